"""Quantization formats: layouts, quantize/dequantize/pack/unpack, the MLX reference matmul.

Everything here is plain MLX ops; it is the oracle for the custom kernels and the CPU path.
Layout facts (checked against MLX 0.32.4 on CPU and its source, mlx/ops.cpp and
mlx/backend/cpu/quantized.cpp); a weight W has shape (..., N, K), K the input dimension:

Packing (all formats).  Each row of K codes is one little-endian bit stream, code i at bits
[i*b, (i+1)*b) of the row, stored as uint32 words (bit j of the stream = bit j % 32 of word
j // 32).  `packed` has shape (..., N, K*b/32).  For b = 1, 2, 4, 8 a word holds 32/b whole
codes, code 0 in the lowest bits (4-bit codes 0..7 -> 0x76543210).  For b = 3, 5, 6 codes
straddle words: 32 codes fill b words (6-bit: 16 codes in 3 words), e.g. 3-bit code 10 is
bits 30-31 of word 0 plus bit 0 of word 1.  MLX's CPU kernels read such rows byte-wise (3-bit:
8 codes per 3 bytes; 5-bit: 8 per 5 bytes; 6-bit: 4 per 3 bytes), which is the same stream.

affine  bits 1, 2, 3, 4, 5, 6, 8 (MLX 0.32.4 accepts 1; DESIGN.md targets 2-8), groups 32,
        64, 128.  w = scale * q + bias, q unsigned in [0, 2^b - 1]; `scales` and `biases` have
        shape (..., N, K/g) and w's dtype.  mx.quantize computes in float32 per group:
        s = max((max - min) / (2^b - 1), 1e-7), negated unless |min| > |max|; edge = min if
        |min| > |max| else max; q0 = rint(edge / s); if q0 != 0: s = edge / q0, bias = edge,
        else bias = 0 (so the larger-magnitude edge is exact); q = clip(rint((w - bias) / s),
        0, 2^b - 1); then scales/biases are cast to w's dtype (rint = round half to even).
        1-bit groups skip the edge step: s = max(max - min, 1e-7) > 0, bias = min.
        mx.dequantize computes q * scale + bias in the scales' dtype (two roundings, no fma),
        then casts to the requested dtype.
mxfp4   bits 4, group 32.  Codes are FP4 E2M1: bit 3 sign, magnitudes [0, .5, 1, 1.5, 2, 3, 4,
        6] for codes 0-7.  `scales` uint8 E8M0: scale = 2^(s - 127) (s = 0 decodes as 2^-127,
        255 as inf); no biases.  Quantize (CPU): a = max|w| / 6 (in w's dtype),
        e = ceil(log2(a)) computed EXACTLY from a's float32 bits (0 when a == 0; mlx's main
        branch source read in Aug 2026 had round(log2(a)); 0.32.4 measurably does exact ceil),
        s = e + 127, v = w / 2^e (so |v| <= 6), code = nearest E2M1 value with ties toward
        the SMALLER magnitude (0.25 -> 0, 0.75 -> 0.5, 1.25 -> 1, 2.5 -> 2, 5 -> 4), and -0
        never produced (negative values that round to 0 give code 0).
nvfp4   bits 4, group 16.  FP4 E2M1 codes as above; `scales` uint8 E4M3 (bias 7, no inf,
        0x7F = NaN, max 448, subnormals m * 2^-9); no biases.  Quantize: a = max|w| / 6 in
        w's dtype, s = e4m3(a) (round to nearest even, >= 464 saturates to 448), v = w / s in
        w's dtype, code as for mxfp4 (v non-finite, i.e. s == 0, gives code 0).  No global
        scale here (mx.quantize's optional `global_scale` is not supported).
mxfp8   bits 8, group 32: E4M3 bytes (encoding as nvfp4's scales) with E8M0 scales; a = max|w|
        / 448, e and v as mxfp4, code = e4m3(v).
int8    ours: bits 8, groups 32, 64, 128, symmetric.  scale = absmax / 127 (float32, then cast
        to w's dtype: `scales` (..., N, K/g) in w's dtype), q = clip(rint(w / scale), -127,
        127) against the stored scale (q = 0 where scale == 0), no biases, w = q * scale.
        q is stored as a two's-complement byte, 4 per uint32 little-endian (byte i of a word =
        code i, i.e. the 8-bit stream above).

Dequantized values: mxfp4/nvfp4/mxfp8 products (value * scale) are exact in bf16/fp16/fp32
unless they under/overflow; affine is not (q * s + b rounds).  reference_matmul dequantizes in
float32 (scales and biases upcast first), the natural oracle for kernels that do the same.

Known differences in MLX itself: on a GPU stream mx.quantize for mxfp4/nvfp4 runs kernels
that may round E2M1 ties to even and keep -0 (the C++ to_fp4_e2m1 in the source does), unlike
the CPU path matched here; mx.quantize(mode="nvfp4") on CPU fails unless the total element
count is a multiple of 32 (our quantize has no such limit).  mx.dequantize of fp formats
defaults to bfloat16 output; ours too.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

__all__ = ["FORMATS", "Format", "get_format", "resolve", "bits_per_weight", "quantize",
           "dequantize", "pack", "unpack", "reference_matmul", "validate_quantized",
           "validate_weights", "validate_quantize_input", "e4m3_encode", "e4m3_decode",
           "e8m0_decode", "fp4_encode", "fp4_decode", "FP4_VALUES"]


@dataclass(frozen=True)
class Format:
    name: str
    bits: tuple
    group_sizes: tuple
    default_bits: int
    default_group_size: int
    scale_kind: str   # "float" (w's dtype), "e8m0" or "e4m3" (uint8)
    has_biases: bool
    description: str


FORMATS = {
    "affine": Format("affine", (1, 2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64, "float", True,
                     "MLX affine: w = scale * q + bias, unsigned b-bit codes"),
    "mxfp4": Format("mxfp4", (4,), (32,), 4, 32, "e8m0", False,
                    "FP4 E2M1 values, power-of-two E8M0 scales (OCP MX)"),
    "nvfp4": Format("nvfp4", (4,), (16,), 4, 16, "e4m3", False,
                    "FP4 E2M1 values, FP8 E4M3 scales (NVIDIA)"),
    "mxfp8": Format("mxfp8", (8,), (32,), 8, 32, "e8m0", False,
                    "FP8 E4M3 values, power-of-two E8M0 scales (OCP MX)"),
    "int8": Format("int8", (8,), (32, 64, 128), 8, 64, "float", False,
                   "symmetric int8: w = scale * q, q in [-127, 127], scale = absmax / 127"),
}

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive E2M1 magnitudes; a magnitude equal to one rounds down.
_FP4_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"fmt: unsupported quantization format {fmt!r} "
                         f"(expected one of {', '.join(FORMATS)})")
    return FORMATS[fmt]


def resolve(fmt: str, bits: Optional[int] = None, group_size: Optional[int] = None):
    """(Format, bits, group_size) with defaults filled in; ValueError for unsupported combos."""
    f = get_format(fmt)
    bits = f.default_bits if bits is None else bits
    group_size = f.default_group_size if group_size is None else group_size
    if bits not in f.bits:
        raise ValueError(f"bits: {fmt} supports bits {', '.join(map(str, f.bits))}; found {bits}")
    if group_size not in f.group_sizes:
        raise ValueError(f"group_size: {fmt} supports group sizes "
                         f"{', '.join(map(str, f.group_sizes))}; found {group_size}")
    return f, bits, group_size


def bits_per_weight(fmt: str, bits: Optional[int] = None, group_size: Optional[int] = None,
                    scale_bits: int = 16) -> float:
    """Storage per weight including scales/biases; `scale_bits` is the float scale width."""
    f, bits, group_size = resolve(fmt, bits, group_size)
    per_group = scale_bits if f.scale_kind == "float" else 8
    if f.has_biases:
        per_group += scale_bits
    return bits + per_group / group_size


# ----------------------------------------------------------------------------- validation

def _is_float(dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating)


def _shape_str(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def validate_quantize_input(w: mx.array, fmt: str = "affine", bits: Optional[int] = None,
                            group_size: Optional[int] = None):
    """Check a weight before quantize(); returns (Format, bits, group_size)."""
    f, bits, group_size = resolve(fmt, bits, group_size)
    if not isinstance(w, mx.array):
        raise ValueError(f"w: expected an mlx array, found {type(w).__name__}")
    if not _is_float(w.dtype):
        raise ValueError(f"w: expected a floating dtype, found {w.dtype}")
    if w.ndim < 2:
        raise ValueError(f"w: expected at least 2 dimensions (..., N, K), found shape "
                         f"{_shape_str(w.shape)}")
    if w.shape[-1] % group_size:
        raise ValueError(f"w: group_size {group_size} must divide K = w.shape[-1] = {w.shape[-1]}")
    return f, bits, group_size


def validate_weights(packed: mx.array, scales: mx.array, biases: Optional[mx.array], fmt: str,
                     bits: Optional[int], group_size: Optional[int], K: Optional[int] = None):
    """Check a quantized weight triple; returns (N, K).  K, if given, is the expected input dim."""
    f, bits, group_size = resolve(fmt, bits, group_size)
    for name, a in (("packed", packed), ("scales", scales)):
        if not isinstance(a, mx.array):
            raise ValueError(f"{name}: expected an mlx array, found {type(a).__name__}")
    if packed.dtype != mx.uint32:
        raise ValueError(f"packed: expected dtype uint32, found {packed.dtype}")
    if packed.ndim < 2:
        raise ValueError(f"packed: expected at least 2 dimensions (..., N, K*bits/32), found "
                         f"shape {_shape_str(packed.shape)}")
    if K is None:
        if (packed.shape[-1] * 32) % bits:
            raise ValueError(f"packed: {packed.shape[-1]} words do not hold a whole number of "
                             f"{bits}-bit codes")
        K = packed.shape[-1] * 32 // bits
    if K % group_size:
        raise ValueError(f"group_size: {group_size} must divide K = {K}")
    if (K * bits) % 32:
        raise ValueError(f"K: {K} {bits}-bit codes do not fill whole uint32 words")
    lead, N = packed.shape[:-2], packed.shape[-2]
    want = (*lead, N, K * bits // 32)
    if tuple(packed.shape) != want:
        raise ValueError(f"packed: expected shape {_shape_str(want)} for K={K}, bits={bits}, "
                         f"found {_shape_str(packed.shape)}")
    want_s = (*lead, N, K // group_size)
    if f.scale_kind == "float":
        if not _is_float(scales.dtype):
            raise ValueError(f"scales: expected a floating dtype for {fmt}, found {scales.dtype}")
    elif scales.dtype != mx.uint8:
        raise ValueError(f"scales: expected dtype uint8 ({f.scale_kind}) for {fmt}, "
                         f"found {scales.dtype}")
    if tuple(scales.shape) != want_s:
        raise ValueError(f"scales: expected shape {_shape_str(want_s)} for K={K}, "
                         f"group_size={group_size}, found {_shape_str(scales.shape)}")
    if f.has_biases:
        if biases is None:
            raise ValueError(f"biases: required for {fmt}, found None")
        if not isinstance(biases, mx.array):
            raise ValueError(f"biases: expected an mlx array, found {type(biases).__name__}")
        if not _is_float(biases.dtype):
            raise ValueError(f"biases: expected a floating dtype, found {biases.dtype}")
        if tuple(biases.shape) != want_s:
            raise ValueError(f"biases: expected shape {_shape_str(want_s)}, found "
                             f"{_shape_str(biases.shape)}")
    elif biases is not None:
        raise ValueError(f"biases: {fmt} has no biases; expected None, found an array")
    return N, K


def validate_quantized(x: mx.array, packed: mx.array, scales: mx.array,
                       biases: Optional[mx.array], fmt: str = "affine",
                       bits: Optional[int] = None, group_size: Optional[int] = None):
    """Check the inputs of y = x @ dequant(W).T before any launch; returns (N, K)."""
    if not isinstance(x, mx.array):
        raise ValueError(f"x: expected an mlx array, found {type(x).__name__}")
    if not _is_float(x.dtype):
        raise ValueError(f"x: expected a floating dtype, found {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension (..., K), found a scalar")
    _, bits, group_size = resolve(fmt, bits, group_size)
    K = x.shape[-1]
    # When packed and scales agree on a K, a different x is x's fault; otherwise check the
    # weight against x's K, so that the message names the array that disagrees.
    if (isinstance(packed, mx.array) and isinstance(scales, mx.array) and packed.ndim >= 1
            and scales.ndim >= 1 and (packed.shape[-1] * 32) % bits == 0):
        Kw = packed.shape[-1] * 32 // bits
        if Kw == scales.shape[-1] * group_size and Kw != K:
            raise ValueError(f"x: last dimension {K} does not match the weight's K = {Kw} "
                             f"(packed {_shape_str(packed.shape)} with {bits}-bit codes)")
    return validate_weights(packed, scales, biases, fmt, bits, group_size, K=K)


# ----------------------------------------------------------------------------- bit streams

def _block(bits: int):
    """Smallest run of codes that fills whole words: (codes, words) per block."""
    for n in (1, 2, 4, 8, 16, 32):
        if (n * bits) % 32 == 0:
            return n, n * bits // 32
    raise ValueError(f"bits: unsupported code width {bits}")


def _stream_positions(bits: int):
    n, words = _block(bits)
    pos = [j * bits for j in range(n)]
    w0 = [p // 32 for p in pos]
    sh = [p % 32 for p in pos]
    straddle = [s + bits > 32 for s in sh]
    return n, words, w0, sh, straddle


def _pack_stream(codes: mx.array, bits: int) -> mx.array:
    """Pack in-range codes (..., K) without checking them (no evaluation)."""
    n, words, w0, sh, straddle = _stream_positions(bits)
    lead = codes.shape[:-1]
    c = codes.astype(mx.uint32).reshape(*lead, -1, n)
    if words == 1:   # 1/2/4/8 bits: whole codes per word
        return mx.sum(mx.left_shift(c, mx.array(sh, mx.uint32)), -1)
    lo = mx.left_shift(c, mx.array(sh, mx.uint32))  # bits past 32 fall off: they go to `hi`
    hi_shift = mx.array([32 - s if st else 0 for s, st in zip(sh, straddle)], mx.uint32)
    zero = mx.array(0, mx.uint32)
    hi = mx.where(mx.array(straddle), mx.right_shift(c, hi_shift), zero)
    out = []
    for t in range(words):
        sel_lo = mx.array([a == t for a in w0])
        sel_hi = mx.array([st and a + 1 == t for a, st in zip(w0, straddle)])
        # Codes never overlap, so summing the pieces of a word equals OR-ing them.
        out.append(mx.sum(mx.where(sel_lo, lo, zero), -1) + mx.sum(mx.where(sel_hi, hi, zero), -1))
    return mx.stack(out, -1).reshape(*lead, -1)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack unsigned integer codes (..., K) in [0, 2^bits) into MLX's uint32 stream
    (..., K*bits/32).

    Raises ValueError for codes out of range (this evaluates `codes`)."""
    if bits not in (1, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits: expected one of 1, 2, 3, 4, 5, 6, 8, found {bits}")
    if not isinstance(codes, mx.array) or not mx.issubdtype(codes.dtype, mx.integer):
        raise ValueError(f"codes: expected an integer mlx array, found "
                         f"{getattr(codes, 'dtype', type(codes).__name__)}")
    n, words, w0, sh, straddle = _stream_positions(bits)
    if codes.ndim < 1 or codes.shape[-1] % n:
        raise ValueError(f"codes: last dimension must be a multiple of {n} for {bits}-bit "
                         f"packing, found shape {_shape_str(codes.shape)}")
    if codes.size and (mx.min(codes).item() < 0 or mx.max(codes).item() >= (1 << bits)):
        raise ValueError(f"codes: values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    return _pack_stream(codes, bits)


def _unpack_bits(packed: mx.array, bits: int) -> mx.array:
    n, words, w0, sh, straddle = _stream_positions(bits)
    lead = packed.shape[:-1]
    blocks = packed.reshape(*lead, -1, words)
    lo = mx.right_shift(mx.take(blocks, mx.array(w0), axis=-1), mx.array(sh, mx.uint32))
    if any(straddle):
        w1 = mx.array([min(a + 1, words - 1) for a in w0])
        hi_shift = mx.array([32 - s if st else 0 for s, st in zip(sh, straddle)], mx.uint32)
        hi = mx.left_shift(mx.take(blocks, w1, axis=-1), hi_shift)
        lo = lo | mx.where(mx.array(straddle), hi, mx.array(0, mx.uint32))
    codes = lo & mx.array((1 << bits) - 1, mx.uint32)
    return codes.reshape(*lead, -1)


def unpack(packed: mx.array, fmt: str = "affine", bits: Optional[int] = None) -> mx.array:
    """Integer codes (..., K) from packed words: uint8 codes; int8 values for fmt="int8"."""
    f = get_format(fmt)
    bits = f.default_bits if bits is None else bits
    if bits not in f.bits:
        raise ValueError(f"bits: {fmt} supports bits {', '.join(map(str, f.bits))}; found {bits}")
    if not isinstance(packed, mx.array) or packed.dtype != mx.uint32:
        raise ValueError(f"packed: expected dtype uint32, found "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.ndim < 1 or packed.shape[-1] % _block(bits)[1]:
        raise ValueError(f"packed: last dimension must be a multiple of {_block(bits)[1]} words "
                         f"for {bits}-bit codes, found shape {_shape_str(packed.shape)}")
    codes = _unpack_bits(packed, bits)
    if fmt == "int8":
        c = codes.astype(mx.int32)
        return mx.where(c >= 128, c - 256, c).astype(mx.int8)
    return codes.astype(mx.uint8)


# ----------------------------------------------------------------------------- fp8 / fp4 codecs

def _floor_log2(a: mx.array) -> mx.array:
    """Exponent field of positive float32 values, unbiased (int32)."""
    bits_ = mx.view(a, mx.uint32)
    return (mx.right_shift(bits_, mx.array(23, mx.uint32)) & 0xFF).astype(mx.int32) - 127


def _ceil_log2(a: mx.array) -> mx.array:
    """Exact ceil(log2(a)) for a >= 0 from float32 bits (int32; 0 where a == 0).  MLX 0.32.4's
    mxfp scales match this exact form, not float32 log2 (which is off just above 2^k)."""
    bits_ = mx.view(a.astype(mx.float32), mx.uint32)
    frac = (bits_ & 0x7FFFFF) != 0
    return mx.where(bits_ == 0, 0, _floor_log2(a.astype(mx.float32)) + frac.astype(mx.int32))


def e4m3_encode(x: mx.array) -> mx.array:
    """float -> FP8 E4M3 byte (uint8): round to nearest even, saturating to +-448, NaN -> 448."""
    f = x.astype(mx.float32)
    neg = mx.view(f, mx.uint32) >= 0x80000000
    a = mx.abs(f)
    big = (a >= 464.0) | mx.isnan(a)     # 464 is the tie between 448 and the NaN code
    a = mx.where(big, 0.0, a)
    # Quantum of the value's binade (at least the subnormal quantum 2^-9): 2^(E - 3).
    e = mx.maximum(_floor_log2(a), -6)
    inv_q = mx.view(mx.left_shift((130 - e).astype(mx.uint32), mx.array(23, mx.uint32)), mx.float32)
    m = mx.round(a * inv_q).astype(mx.int32)      # exact scaling; m in [0, 16]
    code = mx.where(big, 0x7E, (e + 6) * 8 + m)   # m == 16 rolls into the next binade
    code = mx.minimum(code, 0x7E)
    return (code + mx.where(neg, 0x80, 0)).astype(mx.uint8)


def e4m3_decode(code: mx.array, dtype=mx.float32) -> mx.array:
    """FP8 E4M3 byte -> float (0x7F/0xFF -> NaN)."""
    c = code.astype(mx.int32)
    e = (c >> 3) & 15
    m = c & 7
    sub = m.astype(mx.float32) * (2.0 ** -9)
    scale = mx.view(mx.left_shift((e + 117).astype(mx.uint32), mx.array(23, mx.uint32)), mx.float32)
    mag = mx.where(e == 0, sub, (8 + m).astype(mx.float32) * scale)  # (8+m) * 2^(e-10)
    mag = mx.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return mx.where(c >= 128, -mag, mag).astype(dtype)


def e8m0_decode(code: mx.array, dtype=mx.float32) -> mx.array:
    """E8M0 byte -> 2^(code - 127); code 0 -> 2^-127 (a float32 subnormal), 255 -> inf."""
    c = code.astype(mx.uint32)
    bits_ = mx.where(c == 0, mx.array(0x00400000, mx.uint32),
                     mx.left_shift(c, mx.array(23, mx.uint32)))
    return mx.view(bits_, mx.float32).astype(dtype)


def fp4_encode(v: mx.array) -> mx.array:
    """float -> E2M1 code (uint32): nearest value, ties to the smaller magnitude, no -0,
    non-finite -> 0 (MLX CPU mx.quantize's rule)."""
    v = v.astype(mx.float32)
    a = mx.abs(v)
    mag = sum((a > t).astype(mx.uint32) for t in _FP4_EDGES)
    code = mag + mx.where((v < 0) & (mag > 0), mx.array(8, mx.uint32), mx.array(0, mx.uint32))
    return mx.where(mx.isfinite(v), code, mx.array(0, mx.uint32))


def fp4_decode(code: mx.array, dtype=mx.float32) -> mx.array:
    return mx.take(mx.array(FP4_VALUES, mx.float32), code.astype(mx.int32)).astype(dtype)


# ----------------------------------------------------------------------------- quantize

def quantize(w: mx.array, fmt: str = "affine", bits: Optional[int] = None,
             group_size: Optional[int] = None):
    """Quantize w (..., N, K) -> (packed uint32 (..., N, K*bits/32), scales (..., N, K/g),
    biases or None).  Bit-identical to mx.quantize on CPU for affine/mxfp4/nvfp4/mxfp8."""
    f, bits, group_size = validate_quantize_input(w, fmt, bits, group_size)
    shape = w.shape
    g = w.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    if fmt == "affine":
        return _quantize_affine(g, w.dtype, bits, shape)
    if fmt == "int8":
        a = mx.max(mx.abs(g.astype(mx.float32)), -1, keepdims=True)
        scale = (a / 127.0).astype(w.dtype)
        sf = scale.astype(mx.float32)
        q = mx.clip(mx.round(g.astype(mx.float32) / mx.where(sf == 0, 1.0, sf)), -127, 127)
        q = mx.where(sf == 0, 0.0, q).astype(mx.int32) & 0xFF   # two's complement byte
        return _pack_stream(q.reshape(shape), 8), scale.squeeze(-1), None
    dt = w.dtype
    maxval = 448.0 if fmt == "mxfp8" else 6.0
    # Same dtype steps as MLX: the scale and w / scale are rounded in w's dtype.
    a = mx.max(mx.abs(g), -1, keepdims=True) / mx.array(maxval, dt)
    if fmt == "nvfp4":
        scode = e4m3_encode(a)
        v = g / e4m3_decode(scode, dt)
    else:
        e = _ceil_log2(a)
        v = g / e8m0_decode(e + 127, dt)
        scode = (e + 127).astype(mx.uint8)
    codes = e4m3_encode(v).astype(mx.uint32) if fmt == "mxfp8" else fp4_encode(v)
    return _pack_stream(codes.reshape(shape), bits), scode.squeeze(-1), None


def _quantize_affine(g: mx.array, dtype, bits: int, shape):
    gf = g.astype(mx.float32)
    n_bins = mx.array(float((1 << bits) - 1), mx.float32)
    hi = mx.max(gf, -1, keepdims=True)
    lo = mx.min(gf, -1, keepdims=True)
    use_min = mx.abs(lo) > mx.abs(hi)
    # Pick the sign of the scale so that the edge of larger magnitude maps to an integer
    # code q0 exactly (bias = edge); the other edge is then off by at most one rounding.
    s = mx.maximum((hi - lo) / n_bins, mx.array(1e-7, mx.float32))
    if bits == 1:
        # MLX 0.32.4 quantizes 1-bit groups plainly: codes {0, 1} -> {min, max}.
        q = mx.clip(mx.round((gf - lo) / s), 0.0, 1.0).astype(mx.uint32)
        return _pack_stream(q.reshape(shape), bits), s.squeeze(-1).astype(dtype), \
            lo.squeeze(-1).astype(dtype)
    s = mx.where(use_min, s, -s)
    edge = mx.where(use_min, lo, hi)
    q0 = mx.round(edge / s)
    nz = q0 != 0
    s = mx.where(nz, edge / mx.where(nz, q0, 1.0), s)
    b = mx.where(nz, edge, mx.array(0.0, mx.float32))
    q = mx.clip(mx.round((gf - b) / s), 0.0, n_bins).astype(mx.uint32)
    packed = _pack_stream(q.reshape(shape), bits)
    return packed, s.squeeze(-1).astype(dtype), b.squeeze(-1).astype(dtype)


# ----------------------------------------------------------------------------- dequantize

def _dequantize(packed, scales, biases, f: Format, bits, group_size, dtype, compute_dtype):
    codes = _unpack_bits(packed, bits)
    lead = packed.shape[:-1]
    codes = codes.reshape(*lead, -1, group_size)
    if f.name == "affine":
        s = scales.astype(compute_dtype)[..., None]
        b = biases.astype(compute_dtype)[..., None]
        w = codes.astype(compute_dtype) * s + b
    elif f.name == "int8":
        c = codes.astype(mx.int32)
        q = mx.where(c >= 128, c - 256, c)
        w = q.astype(compute_dtype) * scales.astype(compute_dtype)[..., None]
    else:
        vals = fp4_decode(codes, compute_dtype) if bits == 4 else e4m3_decode(codes, compute_dtype)
        sc = e4m3_decode(scales, compute_dtype) if f.scale_kind == "e4m3" else \
            e8m0_decode(scales, compute_dtype)
        w = vals * sc[..., None]
    return w.reshape(*lead, -1).astype(dtype)


def dequantize(packed: mx.array, scales: mx.array, biases: Optional[mx.array] = None,
               fmt: str = "affine", bits: Optional[int] = None, group_size: Optional[int] = None,
               dtype=None) -> mx.array:
    """W (..., N, K) from its quantized form; equals mx.dequantize exactly (same default dtype:
    the scales' dtype for affine/int8, bfloat16 for the fp formats; arithmetic in that dtype)."""
    f, bits, group_size = resolve(fmt, bits, group_size)
    validate_weights(packed, scales, biases, fmt, bits, group_size)
    if dtype is None:
        dtype = scales.dtype if f.scale_kind == "float" else mx.bfloat16
    if not _is_float(dtype):
        raise ValueError(f"dtype: expected a floating dtype, found {dtype}")
    # MLX computes affine in the scales' dtype and casts after; the fp formats in `dtype`
    # (exact products either way unless they under/overflow).
    compute = scales.dtype if f.scale_kind == "float" else dtype
    return _dequantize(packed, scales, biases, f, bits, group_size, dtype, compute)


def reference_matmul(x: mx.array, packed: mx.array, scales: mx.array,
                     biases: Optional[mx.array] = None, fmt: str = "affine",
                     bits: Optional[int] = None, group_size: Optional[int] = None) -> mx.array:
    """y = x @ dequant(W).T in float32 (dequantization in float32 too): the kernels' oracle.

    x (..., K); W (N, K) or batched (..., N, K) broadcasting against x's leading dims."""
    f, bits, group_size = resolve(fmt, bits, group_size)
    validate_quantized(x, packed, scales, biases, fmt, bits, group_size)
    w = _dequantize(packed, scales, biases, f, bits, group_size, mx.float32, mx.float32)
    return x.astype(mx.float32) @ mx.swapaxes(w, -1, -2)
