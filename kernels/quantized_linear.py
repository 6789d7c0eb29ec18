"""Linear layers over quantized weights, with parameter names in mlx-lm's layout.

`weight` holds packed uint32 words along the input dimension, `scales` and (for `affine`)
`biases` hold one value per group, exactly as `mx.quantize` produces them, so mlx-lm and
mlx-community checkpoints load unchanged.
"""

import math
import os

import mlx.core as mx
import mlx.nn as nn

from . import dequantize as _dq
from . import fp4_qmv as _fp4
from . import gated_mlp as _gated
from . import large_qmm as _lqmm
from . import qmm as _qmm
from . import qmv as _qmv
from . import selection
from .formats import reference_matmul
from .launch import backend

# The dense layer the models use; a name of our own so the models depend on kernels/ only.
Linear = nn.Linear

QMV_MAX_M = 8  # rows of x up to which the fused GEMV kernel is a candidate
# From this many rows on (to qmm.MAX_M), 16-bit x goes to the tensor-core qmm kernel instead
QMM_MIN_M = int(os.environ.get("MARLIN_MLX_QMM_MIN_M", "2"))
# MARLIN_MLX_LARGE_QMM=1 lets large_qmm compete with dequantize + matmul past qmm's rows. Off by
# default: it wins the per-layer timing at M = 128-512 but made Qwen3-8B's 512- and 1024-token
# prefills slower on the H200 (13-14k against 17-19k tok/s; KERNEL_NOTES, session 15).
LARGE_QMM = os.environ.get("MARLIN_MLX_LARGE_QMM", "0").strip() == "1"
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


def _m_class(M: int) -> str:
    if M > QMV_MAX_M:  # qmm's cost grows with its 16-row tiles: one class per tile count
        if M > 64:  # dequantize + matmul pays the dequantize once, whatever M: time it at M
            return "M65-255" if M < 256 else ("M256-1023" if M < 1024 else "M1024+")
        return "M9-16" if M <= 16 else ("M17-32" if M <= 32 else "M33-64")
    return "M1" if M == 1 else ("M2-4" if M <= 4 else "M5-8")


_M_REP = {"M1": 1, "M2-4": 4, "M5-8": 8, "M9-16": 16, "M17-32": 32, "M33-64": 64, "M65-255": 128,
          "M256-1023": 512, "M1024+": 2048}


def quantized_matmul(x, w, scales, biases=None, group_size: int = 64, bits: int = 4,
                     mode: str = "affine"):
    """y = x @ dequant(w).T, choosing the op by M, format and backend.

    On the CPU backend this is MLX's own quantized_matmul (the reference path). On a GPU, 1
    to 8 rows of 16-bit x over 4-bit affine weights go to the folded tensor-core GEMV (qmv's
    folded body, where it is switched on); otherwise rows of x up to QMV_MAX_M go to the fused
    qmv kernel (affine, mxfp4, nvfp4), affine float16 / bfloat16 x of QMM_MIN_M to 64 rows to
    the tensor-core qmm kernel, larger M (affine) to the dequantize kernel followed by MLX's
    native matmul (or, with MARLIN_MLX_LARGE_QMM=1, to large_qmm where it times faster), each
    only when the measured selection keeps it (first use per shape class: self-test against the
    reference, timing against MLX's built-in); everything else goes to MLX's built-in op.

    Leading dimensions are folded into M first: MLX's kernels treat x (B, 1, K) as B separate
    one-row products, each reading the whole weight (a batched decode step of 32 sequences
    read every weight 32 times: 115 ms instead of ~15 ms on an H200)."""
    if x.ndim > 2 and math.prod(x.shape[:-2]) > 1:
        lead = x.shape[:-1]
        y = quantized_matmul(x.reshape(-1, x.shape[-1]), w, scales, biases, group_size, bits,
                             mode)
        return y.reshape(*lead, y.shape[-1])
    if backend() is not None:
        # one dict lookup per call at decode: the host cost of this function is paid for every
        # linear layer of every token (the choice itself is cached per shape class)
        key = (x.shape, x.dtype, w.shape, scales.dtype, bits, group_size, mode, _env_mode())
        path = _PATHS.get(key)
        if path is None:
            if len(_PATHS) > 4096:  # prompt lengths vary; keep the cache bounded
                _PATHS.clear()
            path = _PATHS[key] = _choose(x, w, scales, biases, group_size, bits, mode)
        if path == _QMV:
            return _qmv.qmv_kernel(x, w, scales, biases, group_size, bits)
        if path == _QMM:
            return _qmm.qmm_kernel(x, w, scales, biases, group_size, bits)
        if path == _FP4:
            return _fp4.fp4_qmv_kernel(x, w, scales, mode)
        if path == _DQMM:
            return _dq_matmul(x, w, scales, biases, group_size, bits)
        if path == _LQMM:
            return _lqmm.large_qmm_kernel(x, w, scales, biases, group_size, bits)
        if path == _DQMM_FP4:
            return _dq_matmul_fp4(x, w, scales, mode)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode=mode)


_BUILTIN, _QMV, _FP4, _DQMM, _DQMM_FP4, _QMM, _LQMM = range(7)
# os.environ.get costs ~1 µs (key encoding); its backing dict answers in ~50 ns
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = selection.ENV_MODE.encode() if isinstance(_ENV_DATA, dict) else None


def _env_mode():
    if _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get(selection.ENV_MODE)
_PATHS: dict = {}


def _choose(x, w, scales, biases, group_size, bits, mode) -> int:
    M = math.prod(x.shape[:-1]) if x.ndim > 1 else 1
    if mode in _fp4.FORMATS:
        key = (_m_class(M), x.dtype, w.shape, mode, selection.mode())
        use = _DECISIONS.get(key)
        if use is None:
            use = _DECISIONS[key] = _decide_fp4(x, w, scales, mode, M)
        return (_FP4 if M <= QMV_MAX_M else _DQMM_FP4) if use else _BUILTIN
    if mode == "affine":
        op = _affine_op(x, w, scales, biases, group_size, bits, M)
        if op == "dq+mm" and LARGE_QMM and _lqmm.supported(x, w, scales, biases, group_size, bits):
            # large_qmm where it measures faster than dequantize + matmul (the selection times
            # the two against each other; at thousands of rows the dense GEMM wins)
            key = (_m_class(M), "lqmm", x.dtype, scales.dtype, w.shape, bits, group_size,
                   selection.mode())
            use = _DECISIONS.get(key)
            if use is None:
                use = _DECISIONS[key] = _decide(x, w, scales, biases, group_size, bits, M, "lqmm")
            if use:
                return _LQMM
        key = (_m_class(M), op, x.dtype, scales.dtype, w.shape, bits, group_size,
               selection.mode(), _qmv.fold_enabled())
        use = _DECISIONS.get(key)
        if use is None:
            use = _DECISIONS[key] = _decide(x, w, scales, biases, group_size, bits, M, op)
        if use:
            return {"qmv": _QMV, "qmm": _QMM, "dq+mm": _DQMM}[op]
    return _BUILTIN


def _affine_op(x, w, scales, biases, group_size, bits, M) -> str:
    """Our candidate for an affine product of M rows (the selection then times it): the folded
    GEMV where it covers the launch (up to 8 rows, read once for all of them), else qmm from
    QMM_MIN_M rows, qmv below, dequantize + matmul past qmv's rows."""
    if _qmv.fold_enabled() and _qmv.fold_supported(x.dtype, scales.dtype, bits, group_size, M,
                                                   x.shape[-1]):
        return "qmv"
    if M >= QMM_MIN_M and _qmm.supported(x, w, scales, biases, group_size, bits):
        return "qmm"
    return "qmv" if M <= QMV_MAX_M else "dq+mm"


_DECISIONS: dict = {}


def _dq_matmul(x, w, scales, biases, group_size, bits):
    """Large M: dequantize to x's dtype with the custom kernel, then MLX's tensor-core matmul."""
    wd = _dq.dequantize_kernel(w, scales, biases, group_size, bits, x.dtype, after=x)
    return x @ wd.T


def _decide(x, w, scales, biases, group_size, bits, M, op) -> bool:
    if w.ndim != 2 or not _qmv.supported(x, w, scales, biases, group_size, bits):
        return False
    N, K = w.shape[0], x.shape[-1]
    fmt = f"affine-b{bits}-g{group_size}"
    if op == "qmv":
        fmt += _qmv.body_tag(x.dtype, scales.dtype, bits, group_size, M, K)
    cls = f"{_m_class(M)}|{x.dtype}|{scales.dtype}|K{K}|N{N}"
    Mt = _M_REP[_m_class(M)]
    xdt, sdt = x.dtype, scales.dtype

    def make_inputs():
        wr = mx.random.normal((N, K), dtype=sdt)  # no float32 copy of a big layer
        q, s, b = mx.quantize(wr, group_size=group_size, bits=bits)
        return mx.random.normal((Mt, K)).astype(xdt), q, s, b

    def custom(xx, q, s, b):
        if op == "qmv":
            return _qmv.qmv_kernel(xx, q, s, b, group_size, bits)
        if op == "qmm":
            return _qmm.qmm_kernel(xx, q, s, b, group_size, bits)
        if op == "lqmm":
            return _lqmm.large_qmm_kernel(xx, q, s, b, group_size, bits)
        return _dq_matmul(xx, q, s, b, group_size, bits)

    def builtin(xx, q, s, b):
        if op == "lqmm":  # the path large_qmm replaces: dequantize + matmul
            return _dq_matmul(xx, q, s, b, group_size, bits)
        return mx.quantized_matmul(xx, q, s, b, transpose=True, group_size=group_size,
                                   bits=bits, mode="affine")

    def reference(xx, q, s, b):
        return reference_matmul(xx, q, s, b, "affine", bits, group_size)

    return selection.use_custom(op, fmt, cls, make_inputs, custom, builtin, reference,
                                SELF_TEST_TOL.get(x.dtype, 1e-2))


def _dq_matmul_fp4(x, w, scales, mode):
    """Large M for mxfp4/nvfp4: dequantize to x's dtype, then MLX's tensor-core matmul (MLX's
    fp4 quantized_matmul measured 7-8x slower than bf16 at M = 512 and 4096 on the H200)."""
    return x @ mx.dequantize(w, scales, mode=mode, dtype=x.dtype).T


def _decide_fp4(x, w, scales, mode, M) -> bool:
    if not _fp4.supported(x, w, scales, mode):
        return False
    N, K = w.shape[0], x.shape[-1]
    gs = _fp4.FORMATS[mode][1]
    Mt, xdt = _M_REP[_m_class(M)], x.dtype

    def make_inputs():
        q, s = mx.quantize(mx.random.normal((N, K), dtype=mx.bfloat16), group_size=gs, bits=4,
                           mode=mode)[:2]
        return mx.random.normal((Mt, K)).astype(xdt), q, s

    small = M <= QMV_MAX_M
    return selection.use_custom(
        "qmv" if small else "dq+mm", mode, f"{_m_class(M)}|{xdt}|K{K}|N{N}", make_inputs,
        (lambda xx, q, s: _fp4.fp4_qmv_kernel(xx, q, s, mode)) if small
        else (lambda xx, q, s: _dq_matmul_fp4(xx, q, s, mode)),
        lambda xx, q, s: _fp4.reference(xx, q, s, mode),
        lambda xx, q, s: reference_matmul(xx, q, s, None, mode, 4, gs),
        SELF_TEST_TOL.get(xdt, 1e-2))


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
        # item access, not attributes: a Module's parameters live in its dict, and attribute
        # lookups that fall through to __getattr__ cost host time at every decode step
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             self.group_size, self.bits, self.mode)
        if "bias" in self:
            y = y + self["bias"]
        return y


# Fused gate/up (one launch over both weights, SiLU·mul in the epilogue) for quantized MLPs at
# decode; MARLIN_MLX_FUSE_MLP=0 turns it off (the probe and benchmarks compare both).
FUSE_GATE_UP = os.environ.get("MARLIN_MLX_FUSE_MLP", "1").strip() != "0"
_GATED: dict = {}


def swiglu(x, gate, up):
    """silu(gate(x)) * up(x) for two Linear or QuantizedLinear layers.

    Quantized affine gate/up without biases, M <= QMV_MAX_M, on a GPU: the fused gated-MLP
    kernel, when the measured selection keeps it (self-test against the reference, timing
    against two built-in quantized matmuls); otherwise the two projections and the activation."""
    if (FUSE_GATE_UP and type(gate) is QuantizedLinear and type(up) is QuantizedLinear
            and backend() is not None):
        gs, bits = gate.group_size, gate.bits
        M = math.prod(x.shape[:-1]) if x.ndim > 1 else 1
        if M <= QMV_MAX_M:
            key = (_m_class(M), x.dtype, gate.scales.dtype, gate.weight.shape, bits, gs,
                   selection.mode())
            use = _GATED.get(key)
            if use is None:
                use = _GATED[key] = _decide_gated(x, gate, up, M)
            if use:
                return _gated.gated_mlp_kernel(x, (gate.weight, gate.scales, gate.biases),
                                               (up.weight, up.scales, up.biases), gs, bits)
    return nn.silu(gate(x)) * up(x)


def _decide_gated(x, gate, up, M) -> bool:
    gs, bits = gate.group_size, gate.bits
    if (gate.mode != "affine" or up.mode != "affine" or (up.group_size, up.bits) != (gs, bits)
            or "bias" in gate or "bias" in up or gate.weight.shape != up.weight.shape
            or gate.scales.dtype != up.scales.dtype
            or not _qmv.supported(x, gate.weight, gate.scales, gate.biases, gs, bits)):
        return False
    N, K = gate.weight.shape[0], x.shape[-1]
    Mt = _M_REP[_m_class(M)]
    xdt, sdt = x.dtype, gate.scales.dtype
    fmt = f"affine-b{bits}-g{gs}"
    cls = f"{_m_class(M)}|{xdt}|{sdt}|K{K}|N{N}"

    def make_inputs():
        ws = [mx.quantize(mx.random.normal((N, K), dtype=sdt), group_size=gs, bits=bits)
              for _ in range(2)]
        return (mx.random.normal((Mt, K)).astype(xdt), *ws[0], *ws[1])

    def custom(xx, q, s, b, q2, s2, b2):
        return _gated.gated_mlp_kernel(xx, (q, s, b), (q2, s2, b2), gs, bits)

    def builtin(xx, q, s, b, q2, s2, b2):
        return _gated.reference(xx, (q, s, b), (q2, s2, b2), gs, bits)

    def reference(xx, q, s, b, q2, s2, b2):
        g = reference_matmul(xx, q, s, b, "affine", bits, gs)
        u = reference_matmul(xx, q2, s2, b2, "affine", bits, gs)
        return g * mx.sigmoid(g) * u

    return selection.use_custom("gated_mlp", fmt, cls, make_inputs, custom, builtin, reference,
                                SELF_TEST_TOL.get(xdt, 1e-2))


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
    cases += [("qmm", 32, 4, mx.float16), ("qmm", 32, 4, mx.bfloat16),
              ("lqmm", 512, 4, mx.bfloat16), ("dq+mm", 512, 4, mx.float16)]
    for op, M, bits, dtype in cases:
        fmt = f"affine-b{bits}-g64"  # "-fold": the folded tensor-core body runs this launch
        if op == "qmv":
            fmt += _qmv.body_tag(dtype, dtype, bits, 64, M, K)
        row = {"op": op, "format": fmt, "dtype": str(dtype).split(".")[-1]}
        if be is None:
            rows.append({**row, "self_test": "skipped", "chosen_path": "reference",
                         "detail": "CPU backend: MLX quantized_matmul"})
            continue
        if op == "lqmm" and not LARGE_QMM:  # opt-in: nothing to measure, the path is not used
            rows.append({**row, "self_test": "n/a", "chosen_path": "off",
                         "detail": "MARLIN_MLX_LARGE_QMM=1 opts in"})
            continue
        try:
            x = mx.zeros((M, K), dtype)
            q, s, b = mx.quantize(mx.zeros((N, K), dtype), group_size=64, bits=bits)
            _decide(x, q, s, b, 64, bits, M, op)  # each op's own record (lqmm may shadow dq+mm)
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
    for mode in _fp4.FORMATS:
        row = {"op": "qmv", "format": mode, "dtype": "bfloat16"}
        if be is None:
            rows.append({**row, "self_test": "skipped", "chosen_path": "reference",
                         "detail": "CPU backend: MLX quantized_matmul"})
            continue
        try:
            gs = _fp4.FORMATS[mode][1]
            x = mx.zeros((1, K), mx.bfloat16)
            q, s = mx.quantize(mx.zeros((N, K), mx.bfloat16), group_size=gs, bits=4, mode=mode)[:2]
            quantized_matmul(x, q, s, None, gs, 4, mode)
            tail = f"|qmv|{mode}|M1|{x.dtype}|K{K}|N{N}"
            recs = [v for k, v in selection.choices().items() if k.endswith(tail)]
            rec = recs[0] if recs else {}
            rows.append({**row, "self_test": rec.get("self_test", f"not run ({selection.mode()})"),
                         "chosen_path": rec.get("chosen_path", "custom"
                                                if selection.mode() == "custom" else "builtin"),
                         "detail": rec.get("detail", f"{selection.ENV_MODE}={selection.mode()}")})
        except Exception as e:  # noqa: BLE001 - the report shows failures, it does not raise
            rows.append({**row, "self_test": "error", "chosen_path": "builtin",
                         "detail": f"{type(e).__name__}: {e}"[:200]})
    rows.append({"op": "small-M product (mxfp4/nvfp4, M 9-64)", "format": "fp formats",
                 "dtype": "all", "self_test": "n/a",
                 "chosen_path": "selected per shape" if be else "reference",
                 "detail": "MLX dequantize + matmul or its quantized_matmul, whichever the "
                           "selection times faster (qmm covers affine only)"})
    return rows
