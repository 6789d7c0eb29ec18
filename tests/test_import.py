"""GPTQ / AWQ import: tensors packed here from known integers (independent NumPy packers that
follow the formats' definitions) must dequantize to exactly scale * (q - zero)."""

import mlx.core as mx
import numpy as np
import pytest
from marlin_mlx.kernels.formats import dequantize

from marlin_mlx.importers import (
    apply_input_perm,
    apply_input_perms,
    awq_to_affine,
    detect_quantized_format,
    gptq_to_affine,
    import_quantized,
)


def _stream_words(codes, bits):
    """One little-endian bit stream (Python big int) -> uint32 words."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= int(c) << (i * bits)
    n = len(codes) * bits // 32
    return [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(n)]


def pack_gptq_qweight(q_kn, bits):
    """[K, N] codes -> int32 [K*bits/32, N], packed down each column (AutoGPTQ's pack)."""
    K, N = q_kn.shape
    if 32 % bits == 0:   # whole codes per word: row k in word k // per, at shift bits*(k % per)
        per = 32 // bits
        out = np.zeros((K // per, N), np.uint64)
        for k in range(K):
            out[k // per] |= q_kn[k].astype(np.uint64) << np.uint64(bits * (k % per))
    else:
        out = np.array([_stream_words(q_kn[:, n], bits) for n in range(N)], np.uint64).T
    return out.astype(np.uint32).view(np.int32)


def pack_gptq_qzeros(fields_gn, bits):
    """[G, N] stored zero fields -> int32 [G, N*bits/32], packed along each row."""
    return np.array([_stream_words(r, bits) for r in fields_gn], np.uint64) \
        .astype(np.uint32).view(np.int32)


def pack_awq(x_kn):
    """[R, N] 4-bit codes -> int32 [R, N/8] with AutoAWQ's interleave [0, 2, 4, 6, 1, 3, 5, 7]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    R, N = x_kn.shape
    out = np.zeros((R, N // 8), np.uint64)
    for c in range(N // 8):
        for i in range(8):
            out[:, c] |= x_kn[:, 8 * c + order[i]].astype(np.uint64) << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def make_gptq(rng, K, N, bits, g, *, sym, v2=False, act_order=False):
    G = K // g
    q = rng.integers(0, 2 ** bits, (K, N))
    if sym:
        zeros = np.full((G, N), 2 ** (bits - 1))
    else:   # v1 can express zeros 1..2^b, v2 0..2^b-1
        zeros = rng.integers(0 if v2 else 1, 2 ** bits + (0 if v2 else 1), (G, N))
    fields = zeros if v2 else zeros - 1
    scales = (rng.uniform(0.001, 0.05, (G, N)) * rng.choice([-1, 1], (G, N))).astype(np.float16)
    if act_order:
        order = rng.permutation(K)        # GPTQ's column order; groups follow it
        g_idx = np.empty(K, np.int64)
        g_idx[order] = np.arange(K) // g
    else:
        g_idx = np.arange(K) // g
    W = scales.astype(np.float64)[g_idx] * (q - zeros[g_idx])      # [K, N]
    t = {"qweight": pack_gptq_qweight(q, bits), "qzeros": pack_gptq_qzeros(fields, bits),
         "scales": scales, "g_idx": g_idx.astype(np.int32)}
    return t, W.T   # W as [N, K]


def _dq(r, bits):
    return np.array(dequantize(r["weight"], r["scales"], r["biases"], bits=bits,
                               group_size=r["group_size"])).astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_exact(bits, sym, v2):
    rng = np.random.default_rng(bits * 10 + sym * 2 + v2)
    t, W = make_gptq(rng, 256, 96, bits, 64, sym=sym, v2=v2)
    r = gptq_to_affine(**{k: mx.array(v) for k, v in t.items()}, bits=bits, group_size=64,
                       checkpoint_format="gptq_v2" if v2 else "gptq")
    assert "input_perm" not in r and r["group_size"] == 64
    assert r["scales"].dtype == mx.float32
    np.testing.assert_array_equal(_dq(r, bits), W)
    # mlx's own dequantize reads the result the same way
    np.testing.assert_array_equal(
        np.array(mx.dequantize(r["weight"], r["scales"], r["biases"], 64, bits)), W)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order(bits):
    rng = np.random.default_rng(7 + bits)
    t, W = make_gptq(rng, 256, 64, bits, 32, sym=False, act_order=True)
    r = gptq_to_affine(**t, bits=bits, group_size=32)
    perm = np.array(r["input_perm"])
    assert sorted(perm.tolist()) == list(range(256)) and not np.array_equal(perm, np.arange(256))
    np.testing.assert_array_equal(_dq(r, bits), W[:, perm])     # columns permuted, exactly
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = apply_input_perm(mx.array(x), r["input_perm"]) @ mx.array(_dq(r, bits).astype(np.float32)).T
    np.testing.assert_allclose(np.array(y), x.astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)


def test_gptq_large_and_per_channel_groups():
    rng = np.random.default_rng(3)
    for g, want in ((256, 128), (512, 128)):   # 512 = K: what group_size -1 produces
        t, W = make_gptq(rng, 512, 32, 4, g, sym=False)
        r = gptq_to_affine(**t, bits=4, group_size=-1 if g == 512 else g)
        assert r["group_size"] == want
        np.testing.assert_array_equal(_dq(r, 4), W)


@pytest.mark.parametrize("sym", [True, False])
def test_awq_exact(sym):
    rng = np.random.default_rng(11 + sym)
    K, N, g = 256, 64, 128
    q = rng.integers(0, 16, (K, N))
    zeros = np.full((K // g, N), 8) if sym else rng.integers(0, 16, (K // g, N))
    scales = rng.uniform(0.001, 0.05, (K // g, N)).astype(np.float16)
    W = (scales.astype(np.float64)[np.arange(K) // g] * (q - zeros[np.arange(K) // g])).T
    r = awq_to_affine(pack_awq(q), pack_awq(zeros), scales, bits=4, group_size=g)
    np.testing.assert_array_equal(_dq(r, 4), W)


def test_import_quantized_dict_and_detect():
    rng = np.random.default_rng(5)
    t1, W1 = make_gptq(rng, 128, 64, 4, 32, sym=True)
    t2, W2 = make_gptq(rng, 128, 64, 4, 32, sym=False, act_order=True)
    weights = {f"model.a.{k}": v for k, v in t1.items()}
    weights.update({f"model.b.{k}": v for k, v in t2.items()})
    weights["model.a.bias"] = np.zeros(64, np.float16)
    weights["model.b.bias"] = np.ones(64, np.float16)
    weights["model.norm.weight"] = mx.ones((64,))
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                   "desc_act": True, "sym": False}}
    assert detect_quantized_format(cfg) == "gptq"
    assert detect_quantized_format({"bits": 4, "group_size": 128, "desc_act": False}) == "gptq"
    assert detect_quantized_format({"quantization_config": {"quant_method": "awq"}}) == "awq"
    assert detect_quantized_format({"model_type": "llama"}) is None
    out, block = import_quantized(weights, cfg)
    assert block == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert set(out) == {"model.a.weight", "model.a.scales", "model.a.biases", "model.b.weight",
                        "model.b.scales", "model.b.biases", "model.b.input_perm",
                        "model.b.bias", "model.norm.weight"}
    np.testing.assert_array_equal(
        _dq({"weight": out["model.a.weight"], "scales": out["model.a.scales"],
             "biases": out["model.a.biases"], "group_size": 32}, 4), W1)
    perm = np.array(out["model.b.input_perm"])
    np.testing.assert_array_equal(
        _dq({"weight": out["model.b.weight"], "scales": out["model.b.scales"],
             "biases": out["model.b.biases"], "group_size": 32}, 4), W2[:, perm])


def test_bad_inputs():
    rng = np.random.default_rng(0)
    t, _ = make_gptq(rng, 128, 64, 4, 32, sym=True)
    with pytest.raises(ValueError, match="bits"):
        gptq_to_affine(**t, bits=5)
    with pytest.raises(ValueError, match="qzeros"):
        gptq_to_affine(t["qweight"], t["qzeros"][:, :4], t["scales"], bits=4)
    with pytest.raises(ValueError, match="qweight"):
        gptq_to_affine(t["qweight"][:, :32], t["qzeros"], t["scales"], bits=4)
    with pytest.raises(ValueError, match="g_idx"):
        gptq_to_affine(**{**t, "g_idx": t["g_idx"][:100]}, bits=4)
    with pytest.raises(ValueError, match="g_idx"):   # uneven groups
        gptq_to_affine(**{**t, "g_idx": np.zeros(128, np.int32)}, bits=4)
    with pytest.raises(ValueError, match="qweight"):
        gptq_to_affine(t["qweight"].astype(np.float32), t["qzeros"], t["scales"], bits=4)
    t16, _ = make_gptq(rng, 128, 64, 4, 16, sym=True)
    with pytest.raises(ValueError, match="group size 16"):
        gptq_to_affine(**t16, bits=4)
    with pytest.raises(ValueError, match="AWQ"):
        awq_to_affine(t["qweight"], t["qzeros"], t["scales"], bits=3)
    with pytest.raises(ValueError, match="model.x: missing tensor"):
        import_quantized({"model.x.qweight": t["qweight"]},
                         {"quant_method": "gptq", "bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match="checkpoint_format"):
        import_quantized({}, {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match="not a GPTQ or AWQ"):
        import_quantized({}, {"quant_method": "bitsandbytes"})


def test_3bit_stream_matches_autogptq_word_scheme():
    """AutoGPTQ writes 32 3-bit rows into 3 words explicitly (rows 10 and 21 split across
    words); our packer's stream must produce the same words."""
    q = np.random.default_rng(1).integers(0, 8, 32)
    w = [0, 0, 0]
    for j in range(10):
        w[0] |= int(q[j]) << (3 * j)
    w[0] |= (int(q[10]) << 30) & 0xFFFFFFFF
    w[1] |= int(q[10]) >> 2
    for j in range(11, 21):
        w[1] |= int(q[j]) << (3 * (j - 11) + 1)
    w[1] |= (int(q[21]) << 31) & 0xFFFFFFFF
    w[2] |= int(q[21]) >> 1
    for j in range(22, 32):
        w[2] |= int(q[j]) << (3 * (j - 22) + 2)
    assert pack_gptq_qweight(q[:, None], 3)[:, 0].view(np.uint32).tolist() == w


def test_tiny_llama_logits_after_import(tiny_llama_path):
    """Every linear of a tiny Llama replaced by GPTQ tensors of known integers (symmetric,
    asymmetric, act-order): the imported affine model gives the logits of the float model
    holding the dequantized weights."""
    from mlx.utils import tree_flatten

    from marlin_mlx.loader import load_model, quantize_for_checkpoint

    ref, _ = load_model(tiny_llama_path)
    rng = np.random.default_rng(0)
    gptq, dense = {}, {}
    for name, w in tree_flatten(ref.parameters()):
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            p = name[: -len(".weight")]
            N, K = w.shape
            kind = len(dense) % 3          # symmetric, asymmetric, asymmetric act-order
            t, W = make_gptq(rng, K, N, 4, 32, sym=kind == 0, act_order=kind == 2)
            gptq.update({f"{p}.{k}": mx.array(v) for k, v in t.items()})
            dense[name] = mx.array(W.astype(np.float32))
    ref.load_weights(list(dense.items()), strict=False)
    out, block = import_quantized(gptq, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                         "desc_act": False})
    model, _ = load_model(tiny_llama_path)
    quantize_for_checkpoint(model, block, out)
    apply_input_perms(model, out)
    assert sum(k.endswith(".input_perm") for k in out) == 4   # 14 linears, every third
    model.load_weights(list(out.items()), strict=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    tokens = mx.array(rng.integers(0, 400, (2, 9)).astype(np.int32))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)),
                               rtol=1e-4, atol=1e-4)


def test_import_quantized_awq_dict():
    rng = np.random.default_rng(9)
    K, N, g = 128, 32, 64
    q = rng.integers(0, 16, (K, N))
    zeros = rng.integers(0, 16, (K // g, N))
    scales = rng.uniform(0.001, 0.05, (K // g, N)).astype(np.float16)
    W = (scales.astype(np.float64)[np.arange(K) // g] * (q - zeros[np.arange(K) // g])).T
    weights = {"m.l.qweight": mx.array(pack_awq(q)), "m.l.qzeros": mx.array(pack_awq(zeros)),
               "m.l.scales": mx.array(scales)}
    cfg = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": g,
                                   "version": "gemm", "zero_point": True}}
    out, block = import_quantized(weights, cfg)
    assert block == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert set(out) == {"m.l.weight", "m.l.scales", "m.l.biases"}
    np.testing.assert_array_equal(
        _dq({"weight": out["m.l.weight"], "scales": out["m.l.scales"],
             "biases": out["m.l.biases"], "group_size": 64}, 4), W)
    with pytest.raises(ValueError, match="version 'gemv'"):
        import_quantized(weights, {"quant_method": "awq", "bits": 4, "version": "gemv"})


def test_apply_input_perms_needs_a_quantized_linear():
    from mlx import nn

    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="layers.0.input_perm: layers.0 is not a QuantizedLinear"):
        apply_input_perms(model, {"layers.0.input_perm": mx.arange(64)})


def test_gptq_checkpoint_on_disk_loads_through_the_loader(tiny_llama_path, tmp_path):
    """A GPTQ checkpoint folder (qweight/qzeros/scales/g_idx + quantization_config, act-order on
    some layers) loads with marlin_mlx's loader and gives the dequantized float model's logits."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from marlin_mlx.loader import load_model

    ref, _ = load_model(tiny_llama_path)
    rng = np.random.default_rng(1)
    tensors, dense = {}, {}
    for name, w in tree_flatten(ref.parameters()):
        p = name[: -len(".weight")]
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            N, K = w.shape
            t, W = make_gptq(rng, K, N, 4, 32, sym=len(dense) % 2 == 0, act_order=len(dense) % 3 == 2)
            tensors.update({f"{p}.{k}": mx.array(v) for k, v in t.items()})
            tensors[f"{p}.bias"] = mx.zeros((N,), mx.float16)   # AutoGPTQ writes zero biases
            dense[name] = mx.array(W.astype(np.float32))
        else:
            tensors[name] = w
    ref.load_weights(list(dense.items()), strict=False)
    out = tmp_path / "gptq"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    config = json.loads((tiny_llama_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "desc_act": True, "sym": False}
    (out / "config.json").write_text(json.dumps(config))
    for f in tiny_llama_path.glob("tokenizer*"):
        shutil.copy(f, out)

    model, _ = load_model(out)
    kinds = [type(m).__name__ for _, m in model.named_modules() if "_proj" in _]
    assert kinds.count("PermutedQuantizedLinear") == len(dense) // 3   # every third: act-order
    assert kinds.count("QuantizedLinear") == len(dense) - len(dense) // 3
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float32
    tokens = mx.array(rng.integers(0, 400, (2, 9)).astype(np.int32))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)), rtol=1e-4, atol=1e-4)


def _gptq_folder(src, out, rng, act_order: bool, sym_every=2, awq=False):
    """A GPTQ (or AWQ) checkpoint folder of `src`'s architecture whose projections hold codes,
    zeros and scales drawn here; -> the exact float64 weights {name: W [N, K]}."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from marlin_mlx.loader import load_model

    ref, _ = load_model(src)
    tensors, dense = {}, {}
    for name, w in tree_flatten(ref.parameters()):
        p = name[: -len(".weight")]
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            N, K = w.shape
            if awq:
                g = 32
                q = rng.integers(0, 16, (K, N))
                zeros = rng.integers(0, 16, (K // g, N))
                scales = rng.uniform(0.001, 0.05, (K // g, N)).astype(np.float16)
                gi = np.arange(K) // g
                W = (scales.astype(np.float64)[gi] * (q - zeros[gi])).T
                t = {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales}
            else:
                t, W = make_gptq(rng, K, N, 4, 32, sym=len(dense) % sym_every == 0,
                                 act_order=act_order and len(dense) % 3 == 2)
                tensors[f"{p}.bias"] = mx.zeros((N,), mx.float16)   # AutoGPTQ's zero biases
            tensors.update({f"{p}.{k}": mx.array(v) for k, v in t.items()})
            dense[name] = W
        else:
            tensors[name] = w.astype(mx.float16)
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
         "zero_point": True} if awq else
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order,
         "sym": False})
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out)
    return dense


@pytest.mark.parametrize("awq", [False, True])
def test_convert_gptq_awq_source_writes_exact_affine(tiny_qwen3_path, tmp_path, awq):
    """convert(GPTQ/AWQ folder) -> mlx-lm affine folder: every projection dequantizes to
    exactly scale * (q - zero) of the known integers; mlx-lm loads it with marlin-mlx's logits."""
    import json

    import mlx_lm

    from marlin_mlx.convert import convert
    from marlin_mlx.loader import load_model

    src = tmp_path / "src"
    dense = _gptq_folder(tiny_qwen3_path, src, np.random.default_rng(3), act_order=False,
                         awq=awq)
    out = tmp_path / "out"
    res = convert(src, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["mode"] == "affine"
    assert "quant_method" not in cfg["quantization_config"]
    assert not (out / "quantize_config.json").exists()
    model, _ = load_model(out, dtype="float32")
    modules = dict(model.named_modules())
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(mx.load(str(f)))
    sym16 = 0
    for name, W in dense.items():
        m = modules[name[: -len(".weight")]]
        assert type(m).__name__ == "QuantizedLinear" and (m.bits, m.group_size) == (4, 32)
        sym16 += stored[name.replace(".weight", ".scales")].dtype == mx.float16
        got = mx.dequantize(m.weight, m.scales, m.biases, group_size=32, bits=4,
                            dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), W.astype(np.float32))
    # symmetric GPTQ layers (zero 8: bias = -8 * scale) are exact in float16, the rest float32
    assert sym16 == (0 if awq else (len(dense) + 1) // 2)
    assert len(res.skipped) == len(dense) - sym16
    assert res.quantized_bits_per_weight > 4
    ids = mx.array([[1, 5, 9, 33, 100, 7]], dtype=mx.int32)
    theirs, _ = mlx_lm.load(str(out))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the checkpoint's float16; compare in fp32
    np.testing.assert_allclose(np.array(theirs(ids)), np.array(model(ids)), rtol=1e-4, atol=1e-4)


def test_convert_gptq_source_refusals(tiny_qwen3_path, tmp_path):
    from marlin_mlx.convert import convert
    from marlin_mlx.errors import MarlinError

    src = tmp_path / "src"
    _gptq_folder(tiny_qwen3_path, src, np.random.default_rng(4), act_order=True)
    out = tmp_path / "out"
    with pytest.raises(MarlinError, match="act-order .* cannot express") as e:
        convert(src, out, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="exactly as stored; --bits, --group-size do not apply"):
        convert(src, out, bits=3, group_size=64, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
