"""Kernel benchmark: our quantized ops vs MLX's built-in quantized_matmul vs fp16 matmul.

Method (DESIGN.md): one lazy graph per round holding `n` launches, each over a different copy
of the weights, with the copies together larger than the GPU's L2, so every launch reads its
weights from memory; the median round time over `n` is the per-launch time. The measured
device-copy bandwidth is the roofline. Writes JSON (and prints a markdown table).

    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json
    python benchmarks/kernels.py --quick            # M = 1, 4, 8 only
    python benchmarks/kernels.py --formats affine-4,mxfp4 --ms 1,2,4,8,16   # a slice

Formats: affine 4-bit and 8-bit (group 64) and mxfp4 (group 32); ours is the fused qmv kernel
(affine: `qmv`, mxfp4: `fp4_qmv`) up to QMV_MAX_M rows, the tensor-core `qmm` (affine) up to
64 rows and, from QMV_MAX_M rows on, dequantize + MLX's matmul (affine: our dequantize kernel;
mxfp4: MLX's dequantize); the fastest is reported. The fp16 matmul is timed once per shape and M.
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

from marlin_mlx.kernels import large_qmm, launch, qmm
from marlin_mlx.kernels.dequantize import dequantize_kernel
from marlin_mlx.kernels.fp4_qmv import fp4_qmv_kernel
from marlin_mlx.kernels.quantized_linear import _dq_matmul_fp4
from marlin_mlx.kernels.qmm import qmm_kernel
from marlin_mlx.kernels.qmv import qmv_kernel

SHAPES = [(4096, 12288), (12288, 4096), (4096, 4096), (8192, 28672), (28672, 8192)]  # K -> N
MS = [1, 2, 4, 8, 16, 32, 64, 512, 4096]
# format label -> (mode, bits, group size)
FORMATS = {"affine-4": ("affine", 4, 64), "affine-8": ("affine", 8, 64), "mxfp4": ("mxfp4", 4, 32)}
QMV_MAX_M = 16  # rows of x up to which the fused GEMV kernels are timed
L2_BYTES = 60e6
ROTATE_BYTES = 2.5 * L2_BYTES  # every launch still reads its weights from HBM


def device_name() -> str:
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or "gpu")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def timeit(make_outputs, n: int, rounds: int = 7, warmup: int = 1) -> float:
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


def weight_sets(N, K, fmt, dtype, copies):
    """`copies` independent weight sets: (w,) dense, (w, scales[, biases]) quantized."""
    sets = []
    for _ in range(copies):
        w = mx.random.normal((N, K)).astype(dtype) * 0.02
        if fmt is None:
            sets.append((w,))
        else:
            mode, bits, gs = FORMATS[fmt]
            q = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
            sets.append(tuple(q) if mode == "affine" else tuple(q[:2]))
        mx.eval(*sets[-1])
    return sets


def nbytes(arrs) -> int:
    return sum(a.nbytes for a in arrs)


def fp16_times(K, N, Ms, dtype=mx.float16) -> dict:
    """Seconds per fp16 matmul launch for each M (shared by every format of the shape)."""
    fsets = weight_sets(N, K, None, dtype, max(2, math.ceil(ROTATE_BYTES / (2 * N * K))))
    out = {}
    for M in Ms:
        x = mx.random.normal((M, K)).astype(dtype)
        mx.eval(x)
        out[M] = timeit(lambda: [x @ w.T for (w,) in fsets], len(fsets))
    del fsets
    mx.clear_cache()
    return out


def bench_shape(K, N, Ms, fmt="affine-4", dtype=mx.float16, variants=None, check=True,
                fp16=None, qmm_variants=None):
    """Rows of results for one weight shape and format (`fp16`: fp16_times of the shape)."""
    mode, bits, gs = FORMATS[fmt]
    fp16 = fp16 or fp16_times(K, N, Ms, dtype)
    fp16_gemv_GBs = None
    # codes + per-group scales (and biases: affine, in the weights' dtype; fp formats: 1 byte)
    qbytes = N * K * bits // 8 + (2 * 2 * N * (K // gs) if mode == "affine" else N * (K // gs))
    qsets = weight_sets(N, K, fmt, dtype, max(2, math.ceil(ROTATE_BYTES / qbytes)))

    def builtin(x, s):
        return mx.quantized_matmul(x, *s, transpose=True, group_size=gs, bits=bits, mode=mode)

    def ours_qmv(x, s, kw):
        if mode == "affine":
            return qmv_kernel(x, *s, gs, bits, **kw)
        return fp4_qmv_kernel(x, *s, mode)

    def ours_dq_mm(x, s):
        if mode == "affine":
            return x @ dequantize_kernel(*s, gs, bits, dtype).T
        return _dq_matmul_fp4(x, *s, mode)  # fp4: MLX's dequantize, then its matmul

    rows = []
    for M in Ms:
        x = mx.random.normal((M, K)).astype(dtype)
        mx.eval(x)
        io = x.nbytes + M * N * 2
        row = {"K": K, "N": N, "M": M, "bits": fmt, "format": mode, "code_bits": bits,
               "group_size": gs, "dtype": str(dtype), "weight_bytes": qbytes, "fp16_bytes": 2 * N * K}
        t_f = fp16[M]
        t_b = timeit(lambda: [builtin(x, s) for s in qsets], len(qsets))
        row.update(fp16_us=t_f * 1e6, fp16_GBs=(2 * N * K + io) / t_f / 1e9,
                   mlx_us=t_b * 1e6, mlx_GBs=(qbytes + io) / t_b / 1e9)
        if M == 1:
            fp16_gemv_GBs = row["fp16_GBs"]
        best = None
        if M >= QMV_MAX_M:
            t = timeit(lambda: [ours_dq_mm(x, s) for s in qsets], len(qsets))
            row["ours_dq+mm_us"] = t * 1e6
            best = ("dq+mm", t)
        candidates = []
        qmv_variants = (variants or {"auto": {}}) if mode == "affine" else {"auto": {}}
        for name, kw in (qmv_variants if M <= QMV_MAX_M else {}).items():
            candidates.append((name, lambda x, s, kw=kw: ours_qmv(x, s, kw)))
        if mode == "affine" and M > qmm.MAX_M and large_qmm.supported(x, *qsets[0], gs, bits):
            candidates.append(("lqmm", lambda x, s: large_qmm.large_qmm_kernel(x, *s, gs, bits)))
        if mode == "affine" and M <= qmm.MAX_M:
            for name, kw in (qmm_variants or {"auto": {}}).items():
                candidates.append(("qmm" if name == "auto" else f"qmm-{name}",
                                   lambda x, s, kw=kw: qmm_kernel(x, *s, gs, bits, **kw)))
        for name, fn in candidates:
            if check:
                y = fn(x, qsets[0])
                ref = builtin(x, qsets[0])
                err = (mx.linalg.norm((y - ref).astype(mx.float32)) /
                       mx.linalg.norm(ref.astype(mx.float32))).item()
                row[f"err_{name}"] = err
            t = timeit(lambda: [fn(x, s) for s in qsets], len(qsets))
            row[f"ours_{name}_us"] = t * 1e6
            if best is None or t < best[1]:
                best = (name, t)
        if best is None:  # no kernel of ours for this case: MLX's path is what runs
            best = ("builtin", t_b)
        t = best[1]
        row.update(best=best[0], ours_us=t * 1e6, ours_GBs=(qbytes + io) / t / 1e9,
                   vs_mlx=t_b / t, vs_fp16=t_f / t)
        if fp16_gemv_GBs:
            row["ours_frac_fp16_gemv_bw"] = row["ours_GBs"] / fp16_gemv_GBs
        rows.append(row)
        print(f"{fmt:>8} K={K:6d} N={N:6d} M={M:4d}: ours {t*1e6:8.1f} us ({row['ours_GBs']:6.0f} GB/s,"
              f" {best[0]}) mlx {t_b*1e6:8.1f} us fp16 {t_f*1e6:8.1f} us  x{t_b/t:4.2f} vs mlx "
              f"x{t_f/t:4.2f} vs fp16", flush=True)
    del qsets
    return rows


def table(rows) -> str:
    out = ["| K→N | M | format | ours µs | GB/s | of fp16 GEMV GB/s | MLX µs | fp16 µs | vs MLX | "
           "vs fp16 | path |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = r.get("ours_frac_fp16_gemv_bw")
        out.append(f"| {r['K']}→{r['N']} | {r['M']} | {r['bits']} | {r['ours_us']:.1f} | "
                   f"{r['ours_GBs']:.0f} | {'-' if frac is None else f'{frac:.2f}'} | "
                   f"{r['mlx_us']:.1f} | {r['fp16_us']:.1f} | "
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
    for (K, N, fmt) in sorted({(r["K"], r["N"], r["bits"]) for r in rows}):
        rs = [r for r in rows if (r["K"], r["N"], r["bits"]) == (K, N, fmt)]
        for ax, key in zip(axes, ("vs_mlx", "vs_fp16")):
            ax.plot([r["M"] for r in rs], [r[key] for r in rs], marker="o",
                    label=f"{K}->{N} {fmt}")
    for ax, title in zip(axes, ("speed-up vs MLX quantized_matmul", "speed-up vs fp16 matmul")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("M")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_variants(spec: str | None, keys=("PF", "SK", "R")):
    """'auto;R4SK2;R8' -> {'auto': {}, 'R4SK2': {'R': 4, 'SK': 2}, ...} (qmm: keys SK, NT)"""
    if not spec:
        return None
    out = {}
    for v in spec.split(";"):
        kw = {}
        rest = v
        for key in keys:
            if key in rest:
                i = rest.index(key)
                num = "".join(ch for ch in rest[i + len(key):] if ch.isdigit())
                kw[key] = int(num)
                rest = rest[:i]
        out[v] = kw
    return out


def parse_shapes(spec: str | None) -> list:
    """'K:N,K:N' -> [(K, N), ...]; None -> the issue's five shapes."""
    return SHAPES if not spec else [tuple(map(int, s.split(":"))) for s in spec.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="activation (and fp16-baseline) dtype")
    ap.add_argument("--shapes", default=None, help="K:N,K:N")
    ap.add_argument("--variants", default=None, help="qmv launch variants, e.g. 'auto;R4SK2'")
    ap.add_argument("--qmm-variants", default=None, help="qmm launch variants, e.g. 'auto;NT2SK4'")
    args = ap.parse_args(argv)
    if launch.backend() is None:
        print("no GPU backend: nothing to benchmark", file=sys.stderr)
        return 1
    shapes = parse_shapes(args.shapes)
    Ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 4, 8] if args.quick else MS)
    variants = parse_variants(args.variants)
    qmm_variants = parse_variants(args.qmm_variants, ("SK", "NT"))
    dtype = getattr(mx, args.dtype)
    meta = {"device": device_name(), "backend": launch.backend(), "mlx": mx.__version__,
            "dtype": args.dtype,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "command": " ".join(["python"] + sys.argv)}
    bw = copy_bandwidth()
    meta["copy_GBs"] = bw / 1e9
    meta["launch_floor_us"] = launch_floor(64) * 1e6
    print(f"{meta}", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            print(f"unknown format {fmt!r} (expected {', '.join(FORMATS)})", file=sys.stderr)
            return 2
    fp16 = {}
    for K, N in shapes:
        fp16[(K, N)] = fp16_times(K, N, Ms, dtype)
    for fmt in args.formats.split(","):
        for K, N in shapes:
            rows += bench_shape(K, N, Ms, fmt=fmt, dtype=dtype, variants=variants, fp16=fp16[(K, N)],
                                qmm_variants=qmm_variants)
            mx.clear_cache()
            if args.out:  # partial results survive a timeout
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
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
