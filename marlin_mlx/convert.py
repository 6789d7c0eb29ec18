"""Convert a Hugging Face checkpoint to mlx-lm's quantized format (or back to float).

- Which layers: as mlx-lm, every Linear / Embedding / `to_quantized` layer (stacked experts, MLA
  per-head matrices) whose input dimension the group size divides; norms and biases stay float.
  A softmax MoE router (`...mlp.gate`, Qwen3-MoE) is stored at affine 8-bit g64 as mlx-lm's
  qwen3_moe predicate does (kept float for the fp formats); GLM's sigmoid router has no
  quantized form in either runtime and stays float32. Layers the group size does not divide
  are skipped with a note (mlx-lm skips them too); a group size that divides no layer is refused.
- Streaming: the model is built as a skeleton only (lazy zeros, never evaluated) to know module
  paths and shapes; source tensors are lazy `mx.load` views, each popped from the dict before its
  output is evaluated so nothing keeps a materialized copy. Outputs are evaluated tensor by
  tensor and written one output shard at a time, so peak memory is about one output shard plus
  the few source tensors behind the tensor being computed.
- Atomic: everything goes to a hidden temporary folder beside OUT, renamed to OUT at the end;
  any exception (or Ctrl-C) removes it, so an interrupted run leaves nothing at OUT.
- All checks on the user's input (format, bits, recipe, architecture, shards, OUT) happen
  before anything is written.
- `--method gptq` and `--target-bpw` need the float model in memory for calibration (Hessians of
  every Linear for GPTQ; one forward pass per layer and width for the sensitivities), so they
  are for small and medium models; plain round-to-nearest conversion streams.
- Measured (Qwen3-8B shapes, random bf16 weights, 16.4 GB, 4-bit g64, 2-core CPU box): peak RSS
  1.6 GB in 54 s; the output is bit-identical to mlx-lm's convert of the same folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .calibration import allocate_bits, calibrate
from .errors import MarlinError
from .kernels import formats
from .loader import (INDEX_FILE, build_model, load_weights_lazily, quantization_of,
                     quantize_for_checkpoint, read_config, resolve_path, weight_files)

DEFAULT_SHARD_GB = 5.0
ROLES = ("attn", "ffn_gate", "ffn_up", "ffn_down", "lm_head", "embed", "default")
# Named recipes: bits per role (`default` covers everything no other role names).
PRESETS = {
    # the guide's mixed table: attention and the output head at 8, gate/up 4, down 6
    "quality": {"attn": 8, "ffn_gate": 4, "ffn_up": 4, "ffn_down": 6, "lm_head": 8, "embed": 8,
                "default": 8},
    # 4-bit body with the sensitive layers (attention, down projection) at 6 and the head at 8
    "mixed-4-6": {"default": 4, "attn": 6, "ffn_down": 6, "lm_head": 8},
    # smaller: 3-bit MLP gate/up, 4-bit elsewhere, 6-bit down projection and 8-bit head
    "mixed-3-4": {"default": 4, "ffn_gate": 3, "ffn_up": 3, "ffn_down": 6, "lm_head": 8},
}
PRESET_HELP = "; ".join(f"{k}: " + ", ".join(f"{r}={b}" for r, b in v.items())
                        for k, v in PRESETS.items())
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_COPY_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jinja")
_SKIP_COPY = {"config.json", INDEX_FILE}


@dataclass
class ConvertResult:
    out: Path
    shards: int
    tensors: int
    bits_per_weight: float           # over all weights (float layers count their dtype's bits)
    quantized_bits_per_weight: float  # over the quantized layers only
    nbytes: int
    skipped: list = field(default_factory=list)  # notes on layers left in float


# ---------------------------------------------------------------- recipes

def parse_recipe(text: Optional[str], base_bits: int) -> dict:
    """`NAME` of a preset or `role=bits,...` -> {role: bits} with `default` filled in."""
    if text is None or not text.strip():
        return {"default": base_bits}
    text = text.strip()
    if text in PRESETS:
        return dict(PRESETS[text])
    if "=" not in text:
        raise ValueError(f"--recipe {text!r}: not a preset ({', '.join(PRESETS)}) nor a spec "
                         "like attn=8,ffn_down=6")
    out = {"default": base_bits}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        role, _, value = part.partition("=")
        if role not in ROLES:
            raise ValueError(f"--recipe: unknown role {role!r} (roles: {', '.join(ROLES)})")
        try:
            out[role] = int(value)
        except ValueError:
            raise ValueError(f"--recipe: bits for {role!r} must be an integer, found {value!r}"
                             ) from None
    return out


def role_of(path: str) -> str:
    """The recipe role of a module path (HF / mlx-lm names)."""
    last = path.rsplit(".", 1)[-1]
    if path == "lm_head" or last == "lm_head":
        return "lm_head"
    if last == "embed_tokens":
        return "embed"
    if ".self_attn." in path or ".attention." in path:
        return "attn"
    for name, role in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"),
                       ("down_proj", "ffn_down")):
        if last == name:
            return role
    return "default"


# ---------------------------------------------------------------- the plan

def _quantizable(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return True
    return hasattr(module, "to_quantized") and "weight" in module


def _plan(model: nn.Module, weights: dict, fmt: str, group_size: int, roles: dict):
    """{module path: (bits, group_size, mode)} for the layers to quantize, and skip notes."""
    plan, skipped, eligible = {}, [], 0
    for path, module in model.named_modules():
        if not path or not _quantizable(module) or f"{path}.weight" not in weights:
            continue
        k = module.weight.shape[-1]
        if path.endswith("mlp.gate"):  # softmax router (Qwen3-MoE): mlx-lm's 8-bit g64
            if fmt == "affine" and k % 64 == 0:
                plan[path] = (8, 64, "affine")
            else:
                skipped.append(f"{path}: router kept in float")
            continue
        bits = roles.get(role_of(path), roles["default"])
        if k % group_size:
            skipped.append(f"{path}: input dimension {k} not divisible by group size "
                           f"{group_size}, kept in float")
            continue
        eligible += 1
        plan[path] = (bits, group_size, fmt)
    if not eligible:
        raise ValueError(f"--group-size {group_size} divides the input dimension of no layer "
                         "of this model (nothing would be quantized)")
    return plan, skipped


def _out_nbytes(shape, dtype_size: int, q) -> int:
    if q is None:
        return math.prod(shape) * dtype_size
    bits, g, mode = q
    lead = math.prod(shape[:-1])
    k = shape[-1]
    scales = lead * (k // g) * (dtype_size if mode == "affine" else 1)
    return lead * k * bits // 8 + scales * (2 if mode == "affine" else 1)


def _quantize(w: mx.array, bits: int, group_size: int, mode: str):
    try:
        out = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    except Exception:  # e.g. MLX's CPU nvfp4 needs a multiple of 32 elements; ours does not
        out = formats.quantize(w, mode, bits, group_size)
    packed, scales = out[0], out[1]
    biases = out[2] if mode == "affine" and len(out) > 2 else None
    return packed, scales, biases


# ---------------------------------------------------------------- writing

def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise MarlinError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise MarlinError(f"{out}: folder exists and is not empty (use --force to replace it)")


def _finish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old OUT (checked before: empty or --force) goes."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _copy_extras(src: Path, dst: Path) -> None:
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


def _save_shard(file: Path, tensors: dict, tick: Callable = lambda: None) -> None:
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


def _write_shards(tmp: Path, order: list, produce: Callable, sizes: dict, shard_bytes: int,
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
            _save_shard(tmp / shard_name, tensors, bar.update if bar else (lambda: None))
        finally:
            if bar:
                bar.close()
        del tensors
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
    return n, len(weight_map), total


def _write_config(tmp: Path, config: dict, quant: Optional[dict], dtype_name: str) -> None:
    config = {k: v for k, v in config.items()
              if k not in ("quantization", "quantization_config", "_name_or_path")}
    if quant is not None:
        config["quantization"] = quant
        config["quantization_config"] = quant  # mlx-lm writes both (HF tooling reads the latter)
    _add_hub_spelling(config)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["dtype"] = dtype_name
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def _add_hub_spelling(config: dict) -> None:
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


BPW_CANDIDATES = (2, 3, 4, 5, 6, 8)


def _apply_target(plan, errors, weights, names, sizes, target, group_size, dsize, quant, log):
    """Pick bits for the calibrated layers so that the whole model averages `target` bits per
    weight; the other tensors (float ones, layers without a Hessian) keep their plan."""
    def bpw(b):
        return formats.bits_per_weight("affine", b, group_size, scale_bits=dsize * 8)

    fixed = total = 0.0
    for k in names:
        p, n = k.rsplit(".", 1)[0], math.prod(weights[k].shape)
        total += n
        if k.endswith(".weight") and p in plan:
            if p not in errors:
                fixed += n * bpw(plan[p][0]) if plan[p][2] == "affine" else sizes[k] * 8
        else:
            fixed += sizes[k] * 8
    counts = {p: math.prod(weights[f"{p}.weight"].shape) for p in errors}
    costs = {p: {b: counts[p] * bpw(b) for b in BPW_CANDIDATES} for p in errors}
    low = (fixed + sum(min(c.values()) for c in costs.values())) / total
    high = (fixed + sum(max(c.values()) for c in costs.values())) / total
    if not low <= target <= high:
        raise ValueError(f"--target-bpw {target}: this model can reach {low:.3f} to {high:.3f} "
                         f"bits per weight at group size {group_size}")
    choice = allocate_bits(costs, errors, target * total - fixed)
    for p, b in choice.items():
        plan[p] = (b, group_size, "affine")
    for p in list(quant):
        if isinstance(quant[p], dict):
            del quant[p]
    for p, (b, g, m) in sorted(plan.items()):
        if (b, g, m) != (quant["bits"], quant["group_size"], quant["mode"]):
            quant[p] = {"group_size": g, "bits": b, "mode": m}
    for p in errors:  # output sizes follow the new widths
        sizes[f"{p}.weight"] = _out_nbytes(weights[f"{p}.weight"].shape, dsize, plan[p])
    hist = {}
    for b in choice.values():
        hist[b] = hist.get(b, 0) + 1
    log("target-bpw: layers per bit width " + ", ".join(f"{b}-bit {n}"
                                                          for b, n in sorted(hist.items())))


# ---------------------------------------------------------------- the command

def _source_dtype(config: dict, weights: dict):
    name = config.get("dtype") or config.get("torch_dtype")
    if str(name) in _DTYPES:
        return _DTYPES[str(name)]
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float16


def convert(src: Union[str, Path], out: Union[str, Path], *, fmt: str = "affine",
            bits: Optional[int] = None, group_size: Optional[int] = None,
            dtype: Optional[str] = None, recipe: Optional[str] = None, dequantize: bool = False,
            method: str = "rtn", target_bpw: Optional[float] = None,
            calibration: Optional[Union[str, Path]] = None, num_samples: int = 128,
            seq_len: int = 512, act_order: bool = False, damp: float = 0.01,
            shard_size_gb: float = DEFAULT_SHARD_GB, force: bool = False,
            progress: bool = True, log: Callable = lambda s: None) -> ConvertResult:
    """Write a quantized (or, with `dequantize`, float) copy of `src` to the folder `out`."""
    out = Path(out).expanduser()
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if shard_size_gb <= 0:
        raise ValueError(f"--shard-size {shard_size_gb}: must be positive")
    if target_bpw is not None:
        if recipe:
            raise ValueError("--target-bpw and --recipe both choose per-layer bits: give one")
        if fmt != "affine" or dequantize:
            raise ValueError("--target-bpw needs --format affine")
        if calibration is None:
            raise ValueError("--target-bpw needs --calibration FILE (layer sensitivity is "
                             "measured on it)")
        if not Path(calibration).is_file():
            raise ValueError(f"--calibration {calibration}: no such file")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"--method {method!r}: use rtn or gptq")
    if method == "gptq":
        if dequantize or fmt != "affine":
            raise ValueError("--method gptq writes --format affine only (and not --dequantize)")
        if calibration is None:
            raise ValueError("--method gptq needs --calibration FILE (plain text)")
        if not Path(calibration).is_file():
            raise ValueError(f"--calibration {calibration}: no such file")
        if num_samples < 1 or seq_len < 2:
            raise ValueError("--num-samples and the sequence length must be positive")
        try:
            from . import gptq  # noqa: F401
        except ImportError:
            raise ValueError("--method gptq is not available in this build; use --method rtn"
                             ) from None
    if not dequantize:
        _, bits, group_size = formats.resolve(fmt, bits, group_size)
        if fmt not in ("affine", "mxfp4", "nvfp4"):
            raise ValueError(f"--format {fmt!r}: convert writes affine, mxfp4 or nvfp4")
        roles = parse_recipe(recipe, bits)
        if recipe and fmt != "affine":
            raise ValueError(f"--recipe needs --format affine ({fmt} has only 4-bit codes)")
        for role, b in roles.items():
            formats.resolve(fmt, b, group_size)  # ValueError names the bad bits
    _check_out(out, force)

    path = resolve_path(src)
    if out.exists() and out.resolve() == path.resolve():
        raise MarlinError(f"{out}: the output folder is the source folder")
    config = read_config(path)
    model = build_model(path, config)
    weights, _ = load_weights_lazily(weight_files(path))
    quant_src = quantization_of(config, path / "config.json")
    if quant_src is not None and not dequantize:
        raise MarlinError(f"{path}: already quantized (use --dequantize to get float weights "
                          "back, then convert that)")
    if quant_src is None and dequantize:
        raise MarlinError(f"{path}: not quantized; nothing to dequantize")
    try:
        weights = model.sanitize(weights)
    except (KeyError, ValueError, IndexError) as e:
        raise MarlinError(f"{path}: the weights do not fit the {config['model_type']} layout "
                          f"({e})") from None

    target = _DTYPES[dtype] if dtype else _source_dtype(config, weights)
    dtype_name = next(k for k, v in _DTYPES.items() if v == target)
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)
    dsize = target.size

    def cast(k, v):
        if mx.issubdtype(v.dtype, mx.floating) and keep(k):
            return v.astype(target)
        return v

    if dequantize:
        quantize_for_checkpoint(model, quant_src, weights)  # learns each layer's bits/group/mode
        layers = {p: m for p, m in model.named_modules() if f"{p}.scales" in weights
                  and hasattr(m, "bits")}
        plan, skipped, quant = {}, [], None
        names = sorted(k for k in weights if not (k.rsplit(".", 1)[-1] in ("scales", "biases")
                                                  and k.rsplit(".", 1)[0] in layers))
        sizes = {}
        for k in names:
            p = k.rsplit(".", 1)[0]
            if p in layers and k.endswith(".weight"):
                shape = weights[f"{p}.scales"].shape[:-1] + (
                    weights[f"{p}.scales"].shape[-1] * layers[p].group_size,)
            else:
                shape = weights[k].shape
            sizes[k] = math.prod(shape) * dsize

        def produce(k):
            p = k.rsplit(".", 1)[0]
            if p in layers and k.endswith(".weight"):
                m = layers[p]
                w = mx.dequantize(weights.pop(k), weights.pop(f"{p}.scales"),
                                  weights.pop(f"{p}.biases", None), group_size=m.group_size,
                                  bits=m.bits, mode=m.mode, dtype=target)
                return {k: w}
            return {k: cast(k, weights.pop(k))}
    else:
        plan, skipped = _plan(model, weights, fmt, group_size, roles)
        quant = {"group_size": group_size, "bits": bits, "mode": fmt}
        base_bits = roles["default"]
        quant["bits"] = base_bits
        for p, (b, g, m) in sorted(plan.items()):
            if (b, g, m) != (base_bits, group_size, fmt):
                quant[p] = {"group_size": g, "bits": b, "mode": m}
        names = sorted(weights)
        sizes = {}
        for k in names:
            p = k.rsplit(".", 1)[0]
            q = plan.get(p) if k.endswith(".weight") else None
            sizes[k] = _out_nbytes(weights[k].shape, dsize, q)
        hessians = {}
        if method == "gptq" or target_bpw is not None:
            hessians, errors = calibrate(path, config, plan, calibration, num_samples, seq_len,
                                          log, method == "gptq",
                                          BPW_CANDIDATES if target_bpw else ())
            if target_bpw is not None:
                _apply_target(plan, errors, weights, names, sizes, target_bpw, group_size, dsize,
                              quant, log)
            skipped += [f"{p}: no Hessian (not a plain Linear), round-to-nearest" for p in plan
                        if method == "gptq" and p not in hessians]

        def produce(k):
            p = k.rsplit(".", 1)[0]
            if k.endswith(".weight") and p in plan:
                b, g, m = plan[p]
                w = weights.pop(k)
                H = hessians.pop(p, None)
                if H is not None:
                    from .gptq import gptq_quantize

                    packed, scales, biases = gptq_quantize(w.astype(mx.float32), H, b, g,
                                                           act_order=act_order, damp=damp,
                                                           dtype=target)
                else:
                    packed, scales, biases = _quantize(w.astype(target), b, g, m)
                res = {k: packed, f"{p}.scales": scales}
                if biases is not None:
                    res[f"{p}.biases"] = biases
                return res
            return {k: cast(k, weights.pop(k))}

    # bits per weight from the plan (float tensors count their stored dtype's bits)
    qbits = qcount = fbits = fcount = 0
    for k in names:
        p = k.rsplit(".", 1)[0]
        if dequantize:
            n = sizes[k] // dsize if p in layers else math.prod(weights[k].shape)
        else:
            n = math.prod(weights[k].shape)
        if not dequantize and k.endswith(".weight") and p in plan:
            b, g, m = plan[p]
            qbits += n * formats.bits_per_weight(m, b, g, scale_bits=dsize * 8)
            qcount += n
        else:
            floating = dequantize and p in layers or mx.issubdtype(weights[k].dtype, mx.floating)
            store = target if floating and keep(k) else weights[k].dtype
            fbits += n * store.size * 8
            fcount += n
    bpw = (qbits + fbits) / max(qcount + fcount, 1)
    qbpw = qbits / qcount if qcount else 0.0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        n_shards, n_tensors, nbytes = _write_shards(
            tmp, names, produce, sizes, int(shard_size_gb * (1 << 30)), progress)
        _write_config(tmp, config, quant, dtype_name)
        _copy_extras(path, tmp)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in skipped:
        log(f"note: {note}")
    return ConvertResult(out, n_shards, n_tensors, bpw, qbpw, nbytes, skipped)
