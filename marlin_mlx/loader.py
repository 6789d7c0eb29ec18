"""Load a model and its tokenizer from a Hugging Face-format folder or a hub repo id.

- Weights: `*.safetensors`, single or sharded with `model.safetensors.index.json`, read lazily
  by `mx.load` and materialized shard by shard, so peak memory stays near the weights' size.
- Quantized checkpoints in mlx-lm's format: a `quantization` block in config.json (group_size,
  bits, mode, plus per-layer overrides keyed by module path). As in mlx-lm, a layer is quantized
  exactly when the checkpoint has its `scales`; its bits and group size come from the override
  or, failing that, from the stored shapes.
- Everything a user can get wrong raises `MarlinError` with one line naming the file.
- Tensor parallel (`load(path, group=...)`, marlin_mlx.distributed): the model's layers become
  the rank's parallel ones and each split tensor is read as the rank's part only (one byte
  range, or a memory map for parts along a later axis); whole tensors stay lazy as above.
"""

import json
import re
import struct
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MarlinError
from .kernels import quantize_modules
from .models import SUPPORTED_MODEL_TYPES, get_model_class

# what a snapshot needs: config, weights, tokenizer files (no *.bin / *.pt / *.gguf, and not the
# consolidated.safetensors copies some repos carry; mlx-lm fetches the same set)
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                  "*.txt", "*.jinja"]
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16,
           "half": mx.float16, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- locating the checkpoint

def resolve_path(path_or_hf_id: Union[str, Path]) -> Path:
    """A local folder as it is, or a hub repo id downloaded (with progress bars) to the cache."""
    path = Path(path_or_hf_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MarlinError(f"{path}: not a model folder (expected a directory with config.json)")
        return path
    name = str(path_or_hf_id)
    if not _REPO_ID.match(name) or ".." in name:
        raise MarlinError(f"{path}: no such file or directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise MarlinError(f"{repo_id}: the Hugging Face repo is gated; accept its terms and log in "
                          "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise MarlinError(f"{repo_id}: no such local folder, and no such repo on the Hugging Face "
                          "Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise MarlinError(f"{repo_id}: revision not found on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise MarlinError(f"{repo_id}: no such local folder, and it cannot be downloaded (offline "
                          "or the Hub is unreachable) and is not in the local Hugging Face cache"
                          ) from None
    except Exception as e:  # network stack errors differ between huggingface-hub versions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MarlinError(f"{repo_id}: download from the Hugging Face Hub failed: {first}") from None


def read_config(path: Path) -> dict:
    """config.json, with `eos_token_id` taken from generation_config.json when it has one."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MarlinError(f"{path}: not a model folder (no config.json)")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise MarlinError(f"{config_file}: expected a JSON object")
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            gen = {}  # a broken generation config is not worth refusing the model (mlx-lm agrees)
        if isinstance(gen, dict) and gen.get("eos_token_id") is not None:
            config["eos_token_id"] = gen["eos_token_id"]
    return config


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MarlinError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise MarlinError(f"{file}: cannot read ({e.strerror or e})") from None


def weight_files(path: Path) -> list:
    """The shards named by the index, else `model*.safetensors` (else any `*.safetensors`)."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MarlinError(f"{index_file}: no weight_map in the index")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise MarlinError(f"{f}: shard named in {INDEX_FILE} is missing")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise MarlinError(f"{path}: no *.safetensors weights in the model folder")
    return files


def check_safetensors(file: Path) -> tuple:
    """Cheap structural check (header parses, data not truncated) before handing it to MLX.

    Returns `(header, data_start)`: the parsed header and the file offset of its data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MarlinError(f"{file}: not a safetensors file (only {size} bytes)")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise MarlinError(f"{file}: not a safetensors file or truncated "
                                  f"(header of {n} bytes, file of {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise MarlinError(f"{file}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise MarlinError(f"{file}: not a safetensors file (its header is not valid JSON)") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        raise MarlinError(f"{file}: not a safetensors file (malformed header)") from None
    if 8 + n + end > size:
        raise MarlinError(f"{file}: truncated safetensors file ({size} bytes, its header "
                          f"describes {8 + n + end})")
    return header, 8 + n


def load_weights_lazily(files: list) -> tuple:
    """All tensors as lazy arrays, plus which file each came from (for error messages)."""
    weights, source = {}, {}
    for f in files:
        check_safetensors(f)
        try:
            shard = mx.load(str(f))
        except Exception as e:
            raise MarlinError(f"{f}: cannot read safetensors ({e})") from None
        for k, v in shard.items():
            weights[k] = v
            source[k] = f
    return weights, source


# numpy types safetensors dtypes are read as (bfloat16 as its bits, viewed by MLX afterwards)
_NP_TYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
             "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def read_tensor_slice(file: Path, info: dict, data_start: int, spec=None) -> mx.array:
    """One tensor, or only its part `spec = (axis, start, stop)`, read from a safetensors file.

    A part along the first axis is one contiguous byte range (one read); along a later axis
    it is read through a memory map, so only the pages that hold the part are touched. Either
    way the process never holds more than the part. Dtypes numpy cannot hold (fp8) fall back
    to MLX's reader, which reads the whole tensor."""
    import numpy as np

    shape, dtype = tuple(info["shape"]), info["dtype"]
    begin = data_start + int(info["data_offsets"][0])
    if dtype not in _NP_TYPES:
        full = mx.load(str(file))[_name_of(info)]
        if spec is None:
            return full
        index = [slice(None)] * full.ndim
        index[spec[0]] = slice(spec[1], spec[2])
        return mx.contiguous(full[tuple(index)])
    np_type = np.dtype(_NP_TYPES[dtype])
    if spec is None:
        spec = (0, 0, shape[0]) if shape else None
    if spec is None:  # a scalar
        arr = np.fromfile(file, dtype=np_type, count=1, offset=begin).reshape(())
    else:
        axis, start, stop = spec
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        if all(s == 1 for s in shape[:axis]):  # the part is one contiguous byte range
            count = (stop - start) * inner
            arr = np.fromfile(file, dtype=np_type, count=count,
                              offset=begin + start * inner * np_type.itemsize)
            arr = arr.reshape(*shape[:axis], stop - start, *shape[axis + 1:])
        else:
            mm = np.memmap(file, dtype=np_type, mode="r", offset=begin, shape=shape)
            index = [slice(None)] * len(shape)
            index[axis] = slice(start, stop)
            arr = np.ascontiguousarray(mm[tuple(index)])
            del mm
    out = mx.array(arr)
    return out.view(mx.bfloat16) if dtype == "BF16" else out


def _name_of(info: dict) -> str:
    return info["__name__"]


def load_weights_sharded(files: list, plan) -> tuple:
    """Like `load_weights_lazily`, but each tensor is read as the part `plan` (a
    `marlin_mlx.distributed.ShardPlan`) assigns to this rank, under its local name; tensors
    of other ranks only (experts) are not read at all. Split tensors are read at once (only
    their part), whole ones stay lazy until the caller evaluates them."""
    weights, source = {}, {}
    for f in files:
        header, data_start = check_safetensors(f)
        whole = None  # MLX's lazy reader for the tensors every rank holds entirely
        for name, info in header.items():
            if name == "__metadata__":
                continue
            got = plan.local_name(name, tuple(info["shape"]), where=f)
            if got is None:
                continue
            local, spec = got
            try:
                if spec is None:
                    # read later, straight into MLX's memory (no NumPy copy next to it)
                    whole = whole if whole is not None else mx.load(str(f))
                    arr = whole[name]
                else:
                    arr = read_tensor_slice(f, {**info, "__name__": name}, data_start, spec)
            except MarlinError:
                raise
            except Exception as e:
                raise MarlinError(f"{f}: cannot read tensor {name!r} ({e})") from None
            weights[local] = arr
            source[local] = f
    return weights, source


# ---------------------------------------------------------------- quantization and dtype

def quantization_of(config: dict, config_file: Path) -> Optional[dict]:
    """mlx-lm's `quantization` block (or the same under `quantization_config`), else None."""
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and qc:
            if "quant_method" in qc or "bits" not in qc:
                method = qc.get("quant_method", "unknown")
                raise MarlinError(f"{config_file}: quantization method {method!r} is not supported "
                                  "(use an mlx-lm format checkpoint)")
            q = qc
    if q is not None and (not isinstance(q, dict) or "bits" not in q or "group_size" not in q):
        raise MarlinError(f"{config_file}: the quantization block needs bits and group_size")
    return q


def _imported_format(path: Path, config: dict) -> Optional[dict]:
    """The GPTQ/AWQ quantization config of a checkpoint to import, else None. AutoGPTQ keeps it
    in `quantize_config.json`, transformers-style checkpoints in config's `quantization_config`."""
    from .importers import detect_quantized_format

    if config.get("quantization") is not None:
        return None  # mlx-lm's own format
    for candidate in (config.get("quantization_config"), path / "quantize_config.json"):
        if isinstance(candidate, Path):
            candidate = _read_json(candidate) if candidate.is_file() else None
        if isinstance(candidate, dict) and detect_quantized_format(candidate):
            return candidate
    return None


def _infer_quant_params(path: str, module: nn.Module, weights: dict) -> dict:
    """bits / group size / mode a layer was packed with, read off the stored shapes."""
    in_dims = module.weight.shape[-1]
    scales, packed = weights[f"{path}.scales"], weights.get(f"{path}.weight")
    if packed is None:
        return {}  # reported later as a missing tensor
    if scales.shape[-1] == 0 or in_dims % scales.shape[-1]:
        return {}
    group_size = in_dims // scales.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if scales.dtype != mx.uint8:  # only the affine mode keeps floating scales
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    fp_modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    mode = fp_modes.get((bits, group_size))
    return {"group_size": group_size, "bits": bits, "mode": mode} if mode else {}


def quantize_for_checkpoint(model: nn.Module, quant: dict, weights: dict) -> None:
    def predicate(path, module):
        override = quant.get(path)
        if override is False or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return override
        return _infer_quant_params(path, module, weights) or True

    defaults = {"group_size": quant["group_size"], "bits": quant["bits"],
                "mode": quant.get("mode", "affine")}
    quantize_modules(model, class_predicate=predicate, **defaults)


def compute_dtype(config: dict, dtype=None) -> Optional[mx.Dtype]:
    """Explicit dtype wins; on the CPU backend float32; else the checkpoint's own dtype."""
    if dtype is not None:
        if isinstance(dtype, mx.Dtype):
            return dtype
        if str(dtype) in _DTYPES:
            return _DTYPES[str(dtype)]
        raise MarlinError(f"unknown dtype {dtype!r} (use one of float32, float16, bfloat16)")
    if mx.default_device() == mx.cpu:
        return mx.float32  # MLX's CPU matmul in bf16/fp16 is far slower and less exact
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(str(name)) if name else None


# ---------------------------------------------------------------- building the model

def _check_against_model(model: nn.Module, weights: dict, source: dict, path: Path) -> None:
    params = dict(tree_flatten(model.parameters()))

    def where(k):
        return source.get(k, path)

    for k, v in sorted(weights.items()):
        if k not in params:
            raise MarlinError(f"{where(k)}: unexpected tensor {k!r} (not in the "
                              f"{model.args.model_type} model the config describes)")
        if tuple(v.shape) != tuple(params[k].shape):
            raise MarlinError(f"{where(k)}: tensor {k!r} has shape {tuple(v.shape)}, the config "
                              f"expects {tuple(params[k].shape)}")
    missing = [k for k in params if k not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MarlinError(f"{path}: weights missing from the checkpoint: {missing[0]!r}{more}")


def build_model(path: Path, config: dict) -> nn.Module:
    """The model (random-initialized, lazily) that a folder's config describes."""
    config_file = path / "config.json"
    model_type = config.get("model_type")
    if not model_type:
        raise MarlinError(f"{config_file}: no model_type")
    try:
        model_class, args_class = get_model_class(model_type)
    except ValueError:
        raise MarlinError(f"{config_file}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})") from None
    try:
        return model_class(args_class.from_config(config))
    except KeyError as e:
        raise MarlinError(f"{config_file}: missing field {e.args[0]!r}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise MarlinError(f"{config_file}: {e}") from None


def load_model(path_or_hf_id: Union[str, Path], dtype=None, group=None) -> tuple:
    """Build the model a folder describes and load its weights: `(model, config)`.

    With `group` (an `mx.distributed` group of more than one process) the model is this
    rank's tensor-parallel shard (marlin_mlx.distributed) and only the rank's part of each
    tensor is read from the files."""
    path = resolve_path(path_or_hf_id)
    config = read_config(path)
    config_file = path / "config.json"
    model_type = config.get("model_type")
    model = build_model(path, config)
    target = compute_dtype(config, dtype)

    imported = _imported_format(path, config)
    sharded = group is not None and group.size() > 1
    if sharded:
        from .distributed import shard_modules

        if imported is not None:
            raise MarlinError(f"{path}: distributed loading of GPTQ/AWQ checkpoints is not "
                              "supported; convert it first (`marlin-mlx convert`)")
        # the model's layers become the rank's parallel ones and model.args the rank's counts
        # (heads, experts), which is what sanitize must see for the slices read here
        plan = shard_modules(model, group)
        weights, source = load_weights_sharded(weight_files(path), plan)
    else:
        weights, source = load_weights_lazily(weight_files(path))
    if imported is not None:
        # GPTQ/AWQ tensors become exact affine ones (scales and biases in float32: no second
        # rounding); act-order layers come with the input permutation they need
        from .importers import import_quantized

        try:
            weights, quant = import_quantized(weights, imported)
        except ValueError as e:
            raise MarlinError(f"{path}: cannot import this quantized checkpoint ({e})") from None
    try:
        weights = model.sanitize(weights)
    except (KeyError, ValueError, IndexError) as e:
        detail = repr(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise MarlinError(f"{path}: the weights do not fit the {model_type} layout "
                          f"(missing or malformed tensor: {detail})") from None
    # keep the file of origin for names sanitize passed through unchanged
    source = {k: source[k] for k in weights if k in source}

    if imported is None:
        quant = quantization_of(config, config_file)
    if quant is not None:
        quantize_for_checkpoint(model, quant, weights)
    if imported is not None:
        from .importers import apply_input_perms

        apply_input_perms(model, weights)
    _check_against_model(model, weights, source, path)

    if target is not None:
        # no reference to the uncast arrays may survive, or both copies stay in memory
        # a model may keep some tensors in their own precision (GLM's router selection bias:
        # in bf16 it would change which experts are chosen); imported GPTQ/AWQ layers keep
        # their exact float32 scales and biases
        castable = getattr(model, "cast_predicate", lambda k: True)
        exact = (".scales", ".biases") if imported is not None else ()

        def cast(k, v):
            if not mx.issubdtype(v.dtype, mx.floating) or not castable(k) or k.endswith(exact):
                return v
            return v.astype(target)

        weights = {k: cast(k, v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()

    # Materialize one shard at a time: each eval reads (and converts) only that file's tensors.
    # Tensors that sanitize built from several others (stacked experts, split matrices) go one
    # by one, so that only one of them and its sources are in memory at once.
    by_file: dict = {}
    derived = []
    for k, v in weights.items():
        if k in source:
            by_file.setdefault(source[k], []).append(v)
        else:
            derived.append((k, v))
    del weights
    groups = [(f, arrays) for f, arrays in by_file.items()]
    groups += [(f"{path} (tensor {k!r})", [v]) for k, v in derived]
    for where, arrays in groups:
        try:
            mx.eval(arrays)
        except Exception as e:
            raise MarlinError(f"{where}: cannot read weights ({e})") from None
    return model, config


def load_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template) over the HF tokenizer."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model")
    if not any((path / n).is_file() for n in names):
        raise MarlinError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    try:
        return load_wrapper(path, eos_token_ids=eos_token_ids)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MarlinError(f"{path}: cannot load the tokenizer ({first})") from None


def load(path_or_hf_id: Union[str, Path], dtype=None, group=None) -> tuple:
    """`(model, tokenizer)` from a local folder or a Hugging Face repo id; with `group`, this
    rank's tensor-parallel shard of the model (see `load_model`)."""
    path = resolve_path(path_or_hf_id)
    model, config = load_model(path, dtype=dtype, group=group)
    tokenizer = load_tokenizer(path, config.get("eos_token_id"))
    return model, tokenizer


def sampling_defaults(path_or_hf_id: Union[str, Path]) -> dict:
    """The sampling settings a checkpoint's `generation_config.json` recommends, in our names.

    As in transformers, temperature/top-p/top-k/min-p apply only with `do_sample: true`; the
    repetition penalty applies either way. Keys the file does not set are left out.
    """
    file = resolve_path(path_or_hf_id) / "generation_config.json"
    if not file.is_file():
        return {}
    cfg = _read_json(file)
    out = {}
    if cfg.get("do_sample"):
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                             ("top_k", "top_k"), ("min_p", "min_p")):
            if cfg.get(theirs) is not None:
                out[ours] = cfg[theirs]
    if cfg.get("repetition_penalty") not in (None, 1.0):
        out["repetition_penalty"] = cfg["repetition_penalty"]
    return out
