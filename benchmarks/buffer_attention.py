"""Decode attention over KVCache buffers: kernels/buffer_attention.py's kernel at several tilings
against MLX's SDPA over the filled rows and the paged kernel reading each buffer whole.

    python benchmarks/buffer_attention.py --out results.json [--ctx 128,2048] [--tilings 4x8,4x4]

Qwen3-8B / Llama-3.1-8B heads (32 query, 8 kv, 128 wide), bfloat16, one sequence unless --batch.
Each timed call reads another set of buffers (a decode step's 36 layers each have their own), so
the working set exceeds L2; one round = all calls in one graph (one mx.eval), the median over
rounds is reported per call, with the bandwidth (K/V bytes of the context / time)."""

from __future__ import annotations

import argparse
import datetime
import json

import mlx.core as mx
from paged_attention import _time  # benchmarks/: one graph per round, median per call

from marlin_mlx.kernels import buffer_attention as ba
from marlin_mlx.kernels.launch import backend
from marlin_mlx.kernels.selection import rel_err

NH, KVH, D = 32, 8, 128
POOL_BYTES = 256 << 20


def _tiling(nw: int, tpw: int, target: int):
    if (ba.NW, ba.TPW, ba.TARGET_TGS) != (nw, tpw, target):
        ba.NW, ba.TPW, ba.TARGET_TGS = nw, tpw, target
        ba._PLANS.clear()


def run_case(B, ctx, dtype, tilings, n_calls=36):
    cap = -(-(ctx + 1) // 256) * 256  # a KVCache's buffer after `ctx` tokens (step 256)
    per_set = 2 * B * KVH * cap * D * dtype.size
    sets = max(2, min(n_calls, POOL_BYTES // per_set))
    keys = [mx.random.normal((B, KVH, cap, D)).astype(dtype) for _ in range(sets)]
    values = [mx.random.normal((B, KVH, cap, D)).astype(dtype) for _ in range(sets)]
    qs = [mx.random.normal((B, NH, D)).astype(dtype) for _ in range(sets)]
    lens = mx.full((B,), ctx, dtype=mx.int32)
    mx.eval(keys, values, qs, lens)
    scale = D ** -0.5
    calls = range(n_calls)
    out = {"batch": B, "ctx": ctx, "capacity": cap, "sets": sets}
    bytes_read = 2 * B * KVH * ctx * D * dtype.size

    def sdpa(i):
        j = i % sets
        return mx.fast.scaled_dot_product_attention(qs[j][:, :, None], keys[j][:, :, :ctx],
                                                    values[j][:, :, :ctx], scale=scale)[:, :, 0]

    ref = ba.reference(qs[0], keys[0], values[0], lens, scale)
    t = _time([lambda i=i: sdpa(i) for i in calls])
    out["sdpa_us"] = t * 1e6
    paths = [("paged_whole", None)] + [(f"buffer_{nw}x{tpw}" + (f"t{tg}" if tg else ""),
                                         (nw, tpw, tg or ba.TARGET_TGS))
                                        for nw, tpw, tg in tilings]
    for name, tiling in paths:
        if tiling is None:
            saved = ba.fits
            ba.fits = lambda *a: False  # the fallback: the paged kernel over whole buffers
        else:
            _tiling(*tiling)

        def kern(i):
            j = i % sets
            return ba.buffer_attention_kernel(qs[j], keys[j], values[j], lens, scale)

        try:
            out[f"{name}_err"] = rel_err(kern(0), ref)
            t = _time([lambda i=i: kern(i) for i in calls])
            out[f"{name}_us"] = t * 1e6
            out[f"{name}_vs_sdpa"] = out["sdpa_us"] / out[f"{name}_us"]
            out[f"{name}_GBps"] = bytes_read / t / 1e9
        finally:
            if tiling is None:
                ba.fits = saved
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", default="128,512,2048,8192,32768")
    p.add_argument("--batch", default="1")
    p.add_argument("--tilings", default="8x8,8x4,4x8,4x16,8x8t528,8x8t1056,4x8t1056",
                   help="warps x tokens per warp of the kernel, optionally tN: N threadgroups "
                        "wanted by the split (comma-separated)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if backend() is None:
        print("no GPU backend: nothing to time")
        return 1
    dtype = getattr(mx, a.dtype)
    tilings = []
    for t in (t for t in a.tilings.split(",") if t):
        nw, rest = t.split("x")
        tpw, _, tg = rest.partition("t")
        tilings.append((int(nw), int(tpw), int(tg) if tg else 0))
    default = (ba.NW, ba.TPW, ba.TARGET_TGS)
    report = {"kind": "buffer_attention", "mlx": mx.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "command": "python benchmarks/buffer_attention.py " + " ".join(argv or []),
              "heads": [NH, KVH, D], "dtype": a.dtype,
              "default_tiling": {"NW": default[0], "TPW": default[1], "TARGET_TGS": default[2]},
              "cases": []}
    try:
        report["device"] = mx.device_info().get("device_name")
    except Exception:  # noqa: BLE001
        pass
    for B in (int(b) for b in a.batch.split(",")):
        for ctx in (int(c) for c in a.ctx.split(",")):
            r = run_case(B, ctx, dtype, tilings)
            _tiling(*default)
            report["cases"].append(r)
            cols = "  ".join(f"{k[:-3]} {v:7.1f}" for k, v in r.items() if k.endswith("_us"))
            print(f"B{B} ctx {ctx:6d}: µs  {cols}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
