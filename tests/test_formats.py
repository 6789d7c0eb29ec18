"""kernels/formats.py against an independent float64 NumPy reference and against MLX itself.

Inputs are fresh random data every run; each test prints its seed (shown by pytest on failure)
and puts it in assertion messages; MARLIN_TEST_SEED=<n> replays a run.
"""

import os
import secrets

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from marlin_mlx.kernels import formats as F

# (fmt, bits, group_size) for every supported combination.
COMBOS = [("affine", b, g) for b in (1, 2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
    ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)] + [
    ("int8", 8, g) for g in (32, 64, 128)]
MX_MODES = {"affine", "mxfp4", "nvfp4", "mxfp8"}   # the formats mx.quantize knows
# (M, N, groups along K): K = groups * group_size is never a multiple of 512.
SHAPES = [(1, 1, 3), (3, 17, 5), (17, 3, 1), (100, 100, 7)]


@pytest.fixture
def seed():
    s = int(os.environ.get("MARLIN_TEST_SEED", secrets.randbits(31)))
    print(f"seed={s} (replay with MARLIN_TEST_SEED={s})")
    mx.random.seed(s)
    return s


# ----------------------------------------------------------------------------- NumPy reference
# Written from the format definitions, independently of formats.py's shift logic: the packed
# words become a little-endian bit stream through NumPy's byte view and unpackbits.

def np_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    stream = np.unpackbits(packed.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], -1, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(-1)


FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def np_e4m3(codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    return np.where((codes & 0x7F) == 0x7F, np.nan, sign * mag)


def np_dequant(fmt, bits, gs, packed, scales, biases) -> np.ndarray:
    p = np.array(packed)
    s = np.array(scales.astype(mx.float32) if scales.dtype != mx.uint8 else scales)
    s = np.repeat(s.astype(np.float64), gs, axis=-1)
    if fmt == "int8":
        return p.astype("<u4").view(np.int8).astype(np.float64) * s
    codes = np_codes(p, bits)
    if fmt == "affine":
        return codes * s + np.repeat(np.array(biases.astype(mx.float32), np.float64), gs, -1)
    vals = FP4[codes] if bits == 4 else np_e4m3(codes)
    scale = np_e4m3(s) if fmt == "nvfp4" else 2.0 ** (s - 127)
    return vals * scale


def bits_of(a: mx.array) -> np.ndarray:
    """Exact bit pattern, so that comparisons treat -0/NaN strictly."""
    if a.dtype in (mx.bfloat16, mx.float16):
        return np.array(a.view(mx.uint16))
    if a.dtype == mx.float32:
        return np.array(a.view(mx.uint32))
    return np.array(a)


def weights(shape, dtype, rng):
    """Random weights with features quantizers get wrong, mixed row by row: exact rounding ties,
    one-signed groups, heavy tails, tiny values, zero and constant groups."""
    rows = []
    for kind in rng.integers(5, size=shape[:-1]).reshape(-1):
        k = shape[-1]
        rows.append([lambda: rng.standard_normal(k) * 0.02,
                     lambda: np.round(rng.standard_normal(k) * 8) / 8,
                     lambda: rng.uniform(0.0, 1.0, k) * rng.choice([-1.0, 1.0]),
                     lambda: rng.standard_t(3, k),
                     lambda: rng.standard_normal(k) * 1e-5][kind]())
    w = np.array(rows).reshape(shape)
    w[..., :32] = 0.0
    if shape[-1] >= 96:
        w[..., 32:64] = 0.3
    return mx.array(w.astype(np.float32)).astype(dtype)


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("fmt,bits,gs", COMBOS)
def test_matmul_and_dequantize_vs_float64(fmt, bits, gs, seed):
    rng = np.random.default_rng(seed)
    for i, (M, N, groups) in enumerate(SHAPES):
        K = groups * gs
        wdtype = mx.bfloat16 if i % 2 else mx.float32
        w = weights((N, K), wdtype, rng)
        packed, scales, biases = F.quantize(w, fmt, bits, gs)
        ref_w = np_dequant(fmt, bits, gs, packed, scales, biases)
        msg = f"{fmt} bits={bits} g={gs} M={M} N={N} K={K} w={wdtype} seed={seed}"

        # Quantization error: half a step, plus (affine) the part of the group's range that
        # MLX's scale choice leaves uncovered, plus the rounding of scales/biases to w's dtype.
        if fmt in ("affine", "int8"):
            w64 = np.array(w.astype(mx.float32), np.float64)
            step = np.repeat(np.abs(np.array(scales.astype(mx.float32), np.float64)), gs, -1)
            u = 2.0 ** -8 if wdtype == mx.bfloat16 else 2.0 ** -23   # 2x the unit roundoff
            slack = u * 127 * step
            if fmt == "affine":
                g = w64.reshape(N, -1, gs)
                rng_ = np.repeat(g.max(-1) - g.min(-1), gs, -1)
                n_bins = (1 << bits) - 1
                uncovered = np.maximum(0.0, rng_ - n_bins * step)
                b64 = np.repeat(np.abs(np.array(biases.astype(mx.float32), np.float64)), gs, -1)
                slack = u * (n_bins * step + b64) + uncovered
            err = np.abs(ref_w - w64)
            assert np.all(err <= 0.5 * step + slack + 1e-6), msg

        deq = F.dequantize(packed, scales, biases, fmt, bits, gs, dtype=mx.float32)
        assert deq.dtype == mx.float32 and deq.shape == (N, K), msg
        eps = 2.0 ** -7 if (scales.dtype == mx.bfloat16) else 2.0 ** -23
        if fmt == "affine":   # computed in the scales' dtype: q * s and + b each round once
            bound = 2 * eps * (np.abs(ref_w) + np.abs(np.repeat(np.array(
                biases.astype(mx.float32), np.float64), gs, -1))) + 1e-30
        elif fmt == "int8":
            bound = eps * np.abs(ref_w)
        else:                 # fp formats: value * power-of-two or e4m3 scale is exact
            bound = np.zeros_like(ref_w)
        assert np.all(np.abs(np.array(deq, np.float64) - ref_w) <= bound), msg

        xdtype = mx.bfloat16 if i == 1 else mx.float32
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(xdtype)
        y = F.reference_matmul(x, packed, scales, biases, fmt, bits, gs)
        assert y.dtype == mx.float32 and y.shape == (M, N), msg
        x64 = np.array(x.astype(mx.float32), np.float64)
        y64 = x64 @ ref_w.T
        tol = 1e-5 * (np.abs(x64) @ np.abs(ref_w).T) + 1e-30
        assert np.all(np.abs(np.array(y, np.float64) - y64) <= tol), msg


@pytest.mark.parametrize("fmt,bits,gs", [c for c in COMBOS if c[0] in MX_MODES])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_bit_exact_with_mx_quantize_and_dequantize(fmt, bits, gs, dtype, seed):
    rng = np.random.default_rng(seed)
    w = weights((19, 3 * max(gs, 32)), dtype, rng)
    ours = F.quantize(w, fmt, bits, gs)
    theirs = mx.quantize(w, group_size=gs, bits=bits, mode=fmt)
    msg = f"{fmt} bits={bits} g={gs} {dtype} seed={seed}"
    assert (ours[2] is None) == (fmt != "affine"), msg
    for name, a, b in zip(("packed", "scales", "biases"), ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {msg}"
        assert np.array_equal(bits_of(a), bits_of(b)), f"{name} differs: {msg}"
    kw = dict(group_size=gs, bits=bits, mode=fmt)
    for out in (None, mx.float32, mx.bfloat16, mx.float16):
        d_ours = F.dequantize(*ours, fmt, bits, gs, dtype=out)
        if out is not None:
            kw["dtype"] = out
        d_mx = mx.dequantize(*theirs, **kw)
        assert d_ours.dtype == d_mx.dtype, msg
        assert np.array_equal(bits_of(d_ours), bits_of(d_mx)), f"dequantize to {out}: {msg}"


def test_batched_weights_match_mlx(seed):
    """Stacked expert weights (E, N, K) quantize like MLX and broadcast in reference_matmul."""
    w = mx.random.normal((3, 5, 128)).astype(mx.bfloat16)
    ours, theirs = F.quantize(w, "affine", 5, 32), mx.quantize(w, group_size=32, bits=5)
    for a, b in zip(ours, theirs):
        assert np.array_equal(bits_of(a), bits_of(b)), f"seed={seed}"
    x = mx.random.normal((3, 2, 128))
    y = F.reference_matmul(x, *ours, "affine", 5, 32)
    want = mx.quantized_matmul(x, *theirs, transpose=True, group_size=32, bits=5)
    assert y.shape == (3, 2, 5)
    assert np.allclose(np.array(y), np.array(want.astype(mx.float32)), rtol=2e-2, atol=2e-2), \
        f"seed={seed}"


@pytest.mark.parametrize("bits,gs", [(3, 64), (4, 64), (6, 32), (8, 128), (2, 128)])
def test_mlx_lm_quantize_model_bit_exact(bits, gs, seed):
    """mlx-lm's quantize_model (nn.quantize underneath) and our quantize agree bit for bit."""
    from mlx_lm.utils import quantize_model

    model = nn.Sequential(nn.Linear(256, 100), nn.Linear(128, 3, bias=False),
                          nn.Embedding(17, 384))
    model.set_dtype(mx.bfloat16)
    dense = {k: v for k, v in _leaves(model) if k.endswith("weight")}
    quantize_model(model, {}, gs, bits)
    q = dict(_leaves(model))
    for name, w in dense.items():
        base = name[: -len("weight")]
        ours = F.quantize(w, "affine", bits, gs)
        for part, a in zip(("weight", "scales", "biases"), ours):
            b = q[base + part]
            assert np.array_equal(bits_of(a), bits_of(b)), \
                f"{base}{part} bits={bits} g={gs} seed={seed}"


def _leaves(module):
    from mlx.utils import tree_flatten
    return tree_flatten(module.parameters())


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_unpack_known_integers(bits, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(3, 128))
    packed = F.pack(mx.array(codes.astype(np.uint8)), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (3, 128 * bits // 32)
    # Python big-int reference: row = sum(code_i << (i * bits)), word t = bits [32t, 32t+32).
    for r in range(3):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r]))
        want = [(stream >> (32 * t)) & 0xFFFFFFFF for t in range(128 * bits // 32)]
        assert np.array(packed[r]).tolist() == want, f"bits={bits} row={r} seed={seed}"
    assert np.array_equal(np.array(F.unpack(packed, "affine", bits)), codes), f"seed={seed}"
    # MLX reads the same layout: dequantize with scale 1, bias 0 gives the codes back.
    ones = mx.ones((3, 128 // 32))
    back = mx.dequantize(packed, ones, mx.zeros_like(ones), group_size=32, bits=bits)
    assert np.array_equal(np.array(back), codes), f"bits={bits} seed={seed}"


@pytest.mark.parametrize("bits,codes,words", [
    (4, list(range(8)), [0x76543210]),
    (8, [1, 2, 3, 4], [0x04030201]),
    (2, [0, 1, 2, 3] * 4, [0xE4E4E4E4]),
    (1, [1, 0] * 16, [0x55555555]),
    # 3/5/6-bit codes straddle words: code 10 (3-bit), 6 (5-bit), 5 (6-bit) start at bit 30.
    (3, [0] * 10 + [7] + [0] * 21, [0xC0000000, 0x1, 0x0]),
    (5, [0] * 6 + [31] + [0] * 25, [0xC0000000, 0x7, 0, 0, 0]),
    (6, [0] * 5 + [63] + [0] * 10, [0xC0000000, 0xF, 0x0]),
    (3, [1] * 32, [0x49249249, 0x92492492, 0x24924924]),
])
def test_pack_literal_words(bits, codes, words):
    packed = F.pack(mx.array([codes], mx.uint32), bits)
    assert np.array(packed[0]).tolist() == words
    assert np.array(F.unpack(packed, "affine", bits)[0]).tolist() == codes


def test_int8_twos_complement_bytes():
    packed = mx.array([[0x80FF017F, 0x00000000]], mx.uint32)
    assert np.array(F.unpack(packed, "int8")).tolist() == [[127, 1, -1, -128, 0, 0, 0, 0]]
    w = mx.array([[1.0, -1.0, 0.5, -0.25] + [0.0] * 28])
    packed, scales, biases = F.quantize(w, "int8", 8, 32)
    assert biases is None and scales.dtype == mx.float32
    assert np.array(F.unpack(packed, "int8")[0, :4]).tolist() == [127, -127, 64, -32]
    assert int(np.array(packed)[0, 0]) == (0x7F | (0x81 << 8) | (0x40 << 16) | (0xE0 << 24))


# ----------------------------------------------------------------------------- fp codecs

def test_fp8_e4m3_codec_matches_mlx(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-4, 3, 4000),
                        [0.0, -0.0, 448, 464, 465, 480, 1e9, -1e9, 2.0 ** -9, 2.0 ** -10,
                         3 * 2.0 ** -11, 2.0 ** -6 * 15 / 16, 17.0, 18.0, 19.0]])
    x = mx.array(x.astype(np.float32))
    assert np.array_equal(np.array(F.e4m3_encode(x)), np.array(mx.to_fp8(x))), f"seed={seed}"
    codes = mx.array([c for c in range(256) if (c & 0x7F) != 0x7F], mx.uint8)
    for dt in (mx.float32, mx.bfloat16):
        assert np.array_equal(bits_of(F.e4m3_decode(codes, dt)), bits_of(mx.from_fp8(codes, dt)))
    want = np_e4m3(np.array(codes)).astype(np.float32)
    assert np.array_equal(np.array(F.e4m3_decode(codes)), want)


def test_fp4_rounding_ties_and_signs():
    v = mx.array([0.25, 0.2501, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 100.0,
                  -0.1, -0.25, -0.75, -5.0, -7.0, 0.0, -0.0, float("nan"), float("inf")])
    want = [0, 1, 1, 2, 3, 4, 5, 6, 7, 7, 0, 0, 9, 14, 15, 0, 0, 0, 0]
    assert np.array(F.fp4_encode(v)).tolist() == want
    assert np.array(F.fp4_decode(mx.arange(16))).tolist() == FP4.tolist()
    assert np.array(F.e8m0_decode(mx.array([127, 128, 120, 0], mx.uint8))).tolist() == \
        [1.0, 2.0, 2.0 ** -7, 2.0 ** -127]


def test_bits_per_weight():
    assert F.bits_per_weight("affine", 4, 64) == 4.5
    assert F.bits_per_weight("affine", 3, 32) == 4.0
    assert F.bits_per_weight("mxfp4") == 4.25
    assert F.bits_per_weight("nvfp4") == 4.5
    assert F.bits_per_weight("int8", 8, 128) == 8.125
    assert F.bits_per_weight("affine", 8, 128, scale_bits=32) == 8.5


# ----------------------------------------------------------------------------- validation

def _good(fmt="affine", bits=4, gs=64, N=6, K=128, M=2):
    w = mx.random.normal((N, K))
    p, s, b = F.quantize(w, fmt, bits, gs)
    return mx.random.normal((M, K)), p, s, b


def _call(**over):
    fmt, bits, gs = over.pop("fmt", "affine"), over.pop("bits", 4), over.pop("gs", 64)
    x, p, s, b = _good()
    args = dict(x=x, packed=p, scales=s, biases=b)
    args.update(over)
    return F.validate_quantized(args["x"], args["packed"], args["scales"], args["biases"],
                                fmt, bits, gs)


def test_validate_accepts_good_inputs():
    x, p, s, b = _good()
    assert F.validate_quantized(x, p, s, b, "affine", 4, 64) == (6, 128)
    x, p, s, _ = _good("nvfp4", 4, 16)
    assert F.validate_quantized(x, p, s, None, "nvfp4", 4, 16) == (6, 128)


@pytest.mark.parametrize("over,match", [
    (dict(fmt="q4_k"), r"fmt: unsupported quantization format 'q4_k'"),
    (dict(bits=7), r"bits: affine supports bits .*found 7"),
    (dict(gs=48), r"group_size: affine supports group sizes .*found 48"),
    (dict(fmt="mxfp4", bits=4, gs=64), r"group_size: mxfp4 supports group sizes 32; found 64"),
    (dict(fmt="nvfp4", bits=8, gs=16), r"bits: nvfp4 supports bits 4; found 8"),
    (dict(x=mx.ones((2, 128), mx.int32)), r"x: expected a floating dtype, found .*int32"),
    (dict(x=mx.ones((2, 96))), r"x: last dimension 96 does not match the weight's K = 128"),
    (dict(x=mx.ones((2, 100))), r"x: last dimension 100 does not match the weight's K = 128"),
    (dict(x=mx.ones((2, 96)), packed=mx.zeros((6, 12), mx.uint32)),
     r"group_size: 64 must divide K = 96"),
    (dict(packed=mx.zeros((6, 16), mx.int32)), r"packed: expected dtype uint32, found .*int32"),
    (dict(packed=mx.zeros((16,), mx.uint32)), r"packed: expected at least 2 dimensions"),
    (dict(packed=mx.zeros((6, 15), mx.uint32), x=mx.ones((2, 128))),
     r"packed: expected shape \(6, 16\) for K=128, bits=4, found \(6, 15\)"),
    (dict(scales=mx.zeros((6, 3))), r"scales: expected shape \(6, 2\) .*found \(6, 3\)"),
    (dict(scales=mx.zeros((5, 2))), r"scales: expected shape \(6, 2\) .*found \(5, 2\)"),
    (dict(scales=mx.zeros((6, 2), mx.uint8)), r"scales: expected a floating dtype for affine"),
    (dict(biases=None), r"biases: required for affine, found None"),
    (dict(biases=mx.zeros((6, 1))), r"biases: expected shape \(6, 2\), found \(6, 1\)"),
    (dict(biases=mx.zeros((6, 2), mx.int32)), r"biases: expected a floating dtype"),
    (dict(x=np.ones((2, 128), np.float32)), r"x: expected an mlx array, found ndarray"),
])
def test_validation_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_validation_errors_fp_formats():
    x, p, s, _ = _good("mxfp4", 4, 32)
    with pytest.raises(ValueError, match=r"biases: mxfp4 has no biases; expected None"):
        F.validate_quantized(x, p, s, mx.zeros(s.shape), "mxfp4", 4, 32)
    with pytest.raises(ValueError,
                       match=r"scales: expected dtype uint8 \(e8m0\) for mxfp4, found .*float32"):
        F.validate_quantized(x, p, s.astype(mx.float32), None, "mxfp4", 4, 32)
    with pytest.raises(ValueError, match=r"scales: expected dtype uint8 \(e4m3\) for nvfp4"):
        F.dequantize(p, s.astype(mx.float16), None, "nvfp4", 4, 16)


def test_quantize_and_pack_input_errors():
    with pytest.raises(ValueError, match=r"w: expected a floating dtype, found .*int32"):
        F.quantize(mx.zeros((4, 64), mx.int32))
    with pytest.raises(ValueError, match=r"w: expected at least 2 dimensions"):
        F.quantize(mx.zeros((64,)))
    with pytest.raises(ValueError, match=r"w: group_size 64 must divide K = w.shape\[-1\] = 96"):
        F.quantize(mx.zeros((4, 96)), "affine", 4, 64)
    with pytest.raises(ValueError, match=r"bits: int8 supports bits 8; found 4"):
        F.quantize(mx.zeros((4, 64)), "int8", 4, 64)
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 7\]"):
        F.pack(mx.array([[8] + [0] * 31]), 3)
    with pytest.raises(ValueError, match=r"codes: last dimension must be a multiple of 32"):
        F.pack(mx.zeros((1, 16), mx.uint32), 3)
    with pytest.raises(ValueError, match=r"codes: expected an integer mlx array"):
        F.pack(mx.zeros((1, 32)), 4)
    with pytest.raises(ValueError, match=r"packed: expected dtype uint32"):
        F.unpack(mx.zeros((1, 4), mx.int32), "affine", 4)
    with pytest.raises(ValueError, match=r"dtype: expected a floating dtype"):
        x, p, s, b = _good()
        F.dequantize(p, s, b, "affine", 4, 64, dtype=mx.int32)
