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
- `--method gptq` and `--target-bpw` need the float model in memory for calibration
  (calibration.py: one forward + backward pass for the sensitivities; GPTQ one decoder layer at
  a time on cached hidden states, one layer's Hessians at a time), so they are for small and
  medium models; plain round-to-nearest conversion streams.
- A GPTQ/AWQ source (qweight/qzeros/scales[/g_idx]) is written as affine exactly as stored
  (importers.py; no second rounding); act-order layers are refused (mlx-lm cannot express their
  input permutation; marlin-mlx loads such folders directly).
- Measured (Qwen3-8B shapes, random bf16 weights, 16.4 GB, 4-bit g64, 2-core CPU box): peak RSS
  1.6 GB in 54 s; the output is bit-identical to mlx-lm's convert of the same folder.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from . import checkpoint_writer as writer
from .calibration import calibrate
from .errors import MarlinError
from .kernels import formats
from .loader import (_check_against_model, _imported_format, build_model,
                     load_weights_lazily, quantization_of, quantize_for_checkpoint, read_config,
                     resolve_path, weight_files)

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
    # what --target-bpw 4.5 chose on demo-base, by role: the wider group (g128 costs 0.25 bpw
    # less than g64 and loses almost nothing) pays for 5-bit embedding and output head
    "mixed-4.5": {"default": (4, 128), "embed": (5, 128), "lm_head": (5, 128)},
}
PRESET_HELP = "; ".join(f"{k}: " + ", ".join(
    f"{r}={b[0]}:{b[1]}" if isinstance(b, tuple) else f"{r}={b}" for r, b in v.items())
    for k, v in PRESETS.items())
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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
    """`NAME` of a preset or `role=bits[:group],...` -> {role: bits or (bits, group)} with
    `default` filled in (a role without `:group` uses --group-size)."""
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
        b, _, g = value.partition(":")
        try:
            out[role] = (int(b), int(g)) if g else int(b)
        except ValueError:
            raise ValueError(f"--recipe: {role!r} needs bits or bits:group (integers), found "
                             f"{value!r}") from None
    return out


def _spec(value, group_size: int) -> tuple:
    """A recipe value -> (bits, group size)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, group_size)


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
        bits, g = _spec(roles.get(role_of(path), roles["default"]), group_size)
        if k % g:
            skipped.append(f"{path}: input dimension {k} not divisible by group size "
                           f"{g}, kept in float")
            continue
        eligible += 1
        plan[path] = (bits, g, fmt)
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


# ---------------------------------------------------------------- GPTQ / AWQ sources

def _convert_imported(path, out, config, model, weights, source, qcfg, dtype, shard_size_gb,
                      progress) -> ConvertResult:
    """A GPTQ/AWQ folder -> mlx-lm affine folder with exactly the source's weights
    (importers.py: codes repacked, bias = -scale * zero, both exact in float32).  Scales and
    biases are stored in the output dtype where that is exact for the whole layer (e.g. symmetric
    checkpoints in float16), else in float32; nothing is rounded a second time.  The imported
    tensors are held in memory (the size of the quantized model), float tensors stream."""
    from .importers import import_quantized

    try:
        weights, quant = import_quantized(weights, qcfg)
    except ValueError as e:
        raise MarlinError(f"{path}: cannot import this quantized checkpoint ({e})") from None
    perm = sorted(k[: -len(".input_perm")] for k in weights if k.endswith(".input_perm"))
    if perm:
        raise MarlinError(f"{path}: {perm[0]} uses act-order (g_idx), whose input permutation "
                          "mlx-lm's affine format cannot express; load the folder directly with "
                          "marlin-mlx (it imports act-order layers on load)")
    try:
        weights = model.sanitize(weights)
    except (KeyError, ValueError, IndexError) as e:
        raise MarlinError(f"{path}: the weights do not fit the {config['model_type']} layout "
                          f"({e})") from None
    quantize_for_checkpoint(model, quant, weights)
    _check_against_model(model, weights, {k: source[k] for k in weights if k in source}, path)
    layers = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    floats = {k: v for k, v in weights.items()
              if k.rsplit(".", 1)[0] not in layers and mx.issubdtype(v.dtype, mx.floating)}
    target = _DTYPES[dtype] if dtype else _source_dtype(config, floats)
    dtype_name = next(k for k, v in _DTYPES.items() if v == target)
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)
    exact32 = []
    for p in layers:
        s, b = weights[f"{p}.scales"], weights[f"{p}.biases"]
        s2, b2 = s.astype(target), b.astype(target)
        if bool(mx.array_equal(s2.astype(s.dtype), s).item()) and \
                bool(mx.array_equal(b2.astype(b.dtype), b).item()):
            weights[f"{p}.scales"], weights[f"{p}.biases"] = s2, b2
        else:
            exact32.append(p)
    for k in floats:
        if keep(k):
            weights[k] = weights[k].astype(target)
    modules = dict(model.named_modules())
    qbits = qcount = fbits = fcount = 0
    for k, v in weights.items():
        p = k.rsplit(".", 1)[0]
        if p in layers and k.rsplit(".", 1)[1] in ("weight", "scales", "biases"):
            qbits += v.nbytes * 8
            if k.endswith(".weight"):
                qcount += v.size * 32 // modules[p].bits
        else:
            fbits += v.nbytes * 8
            fcount += v.size
    names = sorted(weights)
    sizes = {k: weights[k].nbytes for k in names}
    tmp = writer.tmp_for(out)
    try:
        n_shards, n_tensors, nbytes = writer.write_shards(
            tmp, names, lambda k: {k: weights.pop(k)}, sizes, int(shard_size_gb * (1 << 30)),
            progress)
        writer.write_config(tmp, config, quant, dtype_name)
        writer.copy_extras(path, tmp)
        writer.finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = [f"{p}: scales/biases kept in float32 ({dtype_name} would round them)"
             for p in exact32]
    return ConvertResult(out, n_shards, n_tensors, (qbits + fbits) / max(qcount + fcount, 1),
                         qbits / qcount if qcount else 0.0, nbytes, notes)


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
    group_given = group_size is not None
    given = [name for name, v in (("--format", fmt != "affine"), ("--bits", bits is not None),
                                  ("--group-size", group_given), ("--recipe", bool(recipe)),
                                  ("--target-bpw", target_bpw is not None),
                                  ("--method", method != "rtn"), ("--dequantize", dequantize))
             if v]
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
        for role, v in roles.items():
            formats.resolve(fmt, *_spec(v, group_size))  # ValueError names the bad bits/group
    writer.check_out(out, force)

    path = resolve_path(src)
    if out.exists() and out.resolve() == path.resolve():
        raise MarlinError(f"{out}: the output folder is the source folder")
    config = read_config(path)
    model = build_model(path, config)
    weights, source = load_weights_lazily(weight_files(path))
    imported = _imported_format(path, config)
    if imported is not None:
        if given:
            raise ValueError(f"{path}: a GPTQ/AWQ checkpoint is written as affine exactly as "
                             f"stored; {', '.join(given)} do not apply")
        return _convert_imported(path, out, config, model, weights, source, imported, dtype,
                                 shard_size_gb, progress)
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
        base_bits, base_group = _spec(roles["default"], group_size)
        quant = {"group_size": base_group, "bits": base_bits, "mode": fmt}
        for p, (b, g, m) in sorted(plan.items()):
            if (b, g, m) != (base_bits, base_group, fmt):
                quant[p] = {"group_size": g, "bits": b, "mode": m}
        names = sorted(weights)
        sizes = {}
        for k in names:
            p = k.rsplit(".", 1)[0]
            q = plan.get(p) if k.endswith(".weight") else None
            sizes[k] = _out_nbytes(weights[k].shape, dsize, q)
        gptq_out = {}
        if method == "gptq" or target_bpw is not None:
            gptq_out = calibrate(path, config, plan, weights, names, sizes, quant, target,
                                 dsize, calibration, num_samples, seq_len, method, target_bpw,
                                 group_given, act_order, damp, skipped, log, _out_nbytes)

        def produce(k):
            p = k.rsplit(".", 1)[0]
            if k.endswith(".weight") and p in plan:
                b, g, m = plan[p]
                w = weights.pop(k)
                if f"{p}.weight" in gptq_out:  # computed (and small) already
                    packed = gptq_out.pop(f"{p}.weight")
                    scales, biases = gptq_out.pop(f"{p}.scales"), gptq_out.pop(f"{p}.biases")
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

    tmp = writer.tmp_for(out)
    try:
        n_shards, n_tensors, nbytes = writer.write_shards(
            tmp, names, produce, sizes, int(shard_size_gb * (1 << 30)), progress)
        writer.write_config(tmp, config, quant, dtype_name)
        writer.copy_extras(path, tmp)
        writer.finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in skipped:
        log(f"note: {note}")
    return ConvertResult(out, n_shards, n_tensors, bpw, qbpw, nbytes, skipped)
