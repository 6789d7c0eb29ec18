"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") in MLX, producing MLX `affine` tensors.

For a linear layer y = x W^T, GPTQ minimises ||X W^T - X Wq^T||^2 over the calibration inputs X.
With H = 2/n X^T X it quantizes W one input column at a time and spreads each column's error
over the columns not yet quantized, weighted by the inverse Hessian (its upper Cholesky factor
U with H^-1 = U^T U, so column i's error e feeds column j > i as e * U[i, j] / U[i, i]).
Columns are processed in blocks; updates to columns beyond the block are applied once per block
("lazy batch" updates), which is the same arithmetic but far fewer passes over W.

Choices (documented because the result depends on them):
- Group parameters (scale, bias per group of `group_size` input columns) are MLX affine
  min/max parameters computed by mx.quantize on the group's CURRENT weights (already corrected
  by the errors of earlier columns) when the loop reaches the group's first column, then cast to
  the output dtype; codes are rounded against the stored (cast) parameters, and the error fed
  forward is the one of the stored dequantized value.  block_size is rounded up to a multiple of
  group_size so that a group's current values all live in the block being processed.
- act_order: columns are processed in decreasing diag(H).  MLX's affine layout needs groups
  contiguous in the ORIGINAL column order, so act_order uses "static groups": every group's
  parameters are computed up front from the original weights (AutoGPTQ calls this
  static_groups); only the processing order changes, the output layout does not.
- Dampening: damp * mean(diag(H)) is added to the diagonal (retried x10 up to 3 times if the
  Cholesky fails).  Dead columns (diag(H) == 0, input always zero) get diag 1 and
  weight 0: nothing can be learned about them and they never contribute to the output.
- The inverse-Hessian factor is computed in float64 with NumPy/LAPACK (MLX's linalg ops are
  CPU-only and ~30x slower there); the column loop and block updates run in MLX float32.
"""

import re
from collections.abc import Callable, Iterable

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_unflatten

from .kernels.formats import pack, resolve

__all__ = ["collect_hessians", "gptq_quantize", "gptq_quantize_model", "rtn_quantize"]


def _cholesky_inv_upper(H: mx.array, damp: float) -> mx.array:
    """Upper Cholesky factor U of (H + damping)^-1, with U^T U = (H + damping)^-1.

    In float64 NumPy (LAPACK): MLX's linalg ops run on its CPU stream only, and there a
    1536 x 1536 factorization took 7.3 s against ~0.2 s here; float64 is also safer for the
    ill-conditioned Hessians of real layers."""
    Hn = np.array(H, dtype=np.float64)
    K = Hn.shape[0]
    mean_diag = max(float(np.mean(np.diag(Hn))), 1e-12)
    d = damp
    for _ in range(4):
        try:
            Hinv = np.linalg.inv(Hn + (d * mean_diag) * np.eye(K))
            U = np.linalg.cholesky((Hinv + Hinv.T) / 2).T   # Hinv = L L^T, U = L^T
        except np.linalg.LinAlgError:
            U = None
        if U is not None and np.all(np.isfinite(U)) and np.all(np.diag(U) > 0):
            return mx.array(U.astype(np.float32))
        d *= 10
    raise ValueError("H: the Hessian is not positive definite even after dampening")


def _group_params(wg: mx.array, bits: int, group_size: int, dtype):
    """MLX affine (scale, bias) for groups wg [N, g*m] -> float32 arrays [N, m] of the values
    that will be stored (cast to `dtype` and back)."""
    _, s, b = mx.quantize(wg, group_size=group_size, bits=bits)
    return s.astype(dtype).astype(mx.float32), b.astype(dtype).astype(mx.float32)


def _round(w: mx.array, s: mx.array, b: mx.array, qmax: float) -> mx.array:
    # a scale can underflow to 0 once cast to fp16: the whole group then dequantizes to b
    return mx.clip(mx.round((w - b) / mx.where(s == 0, 1.0, s)), 0.0, qmax)


def gptq_quantize(weight: mx.array, H: mx.array, bits: int = 4, group_size: int = 64,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  dtype=None):
    """Quantize weight [N, K] given the Hessian H [K, K] of its inputs.

    Returns (packed uint32 [N, K*bits/32], scales [N, K/g], biases [N, K/g]) in MLX's affine
    layout (scales/biases in `dtype`, default weight's dtype), readable by mx.dequantize."""
    _, bits, group_size = resolve("affine", bits, group_size)
    if not isinstance(weight, mx.array) or weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-D mlx array [N, K], found "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    K = weight.shape[1]
    if K % group_size:
        raise ValueError(f"weight: group_size {group_size} must divide K = {K}")
    if not isinstance(H, mx.array) or tuple(H.shape) != (K, K):
        raise ValueError(f"H: expected shape ({K}, {K}), found "
                         f"{getattr(H, 'shape', type(H).__name__)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp: expected a value in [0, 1), found {damp}")
    dtype = weight.dtype if dtype is None else dtype
    qmax = float((1 << bits) - 1)
    bs = -(-max(block_size, 1) // group_size) * group_size

    W = weight.astype(mx.float32)
    H = H.astype(mx.float32)
    dead = mx.diagonal(H) == 0
    H = H + mx.diag(dead.astype(mx.float32))       # H[i, i] = 1 for dead columns
    W = mx.where(dead[None, :], 0.0, W)

    if act_order:
        static_s, static_b = _group_params(W, bits, group_size, dtype)   # [N, G] each
        perm = mx.argsort(-mx.diagonal(H))
        W = mx.take(W, perm, axis=1)
        H = mx.take(mx.take(H, perm, axis=0), perm, axis=1)
        perm_list = perm.tolist()
    U = _cholesky_inv_upper(H, damp)

    codes = []
    scales, biases = [], []
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        errs = []
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                g = perm_list[col] // group_size
                s, b = static_s[:, g], static_b[:, g]
            else:
                if col % group_size == 0:
                    gs, gb = _group_params(W1[:, i:i + group_size], bits, group_size, dtype)
                    scales.append(gs)
                    biases.append(gb)
                s, b = scales[-1][:, 0], biases[-1][:, 0]
            w = W1[:, i]
            q = _round(w, s, b, qmax)
            codes.append(q)
            err = (w - (q * s + b)) / U1[i, i]
            # U1 is upper triangular, so this only touches columns i.. of the block.
            W1 = W1 - err[:, None] * U1[i][None, :]
            errs.append(err)
        if i2 < K:
            E = mx.stack(errs, axis=1)
            W = mx.concatenate([W[:, :i2], W[:, i2:] - E @ U[i1:i2, i2:]], axis=1)
        mx.eval(W1, W, *codes[i1:], *scales[-1:], *biases[-1:])

    Q = mx.stack(codes, axis=1)
    if act_order:
        Q = mx.take(Q, mx.argsort(perm), axis=1)     # back to the original column order
        S, B = static_s, static_b
    else:
        S, B = mx.concatenate(scales, axis=1), mx.concatenate(biases, axis=1)
    packed = pack(Q.astype(mx.uint32), bits)
    return packed, S.astype(dtype), B.astype(dtype)


def rtn_quantize(weight: mx.array, bits: int = 4, group_size: int = 64):
    """Round-to-nearest baseline (mx.quantize), same output layout as gptq_quantize."""
    return mx.quantize(weight, group_size=group_size, bits=bits)


# ----------------------------------------------------------------------------- Hessians

class _FastLinear(nn.Module):
    """A float Linear evaluated with NumPy for the calibration forwards (no gradients there):
    OpenBLAS's float32 GEMM is ~20x faster than MLX's CPU matmul on the Linux boxes this runs
    on (0.034 s vs 0.65 s for ten 256x512x1536 products), and these forwards dominate GPTQ's
    time.  On a GPU backend MLX's own matmul is used."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        # plain attributes: arrays set on an nn.Module would join its parameter tree
        object.__setattr__(self, "_wt", None)

    def _numpy_out(self, X: np.ndarray, x: mx.array) -> mx.array:
        if self._wt is None:
            object.__setattr__(self, "_wt", np.array(self.inner.weight.astype(mx.float32)).T)
        y = X @ self._wt
        if "bias" in self.inner:
            y += np.array(self.inner.bias.astype(mx.float32))
        return mx.array(y).reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)

    def __call__(self, x):
        if mx.default_device() != mx.cpu:
            return self.inner(x)
        return self._numpy_out(np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32)), x)


class _Recorder(_FastLinear):
    """Wraps a Linear; accumulates H = 2/n sum x x^T over the rows x it sees.

    X^T X (and, on the CPU, the layer's output) is computed in NumPy (see _FastLinear); layers
    fed the very same input array (q/k/v, gate/up) share one product through `shared` (keyed
    by the input's identity, which it keeps alive)."""

    def __init__(self, inner: nn.Module, K: int, shared: dict | None = None):
        super().__init__(inner)
        object.__setattr__(self, "_acc", np.zeros((K, K), dtype=np.float64))
        object.__setattr__(self, "_n", 0)
        object.__setattr__(self, "_shared", {} if shared is None else shared)

    def __call__(self, x):
        m = x.size // x.shape[-1]
        if not m:
            return self.inner(x)
        hit = self._shared.get(id(x))
        if hit is None or hit[0] is not x:
            X = np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32))
            hit = (x, X, (X.T @ X).astype(np.float64))
            self._shared.clear()  # one entry: the layers sharing an input run back to back
            self._shared[id(x)] = hit
        self._acc += hit[2]
        self._n += m
        if mx.default_device() != mx.cpu:
            return self.inner(x)
        return self._numpy_out(hit[1], x)

    @property
    def _H(self):
        return mx.array((self._acc * (2.0 / max(self._n, 1))).astype(np.float32))


def collect_hessians(model: nn.Module, inputs_list: Iterable[mx.array],
                     layer_paths: Iterable[str] | None = None) -> dict:
    """{path: H [K, K] float32} for every nn.Linear (or the given paths) of `model`, from its
    inputs over `model(inputs)` for each element of inputs_list (e.g. int32 token batches
    [B, L]).  H = 2/n X^T X over all n input rows.  The model is restored afterwards."""
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layer_paths is None:
        paths = list(linears)
    else:
        paths = list(layer_paths)
        missing = [p for p in paths if p not in linears]
        if missing:
            raise ValueError(f"layer_paths: not Linear modules of the model: {missing[:5]}")
    return _record(model, paths, linears, lambda: _run_all(model, inputs_list))


def _run_all(model, inputs_list):
    count = 0
    for inputs in inputs_list:
        mx.eval(model(inputs))
        count += 1
    if not count:
        raise ValueError("inputs_list: no calibration inputs")


def _record(model, paths, linears, run, fast=()) -> dict:
    """Hessians of `paths` over whatever `run()` feeds through `model`; the Linears `fast`
    (not recorded) meanwhile run through NumPy too."""
    shared: dict = {}
    recorders = {p: _Recorder(linears[p], linears[p].weight.shape[1], shared) for p in paths}
    swaps = list(recorders.items()) + [(p, _FastLinear(linears[p])) for p in fast
                                       if p not in recorders]
    model.update_modules(tree_unflatten(swaps))
    try:
        run()
    finally:
        model.update_modules(tree_unflatten([(p, m.inner) for p, m in swaps]))
        shared.clear()
    return {p: r._H for p, r in recorders.items()}


def _chunk_key(path: str) -> str:
    m = re.match(r"^(.*?layers\.\d+)\.", path)
    return m.group(1) if m else path


def _decoder_stack(model: nn.Module):
    """(name, stack) of the embedding / layers / norm body models here share, else None."""
    for name in ("model",):
        st = getattr(model, name, None) if isinstance(getattr(model, name, None),
                                                         nn.Module) else None
        if st is not None and all(hasattr(st, a) for a in ("embed_tokens", "layers", "norm")):
            return name, st
    return None


def gptq_quantize_model(model: nn.Module, inputs_list: Iterable[mx.array], bits: int = 4,
                        group_size: int = 64, act_order: bool = False, damp: float = 0.01,
                        block_size: int = 128, layer_paths: Iterable[str] | None = None,
                        sequential: bool = True, dtype=None,
                        progress: Callable[[str], None] | None = None,
                        specs: dict | None = None) -> dict:
    """GPTQ every nn.Linear (or `layer_paths`, or the keys of `specs`) of a float model ->
    {"<p>.weight" (packed), "<p>.scales", "<p>.biases"[, "<p>.bias"]} in MLX's affine layout.
    `specs` {path: (bits, group_size)} gives per-layer widths (default: bits, group_size).

    Memory: one decoder layer at a time.  For models built on the shared decoder stack
    (`model.embed_tokens`, `model.layers`, `model.norm`) the hidden states of every calibration
    input at the current layer's input are kept (n_inputs x L x hidden floats), and each layer
    runs on them alone: its Hessians are collected, its Linears quantized and the Hessians
    dropped before the next layer; other models run whole forwards per layer instead.
    sequential=True (the GPTQ paper's order) writes each quantized layer's dequantized weight
    back into `model` and recomputes that layer's outputs with it, so later layers are
    calibrated on the inputs they will really see; the model is modified in place then.
    Default paths: every nn.Linear whose input dimension group_size divides."""
    inputs_list = list(inputs_list)
    if not inputs_list:
        raise ValueError("inputs_list: no calibration inputs")
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    specs = dict(specs or {})
    if layer_paths is not None:
        paths = list(layer_paths)
    elif specs:
        paths = [p for p in specs if p in linears]
    else:
        paths = [p for p, m in linears.items() if m.weight.shape[1] % group_size == 0]

    # Forward order: numbered layers by index, then un-numbered ones (lm_head) last.
    def order(p):
        nums = [int(n) for n in re.findall(r"\.(\d+)(?:\.|$)", p)]
        return (0, nums, p) if nums else (1, [], p)
    chunks: dict = {}
    for p in sorted(paths, key=order):
        chunks.setdefault(_chunk_key(p), []).append(p)
    out = {}

    def quantize_chunk(chunk, Hs):
        for p in chunk:
            lin = linears[p]
            b, g = specs.get(p, (bits, group_size))
            packed, s, bb = gptq_quantize(lin.weight, Hs.pop(p), b, g, act_order, damp,
                                          block_size, dtype)
            mx.eval(packed, s, bb)
            out[f"{p}.weight"], out[f"{p}.scales"], out[f"{p}.biases"] = packed, s, bb
            if "bias" in lin:
                out[f"{p}.bias"] = lin.bias
            if sequential:
                lin.weight = mx.dequantize(packed, s, bb, group_size=g,
                                           bits=b).astype(lin.weight.dtype)

    found = _decoder_stack(model)
    if found is None:
        for key, chunk in chunks.items():
            if progress:
                progress(key)
            quantize_chunk(chunk, collect_hessians(model, inputs_list, chunk))
        return out

    name, st = found
    hs = [st.embed_tokens(x) for x in inputs_list]
    mx.eval(hs)
    for i, layer in enumerate(st.layers):
        key = f"{name}.layers.{i}"
        chunk = chunks.pop(key, [])
        inside = [p for p in linears if p.startswith(key + ".")]
        outs = []

        def run(keep):
            for h in hs:
                y = layer(h, None)
                mx.eval(y)
                if keep:
                    outs.append(y)

        if chunk:
            if progress:
                progress(key)
            Hs = _record(model, chunk, linears, lambda: run(not sequential), fast=inside)
            quantize_chunk(chunk, Hs)
        if not outs:  # the layer's outputs with its quantized weights (or no chunk at all)
            _record(model, [], linears, lambda: run(True), fast=inside)
        hs = outs
    for key, chunk in chunks.items():  # the output head and anything outside the layers
        if progress:
            progress(key)
        if chunk == ["lm_head"]:
            normed = [st.norm(h) for h in hs]
            Hs = _record(model, chunk, linears,
                         lambda: [mx.eval(model.lm_head(x)) for x in normed])
        else:
            Hs = collect_hessians(model, inputs_list, chunk)
        quantize_chunk(chunk, Hs)
    return out
