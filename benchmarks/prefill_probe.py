"""Where one batch-1 prefill of a quantized model spends its time, variant by variant.

Builds a model of a preset's shapes with random weights in memory, then for each MoE prefill
variant (kernels/moe_experts.py PREFILL_VARIANTS, through $MARLIN_MLX_MOE_PREFILL) times the
prefill of a random prompt as `marlin-mlx bench` does (one chunk, the last token alone) and,
with --profile, takes the GPU time per kernel (CUPTI through PyTorch's profiler) of one more.

    python benchmarks/prefill_probe.py --preset glm-4.7-flash --prompt 2048 \
        --variants dequant_blocks,quant_blocks --profile --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_probe import build, cupti_profile  # noqa: E402

from marlin_mlx import bench  # noqa: E402
from marlin_mlx.kernels import moe_experts  # noqa: E402
from marlin_mlx.measure import machine_info  # noqa: E402


def ttft(model, prompt, step: int) -> float:
    cache = model.make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(bench.prefill(model, cache, prompt, step))
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="glm-4.7-flash")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick checks)")
    p.add_argument("--vocab", type=int, default=None, help="smaller vocabulary (CPU checks)")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="dequant_blocks,quant_blocks",
                   help="comma-separated MoE prefill variants ($MARLIN_MLX_MOE_PREFILL values), "
                        "each optionally with environment overrides: variant+NAME=VALUE+...")
    p.add_argument("--profile", action="store_true", help="CUPTI GPU time per kernel")
    p.add_argument("--check", type=int, default=0,
                   help="also compare each variant's logits at every position of a prompt of "
                        "this many tokens (no cache) with the first variant's")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    model, config = build(a.preset, a.bits, a.group_size, layers=a.layers, vocab=a.vocab)
    mx.random.seed(0)
    prompt = mx.random.randint(0, config["vocab_size"], (1, a.prompt)).astype(mx.uint32)
    out = {**machine_info(), "preset": a.preset, "bits": a.bits, "group_size": a.group_size,
           "prompt": a.prompt, "layers": config["num_hidden_layers"], "variants": {}}
    base_env = dict(os.environ)
    first_logits = None
    for v in a.variants.split(","):
        # "variant+NAME=VALUE+...": the MoE prefill variant with environment overrides
        name, *env = v.split("+")
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(kv.split("=", 1) for kv in env)
        os.environ[moe_experts.ENV_PREFILL] = name
        r = {}
        try:
            for _ in range(2):  # kernels compiled, the selection measured
                ttft(model, prompt, a.prefill_step)
            times = [ttft(model, prompt, a.prefill_step) for _ in range(a.rounds)]
            t = statistics.median(times)
            r = {"ttft_ms": 1e3 * t, "prefill_tps": a.prompt / t,
                 "ttft_ms_all": [round(1e3 * x, 2) for x in times],
                 "moe_paths": sorted(set(moe_experts._PATHS.values()))}
            print(f"{v:20s} TTFT {r['ttft_ms']:8.1f} ms  {r['prefill_tps']:8.0f} tok/s  "
                  f"paths {r['moe_paths']}", flush=True)
            if a.check:
                logits = model(prompt[:, :a.check]).astype(mx.float32)
                if first_logits is None:
                    first_logits = logits
                r["check"] = {
                    "tokens": a.check,
                    "logits_rel_err_vs_first": (mx.linalg.norm(logits - first_logits)
                                                / mx.linalg.norm(first_logits)).item(),
                    "top1_agreement_vs_first": (logits.argmax(-1) == first_logits.argmax(-1)
                                                ).astype(mx.float32).mean().item()}
                print(f"    check: {r['check']}", flush=True)
            if a.profile:
                cache = model.make_cache()
                r["profile"] = cupti_profile(
                    lambda: mx.eval(bench.prefill(model, cache, prompt, a.prefill_step)), 1)
                for k in r["profile"]["top_kernels"][:12]:
                    print(f"    {k['us_per_step']:9.1f} us  x{k['launches_per_step']:<5g} "
                          f"{k['name'][:110]}", flush=True)
                print(f"    GPU kernels {r['profile']['gpu_kernel_ms_per_step']:.1f} ms, "
                      f"wall {r['profile']['wall_ms_per_step']:.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant keeps the others' numbers
            r = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"{v:20s} {r['error']}", flush=True)
        out["variants"][v] = r
        mx.clear_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
