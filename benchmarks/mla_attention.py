"""Batch-1 MLA decode attention over MLACache's latent buffer (GLM-4.7-Flash: 20 heads,
rows of kv_lora_rank 512 + rope 64), by path: MLX's SDPA on the sliced buffer (what the model
runs without a cache hook), the paged-attention kernel reading the buffer as 256-token blocks,
and two MLX matmuls with a softmax over the buffer in place (models/mla_cache.py).

    python benchmarks/mla_attention.py --out results.json

Each round evaluates one call per layer-sized cache for LAYERS caches in one graph (the working
set exceeds L2, as in a decode step); the median over rounds is reported per call, with the
relative error against float64."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.mla_cache import MLACache  # noqa: E402

HEADS, RANK, ROPE = 20, 512, 64
LAYERS = 47


def make_caches(ctx: int, dtype, rng):
    caches = []
    for _ in range(LAYERS):
        c = MLACache()
        latent = mx.array(rng.standard_normal((1, 1, ctx, RANK)).astype(np.float32)).astype(dtype)
        rope = mx.array(rng.standard_normal((1, 1, ctx, ROPE)).astype(np.float32)).astype(dtype)
        c.update_and_fetch(latent, rope)
        caches.append(c)
    mx.eval([c.buffer for c in caches])
    return caches


def attend(cache: MLACache, q, scale, how: str):
    if how == "sdpa":
        entries = cache.buffer[..., : cache.offset, :]
        return mx.fast.scaled_dot_product_attention(q, entries, entries[..., :RANK], scale=scale)
    cache.decode_attention = how
    return cache.attend(q, None, None, scale)


def reference64(cache: MLACache, q, scale):
    rows = np.array(cache.buffer[0, 0, : cache.offset].astype(mx.float32), dtype=np.float64)
    qs = np.array(q[0, :, 0].astype(mx.float32), dtype=np.float64)
    s = qs @ rows.T * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ rows[:, :RANK]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,1024,8192")
    ap.add_argument("--paths", default="sdpa,paged,matmul")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    dtype = mx.bfloat16
    rng = np.random.default_rng(0)
    scale = (192 + 64) ** -0.5
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        caches = make_caches(ctx, dtype, rng)
        q = mx.array(rng.standard_normal((1, HEADS, 1, RANK + ROPE)).astype(np.float32)).astype(dtype)
        ref = reference64(caches[0], q, scale)
        for how in a.paths.split(","):
            out = attend(caches[0], q, scale, how)
            err = float(np.linalg.norm(np.array(out[0, :, 0].astype(mx.float32)) - ref)
                        / np.linalg.norm(ref))
            mx.eval([attend(c, q, scale, how) for c in caches])  # warm: compile, select
            times = []
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                mx.eval([attend(c, q, scale, how) for c in caches])
                times.append((time.perf_counter() - t0) / LAYERS)
            us = 1e6 * statistics.median(times)
            rows.append({"context": ctx, "path": how, "us_per_call": us, "rel_err": err})
            print(f"ctx {ctx:6d}  {how:7s} {us:8.1f} µs/call  rel err {err:.2e}", flush=True)
        del caches
    res = {"benchmark": "mla_attention", "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "mlx": mx.__version__,
        "device": str(mx.default_device()), "layers_per_graph": LAYERS, "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
