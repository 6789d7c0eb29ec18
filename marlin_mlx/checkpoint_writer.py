"""Writing a converted checkpoint: safetensors shards streamed tensor by tensor from lazy
arrays, the index, config.json (with the hub's older spellings beside transformers 5's) and the
tokenizer files, all in a hidden folder beside OUT that replaces OUT only when complete
(marlin_mlx/convert.py's contract: an interrupted run leaves nothing at OUT)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import MarlinError
from .loader import INDEX_FILE

_COPY_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jinja")
_SKIP_COPY = {"config.json", INDEX_FILE, "quantize_config.json"}


def check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise MarlinError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise MarlinError(f"{out}: folder exists and is not empty (use --force to replace it)")


def finish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old OUT (checked before: empty or --force) goes."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def copy_extras(src: Path, dst: Path) -> None:
    seen = set()
    for pattern in _COPY_PATTERNS:
        for f in src.glob(pattern):
            if f.name in _SKIP_COPY or f.name in seen or not f.is_file():
                continue
            seen.add(f.name)
            shutil.copy(f, dst / f.name)


_ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
              mx.uint8: "U8", mx.int32: "I32", mx.int64: "I64", mx.uint16: "U16",
              mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64", mx.bool_: "BOOL"}


def save_shard(file: Path, tensors: dict, tick: Callable = lambda: None) -> None:
    """Write a safetensors file from LAZY arrays, evaluating and writing one tensor at a time.

    Shapes and dtypes are known before evaluation, so the header goes first; each tensor is then
    computed, its bytes appended and its reference dropped, so the shard never sits in memory
    whole (mx.save_safetensors would evaluate all of it first)."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for k, v in tensors.items():
        if v.dtype not in _ST_DTYPES:
            raise ValueError(f"{k}: dtype {v.dtype} cannot be written to safetensors")
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in list(tensors):
            v = tensors[k]
            tensors[k] = None
            mx.eval(v)  # also materializes its siblings (a quantize's scales and biases)
            if v.size:
                f.write(np.asarray(v.reshape(-1).view(mx.uint8)).data)
            del v
            tick()


def write_shards(tmp: Path, order: list, produce: Callable, sizes: dict, shard_bytes: int,
                  progress: bool) -> tuple:
    """Group output names into shards by size, then stream each shard to disk tensor by tensor.

    The outputs of a shard are built as lazy graphs first (they hold no data: source tensors
    are lazy file views), which gives their shapes for the header."""
    groups, cur, cur_size = [], [], 0
    for name in order:
        if cur and cur_size + sizes[name] > shard_bytes:
            groups.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += sizes[name]
    if cur:
        groups.append(cur)
    n = len(groups)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        shard_name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            tensors.update(produce(name))
        for k, v in tensors.items():
            weight_map[k] = shard_name
            total += v.nbytes
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(tensors), desc=f"shard {i + 1}/{n}", unit="tensor", leave=False)
        try:
            save_shard(tmp / shard_name, tensors, bar.update if bar else (lambda: None))
        finally:
            if bar:
                bar.close()
        del tensors
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
    return n, len(weight_map), total


def write_config(tmp: Path, config: dict, quant: Optional[dict], dtype_name: str) -> None:
    config = {k: v for k, v in config.items()
              if k not in ("quantization", "quantization_config", "_name_or_path")}
    if quant is not None:
        config["quantization"] = quant
        config["quantization_config"] = quant  # mlx-lm writes both (HF tooling reads the latter)
    add_hub_spelling(config)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["dtype"] = dtype_name
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def add_hub_spelling(config: dict) -> None:
    """Also write the hub's older names (top-level rope_theta/rope_scaling, Qwen3-MoE's
    num_experts) beside transformers 5's, for readers such as mlx-lm that know only those."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in config:
        config["rope_theta"] = params["rope_theta"]
        if "rope_scaling" not in config:
            rest = {k: v for k, v in params.items() if k != "rope_theta"}
            default = rest.get("rope_type", rest.get("type", "default")) == "default"
            config["rope_scaling"] = None if default else rest
    if "num_local_experts" in config and "num_experts" not in config:
        config["num_experts"] = config["num_local_experts"]


def tmp_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp
