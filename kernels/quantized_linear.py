"""Linear layers over quantized weights, with parameter names in mlx-lm's layout.

`weight` holds packed uint32 words along the input dimension, `scales` and (for `affine`)
`biases` hold one value per group, exactly as `mx.quantize` produces them, so mlx-lm and
mlx-community checkpoints load unchanged.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from . import dequantize as _dq
from . import qmv as _qmv
from . import selection
from .formats import reference_matmul
from .launch import backend

# The dense layer the models use; a name of our own so the models depend on kernels/ only.
Linear = nn.Linear

QMV_MAX_M = 8  # rows of x up to which the fused GEMV kernel is a candidate
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


def _m_class(M: int) -> str:
    if M > QMV_MAX_M:
        return "M9-64" if M <= 64 else "M65+"
    return "M1" if M == 1 else ("M2-4" if M <= 4 else "M5-8")


_M_REP = {"M1": 1, "M2-4": 4, "M5-8": 8, "M9-64": 32, "M65+": 512}


def quantized_matmul(x, w, scales, biases=None, group_size: int = 64, bits: int = 4,
                     mode: str = "affine"):
    """y = x @ dequant(w).T, choosing the op by M, format and backend.

    On the CPU backend this is MLX's own quantized_matmul (the reference path). On a GPU, rows
    of x up to QMV_MAX_M go to the fused qmv kernel, larger M to the dequantize kernel followed
    by MLX's native matmul, each only when the measured selection keeps it (first use per shape
    class: self-test against the reference, timing against MLX's built-in); everything else
    goes to MLX's built-in op."""
    M = math.prod(x.shape[:-1]) if x.ndim > 1 else 1
    if mode == "affine" and backend() is not None:
        # the decision per shape class is cached here: the per-call host cost matters at decode
        key = (_m_class(M), x.dtype, scales.dtype, w.shape, bits, group_size, selection.mode())
        use = _DECISIONS.get(key)
        if use is None:
            use = _DECISIONS[key] = _decide(x, w, scales, biases, group_size, bits, M)
        if use:
            if M <= QMV_MAX_M:
                return _qmv.qmv_kernel(x, w, scales, biases, group_size, bits)
            return _dq_matmul(x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode=mode)


_DECISIONS: dict = {}


def _dq_matmul(x, w, scales, biases, group_size, bits):
    """Large M: dequantize to x's dtype with the custom kernel, then MLX's tensor-core matmul."""
    wd = _dq.dequantize_kernel(w, scales, biases, group_size, bits, x.dtype)
    return x @ wd.T


def _decide(x, w, scales, biases, group_size, bits, M) -> bool:
    if w.ndim != 2 or not _qmv.supported(x, w, scales, biases, group_size, bits):
        return False
    N, K = w.shape[0], x.shape[-1]
    fmt = f"affine-b{bits}-g{group_size}"
    cls = f"{_m_class(M)}|{x.dtype}|{scales.dtype}|K{K}|N{N}"
    Mt = _M_REP[_m_class(M)]
    op = "qmv" if M <= QMV_MAX_M else "dq+mm"
    xdt, sdt = x.dtype, scales.dtype

    def make_inputs():
        wr = mx.random.normal((N, K), dtype=sdt)  # no float32 copy of a big layer
        q, s, b = mx.quantize(wr, group_size=group_size, bits=bits)
        return mx.random.normal((Mt, K)).astype(xdt), q, s, b

    def custom(xx, q, s, b):
        if op == "qmv":
            return _qmv.qmv_kernel(xx, q, s, b, group_size, bits)
        return _dq_matmul(xx, q, s, b, group_size, bits)

    def builtin(xx, q, s, b):
        return mx.quantized_matmul(xx, q, s, b, transpose=True, group_size=group_size,
                                   bits=bits, mode="affine")

    def reference(xx, q, s, b):
        return reference_matmul(xx, q, s, b, "affine", bits, group_size)

    return selection.use_custom(op, fmt, cls, make_inputs, custom, builtin, reference,
                                SELF_TEST_TOL.get(x.dtype, 1e-2))


class QuantizedLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((output_dims, input_dims))
        q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = q[0], q[1]
        if mode == "affine":
            self.biases = q[2]
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4,
                    mode: str = "affine") -> "QuantizedLinear":
        out_dims, in_dims = linear.weight.shape
        ql = cls(in_dims, out_dims, "bias" in linear, group_size, bits, mode)
        q = mx.quantize(linear.weight, group_size=group_size, bits=bits, mode=mode)
        ql.weight, ql.scales = q[0], q[1]
        if mode == "affine":
            ql.biases = q[2]
        if "bias" in linear:
            ql.bias = linear.bias
        return ql

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self.weight, self.scales, self.get("biases"), self.group_size,
                             self.bits, self.mode)
        if "bias" in self:
            y = y + self.bias
        return y


class QuantizedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dims: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_embeddings, self.dims = num_embeddings, dims
        q = mx.quantize(mx.zeros((num_embeddings, dims)), group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = q[0], q[1]
        if mode == "affine":
            self.biases = q[2]
        self.freeze()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int = 64, bits: int = 4,
                       mode: str = "affine") -> "QuantizedEmbedding":
        n, d = emb.weight.shape
        qe = cls(n, d, group_size, bits, mode)
        q = mx.quantize(emb.weight, group_size=group_size, bits=bits, mode=mode)
        qe.weight, qe.scales = q[0], q[1]
        if mode == "affine":
            qe.biases = q[2]
        return qe

    def __call__(self, ids: mx.array) -> mx.array:
        biases = self.biases[ids] if "biases" in self else None
        return mx.dequantize(self.weight[ids], self.scales[ids], biases, group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        """Tied output projection: x @ embedding.T with the quantized table."""
        return quantized_matmul(x, self.weight, self.scales, self.get("biases"), self.group_size,
                                self.bits, self.mode)


def quantize_modules(model: nn.Module, group_size: int = 64, bits: int = 4, mode: str = "affine",
                     class_predicate=None) -> nn.Module:
    """Swap Linear/Embedding layers for quantized ones, in place.

    Model-specific layers (stacked experts, per-head matrices) quantize themselves through a
    `to_quantized(group_size, bits, mode)` method, the hook mlx-lm's nn.quantize uses too.
    `class_predicate(path, module)` returns False to skip a layer, True to use the defaults, or a
    dict with `group_size`/`bits`/`mode` overrides (mlx-lm's per-layer quantization config).
    Layers whose input dimension the group size does not divide stay as they are.
    """
    replacements = []
    for path, module in model.named_modules():
        plain = isinstance(module, (nn.Linear, nn.Embedding))
        if not plain and not (hasattr(module, "to_quantized") and "weight" in module):
            continue
        choice = True if class_predicate is None else class_predicate(path, module)
        if choice is False:
            continue
        opts = {"group_size": group_size, "bits": bits, "mode": mode}
        if isinstance(choice, dict):
            opts.update({k: v for k, v in choice.items() if k in opts})
        if module.weight.shape[-1] % opts["group_size"] != 0:
            continue
        if isinstance(module, nn.Linear):
            new = QuantizedLinear.from_linear(module, **opts)
        elif isinstance(module, nn.Embedding):
            new = QuantizedEmbedding.from_embedding(module, **opts)
        else:
            new = module.to_quantized(**opts)
        replacements.append((path, new))
    if replacements:
        model.update_modules(nn.utils.tree_unflatten(replacements))
    return model


def doctor_report(shape=(4096, 4096)) -> list[dict]:
    """Each kernel's self-test result and chosen path on this backend (for `marlin-mlx doctor`).

    Runs (or reads from the selection cache) the first-use measurement for the main formats at
    one shape; on the CPU backend nothing is launched and the reference path is reported."""
    be = backend()
    N, K = shape
    rows = []
    cases = [("qmv", 1, bits, dt) for bits in (4, 8, 2) for dt in (mx.float16, mx.bfloat16)]
    cases += [("dq+mm", 32, 4, mx.float16), ("dq+mm", 32, 4, mx.bfloat16)]
    for op, M, bits, dtype in cases:
        fmt = f"affine-b{bits}-g64"
        row = {"op": op, "format": fmt, "dtype": str(dtype).split(".")[-1]}
        if be is None:
            rows.append({**row, "self_test": "skipped", "chosen_path": "reference",
                         "detail": "CPU backend: MLX quantized_matmul"})
            continue
        try:
            x = mx.zeros((M, K), dtype)
            q, s, b = mx.quantize(mx.zeros((N, K), dtype), group_size=64, bits=bits)
            quantized_matmul(x, q, s, b, 64, bits, "affine")
            tail = f"|{op}|{fmt}|{_m_class(M)}|{x.dtype}|{s.dtype}|K{K}|N{N}"
            recs = [v for k, v in selection.choices().items() if k.endswith(tail)]
            forced = selection.mode()
            rec = recs[0] if recs else {}
            rows.append({**row, "self_test": rec.get("self_test", f"not run ({forced})"),
                         "chosen_path": rec.get("chosen_path",
                                                "custom" if forced == "custom" else "builtin"),
                         "detail": rec.get("detail", f"{selection.ENV_MODE}={forced}")})
        except Exception as e:  # noqa: BLE001 - the report shows failures, it does not raise
            rows.append({**row, "self_test": "error", "chosen_path": "builtin",
                         "detail": f"{type(e).__name__}: {e}"[:200]})
    rows.append({"op": "qmm (mxfp4/nvfp4/int8)", "format": "fp formats", "dtype": "all",
                 "self_test": "n/a", "chosen_path": "builtin" if be else "reference",
                 "detail": "MLX quantized_matmul (no custom kernel yet)"})
    return rows
