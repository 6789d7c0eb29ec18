"""Prefill attention with large heads: our flash_prefill kernel against MLX's attention (whose
CUDA backend falls back to a score matrix for heads over 128), same inputs, same run.

    python benchmarks/flash_attention.py --json out.json
GLM-4.7-Flash's expanded prefill shapes by default: 20 heads, D = 256, DV = 256, bfloat16.
Each timing is one graph of `--reps` launches built before the clock starts; median of rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from marlin_mlx.kernels import flash_attention as fa
from marlin_mlx.measure import machine_info


def timed(fn, reps: int, rounds: int) -> float:
    """µs per call: `reps` calls chained in one graph (each call's output feeds a dummy add so
    none is dropped), median of `rounds`."""
    mx.eval(fn())
    out = []
    for _ in range(rounds):
        ys = [fn() for _ in range(reps)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(ys)
        out.append((time.perf_counter() - t0) / reps)
    return 1e6 * statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--dv", type=int, default=256)
    p.add_argument("--dvb", default="128,256", help="output columns per threadgroup to try")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dt = mx.bfloat16
    res = {**machine_info(), "heads": a.heads, "d": a.d, "dv": a.dv, "dtype": "bfloat16",
           "lengths": {}}
    for L in (int(x) for x in a.lengths.split(",")):
        q = mx.random.normal((1, a.heads, L, a.d)).astype(dt)
        k = mx.random.normal((1, a.heads, L, a.d)).astype(dt)
        v = mx.random.normal((1, a.heads, L, a.dv)).astype(dt)
        mx.eval(q, k, v)
        scale = a.d ** -0.5
        ref = fa.reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale)
        flops = 2 * a.heads * L * L * (a.d + a.dv) / 2  # causal: half the score matrix
        r = {"mlx_us": timed(lambda: fa.reference(q, k, v, scale), a.reps, a.rounds)}
        for dvb in (int(x) for x in a.dvb.split(",")):
            o = fa.flash_prefill_kernel(q, k, v, scale, dvb)
            err = (mx.linalg.norm(o.astype(mx.float32) - ref) / mx.linalg.norm(ref)).item()
            us = timed(lambda: fa.flash_prefill_kernel(q, k, v, scale, dvb), a.reps, a.rounds)
            r[f"ours_dvb{dvb}"] = {"us": us, "rel_err_vs_f32": err, "tflops": flops / us / 1e6,
                                   "speedup_vs_mlx": r["mlx_us"] / us}
        res["lengths"][L] = r
        print(f"L={L:5d} mlx {r['mlx_us']:9.1f} us  " + "  ".join(
            f"dvb{k[8:]} {v['us']:8.1f} us ({v['speedup_vs_mlx']:.2f}x, {v['tflops']:.0f} TF, "
            f"err {v['rel_err_vs_f32']:.1e})" for k, v in r.items() if k.startswith("ours")),
            flush=True)
        ref = None
        mx.clear_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
