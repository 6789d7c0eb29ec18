"""MoE prefill variants on the inputs a real forward gives them: every routed-expert call of one
cacheless forward of a random model is recorded, then each variant runs on the recorded
inputs of some layers and is compared with the float32 oracle (gather_qmm on float32
activations). Also prints the size of the experts' output against the residual stream's.

    python benchmarks/moe_check.py --preset glm-4.7-flash --prompt 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_probe import build  # noqa: E402

from marlin_mlx.kernels import moe_experts  # noqa: E402
from marlin_mlx.measure import machine_info  # noqa: E402


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).reshape(-1)) / mx.linalg.norm(b.reshape(-1))).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="glm-4.7-flash")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--variants", default="dequant_blocks,quant_blocks,gather_qmm")
    p.add_argument("--every", type=int, default=8, help="check every n-th recorded layer")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model, config = build(a.preset, 4, 64, layers=a.layers)
    mx.random.seed(0)
    prompt = mx.random.randint(0, config["vocab_size"], (1, a.prompt)).astype(mx.uint32)
    calls = []
    real = moe_experts.switch_glu

    def record(x, inds, weights, gate, up, down, group_size=64, bits=4, **kw):
        calls.append((x, inds, weights, gate, up, down, group_size, bits))
        return real(x, inds, weights, gate, up, down, group_size, bits, **kw)

    moe_experts.switch_glu = record
    logits = model(prompt)
    mx.eval(logits, [c[:3] for c in calls])
    moe_experts.switch_glu = real
    out = {**machine_info(), "preset": a.preset, "prompt": a.prompt, "layers": []}
    for i in range(0, len(calls), a.every):
        x, inds, w, gate, up, down, gs, bits = calls[i]
        f32 = [tuple(t if t.dtype == mx.uint32 else t.astype(mx.float32) for t in tr)
               for tr in (gate, up, down)]
        ref = moe_experts.switch_glu_reference(x.astype(mx.float32), inds, w, *f32, gs, bits,
                                               sort=True)
        r = {"call": i, "x_rms": mx.sqrt(mx.mean(x.astype(mx.float32) ** 2)).item(),
             "out_rms": mx.sqrt(mx.mean(ref ** 2)).item(),
             "experts_used": int(mx.max(inds).item()) + 1}
        for v in a.variants.split(","):
            r[v] = rel(moe_experts.switch_glu_prefill(x, inds, w, gate, up, down, gs, bits, v), ref)
        out["layers"].append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
