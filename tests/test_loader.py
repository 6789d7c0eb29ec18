"""The loader: sharded and quantized checkpoints, dtypes, tokenizer, hub ids, and bad input."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from marlin_mlx.errors import MarlinError
from marlin_mlx.kernels import QuantizedEmbedding, QuantizedLinear, quantize_modules
from marlin_mlx.loader import compute_dtype, load, load_model
from parity import rel_err

IDS = mx.array([[5, 17, 99, 250, 3, 42, 7, 300, 11, 64, 128, 1]])


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------- formats


def test_sharded_checkpoint_loads_like_single_file(make_checkpoint, tmp_path):
    sharded = copy_ckpt(make_checkpoint("llama", max_shard_size="100KB"), tmp_path / "m")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 2
    single, _ = load(make_checkpoint("llama"))
    model, _ = load(sharded)
    for f in shards:  # loading materialized the weights: overwriting the files changes nothing
        f.write_bytes(bytes(f.stat().st_size))
    assert np.array_equal(np.array(model(IDS)), np.array(single(IDS)))


def test_default_dtype_and_explicit_dtype_wins(make_checkpoint):
    path = make_checkpoint("qwen3", save_dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model, config = load_model(path)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    # float32 on the CPU backend, the checkpoint's bfloat16 on a GPU
    assert dtypes == {mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16}
    model16, _ = load_model(path, dtype="float16")
    assert {v.dtype for _, v in tree_flatten(model16.parameters())} == {mx.float16}
    with pytest.raises(MarlinError, match="dtype"):
        load_model(path, dtype="float8")


def test_gpu_default_dtype_is_the_checkpoints(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert compute_dtype({"dtype": "bfloat16"}) == mx.float32
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert compute_dtype({"dtype": "bfloat16"}) == mx.bfloat16
    assert compute_dtype({"torch_dtype": "float16"}) == mx.float16
    assert compute_dtype({}) is None  # keep the stored dtype
    assert compute_dtype({"dtype": "bfloat16"}, "float32") == mx.float32


def test_tokenizer_wrapper_eos_and_chat_template(tiny_qwen3_path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    _, tok = load(tiny_qwen3_path)
    assert isinstance(tok, TokenizerWrapper)
    cfg = json.loads((tiny_qwen3_path / "config.json").read_text())
    assert cfg["eos_token_id"] in tok.eos_token_ids
    text = "the boat left the harbour"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_generation_config_eos_wins(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    _, tok = load(path)
    assert set(tok.eos_token_ids) == {0, 2}


def test_hub_id_is_downloaded_with_allow_patterns(monkeypatch, tiny_llama_path):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tiny_llama_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tok = load("someone/tiny-llama")
    assert seen["repo_id"] == "someone/tiny-llama"
    assert "model*.safetensors" in seen["allow_patterns"] and "*.json" in seen["allow_patterns"]
    assert model.args.model_type == "llama"


# ---------------------------------------------------------------- quantized checkpoints


def _save_mlx_format(model, config: dict, src: Path, dst: Path) -> Path:
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                       "generation_config.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("arch,mode", [("llama", "affine"), ("qwen3", "affine"),
                                       ("llama", "mxfp4")])
def test_quantized_round_trip_matches_mlx_lm(make_checkpoint, tmp_path, arch, mode):
    """Quantize, save in mlx-lm's layout with per-layer overrides, load with both loaders."""
    import mlx_lm

    src = make_checkpoint(arch)
    model, config = load_model(src)
    float_logits = model(IDS)
    # K == group_size (one group per row) is avoided: MLX 0.32.4's CUDA quantized_matmul returns
    # garbage there for M > 1, which would make mlx-lm a wrong reference on a GPU
    overrides = {"lm_head": {"group_size": 32, "bits": 8, "mode": "affine"},
                 "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8, "mode": "affine"},
                 "model.layers.1.mlp.down_proj": False}

    def predicate(path, module):
        return overrides.get(path, True)

    quantize_modules(model, group_size=32, bits=4, mode=mode, class_predicate=predicate)
    quant = {"group_size": 32, "bits": 4, "mode": mode, **overrides}
    config = dict(config, quantization=quant, quantization_config=quant)
    dst = _save_mlx_format(model, config, src, tmp_path / "q")

    ours, _ = load(dst)
    theirs, _ = mlx_lm.load(str(dst))
    a, b = ours(IDS), theirs(IDS)
    assert rel_err(a, b) < 1e-4
    # really quantized, yet still close in direction to the float model's logits
    a64, f64 = np.array(a, dtype=np.float64).ravel(), np.array(float_logits, dtype=np.float64).ravel()
    assert rel_err(a64, f64) > 1e-3
    assert a64 @ f64 / np.linalg.norm(a64) / np.linalg.norm(f64) > 0.8
    layers = dict(ours.named_modules())
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_proj, QuantizedLinear)
    assert (q_proj.bits, q_proj.group_size, q_proj.mode) == (4, 32, mode)
    down0 = layers["model.layers.0.mlp.down_proj"]
    assert (down0.bits, down0.group_size, down0.mode) == (8, 64, "affine")
    assert type(layers["model.layers.1.mlp.down_proj"]) is nn.Linear
    assert isinstance(layers["model.embed_tokens"], QuantizedEmbedding)
    if arch == "llama":
        assert layers["lm_head"].bits == 8 and layers["lm_head"].group_size == 32


def test_mlx_lm_convert_output_loads(make_checkpoint, tmp_path):
    from mlx_lm import convert
    import mlx_lm

    dst = tmp_path / "converted"
    convert(str(make_checkpoint("qwen3")), str(dst), quantize=True, q_group_size=32, q_bits=4)
    ours, _ = load(dst)
    theirs, _ = mlx_lm.load(str(dst))
    assert isinstance(ours.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert rel_err(ours(IDS), theirs(IDS)) < 1e-4


def test_quantization_config_in_mlx_lm_shape_is_read(make_checkpoint, tmp_path):
    src = make_checkpoint("llama")
    model, config = load_model(src)
    quantize_modules(model, group_size=64, bits=8)
    config = dict(config, quantization_config={"group_size": 64, "bits": 8})
    ours, _ = load(_save_mlx_format(model, config, src, tmp_path / "q"))
    assert isinstance(ours.lm_head, QuantizedLinear) and ours.lm_head.bits == 8


def test_quantization_override_that_contradicts_the_weights(make_checkpoint, tmp_path):
    src = make_checkpoint("llama")
    model, config = load_model(src)
    quantize_modules(model, group_size=32, bits=4)
    quant = {"group_size": 32, "bits": 4, "lm_head": {"group_size": 64, "bits": 4}}
    dst = _save_mlx_format(model, dict(config, quantization=quant), src, tmp_path / "q")
    with pytest.raises(MarlinError, match=r"model\.safetensors: tensor 'lm_head\.(biases|scales)' "
                                          r"has shape \(512, 2\), the config expects \(512, 1\)"):
        load(dst)


def test_foreign_quantization_method_is_refused(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    edit_config(path, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(MarlinError, match=r"config\.json.*bitsandbytes"):
        load(path)


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(MarlinError, match="no-such-dir: no such file"):
        load(tmp_path / "no-such-dir")
    with pytest.raises(MarlinError, match="no such file"):
        load("./relative/no-such-dir")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(MarlinError, match=f"{tmp_path}: not a model folder.*config.json"):
        load(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MarlinError, match="file.txt: not a model folder"):
        load(tmp_path / "file.txt")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MarlinError, match="marlin-mlx-tests/no-such-model: .*(offline|cache)"):
        load("marlin-mlx-tests/no-such-model")


def test_unknown_model_type(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    edit_config(path, model_type="gpt2")
    with pytest.raises(MarlinError, match=r"config\.json: model_type 'gpt2'.*supported: .*llama"):
        load(path)


def test_invalid_config_json(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    (path / "config.json").write_text("{ not json")
    with pytest.raises(MarlinError, match=r"config\.json: not valid JSON"):
        load(path)
    edit_path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m2")
    cfg = json.loads((edit_path / "config.json").read_text())
    del cfg["hidden_size"]
    (edit_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MarlinError, match=r"config\.json: missing field 'hidden_size'"):
        load(edit_path)


def test_truncated_safetensors(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MarlinError, match=r"model\.safetensors: truncated"):
        load(path)
    f.write_bytes(data[:5])
    with pytest.raises(MarlinError, match=r"model\.safetensors: not a safetensors file"):
        load(path)


def test_garbage_safetensors(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(MarlinError, match=r"model\.safetensors: not a safetensors file"):
        load(path)


def test_missing_shard(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama", max_shard_size="100KB"), tmp_path / "m")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MarlinError, match=f"{victim.name}: shard named in model.safetensors.index"):
        load(path)


def test_no_weights(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(MarlinError, match=r"no \*\.safetensors"):
        load(path)


def test_shape_mismatch_names_tensor_shapes_and_file(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    edit_config(path, intermediate_size=96)
    with pytest.raises(MarlinError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\."
                                          r"\w+_proj\.weight' has shape \(\d+, \d+\), the config "
                                          r"expects \(\d+, \d+\)"):
        load(path)


def _rewrite_weights(path: Path, edit) -> None:
    f = path / "model.safetensors"
    weights = dict(mx.load(str(f)))
    edit(weights)
    mx.save_safetensors(str(f), weights)


def test_missing_weight(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    _rewrite_weights(path, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(MarlinError, match=r"missing.*'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load(path)


def test_unexpected_weight(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    _rewrite_weights(path, lambda w: w.update({"model.layers.0.extra.weight": mx.zeros((2,))}))
    with pytest.raises(MarlinError, match=r"model\.safetensors: unexpected tensor "
                                          r"'model\.layers\.0\.extra\.weight'"):
        load(path)


def test_missing_tokenizer(make_checkpoint, tmp_path):
    path = copy_ckpt(make_checkpoint("llama"), tmp_path / "m")
    for f in path.glob("tokenizer*"):
        f.unlink()
    model, _ = load_model(path)  # the weights alone still load
    with pytest.raises(MarlinError, match="no tokenizer files"):
        load(path)


def test_sampling_defaults_follow_generation_config(tmp_path):
    import json

    from marlin_mlx.loader import sampling_defaults

    assert sampling_defaults(tmp_path) == {}
    cfg = {"do_sample": False, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.3}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    # greedy checkpoints keep greedy decoding; the penalty applies either way (transformers' rule)
    assert sampling_defaults(tmp_path) == {"repetition_penalty": 1.3}
    cfg.update(do_sample=True, top_p=0.95, repetition_penalty=1.0)
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
