"""Paged-attention decode timing: the custom kernel vs the plain-MLX reference path vs MLX's
fused SDPA over contiguous K/V of the same length (the bar a paged cache should approach).

    python benchmarks/paged_attention.py --out results.json [--quick]

Every sequence of the batch attends to `ctx` tokens whose blocks (16 tokens) are scattered at
random over a pool; each timed call rotates to another set of sequences so that the working set
exceeds the GPU's L2 cache. One round = N calls in one graph (one mx.eval); the median over
rounds is reported, with the effective bandwidth (K/V bytes read / time)."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import mlx.core as mx

from marlin_mlx.kernels import paged_attention as pa
from marlin_mlx.kernels.launch import backend
from marlin_mlx.kernels import selection
from marlin_mlx.kernels.selection import rel_err

SHAPES = {  # name: (num_heads, num_kv_heads, k_dim, v_dim, mla)
    "qwen3-8b": (32, 8, 128, 128, False),
    "glm-mla": (20, 1, 576, 512, True),
}
BS = 16
POOL_BYTES = 256 << 20  # rotate over at least this many cache bytes


def _time(fns, rounds=5):
    """Median seconds per call; each round evaluates all of fns as one graph."""
    mx.eval([f() for f in fns[:2]])
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval([f() for f in fns])
        ts.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(ts)


def run_case(shape, B, ctx, dtype, n_calls=32):
    nh, kvh, dk, dv, mla = SHAPES[shape]
    row_bytes = kvh * (dk + (0 if mla else dv)) * dtype.size
    mb = -(-ctx // BS)
    sets = max(1, min(n_calls, POOL_BYTES // (B * mb * BS * row_bytes)))
    nblocks = sets * B * mb
    kc = mx.random.normal((nblocks, kvh, BS, dk)).astype(dtype)
    vc = None if mla else mx.random.normal((nblocks, kvh, BS, dv)).astype(dtype)
    perm = mx.random.permutation(nblocks).astype(mx.int32).reshape(sets, B, mb)
    lens = mx.full((B,), ctx, dtype=mx.int32)
    qs = [mx.random.normal((B, nh, dk)).astype(dtype) for _ in range(sets)]
    mx.eval(kc, perm, qs, *([] if vc is None else [vc]))
    scale = dk ** -0.5
    tables = [perm[i] for i in range(sets)]

    def kern(i):
        return pa.paged_attention_kernel(qs[i], kc, vc, tables[i], lens, scale, dv)

    def ref(i):
        return pa.reference_paged_attention(qs[i], kc, vc, tables[i], lens, scale, v_dim=dv)

    err = rel_err(kern(0), ref(0))
    rec = {"shape": shape, "B": B, "ctx": ctx, "dtype": str(dtype).split(".")[-1],
           "heads": f"{nh}/{kvh}x{dk}" + (f"/{dv} (MLA)" if mla else ""),
           "rel_err_vs_reference": err, "kv_bytes": B * ctx * row_bytes}
    idx = [i % sets for i in range(n_calls)]
    rec["kernel_us"] = _time([lambda i=i: kern(i) for i in idx]) * 1e6
    nref = max(2, min(n_calls, 4 if B * ctx >= 32 * 4096 else n_calls))
    rec["reference_us"] = _time([lambda i=i: ref(i) for i in idx[:nref]], rounds=3) * 1e6
    # contiguous K/V of the same length through MLX's fused SDPA (its own rotation sets)
    csets = sets
    ks = [pa.gather_paged(kc, tables[i][b], ctx) for i in range(csets) for b in range(B)]
    kcont = [mx.concatenate(ks[i * B:(i + 1) * B]) for i in range(csets)]
    if mla:
        vcont = [k[..., :dv] for k in kcont]
        vcont = [mx.contiguous(v) for v in vcont]
    else:
        vs = [pa.gather_paged(vc, tables[i][b], ctx) for i in range(csets) for b in range(B)]
        vcont = [mx.concatenate(vs[i * B:(i + 1) * B]) for i in range(csets)]
    mx.eval(kcont, vcont)
    try:
        def sdpa(i):
            return mx.fast.scaled_dot_product_attention(qs[i][:, :, None], kcont[i], vcont[i],
                                                        scale=scale)
        rec["sdpa_contiguous_us"] = _time([lambda i=i: sdpa(i % csets) for i in idx]) * 1e6
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        rec["sdpa_contiguous_us"] = None
        rec["sdpa_error"] = f"{type(e).__name__}: {e}"[:200]
    rec["kernel_GBps"] = rec["kv_bytes"] / rec["kernel_us"] / 1e3
    del kc, vc, kcont, vcont, ks
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="paged_attention.json")
    ap.add_argument("--quick", action="store_true", help="one dtype, fewer cases")
    args = ap.parse_args()
    if backend() is None:
        raise SystemExit("needs an MLX GPU backend")
    info = mx.device_info()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mlx": mx.__version__, "backend": backend(),
           "device": info.get("device_name") or info.get("architecture"), "block_size": BS,
           "cases": []}
    # the measured selection (first-use self-test + timing vs the reference path) per shape
    for shape, (nh, kvh, dk, dv, mla) in SHAPES.items():
        kc = mx.zeros((4, kvh, BS, dk), mx.bfloat16)
        vc = None if mla else mx.zeros((4, kvh, BS, dv), mx.bfloat16)
        mx.eval(pa.paged_attention(mx.zeros((1, nh, dk), mx.bfloat16), kc, vc,
                                   mx.zeros((1, 2), mx.int32), mx.array([20], mx.int32),
                                   dk ** -0.5, v_dim=dv))
    res["selection"] = {k: v for k, v in selection.choices().items() if "paged_attention" in k}
    print(json.dumps(res["selection"]), flush=True)
    dtypes = [mx.bfloat16] if args.quick else [mx.bfloat16, mx.float16]
    for dtype in dtypes:
        for shape in SHAPES:
            for B in (1, 8, 32):
                for ctx in (512, 4096):
                    rec = run_case(shape, B, ctx, dtype)
                    print(json.dumps(rec), flush=True)
                    res["cases"].append(rec)
                    with open(args.out, "w") as f:
                        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
