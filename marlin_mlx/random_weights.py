"""Checkpoints with random weights of a real model's shapes, for measuring without a download.

A preset is a real Hugging Face `config.json` (numbers copied from the public model repos), or
any config.json path. `save_random_checkpoint` builds the model lazily, quantizes it with
`marlin_mlx.kernels.quantize_modules` (and stacked MoE experts through their own
`to_quantized`), then materializes and writes it a few layers at a time,
so the full-precision weights of the whole model never exist at once (an 8B model in bf16 is
16 GB). The result is a checkpoint directory in mlx-lm's layout (`config.json` with a
`quantization` block, sharded `model-*.safetensors` and an index), which marlin-mlx and mlx-lm
both load, so a side-by-side benchmark runs on identical weights.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import MarlinError

# --- presets: public config.json of each model (fields that change shapes or numerics) ---

_QWEN3_COMMON = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

PRESETS: dict[str, dict] = {
    # Qwen/Qwen3-8B
    "qwen3-8b": {**_QWEN3_COMMON, "hidden_size": 4096, "intermediate_size": 12288,
                 "tie_word_embeddings": False},
    # Qwen/Qwen3-4B
    "qwen3-4b": {**_QWEN3_COMMON, "hidden_size": 2560, "intermediate_size": 9728,
                 "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {
        **_QWEN3_COMMON,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "decoder_sparse_step": 1,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
    },
    # zai-org/GLM-4.7-Flash (MLA attention + MoE)
    "glm-4.7-flash": {
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "model_type": "glm4_moe_lite",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 10240,
        "kv_lora_rank": 512,
        "max_position_embeddings": 202752,
        "moe_intermediate_size": 1536,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 20,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 47,
        "num_key_value_heads": 20,
        "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 1.0,
        "q_lora_rank": 768,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "routed_scaling_factor": 1.8,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 256,
        "vocab_size": 154880,
        "pad_token_id": 154820,
        "eos_token_id": [154820, 154827, 154829],
    },
}

# The quantized formats MLX packs, with the group size each one allows (affine: a choice).
FORMATS = {"affine": None, "mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
FORMAT_BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
_SHARD_BYTES = 2 << 30


def resolve_config(preset: Union[str, os.PathLike]) -> dict:
    """The config dict of a preset name, or of a config.json path (or a folder holding one)."""
    key = str(preset).lower()
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    path = Path(preset)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MarlinError(
            f"unknown random-weights preset {str(preset)!r}: not a file and not one of "
            f"{', '.join(sorted(PRESETS))}"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MarlinError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise MarlinError(f"{path}: not a model config (no model_type)")
    return config


def quantization_settings(bits: Optional[int], group_size: Optional[int],
                          fmt: str = "affine") -> Optional[dict]:
    """mlx-lm's `quantization` block for these options; None for an unquantized model.

    bits None/0/16 means no quantization. Non-affine formats fix their group size and bits.
    """
    if fmt not in FORMATS:
        raise MarlinError(f"unknown format {fmt!r} (supported: {', '.join(FORMATS)})")
    if fmt == "affine":
        if not bits or bits == 16:
            return None
        if bits not in (2, 3, 4, 5, 6, 8):
            raise MarlinError(f"--bits {bits} is not supported by affine (2, 3, 4, 5, 6, 8 or 16)")
        group_size = group_size or 64
        if group_size not in (32, 64, 128):
            raise MarlinError(f"--group-size {group_size} is not supported (32, 64 or 128)")
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    need_gs, need_bits = FORMATS[fmt], FORMAT_BITS[fmt]
    if group_size not in (None, need_gs) or bits not in (None, 0, need_bits):
        raise MarlinError(f"format {fmt} needs --bits {need_bits} --group-size {need_gs}")
    return {"group_size": need_gs, "bits": need_bits, "mode": fmt}


def default_dtype() -> mx.Dtype:
    # MLX's CPU bfloat16 matmul is very slow; on a GPU checkpoints are bfloat16.
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def _model_classes(config: dict):
    from marlin_mlx.models import SUPPORTED_MODEL_TYPES, get_model_class

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MarlinError(
            f"random weights for model_type {model_type!r} need its architecture, which "
            f"marlin-mlx does not implement yet (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return get_model_class(model_type)


def build_lazy_model(config: dict, quantization: Optional[dict], dtype: mx.Dtype,
                     seed: int = 0) -> nn.Module:
    """The model with lazy random weights (nothing is computed until evaluated).

    Linear layers get MLX's default uniform(+-1/sqrt(in)) init and embeddings N(0, 1), which
    keeps activations finite through deep stacks; norms are ones.
    """
    Model, ModelArgs = _model_classes(config)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(config))
    model.set_dtype(dtype)
    keep = getattr(model, "cast_predicate", None)  # tensors the model holds in float32 (GLM's router)
    if keep is not None:
        model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in
                                     tree_flatten(model.parameters()) if not keep(k)]))
    if quantization is not None:
        from marlin_mlx.kernels import quantize_modules

        gs, bits, mode = quantization["group_size"], quantization["bits"], quantization["mode"]
        quantize_modules(model, group_size=gs, bits=bits, mode=mode)
    return model


def _check_size(weights: dict, quant: Optional[dict], out: Path) -> None:
    """Refuse early, with the numbers, when the checkpoint cannot fit on disk."""
    total = sum(v.nbytes for v in weights.values())
    free = shutil.disk_usage(out).free
    if total > free * 0.95:
        dense = sum(v.nbytes for k, v in weights.items() if k.endswith(".weight")
                    and v.ndim >= 2 and mx.issubdtype(v.dtype, mx.floating))
        hint = (f"; {dense / 1e9:.1f} GB of it is unquantized matrices" if quant else "")
        raise MarlinError(f"{out}: the random checkpoint needs {total / 1e9:.1f} GB, only "
                          f"{free / 1e9:.1f} GB free{hint}")


def _layer_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def save_random_checkpoint(preset: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                           bits: Optional[int] = 4, group_size: Optional[int] = None,
                           fmt: str = "affine", dtype: Optional[mx.Dtype] = None,
                           seed: int = 0, config_overrides: Optional[dict] = None) -> Path:
    """Write a random-weight checkpoint of `preset`'s shapes into `out_dir`; returns the path.

    Peak memory is about one shard (2 GB) plus one layer's full-precision weights.
    """
    config = resolve_config(preset)
    config.update(config_overrides or {})
    quant = quantization_settings(bits, group_size, fmt)
    if isinstance(dtype, str):
        from .loader import compute_dtype

        dtype = compute_dtype({}, dtype)
    dtype = dtype or default_dtype()
    model = build_lazy_model(config, quant, dtype, seed)
    # the model's own parameter names are what its loader expects (sanitize passes them through)
    weights = dict(tree_flatten(model.parameters()))
    del model  # the lazy arrays keep their own graphs; the model object is not needed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_size(weights, quant, out)
    # layers in order, the rest (embeddings, final norm, head) at the end
    names = sorted(weights, key=lambda k: (_layer_of(k) < 0, _layer_of(k), k))
    shards, current, size = [], [], 0
    for name in names:
        nbytes = weights[name].nbytes
        if current and size + nbytes > _SHARD_BYTES and _layer_of(name) != _layer_of(current[-1]):
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)

    index, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: weights.pop(k) for k in shard}
        for layer in sorted({_layer_of(k) for k in shard}):
            # one layer at a time, so only that layer's full-precision weights exist at once
            mx.eval([v for k, v in tensors.items() if _layer_of(k) == layer])
        mx.save_safetensors(str(out / fname), tensors, metadata={"format": "mlx"})
        total += sum(v.nbytes for v in tensors.values())
        index.update({k: fname for k in shard})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))},
                   indent=2))

    config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16"}.get(dtype, "bfloat16")
    if quant is not None:
        config["quantization"] = dict(quant)
        config["quantization_config"] = dict(quant)
    config["marlin_mlx_random_weights"] = {"preset": str(preset), "seed": seed}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


class RandomCheckpoint:
    """Context manager: a random checkpoint in a temporary folder, removed on exit."""

    def __init__(self, preset, **kwargs):
        self.preset, self.kwargs = preset, kwargs
        self.path: Optional[Path] = None
        self._tmp: Optional[str] = None

    def __enter__(self) -> Path:
        self._tmp = tempfile.mkdtemp(prefix="marlin-mlx-random-")
        try:
            self.path = save_random_checkpoint(self.preset, self._tmp, **self.kwargs)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return self.path

    def __exit__(self, *exc):
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
