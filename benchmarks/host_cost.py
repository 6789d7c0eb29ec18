"""Wall time per graph node of chains of one op kind, evaluated on the GPU backend.

A batch-1 decode step of a MoE model is hundreds of small launches, and on the H200 GLM's was
host-bound (CUPTI: 5 ms of kernels in an 11.5 ms step). This measures what one node of each
kind costs when nothing else is in the graph: a chain of n dependent nodes is built first (not
timed), then `mx.eval` is timed. For ops whose GPU time is a few µs, the result is the host's
cost per node (MLX's eval, graph-node creation, CUDA graph update and launch).

    python benchmarks/host_cost.py --n 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from marlin_mlx.kernels import qmv as _qmv


def _chains(D: int):
    w, s, b = mx.quantize(mx.random.normal((D, D)).astype(mx.bfloat16) * 0.02, group_size=64,
                          bits=4)
    nw = mx.ones((D,), mx.bfloat16)
    mx.eval(w, s, b, nw)
    return {
        "add (builtin)": lambda y: y + 1.0,
        "rms_norm (builtin)": lambda y: mx.fast.rms_norm(y, nw, 1e-6),
        "quantized_matmul (builtin)": lambda y: mx.quantized_matmul(
            y, w, s, b, transpose=True, group_size=64, bits=4),
        "qmv (custom kernel)": lambda y: _qmv.qmv_kernel(y, w, s, b, 64, 4),
        "astype f32->bf16 pair": lambda y: y.astype(mx.float32).astype(mx.bfloat16),
    }


def per_node_us(fn, x, n: int, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        y = x
        for _ in range(n):
            y = fn(y)
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="nodes per chain")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--json")
    a = p.parse_args(argv)
    x = mx.random.normal((1, a.dim)).astype(mx.bfloat16)
    res = {}
    for name, fn in _chains(a.dim).items():
        if "custom" in name and _qmv.backend() is None:
            continue
        res[name] = per_node_us(fn, x, a.n, a.reps)
        print(f"{name:>28}: {res[name]:6.2f} µs per node", flush=True)
    out = {"n": a.n, "dim": a.dim, "mlx": mx.__version__, "us_per_node": res,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
