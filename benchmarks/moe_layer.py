"""One MoE layer's decode step on a GPU: marlin-mlx's fused router and expert kernels against the
previous path (argpartition routing + `mx.gather_qmm`, as mlx-lm runs it), random 4-bit weights.

Shapes: GLM-4.7-Flash (hidden 2048, 64 experts, top-4, moe_intermediate 1536, 1 shared expert,
sigmoid + bias routing, scale 1.8) and Qwen3-30B-A3B (hidden 2048, 128 experts, top-8,
moe_intermediate 768, softmax routing). `--layers` distinct layers' weights (several GB, far
past the 50 MB L2) are chained `--reps` times in one graph (each layer's output feeds the
next, as in decode), evaluated once; the figure is the median over rounds of eval time /
(layers * reps). Graph-building (host) time is reported separately. Paths: `ours` (router
kernel + expert kernels + shared expert beside them), `ours-shared-fused` (the shared expert as
a slot of the expert launches), `previous` (argpartition + gather_qmm + shared);
without the shared expert: `router-ours` / `router-reference` / `router-previous` (that router,
then gather_qmm) and `experts-ours` (argpartition, then the expert kernels). Prefill (one layer,
`--prefill-tokens`): router kernel or argpartition, then gather_qmm over the pairs sorted by
expert (`prefill-ours`, `prefill-previous`) or unsorted (`prefill-unsorted`).

    python benchmarks/moe_layer.py --json $OUT/moe_layer.json [--sweep]

`--prefill-variants`: only the experts' prefill paths of kernels/moe_experts.py
(`switch_glu_prefill`: gather_qmm, dequant_gather_mm, dequant_used, per_expert, per_expert_qmm,
and `switch_glu`, the dispatch after its selection), `--prefill-tokens` tokens through
`--prefill-layers` distinct layers chained in one graph (fused router first), with each
variant's relative error from the float32 gather_qmm oracle on the first layer and its peak
memory:

    python benchmarks/moe_layer.py --prefill-variants --json $OUT/moe_prefill.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from marlin_mlx.kernels import moe_experts, moe_router
from marlin_mlx.models.base import MLP

SHAPES = {
    "glm-4.7-flash": dict(D=2048, E=64, k=4, I=1536, shared=1, scoring="sigmoid", bias=True,
                          norm=True, rsf=1.8),
    "qwen3-30b-a3b": dict(D=2048, E=128, k=8, I=768, shared=0, scoring="softmax", bias=False,
                          norm=True, rsf=1.0),
}


def _qstack(E, N, K, bits, gs, dtype):
    """Random packed codes with plausible scales/biases (no float weights materialized)."""
    shape = (E, N, K * bits // 32)
    lo, hi = (mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32) for _ in range(2))
    w = lo | (hi << 16)
    s = (mx.random.uniform(0.002, 0.02, (E, N, K // gs))).astype(dtype)
    b = (-s.astype(mx.float32) * (1 << (bits - 1))).astype(dtype)
    return w, s, b


def make_layer(c, bits, gs, dtype):
    D, E, I = c["D"], c["E"], c["I"]
    layer = dict(router=mx.random.normal((E, D)) * 0.02,
                 bias=(mx.random.normal((E,)) * 0.01) if c["bias"] else None,
                 gate=_qstack(E, I, D, bits, gs, dtype), up=_qstack(E, I, D, bits, gs, dtype),
                 down=_qstack(E, D, I, bits, gs, dtype), shared=None)
    if c["shared"]:
        mlp = MLP(D, I * c["shared"])
        nn.quantize(mlp, group_size=gs, bits=bits)
        mlp.update(nn.utils.tree_map(lambda a: a if a.dtype == mx.uint32 else
                                     (mx.random.uniform(0.002, 0.02, a.shape)).astype(dtype),
                                     mlp.parameters()))
        layer["shared"] = mlp
    mx.eval(layer["router"], layer["bias"], layer["gate"], layer["up"], layer["down"],
            layer["shared"].parameters() if layer["shared"] is not None else [])
    return layer


def route_previous(logits, k, c):
    """The routing before the fused kernel (argpartition top-k, as mlx-lm does it)."""
    logits = logits.astype(mx.float32)
    scores = mx.softmax(logits, axis=-1, precise=True) if c["scoring"] == "softmax" else mx.sigmoid(logits)
    choice = scores if not c["bias"] else scores + c["_bias"]
    inds = mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k]
    w = mx.take_along_axis(scores, inds, axis=-1)
    if c["norm"]:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return inds.astype(mx.uint32), w * c["rsf"]


def step(layer, x, c, path, bits, gs, cfg=None):
    """x (1, D) -> x + moe(x) for one layer; path in ours / previous / router-* / experts-*."""
    k = c["k"]
    logits = x.astype(mx.float32) @ layer["router"].T
    kw = dict(scoring=c["scoring"], norm_topk_prob=c["norm"], correction_bias=layer["bias"],
              routed_scaling_factor=c["rsf"])
    if path in ("ours", "router-ours", "experts-ours"):
        inds, w = (moe_router.route_kernel(logits, k, **kw) if path != "experts-ours"
                   else route_previous(logits, k, dict(c, _bias=layer["bias"])))
    elif path == "router-reference":
        inds, w = moe_router.route_reference(logits, k, **kw)
    else:
        inds, w = route_previous(logits, k, dict(c, _bias=layer["bias"]))
    if path == "ours-shared-fused":  # the shared expert as a slot of the expert launches
        inds, w = moe_router.route_kernel(logits, k, **kw)
        sh = layer["shared"]
        trip = [(p.weight, p.scales, p.biases) for p in (sh.gate_proj, sh.up_proj, sh.down_proj)]
        y = moe_experts.switch_glu_kernel(x, inds, w, layer["gate"], layer["up"], layer["down"],
                                          gs, bits, shared=trip, cfg=cfg)
        return x + y * 0.01
    if path in ("ours", "experts-ours"):
        y = moe_experts.switch_glu_kernel(x, inds, w, layer["gate"], layer["up"], layer["down"],
                                          gs, bits, cfg=cfg)
    else:
        y = moe_experts.switch_glu_reference(x, inds, w, layer["gate"], layer["up"], layer["down"],
                                             gs, bits)
    if layer["shared"] is not None and path in ("ours", "previous"):
        y = y + layer["shared"](x)
    return x + y * 0.01


def prefill_step(layer, x, c, path, bits, gs):
    """x (n, D), many tokens: routing (fused kernel or argpartition) then gather_qmm over the
    (token, expert) pairs sorted by expert (or unsorted, for reference)."""
    logits = x.astype(mx.float32) @ layer["router"].T
    if path == "prefill-ours":
        inds, w = moe_router.route_kernel(logits, c["k"], scoring=c["scoring"],
                                          norm_topk_prob=c["norm"], correction_bias=layer["bias"],
                                          routed_scaling_factor=c["rsf"])
    else:
        inds, w = route_previous(logits, c["k"], dict(c, _bias=layer["bias"]))
    y = moe_experts.switch_glu_reference(x, inds, w, layer["gate"], layer["up"], layer["down"],
                                         gs, bits, sort=path != "prefill-unsorted")
    return x + y * 0.01


def time_path(layers, c, path, bits, gs, reps, rounds, cfg=None, tokens=1):
    x0 = mx.random.normal((tokens, c["D"])).astype(mx.bfloat16)
    mx.eval(x0)

    def graph():
        x = x0
        for _ in range(reps):
            for layer in layers:
                x = (prefill_step(layer, x, c, path, bits, gs) if path.startswith("prefill")
                     else step(layer, x, c, path, bits, gs, cfg))
        return x

    mx.eval(graph())  # compile and warm
    evals, builds = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        y = graph()
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        builds.append((t1 - t0) / (reps * len(layers)))
        evals.append((t2 - t1) / (reps * len(layers)))
    return {"eval_us": statistics.median(evals) * 1e6, "build_us": statistics.median(builds) * 1e6,
            "eval_min_us": min(evals) * 1e6}


def prefill_variant_step(layer, x, c, variant, bits, gs):
    """x (n, D) -> x + experts(x) through one prefill variant (or the dispatch)."""
    logits = x.astype(mx.float32) @ layer["router"].T
    inds, w = moe_router.route(logits, c["k"], scoring=c["scoring"], norm_topk_prob=c["norm"],
                               correction_bias=layer["bias"], routed_scaling_factor=c["rsf"])
    args = (x, inds, w, layer["gate"], layer["up"], layer["down"], gs, bits)
    y = (moe_experts.switch_glu(*args) if variant == "switch_glu"
         else moe_experts.switch_glu_prefill(*args, variant=variant))
    return x + y * 0.01


def prefill_variants(a, c, layers, dtype):
    """Time every prefill variant over the layers chained in one graph; errors on layer 0."""
    res = {}
    mx.random.seed(1)
    x0 = mx.random.normal((a.prefill_tokens, c["D"])).astype(dtype)
    l0 = layers[0]
    logits = x0.astype(mx.float32) @ l0["router"].T
    inds, w = moe_router.route(logits, c["k"], scoring=c["scoring"], norm_topk_prob=c["norm"],
                               correction_bias=l0["bias"], routed_scaling_factor=c["rsf"])
    f32 = [tuple(t if t.dtype == mx.uint32 else t.astype(mx.float32) for t in l0[p])
           for p in ("gate", "up", "down")]
    oracle = moe_experts.switch_glu_reference(x0.astype(mx.float32), inds, w, *f32,
                                              a.group_size, a.bits, sort=True)
    mx.eval(x0, inds, w, oracle)
    loads = np.bincount(np.array(inds).ravel(), minlength=c["E"])
    res["expert_loads"] = {"min": int(loads.min()), "max": int(loads.max()),
                           "empty": int((loads == 0).sum())}
    for v in a.variants.split(","):
        try:
            y = (moe_experts.switch_glu(x0, inds, w, l0["gate"], l0["up"], l0["down"],
                                        a.group_size, a.bits) if v == "switch_glu" else
                 moe_experts.switch_glu_prefill(x0, inds, w, l0["gate"], l0["up"], l0["down"],
                                                a.group_size, a.bits, variant=v))
            err = float(mx.linalg.norm((y.astype(mx.float32) - oracle))
                        / mx.linalg.norm(oracle))

            def graph():
                x = x0
                for layer in layers:
                    x = prefill_variant_step(layer, x, c, v, a.bits, a.group_size)
                return x

            mx.eval(graph())  # compile, warm (and the dispatch's selection)
            mx.reset_peak_memory()
            evals = []
            for _ in range(a.prefill_rounds):
                y = graph()
                mx.synchronize()
                t0 = time.perf_counter()  # graph building is included for the host-sync variants
                mx.eval(y)
                evals.append((time.perf_counter() - t0) / len(layers))
            # the host-sync variants evaluate part of the graph while it is built: time it all
            t0 = time.perf_counter()
            mx.eval(graph())
            whole = (time.perf_counter() - t0) / len(layers)
            us = statistics.median(evals) * 1e6
            r = {"eval_us": us, "whole_us": whole * 1e6, "rel_err_vs_f32": err,
                 "peak_GB": mx.get_peak_memory() / 1e9,
                 "tokens_per_s": a.prefill_tokens / (max(us * 1e-6, whole))}
            if v == "switch_glu":
                r["paths"] = sorted({p for p in moe_experts._PATHS.values()})
        except Exception as e:  # noqa: BLE001 - one failing variant keeps the others' numbers
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        res[v] = r
        print(f"{c['name']:14s} {v:18s} " + (f"{r['eval_us']:9.1f} us/layer (whole "
              f"{r['whole_us']:.1f}) err {r['rel_err_vs_f32']:.1e} peak {r['peak_GB']:.1f} GB"
              if "error" not in r else r["error"]), flush=True)
        mx.clear_cache()
    base = res.get("gather_qmm", {}).get("whole_us")
    if base:
        res["speedup_vs_gather_qmm"] = {v: base / r["whole_us"] for v, r in res.items()
                                        if isinstance(r, dict) and "whole_us" in r}
    return res


def bytes_read(c, bits, gs):
    """Weight bytes one decode step must read: the selected experts (+ shared), 4-bit + scales."""
    per_row = lambda K: K * bits / 8 + 2 * 2 * K / gs  # codes + bf16 scale and bias
    D, I, k = c["D"], c["I"], c["k"]
    n = k + c["shared"]
    return n * (2 * I * per_row(D) + D * per_row(I)) + c["E"] * D * 4


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also time (R, SK) tilings of the expert kernels")
    ap.add_argument("--paths", default="ours,ours-shared-fused,previous,router-ours,router-reference,"
                                       "router-previous,experts-ours")
    ap.add_argument("--prefill-paths", default="prefill-ours,prefill-previous,prefill-unsorted")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-variants", action="store_true",
                    help="only time the experts' prefill variants (kernels/moe_experts.py)")
    ap.add_argument("--variants", default=",".join(moe_experts.PREFILL_VARIANTS) + ",switch_glu")
    ap.add_argument("--prefill-layers", type=int, default=4)
    ap.add_argument("--prefill-rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--tiny", action="store_true", help="hidden/intermediate sizes / 4 (a CPU check of the script)")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ.setdefault("MARLIN_MLX_KERNELS", "custom")  # the shared expert's qmv path, both sides
    info = {}
    try:
        info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # noqa: BLE001 - informational
        pass
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mlx": mx.__version__, "device": info, "host": platform.platform(),
           "bits": a.bits, "group_size": a.group_size, "layers": a.layers, "reps": a.reps,
           "results": {}}
    for name in a.shapes.split(","):
        c = dict(SHAPES[name])
        if a.tiny:
            c["D"], c["I"] = c["D"] // 4, c["I"] // 4
        mx.random.seed(0)
        if a.prefill_variants:
            c["name"] = name
            dt = getattr(mx, a.dtype)
            layers = [make_layer(dict(c, shared=0), a.bits, a.group_size, dt)
                      for _ in range(a.prefill_layers)]
            out["prefill_tokens"] = a.prefill_tokens
            out["results"][name] = prefill_variants(a, c, layers, dt)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(out, f, indent=1)
            del layers
            mx.clear_cache()
            continue
        layers = [make_layer(c, a.bits, a.group_size, mx.bfloat16) for _ in range(a.layers)]
        res = {"bytes_per_step": bytes_read(c, a.bits, a.group_size)}
        for path in a.paths.split(","):
            if path == "ours-shared-fused" and not c["shared"]:
                continue
            res[path] = time_path(layers, c, path, a.bits, a.group_size, a.reps, a.rounds)
            print(f"{name:14s} {path:18s} {res[path]['eval_us']:8.1f} us/layer "
                  f"(build {res[path]['build_us']:.1f} us)", flush=True)
        for path in (p for p in a.prefill_paths.split(",") if p):
            t = time_path(layers[:4], c, path, a.bits, a.group_size, 1, 3, tokens=a.prefill_tokens)
            res[path] = dict(t, tokens=a.prefill_tokens,
                             tokens_per_s=a.prefill_tokens / (t["eval_us"] * 1e-6))
            print(f"{name:14s} {path:18s} {t['eval_us']:8.1f} us/layer for {a.prefill_tokens} tokens",
                  flush=True)
        if "ours" in res and "previous" in res:
            res["speedup_layer"] = res["previous"]["eval_us"] / res["ours"]["eval_us"]
            res["ours_GBps"] = res["bytes_per_step"] / res["ours"]["eval_us"] / 1e3
        if a.sweep:
            sweep = {}
            r1d, s1d = moe_experts.config(c["k"], c["I"], c["D"] // 32, True)
            r2d, s2d = moe_experts.config(1, c["D"], c["k"] * c["I"] // 32, False)
            cfgs = [((r, s), (r2d, s2d)) for r, s in ((1, 2), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2))]
            cfgs += [((r1d, s1d), (r, s)) for r, s in ((2, 2), (2, 6), (4, 2), (4, 4), (4, 6),
                                                         (8, 2), (8, 4), (1, 8))]
            res["sweep_experts_only"] = sweep
            for cfg in cfgs:
                t = time_path(layers, c, "experts-ours", a.bits, a.group_size, a.reps, 5, cfg)
                sweep[str(cfg)] = t["eval_us"]
                print(f"{name:14s} experts cfg {cfg}: {t['eval_us']:.1f} us/layer", flush=True)
            res["sweep_experts_only"] = sweep
            res["default_cfg"] = str(((r1d, s1d), (r2d, s2d)))
        out["results"][name] = res
        if a.json:  # after every shape: a later failure keeps what was measured
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        del layers
        mx.clear_cache()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk.startswith("speedup") or kk.endswith("GBps")}
                      for k, v in out["results"].items()}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
