"""How far a random MoE model's logits move when every routed-expert output is perturbed by a
small relative noise (the size of a 16-bit kernel's rounding): a yardstick for comparing whole-
model logits of two kernel paths on random weights. float32, any device.

    python benchmarks/moe_sensitivity.py --layers 3,47 --json out.json
A shrunken GLM-4.7-Flash config by default (hidden 256, 64 experts, top-4): routing flips
compound over depth, so a deep random model's logits diverge even when each layer agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_probe import build  # noqa: E402

from marlin_mlx.kernels import moe_experts  # noqa: E402
from marlin_mlx.measure import machine_info  # noqa: E402
from marlin_mlx.random_weights import resolve_config  # noqa: E402

SMALL = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, vocab_size=2048,
             q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, num_attention_heads=4)


def run(layers: int, noise: float, tokens: int) -> dict:
    cfg = {**resolve_config("glm-4.7-flash"), **SMALL, "num_hidden_layers": layers}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    model, _ = build(f.name, 4, 64, mx.float32)
    os.unlink(f.name)
    mx.random.seed(0)
    prompt = mx.random.randint(0, cfg["vocab_size"], (1, tokens)).astype(mx.uint32)
    base = model(prompt)
    mx.eval(base)
    real, key = moe_experts.switch_glu, [mx.random.key(1)]

    def noisy(*a, **kw):
        y = real(*a, **kw)
        key[0], k = mx.random.split(key[0])
        return y * (1 + noise * mx.random.normal(y.shape, key=k))

    moe_experts.switch_glu = noisy
    try:
        pert = model(prompt)
    finally:
        moe_experts.switch_glu = real
    err = mx.linalg.norm((pert - base).reshape(-1)) / mx.linalg.norm(base.reshape(-1))
    agree = (pert.argmax(-1) == base.argmax(-1)).astype(mx.float32).mean()
    return {"layers": layers, "noise": noise, "tokens": tokens,
            "logits_rel_err": err.item(), "top1_agreement": agree.item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="3,47")
    p.add_argument("--noise", type=float, default=5e-3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = {**machine_info(), "config": SMALL, "runs": []}
    for n in (int(x) for x in a.layers.split(",")):
        out["runs"].append(run(n, a.noise, a.tokens))
        print(json.dumps(out["runs"][-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
