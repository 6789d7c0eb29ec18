"""Throughput benchmark: prefill, decode, time to first token, memory and load time.

The same timing code drives every runtime, so a side-by-side run compares the model
implementations and kernels, not two generation loops:

- load: wall time of `load_model` (marlin-mlx) or `mlx_lm.utils.load_model` until every weight
  is materialized, MLX's peak memory and the process's peak RSS during it (Linux resets the
  RSS high-water mark through /proc/self/clear_refs; elsewhere the peak is process-wide).
- one trial: a random prompt of P tokens (batch B) is prefilled through the KV cache in chunks
  of `prefill_step` tokens (all but the last token, whose logits alone are computed, as the
  generation loops do) and the first token is picked (greedy); time to first token (TTFT) is
  that wall time and prefill tok/s = B*P/TTFT. Then `gen_tokens` decode steps follow, each one
  lazy graph (model, argmax) handed to `mx.async_eval` before the previous token is read back on
  the host, as a real generation loop does; decode tok/s = B*gen_tokens / decode time. Tokens are
  generated for real and EOS does not stop the loop.
- `warmup` untimed trials, then `trials` timed ones; every figure is reported as median, mean,
  stdev, min and max. Peak memory is the weights plus the most MLX memory any timed trial
  needed beyond what was in use before it (KV cache, activations, logits).
- with `interleave`, both runtimes stay loaded and their trials alternate (ABBA order), so a
  drift in the machine's speed (a shared CPU, thermal limits) hits both alike.
- weights GB/s: bytes a decode step must read (all weights except an untied input embedding)
  times steps per second: the figure to hold against the device's copy bandwidth.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .measure import GB, PeakRSS, free_memory, machine_info, summarize

RUNTIMES = ("marlin-mlx", "mlx-lm")
SCHEMA = "marlin-mlx/bench/1"


# ----------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    runtime: str
    model: object
    config: dict
    make_cache: Callable[[], list]
    load: dict = field(default_factory=dict)


def param_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode_read_bytes(model) -> int:
    """Weight bytes one decode step reads: all, less an untied input embedding (one row read)."""
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    tied = "lm_head.weight" not in params and any(".embed_tokens." in k for k in params)
    if not tied:
        total -= sum(v.nbytes for k, v in params.items() if ".embed_tokens." in k)
    return total


def _float_dtype(model) -> Optional[mx.Dtype]:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return None


def _preimport(runtime: str, path) -> None:
    import importlib

    from . import loader

    try:
        model_type = loader.read_config(loader.resolve_path(path)).get("model_type")
    except Exception:
        return  # the load itself reports the problem
    try:
        if runtime == "marlin-mlx":
            from .models import get_model_class

            get_model_class(model_type)
        else:
            import mlx_lm.utils  # noqa: F401
            from mlx_lm.models import cache  # noqa: F401

            importlib.import_module(f"mlx_lm.models.{model_type}")
    except Exception:
        pass


def load_runtime(runtime: str, path, dtype=None) -> Loaded:
    """Load `path` with one runtime, timing it and measuring its memory."""
    if runtime not in RUNTIMES:
        from .errors import MarlinError

        raise MarlinError(f"unknown runtime {runtime!r} (supported: {', '.join(RUNTIMES)})")
    _preimport(runtime, path)  # Python import time is not load time
    free_memory()
    rss_before = PeakRSS.current()
    rss_resettable = PeakRSS.reset()
    active_before = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    cast_to = None
    if runtime == "marlin-mlx":
        from .loader import load_model

        model, config = load_model(path, dtype=dtype)
        make_cache = model.make_cache
    else:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model as mlx_lm_load_model

        from .loader import resolve_path

        from .loader import compute_dtype

        model, config = mlx_lm_load_model(resolve_path(path))
        target = compute_dtype(config, dtype)  # what marlin-mlx computes in
        if target is not None and _float_dtype(model) != target:
            # the same compute dtype on both sides (float32 on the CPU backend); the cast
            # happens after mlx-lm's own load, so its load memory includes a second copy
            model.set_dtype(target)
            cast_to = str(target)
        model.eval()

        def make_cache():
            return make_prompt_cache(model)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - t0
    weights = param_bytes(model)
    peak_rss = PeakRSS.peak()
    info = {
        "load_time_s": seconds,
        "weight_bytes": weights,
        "decode_read_bytes": decode_read_bytes(model),
        "load_peak_memory_bytes": mx.get_peak_memory() - active_before,
        "load_peak_rss_bytes": peak_rss,
        "load_rss_growth_bytes": (peak_rss - rss_before) if peak_rss and rss_before else None,
        "load_rss_resettable": rss_resettable,
        "dtype": str(_float_dtype(model)),
        "cast_after_load_to": cast_to,
    }
    if info["load_rss_growth_bytes"] is not None and rss_resettable:
        info["load_rss_over_weights"] = info["load_rss_growth_bytes"] / weights
    return Loaded(runtime, model, config, make_cache, info)


# ----------------------------------------------------------------------------- timing

def prefill(model, cache, prompt: mx.array, prefill_step: int) -> mx.array:
    """Feed `prompt` (B, P) through the cache; return the greedy next token (B,).

    As mlx-lm's and marlin-mlx's generation loops do: all but the last token in chunks whose
    logits are never computed (only the cache is evaluated), then the last token alone.
    """
    P = prompt.shape[1]
    done = 0
    while P - done > 1:
        n = min(prefill_step, P - done - 1)
        model(prompt[:, done:done + n], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
    logits = model(prompt[:, done:], cache=cache)
    return mx.argmax(logits[:, -1, :], axis=-1)


def run_trial(model, make_cache, prompt: mx.array, gen_tokens: int, prefill_step: int = 2048,
              keep_tokens: bool = False, forward: Optional[Callable] = None) -> dict:
    """One trial; `forward` (default: the model) runs the decode steps, e.g. marlin-mlx's
    compiled step from `generation.decode_forward`."""
    forward = forward or model
    B, P = prompt.shape
    cache = make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    y = prefill(model, cache, prompt, prefill_step)
    mx.eval(y)
    t1 = time.perf_counter()

    def step(tok):
        logits = forward(tok[:, None], cache=cache)
        return mx.argmax(logits[:, -1, :], axis=-1)

    tokens = [y.tolist()]
    nxt = step(y)
    mx.async_eval(nxt)
    for _ in range(gen_tokens - 1):
        y = nxt
        nxt = step(y)
        mx.async_eval(nxt)
        tokens.append(y.tolist())  # the host reads token n while n+1 computes
    tokens.append(nxt.tolist())
    t2 = time.perf_counter()
    ttft, decode = t1 - t0, t2 - t1
    out = {
        "ttft_s": ttft,
        "prefill_tps": B * P / ttft,
        "decode_s": decode,
        "decode_tps": B * gen_tokens / decode,
        "kv_cache_bytes": sum(getattr(c, "nbytes", 0) for c in cache),
    }
    if keep_tokens:
        out["tokens"] = [list(col) for col in zip(*tokens)]  # (B, gen_tokens + 1)
    return out


@dataclass
class BenchSettings:
    prompt_tokens: list = field(default_factory=lambda: [512])
    gen_tokens: int = 128
    trials: int = 5
    warmup: int = 1
    batch_size: int = 1
    prefill_step: int = 2048
    seed: int = 0
    compile: bool = True  # marlin-mlx decodes through its compiled step (mlx-lm never)

    def check(self) -> None:
        from .errors import MarlinError

        if not self.prompt_tokens or min(self.prompt_tokens) < 1:
            raise MarlinError("--prompt-tokens needs positive lengths, e.g. 512,2048")
        for name in ("gen_tokens", "trials", "batch_size", "prefill_step"):
            if getattr(self, name) < 1:
                raise MarlinError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise MarlinError("--warmup must be 0 or more")


def prompt_ids(vocab_size: int, batch: int, length: int, seed: int) -> mx.array:
    """The same random prompt for every runtime (ids from the whole vocabulary)."""
    key = mx.random.key(seed * 1_000_003 + length)
    return mx.random.randint(0, vocab_size, (batch, length), key=key).astype(mx.int32)


def vocab_size_of(loaded: Loaded) -> int:
    cfg = loaded.config
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not vocab:
        vocab = loaded.model.args.vocab_size
    return int(vocab)


def decode_fn(loaded: Loaded, settings: BenchSettings) -> Callable:
    """What runs the decode steps: marlin-mlx's compiled step (settings.compile) or the model."""
    if loaded.runtime != "marlin-mlx":
        return loaded.model
    from .generation import decode_forward

    return decode_forward(loaded.model, settings.compile)


def _timed_trial(loaded: Loaded, prompt: mx.array, settings: BenchSettings, keep: bool) -> dict:
    """One trial, with the memory it needed beyond what was already in use."""
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = run_trial(loaded.model, loaded.make_cache, prompt, settings.gen_tokens,
                    settings.prefill_step, keep_tokens=keep, forward=decode_fn(loaded, settings))
    out["extra_memory_bytes"] = mx.get_peak_memory() - before
    return out


def bench_runtimes(loadeds: list, settings: BenchSettings, interleave: bool = False,
                   progress: Optional[Callable] = None) -> dict:
    """All prompt lengths on each loaded runtime: one after the other, or with the trials of
    the runtimes alternating (fairer on a machine whose speed drifts, e.g. a shared CPU)."""
    out = {ld.runtime: {"load": ld.load, "results": []} for ld in loadeds}
    for P in settings.prompt_tokens:
        prompts = {ld.runtime: prompt_ids(vocab_size_of(ld), settings.batch_size, P, settings.seed)
                   for ld in loadeds}
        trials = {ld.runtime: [] for ld in loadeds}

        def warm(ld):
            for _ in range(settings.warmup):
                run_trial(ld.model, ld.make_cache, prompts[ld.runtime], settings.gen_tokens,
                          settings.prefill_step, forward=decode_fn(ld, settings))

        def timed(ld, t):
            trials[ld.runtime].append(_timed_trial(ld, prompts[ld.runtime], settings, t == 0))
            if progress:
                progress(ld.runtime, P, t + 1, trials[ld.runtime][-1])

        if interleave:
            for ld in loadeds:
                warm(ld)
            for t in range(settings.trials):
                for ld in (loadeds if t % 2 == 0 else loadeds[::-1]):
                    timed(ld, t)
        else:
            for ld in loadeds:
                warm(ld)
                for t in range(settings.trials):
                    timed(ld, t)
        for ld in loadeds:
            tr = trials[ld.runtime]
            extra = max(t["extra_memory_bytes"] for t in tr)
            row = {
                "prompt_tokens": P,
                "gen_tokens": settings.gen_tokens,
                "batch_size": settings.batch_size,
                "prefill_tps": summarize([t["prefill_tps"] for t in tr]),
                "decode_tps": summarize([t["decode_tps"] for t in tr]),
                "ttft_s": summarize([t["ttft_s"] for t in tr]),
                # weights plus the most any trial needed on top (cache, activations)
                "peak_memory_bytes": ld.load["weight_bytes"] + extra,
                "peak_memory_over_idle_bytes": extra,
                "kv_cache_bytes": tr[-1]["kv_cache_bytes"],
                "tokens_first_trial": tr[0]["tokens"],
            }
            steps_per_s = row["decode_tps"]["median"] / settings.batch_size
            row["weights_gbps"] = ld.load["decode_read_bytes"] * steps_per_s / GB
            out[ld.runtime]["results"].append(row)
    return out


def bench_loaded(loaded: Loaded, settings: BenchSettings,
                 progress: Optional[Callable] = None) -> dict:
    """All prompt lengths on one loaded runtime."""
    return bench_runtimes([loaded], settings, progress=progress)[loaded.runtime]


def _agreement(a: list, b: list) -> float:
    """Fraction of greedy tokens that agree before the first divergence, over the batch."""
    total = same = 0
    for ra, rb in zip(a, b):
        total += len(ra)
        for x, y in zip(ra, rb):
            if x != y:
                break
            same += 1
    return same / total if total else 0.0


def compare(ours: dict, theirs: dict) -> list:
    """Ratios marlin-mlx / mlx-lm per prompt length (> 1 means marlin-mlx is faster for
    throughput; for TTFT and memory < 1 is better)."""
    rows = []
    for a, b in zip(ours["results"], theirs["results"]):
        rows.append({
            "prompt_tokens": a["prompt_tokens"],
            "prefill_tps": a["prefill_tps"]["median"] / b["prefill_tps"]["median"],
            "decode_tps": a["decode_tps"]["median"] / b["decode_tps"]["median"],
            "ttft_s": a["ttft_s"]["median"] / b["ttft_s"]["median"],
            "peak_memory": a["peak_memory_bytes"] / max(b["peak_memory_bytes"], 1),
            "greedy_prefix_agreement": _agreement(a["tokens_first_trial"], b["tokens_first_trial"]),
        })
    rows.append({"load_time_s": ours["load"]["load_time_s"] / theirs["load"]["load_time_s"],
                 "weight_bytes": ours["load"]["weight_bytes"] / theirs["load"]["weight_bytes"]})
    return rows


def run_bench(model: Optional[str] = None, random_weights: Optional[str] = None,
              settings: Optional[BenchSettings] = None, compare_with: Optional[str] = None,
              bits: Optional[int] = 4, group_size: Optional[int] = None, fmt: str = "affine",
              dtype=None, save_random: Optional[str] = None, interleave: bool = False,
              progress: Optional[Callable] = None, log: Callable = lambda s: None) -> dict:
    """The whole benchmark; returns the JSON-ready report."""
    from .errors import MarlinError

    settings = settings or BenchSettings()
    settings.check()
    if (model is None) == (random_weights is None):
        raise MarlinError("give exactly one of --model or --random-weights")
    runtimes = ["marlin-mlx"]
    if compare_with:
        if compare_with != "mlx-lm":
            raise MarlinError(f"--compare {compare_with!r}: only mlx-lm is supported")
        runtimes.append("mlx-lm")

    quant = None
    if random_weights is not None:
        from .random_weights import RandomCheckpoint, quantization_settings, save_random_checkpoint

        quant = quantization_settings(bits, group_size, fmt)
        kw = dict(bits=bits, group_size=group_size, fmt=fmt, seed=settings.seed,
                  dtype=_dtype(dtype))
        log(f"building random weights for {random_weights} ({quant or 'unquantized'}) ...")
        t0 = time.perf_counter()
        if save_random:
            ctx = nullcontext(save_random_checkpoint(random_weights, save_random, **kw))
        else:
            ctx = RandomCheckpoint(random_weights, **kw)
    else:
        ctx = nullcontext(model)

    report = {
        "schema": SCHEMA,
        "kind": "bench",
        "model": model if model is not None else f"random:{random_weights}",
        "random_weights": random_weights,
        "quantization": quant,
        "machine": machine_info(),
        "command": sys.argv,
        "settings": {**asdict(settings), "interleave": interleave},
        "runtimes": {},
    }
    with ctx as path:
        if random_weights is not None:
            report["random_build_s"] = time.perf_counter() - t0
        report["checkpoint_bytes"] = _dir_bytes(path)
        loadeds = []
        for runtime in runtimes:
            log(f"loading {runtime} ...")
            loaded = load_runtime(runtime, path, dtype=_dtype(dtype))
            report.setdefault("config", _short_config(loaded.config))
            log(f"  loaded in {loaded.load['load_time_s']:.2f} s, "
                f"{loaded.load['weight_bytes'] / GB:.3f} GB of weights")
            if interleave:
                loadeds.append(loaded)  # both stay loaded; their trials alternate
                continue
            report["runtimes"][runtime] = bench_loaded(loaded, settings, progress)
            del loaded
            free_memory()
        if loadeds:
            report["runtimes"] = bench_runtimes(loadeds, settings, True, progress)
            del loadeds
            free_memory()
    if len(runtimes) == 2:
        report["ratios"] = compare(report["runtimes"]["marlin-mlx"], report["runtimes"]["mlx-lm"])
    return report


def _dtype(dtype):
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    from .loader import compute_dtype

    return compute_dtype({}, dtype)


def _dir_bytes(path) -> Optional[int]:
    p = Path(str(path))
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def _short_config(config: dict) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "tie_word_embeddings", "num_experts", "n_routed_experts", "quantization")
    return {k: config[k] for k in keys if k in config}


# ----------------------------------------------------------------------------- printing

def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GB:.3f} GB"


def format_report(report: dict) -> str:
    """A plain-text table; with two runtimes, side by side with ratios."""
    W = 30  # column width
    names = list(report["runtimes"])
    runs = [report["runtimes"][n] for n in names]
    m = report["machine"]
    lines = [f"model: {report['model']}   device: {m['device']} ({m['device_name']})   "
             f"mlx {m['mlx']}   mlx-lm {m['mlx_lm']}   {m['date']}"]
    s = report["settings"]
    lines.append(f"batch {s['batch_size']}, {s['gen_tokens']} decode tokens, median of "
                 f"{s['trials']} trials after {s['warmup']} warm-up (min..max)"
                 + (", runtimes' trials alternating" if s.get("interleave") else "")
                 + (", marlin-mlx compiled decode step" if s.get("compile") else
                    ", marlin-mlx uncompiled decode"))
    header = f"{'prompt':>7}  {'metric':<16}" + "".join(f"{n:>{W}}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>9}"
    lines += ["", header, "-" * len(header)]

    def cell(stat, scale=1.0, digits=1):
        return (f"{stat['median'] * scale:.{digits}f} ({stat['min'] * scale:.{digits}f}.."
                f"{stat['max'] * scale:.{digits}f})")

    for i, row in enumerate(runs[0]["results"]):
        rows = [r["results"][i] for r in runs]
        metrics = [("prefill tok/s", "prefill_tps", 1.0, 1), ("decode tok/s", "decode_tps", 1.0, 1),
                   ("TTFT ms", "ttft_s", 1e3, 1)]
        for j, (label, key, scale, digits) in enumerate(metrics):
            text = f"{row['prompt_tokens'] if j == 0 else '':>7}  {label:<16}"
            text += "".join(f"{cell(r[key], scale, digits):>{W}}" for r in rows)
            if len(rows) == 2:
                text += f"{rows[0][key]['median'] / rows[1][key]['median']:>8.2f}x"
            lines.append(text)
        text = f"{'':>7}  {'peak memory':<16}" + "".join(
            f"{_fmt_bytes(r['peak_memory_bytes']):>{W}}" for r in rows)
        if len(rows) == 2:
            text += f"{rows[0]['peak_memory_bytes'] / max(rows[1]['peak_memory_bytes'], 1):>8.2f}x"
        lines.append(text)
        lines.append(f"{'':>7}  {'weights GB/s':<16}" + "".join(
            f"{r['weights_gbps']:>{W}.2f}" for r in rows))
    lines.append("")
    for label, key, fmt in (("load time", "load_time_s", lambda v: f"{v:.2f} s"),
                            ("weights", "weight_bytes", _fmt_bytes),
                            ("load peak (MLX)", "load_peak_memory_bytes", _fmt_bytes),
                            ("load RSS growth", "load_rss_growth_bytes", _fmt_bytes)):
        vals = [r["load"].get(key) for r in runs]
        text = f"{'':>7}  {label:<16}" + "".join(f"{fmt(v) if v is not None else '-':>{W}}"
                                                 for v in vals)
        if len(vals) == 2 and all(v for v in vals):
            text += f"{vals[0] / vals[1]:>8.2f}x"
        lines.append(text)
    if "ratios" in report:
        agree = [r["greedy_prefix_agreement"] for r in report["ratios"] if "prompt_tokens" in r]
        lines.append("\ngreedy tokens agreeing with mlx-lm (prefix, first trial): "
                     + ", ".join(f"{a:.0%}" for a in agree))
    return "\n".join(lines)
