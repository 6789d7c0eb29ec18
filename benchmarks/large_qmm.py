"""large_qmm against dequantize + matmul and the 16-bit matmul, side by side in one run.

For each shape and M: the 16-bit matmul (x @ W.T on dense weights), our dequantize kernel +
MLX's matmul (the large-M path before large_qmm), MLX's quantized_matmul, and large_qmm in each
tiling asked for (checked against the reference first). Wall clock per launch inside one graph,
weight copies rotated past L2 (kernels.timeit). Writes JSON (rows + meta with the command).

    python benchmarks/large_qmm.py --dtype bfloat16 --ms 128,256,512,1024,4096 --out R.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import mlx.core as mx

from marlin_mlx.kernels import large_qmm, launch
from marlin_mlx.kernels.dequantize import dequantize_kernel
from marlin_mlx.measure import machine_info

from kernels import ROTATE_BYTES, fp16_times, parse_shapes, timeit, weight_sets  # benchmarks/


def parse_tilings(spec: str) -> dict:
    """'auto;MW1NX128ST3' -> {'auto': {}, 'MW1NX128ST3': {'MW': 1, 'NX': 128, 'ST': 3}}"""
    out = {}
    for name in spec.split(";"):
        kw, rest = {}, name
        for key in ("MW", "NX", "WG", "ST"):
            if key in rest:
                tail = rest.split(key, 1)[1]
                digits = tail[:len(tail) - len(tail.lstrip("0123456789"))]
                kw[key] = int(digits)
        out[name] = {} if name == "auto" else kw
    return out


def bench(K, N, Ms, dtype, tilings, gs=64):
    fp = fp16_times(K, N, Ms, dtype)
    qbytes = N * K // 2 + 4 * N * (K // gs)
    qsets = weight_sets(N, K, "affine-4", dtype, max(2, math.ceil(ROTATE_BYTES / qbytes)))
    rows = []
    for M in Ms:
        x = mx.random.normal((M, K)).astype(dtype)
        mx.eval(x)
        row = {"K": K, "N": N, "M": M, "dtype": str(dtype), "group_size": gs,
               "fp16_us": fp[M] * 1e6, "fp16_TFLOPs": 2 * M * N * K / fp[M] / 1e12}
        row["dq+mm_us"] = 1e6 * timeit(
            lambda: [x @ dequantize_kernel(*s, gs, 4, dtype).T for s in qsets], len(qsets))
        row["mlx_us"] = 1e6 * timeit(
            lambda: [mx.quantized_matmul(x, *s, transpose=True, group_size=gs, bits=4)
                     for s in qsets], len(qsets))
        ref = (x @ dequantize_kernel(*qsets[0], gs, 4, dtype).T).astype(mx.float32)
        for name, kw in tilings.items():
            try:
                y = large_qmm.large_qmm_kernel(x, *qsets[0], gs, **kw).astype(mx.float32)
                err = (mx.linalg.norm(y - ref) / mx.linalg.norm(ref)).item()
                t = timeit(lambda: [large_qmm.large_qmm_kernel(x, *s, gs, **kw) for s in qsets],
                           len(qsets))
            except Exception as e:  # noqa: BLE001 - a tiling that does not build is a result
                row[f"lqmm_{name}_error"] = repr(e)[:300]
                continue
            row[f"lqmm_{name}_us"] = t * 1e6
            row[f"lqmm_{name}_err"] = err
            row[f"lqmm_{name}_vs_fp16"] = fp[M] / t
            row[f"lqmm_{name}_vs_dq+mm"] = row["dq+mm_us"] / 1e6 / t
        tx = timeit(lambda: [large_qmm.permute_kernel(x) for _ in range(8)], 8)
        row["permute_us"] = tx * 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    del qsets
    mx.clear_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="128,256,512,1024,4096")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--shapes", default=None, help="K:N,K:N (default: the kernel matrix's five)")
    ap.add_argument("--tilings", default="auto", help="e.g. 'auto;MW1NX128ST3;MW2NX64ST4'")
    args = ap.parse_args(argv)
    if launch.backend() is None:
        print("no GPU backend: nothing to benchmark", file=sys.stderr)
        return 1
    shapes = parse_shapes(args.shapes)
    meta = machine_info()
    meta["command"] = " ".join(["python"] + sys.argv)
    rows = []
    for K, N in shapes:
        rows += bench(K, N, [int(m) for m in args.ms.split(",")], getattr(mx, args.dtype),
                      parse_tilings(args.tilings))
        if args.out:  # partial results survive a timeout
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
