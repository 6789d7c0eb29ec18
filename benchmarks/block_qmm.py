"""MoE prefill expert products: block_qmm (quantized experts, dequantized in registers) against
the dequantize + MLX gather_mm path it replaces, same blocks, same run.

    python benchmarks/block_qmm.py --json out.json
GLM-4.7-Flash's routed experts by default (64 experts, top-4, hidden 2048, intermediate 1536,
4-bit g64, bfloat16), the (token, expert) pairs of `--tokens` tokens under uniform random
routing in 64-row expert blocks, as kernels/moe_experts.py `_blocks` builds them. Each timing
is one graph of `--reps` calls built before the clock starts; median of rounds.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from marlin_mlx.kernels import block_qmm as bq
from marlin_mlx.kernels import moe_experts
from marlin_mlx.measure import machine_info

from flash_attention import timed  # benchmarks/ is the script's directory


def blocks_for(n, k, E, rng):
    """(owner (nblk,), used, rows in use) for n tokens routed to k of E experts at random."""
    inds = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
    counts = np.bincount(inds.ravel(), minlength=E)
    per = -(-counts // bq.BLOCK)
    nblk = -(-(n * k) // bq.BLOCK) + E
    owner = np.full(nblk, E - 1, np.uint32)
    owner[:per.sum()] = np.repeat(np.arange(E), per)
    return mx.array(owner), int(per.sum())


def stack(E, N, K, bits, gs, dt):
    w = mx.random.uniform(-K ** -0.5, K ** -0.5, (E, N, K))
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return q, s.astype(dt), b.astype(dt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,2048,8192")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--configs", default="2x4,2x8;4x4,4x8,2x4",
                   help="NTxNW launch shapes to try: gated ones; plain ones")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dt, E, D, I, gs, bits = mx.bfloat16, a.experts, a.hidden, a.inter, a.group_size, a.bits
    gate, up, down = (stack(E, I, D, bits, gs, dt), stack(E, I, D, bits, gs, dt),
                      stack(E, D, I, bits, gs, dt))
    mx.eval(gate, up, down)
    gcfg, pcfg = ([tuple(int(v) for v in c.split("x")) for c in part.split(",")]
                  for part in a.configs.split(";"))
    rng = np.random.default_rng(0)
    res = {**machine_info(), "experts": E, "topk": a.topk, "hidden": D, "inter": I, "bits": bits,
           "group_size": gs, "dtype": "bfloat16", "tokens": {}}
    for n in (int(t) for t in a.tokens.split(",")):
        owner, used = blocks_for(n, a.topk, E, rng)
        x = mx.random.normal((owner.size * bq.BLOCK, D)).astype(dt)
        h = mx.random.normal((owner.size * bq.BLOCK, I)).astype(dt)
        u = mx.array([used], mx.int32)
        mx.eval(x, h, u)
        flops_glu, flops_down = 2 * used * bq.BLOCK * D * I * 2, 2 * used * bq.BLOCK * D * I
        deq = moe_experts._dequant
        q = dict(rhs_indices=owner, sorted_indices=True)

        def base_glu():
            xb = x.reshape(-1, bq.BLOCK, D)
            g = mx.gather_mm(xb, deq(gate, gs, bits, dt).swapaxes(-1, -2), **q)
            return (nn.silu(g) * mx.gather_mm(xb, deq(up, gs, bits, dt).swapaxes(-1, -2), **q)
                    ).reshape(-1, I)

        def base_down():
            return mx.gather_mm(h.reshape(-1, bq.BLOCK, I),
                                deq(down, gs, bits, dt).swapaxes(-1, -2), **q).reshape(-1, D)

        r = {"blocks": owner.size, "used": used,
             "dequant_gather_mm": {"glu_us": timed(base_glu, a.reps, a.rounds),
                                   "down_us": timed(base_down, a.reps, a.rounds)}}
        ref_glu, ref_down = (f()[:used * bq.BLOCK].astype(mx.float32) for f in (base_glu, base_down))
        for name, cfgs, st, xin, ref, fl in (("glu", gcfg, (gate, up), x, ref_glu, flops_glu),
                                             ("down", pcfg, (down,), h, ref_down, flops_down)):
            for NT, NW in cfgs:
                def f(NT=NT, NW=NW, st=st, xin=xin):
                    return bq.block_qmm_kernel(xin, owner, u, st, gs, bits, NT, NW)
                y = f()[:used * bq.BLOCK].astype(mx.float32)
                err = (mx.linalg.norm(y - ref) / mx.linalg.norm(ref)).item()
                us = timed(f, a.reps, a.rounds)
                r[f"block_qmm_{name}_{NT}x{NW}"] = {"us": us, "rel_err_vs_dequant": err,
                                                   "tflops": fl / us / 1e6}
        res["tokens"][str(n)] = r
        print(n, json.dumps(r, indent=1), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
