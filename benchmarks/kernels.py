"""Kernel benchmark: our quantized ops vs MLX's built-in quantized_matmul vs fp16 matmul.

Method (DESIGN.md): one lazy graph per round holding `n` launches, each over a different copy
of the weights, with the copies together larger than the GPU's L2, so every launch reads its
weights from memory; the median round time over `n` is the per-launch time. The measured
device-copy bandwidth is the roofline. Writes JSON (and prints a markdown table).

    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json
    python benchmarks/kernels.py --quick            # fewer shapes / M values
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import mlx.core as mx

from marlin_mlx.kernels import launch
from marlin_mlx.kernels.dequantize import dequantize_kernel
from marlin_mlx.kernels.qmv import qmv_kernel

SHAPES = [(4096, 12288), (12288, 4096), (4096, 4096), (8192, 28672), (28672, 8192)]  # K -> N
MS = [1, 2, 4, 8, 16, 32, 64, 512, 4096]
L2_BYTES = 60e6
ROTATE_BYTES = 4 * L2_BYTES


def device_name() -> str:
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or "gpu")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def timeit(make_outputs, n: int, rounds: int = 15, warmup: int = 3) -> float:
    """Median seconds per launch: each round evaluates one graph of `n` launches.

    The graph is built before the clock starts (in a decode loop graph building overlaps the
    previous step's GPU work); the clock covers MLX's encoding and the GPU's execution."""
    for _ in range(warmup):
        mx.eval(make_outputs())
    ts = []
    for _ in range(rounds):
        outs = make_outputs()
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / n


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written)."""
    arrs = [mx.random.normal((128, 1024, 1024)).astype(mx.float16) for _ in range(4)]  # 4 x 256 MB
    mx.eval(*arrs)
    t = timeit(lambda: [a * 2 for a in arrs], len(arrs), rounds=10)
    return 2 * arrs[0].nbytes / t


def launch_floor(n: int) -> float:
    """Per-launch time of a tiny custom kernel in a graph of n: the host/launch floor."""
    q, s, b = mx.quantize(mx.random.normal((32, 64)).astype(mx.float16), group_size=64, bits=4)
    xs = [mx.random.normal((1, 64)).astype(mx.float16) for _ in range(n)]
    mx.eval(q, s, b, *xs)
    return timeit(lambda: [qmv_kernel(x, q, s, b, 64, 4) for x in xs], n)


def weight_sets(N, K, bits, gs, dtype, copies):
    sets = []
    for _ in range(copies):
        w = mx.random.normal((N, K)).astype(dtype) * 0.02
        if bits is None:
            sets.append((w,))
        else:
            sets.append(tuple(mx.quantize(w, group_size=gs, bits=bits)))
        mx.eval(*sets[-1])
    return sets


def nbytes(arrs) -> int:
    return sum(a.nbytes for a in arrs)


def bench_shape(K, N, Ms, bits=4, gs=64, dtype=mx.float16, variants=None, check=True):
    """Rows of results for one weight shape."""
    qbytes = N * K * bits // 8 + 2 * N * (K // gs) * 2
    copies_q = max(2, math.ceil(ROTATE_BYTES / qbytes))
    copies_f = max(2, math.ceil(ROTATE_BYTES / (2 * N * K)))
    qsets = weight_sets(N, K, bits, gs, dtype, copies_q)
    fsets = weight_sets(N, K, None, gs, dtype, copies_f)
    rows = []
    for M in Ms:
        x = mx.random.normal((M, K)).astype(dtype)
        mx.eval(x)
        io = x.nbytes + M * N * 2
        row = {"K": K, "N": N, "M": M, "bits": bits, "group_size": gs, "dtype": str(dtype),
               "weight_bytes": qbytes, "fp16_bytes": 2 * N * K}
        t_f = timeit(lambda: [x @ w.T for (w,) in fsets], len(fsets))
        t_b = timeit(lambda: [mx.quantized_matmul(x, *s, transpose=True, group_size=gs,
                                                  bits=bits) for s in qsets], len(qsets))
        row.update(fp16_us=t_f * 1e6, fp16_GBs=(2 * N * K + io) / t_f / 1e9,
                   mlx_us=t_b * 1e6, mlx_GBs=(qbytes + io) / t_b / 1e9)
        best = None
        if M >= 16:
            t = timeit(lambda: [x @ dequantize_kernel(*s, gs, bits, dtype).T for s in qsets],
                       len(qsets))
            row["ours_dq+mm_us"] = t * 1e6
            best = ("dq+mm", t)
        for name, kw in ((variants or {"auto": {}}) if M <= 16 else {}).items():
            if check:
                y = qmv_kernel(x, *qsets[0], gs, bits, **kw)
                ref = mx.quantized_matmul(x, *qsets[0], transpose=True, group_size=gs, bits=bits)
                err = (mx.linalg.norm((y - ref).astype(mx.float32)) /
                       mx.linalg.norm(ref.astype(mx.float32))).item()
                row[f"err_{name}"] = err
            t = timeit(lambda: [qmv_kernel(x, *s, gs, bits, **kw) for s in qsets], len(qsets))
            row[f"ours_{name}_us"] = t * 1e6
            if best is None or t < best[1]:
                best = (name, t)
        kw = (variants or {}).get(best[0], {})
        t0 = time.perf_counter()
        for s in qsets * 4:
            qmv_kernel(x, *s, gs, bits, **kw) if M <= 16 else None
        row["host_us_ours"] = (time.perf_counter() - t0) / (4 * len(qsets)) * 1e6
        t0 = time.perf_counter()
        for s in qsets * 4:
            mx.quantized_matmul(x, *s, transpose=True, group_size=gs, bits=bits)
        row["host_us_mlx"] = (time.perf_counter() - t0) / (4 * len(qsets)) * 1e6
        t = best[1]
        row.update(best=best[0], ours_us=t * 1e6, ours_GBs=(qbytes + io) / t / 1e9,
                   vs_mlx=t_b / t, vs_fp16=t_f / t)
        rows.append(row)
        print(f"K={K:6d} N={N:6d} M={M:3d}: ours {t*1e6:7.1f} us ({row['ours_GBs']:6.0f} GB/s, "
              f"{best[0]}) mlx {t_b*1e6:7.1f} us fp16 {t_f*1e6:7.1f} us  x{t_b/t:4.2f} vs mlx "
              f"x{t_f/t:4.2f} vs fp16", flush=True)
    del qsets, fsets
    return rows


def table(rows) -> str:
    out = ["| K→N | M | bits | ours µs | GB/s | MLX µs | fp16 µs | vs MLX | vs fp16 | variant |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['K']}→{r['N']} | {r['M']} | {r['bits']} | {r['ours_us']:.1f} | "
                   f"{r['ours_GBs']:.0f} | {r['mlx_us']:.1f} | {r['fp16_us']:.1f} | "
                   f"{r['vs_mlx']:.2f}x | {r['vs_fp16']:.2f}x | {r['best']} |")
    return "\n".join(out)


def plot(rows, path):
    """Speed-up over MLX's built-in and over fp16 against M, one line per shape (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (K, N, bits) in sorted({(r["K"], r["N"], r["bits"]) for r in rows}):
        rs = [r for r in rows if (r["K"], r["N"], r["bits"]) == (K, N, bits)]
        for ax, key in zip(axes, ("vs_mlx", "vs_fp16")):
            ax.plot([r["M"] for r in rs], [r[key] for r in rs], marker="o",
                    label=f"{K}->{N} {bits}-bit")
    for ax, title in zip(axes, ("speed-up vs MLX quantized_matmul", "speed-up vs fp16 matmul")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("M")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_variants(spec: str | None):
    """'auto;R4SK2;R8' -> {'auto': {}, 'R4SK2': {'R': 4, 'SK': 2}, ...}"""
    if not spec:
        return None
    out = {}
    for v in spec.split(";"):
        kw = {}
        rest = v
        for key in ("PF", "SK", "R"):
            if key in rest:
                i = rest.index(key)
                num = "".join(ch for ch in rest[i + len(key):] if ch.isdigit())
                kw[key] = int(num)
                rest = rest[:i]
        out[v] = kw
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--shapes", default=None, help="K:N,K:N")
    ap.add_argument("--variants", default=None)
    args = ap.parse_args(argv)
    if launch.backend() is None:
        print("no GPU backend: nothing to benchmark", file=sys.stderr)
        return 1
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split(":")))
                                             for s in args.shapes.split(",")]
    Ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 4, 8] if args.quick else MS)
    variants = parse_variants(args.variants)
    meta = {"device": device_name(), "backend": launch.backend(), "mlx": mx.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node()}
    bw = copy_bandwidth()
    meta["copy_GBs"] = bw / 1e9
    meta["launch_floor_us"] = launch_floor(64) * 1e6
    print(f"{meta}", flush=True)
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for K, N in shapes:
            rows += bench_shape(K, N, Ms, bits=bits, variants=variants)
    result = {"meta": meta, "rows": rows}
    md = (f"{meta['device']}, MLX {meta['mlx']} ({meta['backend']}), {meta['date']}; "
          f"per-launch wall time, graph of n launches, weights rotated past L2\n\n" + table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        stem = os.path.splitext(args.out)[0]
        with open(stem + ".md", "w") as f:
            f.write(md + "\n")
        plot(rows, stem + ".png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
