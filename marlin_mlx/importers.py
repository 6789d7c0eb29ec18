"""Import GPTQ and AWQ checkpoints into MLX's `affine` format exactly (no second rounding).

Source layouts (K = in_features, N = out_features, b = bits, G = number of groups):

GPTQ (AutoGPTQ / GPTQModel / transformers+optimum `QuantLinear`, checked against AutoGPTQ's
torch dequantization path and GPTQModel's v1<->v2 converters):
  qweight int32 [K*b/32, N]  each COLUMN n is a little-endian bit stream along K: code k sits at
                             bits [k*b, (k+1)*b) of column n, word w = bits [32w, 32w+32).
                             For b = 2/4/8 a word holds 32/b whole codes (code k at shift
                             b*(k % (32/b))); for b = 3 32 codes fill 3 words and codes 10 and 21
                             straddle words -- the same stream.
  qzeros  int32 [G, N*b/32]  zero points, each ROW a little-endian bit stream along N.
  scales  fp16  [G, N]
  g_idx   int32 [K]          group of input channel k; arange(K) // g unless act-order (desc_act).
  Dequantization: W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k], where
  zero = stored field + 1 for checkpoint_format "gptq" (v1, the historical AutoGPTQ offset:
  the field is masked to b bits, then 1 is added, so zero ranges 1..2^b) and zero = field for
  "gptq_v2".  Symmetric checkpoints store zero 2^(b-1) like any other (0x77777777 at 4 bits in v1).

AWQ (AutoAWQ "gemm" version, 4-bit only):
  qweight int32 [K, N/8]     each ROW packs 8 output channels per word in the interleaved order
                             [0, 2, 4, 6, 1, 3, 5, 7]: nibble i of word c holds channel 8c+order[i].
  qzeros  int32 [G, N/8]     same interleave; no +1 offset.   scales fp16 [G, N].
  W[n, k] = scales[k // g, n] * (q[k, n] - zero[k // g, n]).

Target (kernels/formats.py): packed uint32 [N, K*b/32] (each row a little-endian bit stream
along K), scales and biases [N, K/g'], w = scale * q + bias.  We set bias = -scale * zero and keep
scales/biases in FLOAT32: a fp16 scale has 11 significant bits and |zero|, |q - zero| <= 256, so
-scale*zero, q*scale and their sum are all exact in float32, i.e. the affine dequantization
(mx.dequantize in the scales' dtype) equals scale*(q - zero) exactly.  In fp16 the bias would
round (a second rounding); pass dtype=mx.float16 only if that is acceptable.
Group sizes: MLX affine takes 32/64/128; a larger source group (256, or -1 = one group over K) is
re-expressed exactly by repeating its scale/bias over several 128-wide groups.

Act-order (g_idx not equal to arange(K)//g): sorting the input channels by g_idx makes every
group contiguous.  We store W with its columns permuted, W'[:, j] = W[:, perm[j]], so
x @ W.T == x[..., perm] @ W'.T.  The layer must therefore gather its input first:
`apply_input_perm(x, perm)`.  `import_quantized` returns the permutation as `<path>.input_perm`
(int32 [K]); the loader has to apply it before the matmul of that layer.
"""


import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from .kernels import QuantizedLinear
from .kernels.formats import pack

__all__ = [
    "AWQ_ORDER",
    "GPTQ_BITS",
    "PermutedQuantizedLinear",
    "apply_input_perm",
    "apply_input_perms",
    "awq_to_affine",
    "detect_quantized_format",
    "gptq_to_affine",
    "import_quantized",
]

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_MLX_GROUPS = (128, 64, 32)


def _np(a, name: str) -> np.ndarray:
    if isinstance(a, mx.array):
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        return np.array(a)
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "numpy"):   # torch tensors
        return a.numpy()
    raise ValueError(f"{name}: expected an mlx or numpy array, found {type(a).__name__}")


def _packed_arrays(qweight, qzeros, scales) -> tuple:
    """qweight and qzeros as uint32 words, scales as a 2-D float array [G, N] (checked)."""
    sc = _np(scales, "scales")
    if sc.ndim != 2 or not np.issubdtype(sc.dtype, np.floating):
        raise ValueError(f"scales: expected a 2-D float array [G, N], found {sc.dtype} "
                         f"{tuple(sc.shape)}")
    return _words(qweight, "qweight"), _words(qzeros, "qzeros"), sc


def _words(a, name: str) -> np.ndarray:
    a = _np(a, name)
    if a.dtype not in (np.int32, np.uint32):
        raise ValueError(f"{name}: expected int32 packed words, found {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected 2 dimensions, found shape {tuple(a.shape)}")
    return a.view(np.uint32)


def _unpack_stream(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """Codes along `axis` from a little-endian bit stream of uint32 words along that axis."""
    w = np.moveaxis(words, axis, 0).astype(np.uint64)
    w = np.concatenate([w, np.zeros((1,) + w.shape[1:], np.uint64)])   # for the straddle read
    off = np.arange(count, dtype=np.int64) * bits
    idx, sh = off // 32, (off % 32).astype(np.uint64)
    pair = w[idx] | (w[idx + 1] << np.uint64(32))
    codes = (pair >> sh.reshape((-1,) + (1,) * (w.ndim - 1))) & np.uint64((1 << bits) - 1)
    return np.moveaxis(codes.astype(np.int64), 0, axis)


def _out_group(g: int, what: str) -> int:
    for t in _MLX_GROUPS:
        if g % t == 0:
            return t
    raise ValueError(f"{what}: group size {g} cannot be expressed as MLX affine groups "
                     f"(needs a multiple of 32)")


def _to_affine(q_kn: np.ndarray, zeros_gn: np.ndarray, scales_gn: np.ndarray,
               g_idx: np.ndarray | None, bits: int, dtype, what: str) -> dict:
    """Shared tail: q [K, N] codes, zeros/scales [G, N] -> affine tensors (+ input_perm)."""
    K = q_kn.shape[0]
    G = scales_gn.shape[0]
    if K % G:
        raise ValueError(f"{what}: {G} groups do not divide K = {K}")
    gsz = K // G
    natural = np.arange(K) // gsz
    perm = None
    if g_idx is not None and not np.array_equal(g_idx, natural):
        if g_idx.min() < 0 or g_idx.max() >= G:
            raise ValueError(f"{what}: g_idx values must lie in [0, {G - 1}]")
        perm = np.argsort(g_idx, kind="stable")
        if not np.array_equal(g_idx[perm], natural):
            raise ValueError(f"{what}: g_idx does not give every group {gsz} channels; "
                             "cannot make groups contiguous")
        q_kn = q_kn[perm]
    gout = _out_group(gsz, what)
    rep = gsz // gout
    s64 = scales_gn.astype(np.float64)
    b64 = -s64 * zeros_gn.astype(np.float64)
    scales = np.repeat(s64.T, rep, axis=1)
    biases = np.repeat(b64.T, rep, axis=1)
    out = {
        "weight": pack(mx.array(np.ascontiguousarray(q_kn.T).astype(np.uint32)), bits),
        "scales": mx.array(scales.astype(np.float32)).astype(dtype),
        "biases": mx.array(biases.astype(np.float32)).astype(dtype),
        "group_size": gout,
    }
    if perm is not None:
        out["input_perm"] = mx.array(perm.astype(np.int32))
    return out


def gptq_to_affine(qweight, qzeros, scales, g_idx=None, *, bits: int,
                   group_size: int | None = None,
                   checkpoint_format: str = "gptq", dtype=mx.float32) -> dict:
    """One GPTQ linear -> {"weight", "scales", "biases", "group_size"[, "input_perm"]}.

    group_size is only checked against the tensors (G = scales.shape[0] decides; -1 = one group).
    checkpoint_format: "gptq" (v1, zeros stored minus one) or "gptq_v2"."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits: GPTQ import supports bits {GPTQ_BITS}, found {bits}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', found "
                         f"{checkpoint_format!r}")
    qw, qz, sc = _packed_arrays(qweight, qzeros, scales)
    G, N = sc.shape
    if (qw.shape[0] * 32) % bits:
        raise ValueError(f"qweight: {qw.shape[0]} rows do not hold whole {bits}-bit codes")
    K = qw.shape[0] * 32 // bits
    if qw.shape[1] != N:
        raise ValueError(f"qweight: expected {N} columns (scales {tuple(sc.shape)}), found "
                         f"shape {tuple(qw.shape)}")
    if qz.shape[0] != G or qz.shape[1] * 32 != N * bits:
        raise ValueError(f"qzeros: expected shape ({G}, {N * bits // 32}) for N={N}, "
                         f"bits={bits}, found {tuple(qz.shape)}")
    if group_size is not None and group_size != -1 and G != -(-K // group_size):
        raise ValueError(f"scales: {G} groups do not match K={K} with group_size={group_size}")
    gi = None
    if g_idx is not None:
        gi = _np(g_idx, "g_idx").astype(np.int64).reshape(-1)
        if gi.shape[0] != K:
            raise ValueError(f"g_idx: expected {K} entries (K from qweight), found {gi.shape[0]}")
    q = _unpack_stream(qw, bits, K, axis=0)
    z = _unpack_stream(qz, bits, N, axis=1)
    if checkpoint_format == "gptq":
        z = z + 1
    return _to_affine(q, z, sc, gi, bits, dtype, "gptq")


def awq_to_affine(qweight, qzeros, scales, *, bits: int = 4, group_size: int | None = None,
                  dtype=mx.float32) -> dict:
    """One AutoAWQ GEMM linear -> {"weight", "scales", "biases", "group_size"}."""
    if bits != 4:
        raise ValueError(f"bits: AWQ import supports 4-bit GEMM checkpoints, found {bits}")
    qw, qz, sc = _packed_arrays(qweight, qzeros, scales)
    G, N = sc.shape
    K = qw.shape[0]
    if qw.shape[1] * 8 != N:
        raise ValueError(f"qweight: expected shape ({K}, {N // 8}) for N={N}, found "
                         f"{tuple(qw.shape)}")
    if qz.shape != (G, N // 8):
        raise ValueError(f"qzeros: expected shape ({G}, {N // 8}), found {tuple(qz.shape)}")
    if group_size is not None and group_size != -1 and G * group_size != K:
        raise ValueError(f"scales: {G} groups do not match K={K} with group_size={group_size}")
    inv = np.argsort(AWQ_ORDER)   # channel j of a word sits in nibble inv[j]

    def deinterleave(words):
        raw = _unpack_stream(words, 4, words.shape[1] * 8, axis=1)
        return raw.reshape(raw.shape[0], -1, 8)[:, :, inv].reshape(raw.shape[0], -1)

    return _to_affine(deinterleave(qw), deinterleave(qz), sc, None, 4, dtype, "awq")


def apply_input_perm(x: mx.array, perm: mx.array) -> mx.array:
    """x[..., perm]: the input gather an act-order layer needs before its affine matmul."""
    return mx.take(x, perm, axis=-1)


class PermutedQuantizedLinear(QuantizedLinear):
    """QuantizedLinear of an act-order import: y = x[..., input_perm] @ W'.T (+ bias).
    Parameters are named as QuantizedLinear's plus `input_perm` (int32 [K])."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__(input_dims, output_dims, bias, group_size, bits, mode)
        self.input_perm = mx.arange(input_dims, dtype=mx.int32)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(apply_input_perm(x, self.input_perm))


def apply_input_perms(model, weights: dict) -> None:
    """For each `<p>.input_perm` in weights, swap the QuantizedLinear at p (already created,
    e.g. by the loader's quantize step) for a PermutedQuantizedLinear, in place; call it before
    model.load_weights."""
    modules = dict(model.named_modules())
    swaps = []
    for k in weights:
        if not k.endswith(".input_perm"):
            continue
        p = k[: -len(".input_perm")]
        m = modules.get(p)
        if not isinstance(m, QuantizedLinear):
            raise ValueError(f"{k}: {p} is not a QuantizedLinear of the model")
        n, k_in = m.scales.shape[0], m.scales.shape[1] * m.group_size
        swaps.append((p, PermutedQuantizedLinear(k_in, n, "bias" in m, m.group_size, m.bits,
                                                 m.mode)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


# ----------------------------------------------------------------------------- whole checkpoints

def _quant_block(config: dict) -> dict | None:
    """The quantization dict of a config.json (quantization_config) or a quantize_config.json."""
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"]
    return config


def detect_quantized_format(config: dict) -> str | None:
    """'gptq' | 'awq' | None from config.json (or quantize_config.json's contents)."""
    q = _quant_block(config)
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return method
    if not method and "bits" in q and ("desc_act" in q or "damp_percent" in q):
        return "gptq"   # AutoGPTQ's quantize_config.json has no quant_method
    return None


def import_quantized(weights: dict, quant_config: dict, dtype=mx.float32):
    """Convert a checkpoint's weight dict -> (affine weights, mlx-lm `quantization` block).

    `<p>.qweight/.qzeros/.scales[/.g_idx]` become `<p>.weight/.scales/.biases` (+ `<p>.input_perm`
    for act-order layers: the loader must then compute x[..., input_perm] before that layer).
    An all-zero `<p>.bias` (AutoGPTQ writes one for bias-free linears) is dropped; other tensors
    pass through unchanged."""
    fmt = detect_quantized_format(quant_config)
    if fmt is None:
        raise ValueError("quant_config: not a GPTQ or AWQ quantization config")
    q = _quant_block(quant_config)
    bits = int(q.get("bits", q.get("w_bit", 4)))
    group_size = int(q.get("group_size", q.get("q_group_size", 128)))
    if fmt == "gptq":
        cf = str(q.get("checkpoint_format", "gptq")).lower()
        if q.get("is_marlin_format") or cf not in ("gptq", "gptq_v2"):
            raise ValueError(f"quant_config: GPTQ checkpoint_format {cf!r} is not supported "
                             "(expected gptq or gptq_v2)")
    else:
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quant_config: AWQ version {version!r} is not supported "
                             "(expected gemm)")
        if q.get("zero_point") is False:
            raise ValueError("quant_config: AWQ without zero points is not supported")
    prefixes = [k[: -len(".qweight")] for k in weights if k.endswith(".qweight")]
    out = {k: v for k, v in weights.items()
           if not any(k.startswith(p + ".") for p in prefixes)}
    groups = {}
    for p in prefixes:
        try:
            if fmt == "gptq":
                r = gptq_to_affine(weights[p + ".qweight"], weights[p + ".qzeros"],
                                   weights[p + ".scales"], weights.get(p + ".g_idx"), bits=bits,
                                   group_size=group_size, checkpoint_format=cf, dtype=dtype)
            else:
                r = awq_to_affine(weights[p + ".qweight"], weights[p + ".qzeros"],
                                  weights[p + ".scales"], bits=bits, group_size=group_size,
                                  dtype=dtype)
        except KeyError as e:
            raise ValueError(f"{p}: missing tensor {e.args[0]}") from None
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        groups[p] = r.pop("group_size")
        for name, v in r.items():
            out[f"{p}.{name}"] = v
        b = weights.get(p + ".bias")
        if b is not None and np.any(_np(b, p + ".bias") != 0):
            out[p + ".bias"] = b
    common = max(set(groups.values()), key=list(groups.values()).count) if groups else 64
    block = {"group_size": common, "bits": bits, "mode": "affine"}
    for p, g in groups.items():
        if g != common:   # mlx-lm's per-layer override form
            block[p] = {"group_size": g, "bits": bits, "mode": "affine"}
    return out, block
