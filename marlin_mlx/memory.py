"""Memory profile of a model: after load, after prefilling a context, during decode.

MLX's allocator counts every buffer it holds (`mx.get_active_memory`), and its peak can be reset
(`mx.reset_peak_memory`), so each phase gets its own peak. The split:

- weights: bytes of the model's parameters (as loaded, quantized where the checkpoint is);
- KV cache: bytes the caches hold (`nbytes`: allocated, including the unused tail of the last
  256-token step);
- other: the rest of the phase's peak over the memory in use before the model was loaded
  (activations, logits, temporaries of the kernels, allocator rounding).

Host RSS (Linux /proc) is reported alongside: on unified-memory machines it includes the
weights, on a discrete GPU it shows the host side only.
"""

from __future__ import annotations

import time
from typing import Optional

import mlx.core as mx

from .bench import load_runtime, prefill, prompt_ids, vocab_size_of
from .errors import MarlinError
from .measure import GB, PeakRSS, free_memory, machine_info

SCHEMA = "marlin-mlx/memory/1"


def _kv_bytes(cache) -> int:
    return sum(getattr(c, "nbytes", 0) for c in cache)


def _kv_used_bytes(cache) -> int:
    """Bytes of the cached entries themselves, without the unused tail of the last step."""
    total = 0
    for c in cache:
        k, v = getattr(c, "keys", None), getattr(c, "values", None)
        if isinstance(k, mx.array) and isinstance(v, mx.array) and k.ndim == 4 and k.shape[2]:
            total += (k.nbytes + v.nbytes) * min(c.offset, k.shape[2]) // k.shape[2]
        else:  # other cache layouts (e.g. a latent cache): what they report as their state
            total += sum(a.nbytes for a in (c.state or []) if isinstance(a, mx.array))
    return total


def profile_memory(model_path, context: int = 4096, gen_tokens: int = 64, batch_size: int = 1,
                   prefill_step: int = 2048, runtime: str = "marlin-mlx", dtype=None,
                   seed: int = 0) -> dict:
    """Peak memory per phase, split into weights, KV cache and the rest (bytes)."""
    if context < 1 or gen_tokens < 1 or batch_size < 1 or prefill_step < 1:
        raise MarlinError("--context, --gen-tokens, --batch-size and --prefill-step must be >= 1")
    free_memory()
    baseline = mx.get_active_memory()
    rss_baseline = PeakRSS.current()

    loaded = load_runtime(runtime, model_path, dtype=dtype)
    model = loaded.model
    weights = loaded.load["weight_bytes"]
    after_load_active = mx.get_active_memory()
    load_peak = baseline + loaded.load["load_peak_memory_bytes"]

    prompt = prompt_ids(vocab_size_of(loaded), batch_size, context, seed)
    mx.eval(prompt)
    free_memory()
    mx.reset_peak_memory()
    cache = loaded.make_cache()
    t0 = time.perf_counter()
    y = prefill(model, cache, prompt, prefill_step)
    mx.eval(y)
    prefill_s = time.perf_counter() - t0
    prefill_peak = mx.get_peak_memory()
    kv_prefill = _kv_bytes(cache)
    after_prefill_active = mx.get_active_memory()

    mx.reset_peak_memory()
    kv_start = kv_prefill
    for _ in range(gen_tokens):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(y)
    mx.eval(y)
    decode_peak = mx.get_peak_memory()
    kv_decode = _kv_bytes(cache)
    kv_used = _kv_used_bytes(cache)
    rss_peak = PeakRSS.peak()

    def split(peak, kv):
        return {"peak_bytes": peak, "weights_bytes": weights, "kv_cache_bytes": kv,
                "other_bytes": peak - baseline - weights - kv}

    n_layers = len(cache)
    report = {
        "schema": SCHEMA,
        "kind": "memory",
        "model": str(model_path),
        "runtime": runtime,
        "machine": machine_info(),
        "settings": {"context": context, "gen_tokens": gen_tokens, "batch_size": batch_size,
                     "prefill_step": prefill_step, "seed": seed},
        "baseline_bytes": baseline,
        "load": {**split(load_peak, 0), "active_after_bytes": after_load_active,
                 "load_time_s": loaded.load["load_time_s"],
                 "rss_growth_bytes": loaded.load["load_rss_growth_bytes"],
                 "rss_growth_over_weights": loaded.load.get("load_rss_over_weights")},
        "prefill": {**split(prefill_peak, kv_prefill), "active_after_bytes": after_prefill_active,
                    "seconds": prefill_s},
        "decode": {**split(decode_peak, kv_decode),
                   "kv_growth_bytes": kv_decode - kv_start,
                   "kv_used_bytes": kv_used,
                   "kv_bytes_per_token": kv_used / (batch_size * (context + gen_tokens))},
        "peak_bytes": max(load_peak, prefill_peak, decode_peak),
        "rss_baseline_bytes": rss_baseline,
        "rss_peak_bytes": rss_peak,
        "kv_layers": n_layers,
    }
    return report


def format_memory(report: dict) -> str:
    def gb(n) -> str:
        return "-" if n is None else f"{n / GB:.3f} GB"

    s, m = report["settings"], report["machine"]
    lines = [f"=== Memory profile: {report['model']} ({report['runtime']}) ===",
             f"device: {m['device']} ({m['device_name']})   mlx {m['mlx']}   {m['date']}",
             f"context {s['context']} x batch {s['batch_size']}, {s['gen_tokens']} decode tokens",
             "", f"baseline (before load):   {gb(report['baseline_bytes'])}"]
    for phase, title in (("load", "after load"), ("prefill", f"prefill ({s['context']} tokens)"),
                         ("decode", "during decode")):
        p = report[phase]
        lines.append(f"{title + ':':<26}{gb(p['peak_bytes'])} peak")
        lines.append(f"  - weights:               {gb(p['weights_bytes'])}")
        lines.append(f"  - KV cache:              {gb(p['kv_cache_bytes'])}")
        lines.append(f"  - other:                 {gb(p['other_bytes'])}")
    lines.append(f"KV cache per token:       "
                 f"{report['decode']['kv_bytes_per_token'] / 1024:.1f} KiB")
    lines.append(f"peak usage:               {gb(report['peak_bytes'])}")
    ld = report["load"]
    if ld.get("rss_growth_bytes") is not None:
        ratio = ld.get("rss_growth_over_weights")
        lines.append(f"load RSS growth:          {gb(ld['rss_growth_bytes'])}"
                     + (f" ({ratio:.2f}x the weights)" if ratio else ""))
    if report.get("rss_peak_bytes"):
        lines.append(f"host peak RSS:            {gb(report['rss_peak_bytes'])}")
    return "\n".join(lines)


def profile_memory_for(model: Optional[str], random_weights: Optional[str], **kwargs) -> dict:
    """`profile_memory` on a checkpoint, or on random weights of a preset's shapes."""
    if (model is None) == (random_weights is None):
        raise MarlinError("give exactly one of --model or --random-weights")
    if model is not None:
        return profile_memory(model, **kwargs)
    from .random_weights import RandomCheckpoint

    build = {k: kwargs.pop(k) for k in ("bits", "group_size", "fmt") if k in kwargs}
    with RandomCheckpoint(random_weights, dtype=kwargs.get("dtype"), **build) as path:
        report = profile_memory(path, **kwargs)
    report["model"] = f"random:{random_weights}"
    return report
