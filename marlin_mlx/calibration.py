"""Calibration for `marlin-mlx convert`: GPTQ Hessians, per-layer sensitivities and the bit
allocation behind --target-bpw.

Unlike plain round-to-nearest conversion these hold the whole float32 model in memory: fine for
small and medium models, not yet for 8B-class ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def calibrate(path: Path, config: dict, plan: dict, calibration, num_samples: int,
               seq_len: int, log: Callable, hessians_too: bool = True,
               candidates: tuple = ()) -> tuple:
    """GPTQ Hessians {module path: H} of the planned plain Linear layers, from the float model
    run on `num_samples` windows of `seq_len` tokens of the calibration text, and (given
    `candidates`) each planned layer's sensitivity for --target-bpw.

    Unlike the rest of convert this holds the whole float32 model and every Hessian (K x K) in
    memory at once: fine for small and medium models, not for 8B-class ones yet."""
    from .gptq import collect_hessians
    from .loader import load_model, load_tokenizer

    text = Path(calibration).read_text(encoding="utf-8", errors="replace")
    tokenizer = load_tokenizer(path, config.get("eos_token_id"))
    ids = tokenizer.encode(text)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)][:num_samples]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"--calibration {calibration}: too little text to calibrate on")
    model, _ = load_model(path, dtype=mx.float32)
    linear = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    paths = [p for p in plan if p in linear] if hessians_too else []
    hessians = {}
    if paths:
        log(f"calibrating on {len(windows)} window(s) of up to {seq_len} tokens "
            f"({len(paths)} layers)")
        inputs = (mx.array([w], dtype=mx.int32) for w in windows)
        hessians = collect_hessians(model, inputs, layer_paths=paths)
        mx.eval(list(hessians.values()))
    errors = {}
    if candidates:
        sens = [mx.array([w[:SENS_TOKENS]], dtype=mx.int32) for w in windows[:SENS_WINDOWS]]
        errors = sensitivities(model, [p for p in plan if not p.endswith("mlp.gate")],
                                {p: plan[p][1] for p in plan}, sens, candidates, log)
    del model
    return hessians, errors


SENS_WINDOWS, SENS_TOKENS = 4, 256


def sensitivities(model, paths: list, group_sizes: dict, inputs: list, candidates: tuple,
                   log: Callable) -> dict:
    """{layer: {bits: KL(float model || model with only this layer rounded to `bits`)}}, summed
    over the calibration tokens: the end-to-end cost of quantizing each layer on its own.

    Costs len(paths) * len(candidates) forward passes over a few short windows."""
    modules = dict(model.named_modules())
    ref = [nn.log_softmax(model(x).astype(mx.float32), axis=-1) for x in inputs]
    mx.eval(ref)
    log(f"target-bpw: measuring {len(paths)} layers x {len(candidates)} widths")
    out = {}
    for p in paths:
        m = modules[p]
        w0 = m.weight
        out[p] = {}
        for b in candidates:
            q, sc, bi = mx.quantize(w0, group_size=group_sizes[p], bits=b)
            m.weight = mx.dequantize(q, sc, bi, group_size=group_sizes[p], bits=b)
            kl = 0.0
            for x, lp in zip(inputs, ref):
                lq = nn.log_softmax(model(x).astype(mx.float32), axis=-1)
                kl += float(mx.sum(mx.exp(lp) * (lp - lq)).item())
            out[p][b] = max(kl, 0.0)
        m.weight = w0
    return out


def allocate_bits(costs: dict, errors: dict, budget: float) -> dict:
    """Greedy bit allocation: every layer starts at its cheapest width; the upgrade with the
    largest error reduction per extra stored bit is applied while the budget allows.

    costs {layer: {bits: stored bits}}, errors {layer: {bits: output error}}, budget in bits."""
    choice = {p: min(c) for p, c in costs.items()}
    spent = sum(costs[p][b] for p, b in choice.items())
    while True:
        best, best_gain = None, 0.0
        for p, b in choice.items():
            higher = [x for x in sorted(costs[p]) if x > b]
            if not higher:
                continue
            nb = higher[0]
            extra = costs[p][nb] - costs[p][b]
            if spent + extra > budget:
                continue
            gain = (errors[p][b] - errors[p][nb]) / max(extra, 1e-9)
            if best is None or gain > best_gain:
                best, best_gain = (p, nb, extra), gain
        if best is None:
            return choice
        p, nb, extra = best
        choice[p] = nb
        spent += extra
