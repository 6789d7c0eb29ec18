"""Calibration for `marlin-mlx convert`: calibration windows, per-layer sensitivities and the
bit allocation behind --target-bpw.  (GPTQ itself, layer by layer, is in gptq.py.)

Sensitivity (why it is built this way): the end-to-end cost of rounding one layer is
approximated to second order with the empirical Fisher of the layer's OUTPUT,
    dL ~ 1/2 * sum_t sum_n g[t, n]^2 * d[t, n]^2,   d = X (W - Wq)^T,
where X are the layer's inputs and g the gradients of the calibration loss (next-token cross
entropy) with respect to the layer's outputs, both captured in ONE forward + backward pass of the
float model.  Every (layer, bits, group size) candidate then costs one matmul on the stored
activations, done in numpy: MLX's CPU matmul is ~20x slower than OpenBLAS on the 2-core Linux
box this was measured on (0.65 s vs 0.034 s for ten 256x512x1536 products), and the old method
-- one whole-model forward per (layer, width) pair -- needed 43 x 6 x 2 forwards of ~5 s each.
The output-gradient weighting is what makes errors of different layers comparable (a plain
||X dW^T||^2 is not: it ignores what the rest of the network does with that output).

Memory: the float32 model plus, per calibrated layer, its inputs and output gradients over the
sensitivity tokens (2 x 256 by default): small and medium models.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kernels import formats

SENS_WINDOWS, SENS_TOKENS = 2, 256


def calibration_windows(path: Path, config: dict, calibration, num_samples: int,
                        seq_len: int) -> list:
    """Token windows (lists of ids) of the calibration text: `num_samples` of `seq_len`.
    Only as much text as needed is tokenized (a prefix, grown until it is long enough)."""
    from .loader import load_tokenizer

    text = Path(calibration).read_text(encoding="utf-8", errors="replace")
    tokenizer = load_tokenizer(path, config.get("eos_token_id"))
    want = num_samples * seq_len + 1
    n = min(len(text), want * 8)
    while True:
        ids = tokenizer.encode(text[:n])
        if len(ids) >= want or n >= len(text):
            break
        n = min(len(text), n * 2)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)][:num_samples]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"--calibration {calibration}: too little text to calibrate on")
    return windows


class _Probe(nn.Module):
    """Wraps a Linear (or the tied embedding): records its input and adds a zero `delta` to its
    output, so that the gradient with respect to delta is the gradient of the output."""

    def __init__(self, inner: nn.Module, key: str, state: dict):
        super().__init__()
        self.inner = inner
        # plain attributes: a dict set on an nn.Module would join its parameter tree
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_state", state)

    def _tap(self, key, x, y):
        st = self._state
        st["inputs"][key] = x
        if st["deltas"] is None:  # the shape pass: the graph is built, never evaluated
            st["shapes"][key] = y.shape
            return y
        return y + st["deltas"][key]

    def __call__(self, x, *args, **kwargs):
        return self._tap(self._key, x, self.inner(x, *args, **kwargs))

    def as_linear(self, x):  # tied embedding used as the output head
        return self._tap(self._key + "#head", x, self.inner.as_linear(x))


def _capture(model: nn.Module, paths: list, windows: list, labels: str = "data") -> dict:
    """{key: (X [T, K], G [T, N]) numpy float32} for every probed layer over `windows`;
    the tied embedding gives `<p>` (lookup: ids, output grads) and `<p>#head`."""
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    state = {"inputs": {}, "shapes": {}, "deltas": None}
    probes = [(p, _Probe(modules[p], p, state)) for p in paths]
    model.update_modules(tree_unflatten(probes))
    got: dict = {}
    try:
        for w in windows:
            x = mx.array([w], dtype=mx.int32)
            inp, tgt = x[:, :-1], x[:, 1:]
            state["deltas"] = None
            if labels == "model":  # the model's own Fisher: targets drawn from its predictions
                tgt = mx.random.categorical(model(inp).astype(mx.float32),
                                            key=mx.random.key(len(w)))
            model(inp)  # lazy: output shapes only, nothing is computed
            zeros = {k: mx.zeros(s, dtype=mx.float32) for k, s in state["shapes"].items()}

            def loss_fn(deltas):
                state["deltas"], state["inputs"] = deltas, {}
                logits = model(inp).astype(mx.float32)
                loss = nn.losses.cross_entropy(logits, tgt, reduction="sum")
                return loss, [state["inputs"][k] for k in sorted(state["inputs"])]

            (_, xs), grads = mx.value_and_grad(loss_fn)(zeros)
            keys = sorted(state["inputs"])
            mx.eval(xs, grads)
            for k, xin in zip(keys, xs):
                if xin.dtype == mx.int32:  # embedding lookup: the token ids
                    xn = np.array(xin).reshape(-1)
                else:
                    xn = np.array(xin.astype(mx.float32)).reshape(-1, xin.shape[-1])
                g = grads[k]
                got.setdefault(k, []).append((xn, np.array(g).reshape(-1, g.shape[-1])))
            state["inputs"] = {}
    finally:
        model.update_modules(tree_unflatten([(p, pr.inner) for p, pr in probes]))
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v]))
            for k, v in got.items()}


def sensitivities(model: nn.Module, windows: list, paths: list, candidates: list,
                  dtype=mx.float32, log: Callable = lambda s: None, labels: str = "data") -> dict:
    """{layer: {(bits, group_size): estimated loss increase}} for the plain Linear layers (and
    the embedding, tied head included) among `paths`, from one forward + backward pass over
    `windows`.  Candidates whose group size does not divide a layer's input are left out.
    labels: "data" (the empirical Fisher of the next-token loss on the text: estimates the loss
    increase) or "model" (targets sampled from the model itself: estimates KL(float || rounded))."""
    modules = dict(model.named_modules())
    ok = [p for p in paths if isinstance(modules.get(p), (nn.Linear, nn.Embedding))]
    log(f"target-bpw: capturing activations and output gradients of {len(ok)} layers on "
        f"{sum(len(w) for w in windows)} tokens")
    data = _capture(model, ok, windows, labels)
    out = {}
    for p in ok:
        W = modules[p].weight.astype(mx.float32)
        K = W.shape[-1]
        Wn = np.array(W)
        out[p] = {}
        for b, g in candidates:
            if K % g:
                continue
            q, s, bi = mx.quantize(W.astype(dtype), group_size=g, bits=b)
            dW = Wn - np.array(mx.dequantize(q, s, bi, group_size=g, bits=b).astype(mx.float32))
            err = 0.0
            if isinstance(modules[p], nn.Embedding):
                ids, G = data[p]
                err += float(np.sum(G.astype(np.float64) ** 2 * dW[ids].astype(np.float64) ** 2))
                if p + "#head" in data:
                    X, G = data[p + "#head"]
                    err += float(np.sum((G * (X @ dW.T)).astype(np.float64) ** 2))
            else:
                X, G = data[p]
                err += float(np.sum((G * (X @ dW.T)).astype(np.float64) ** 2))
            out[p][(b, g)] = 0.5 * err
    return out


def _hull(costs: dict, errors: dict) -> list:
    """The candidates of one layer on the lower convex hull of (cost, error), by cost: only
    these can be optimal for some price per bit."""
    pts = sorted(costs, key=lambda c: (costs[c], errors[c]))
    front = []
    for c in pts:  # Pareto front: more bits must buy less error
        if not front or errors[c] < errors[front[-1]]:
            if front and costs[c] == costs[front[-1]]:
                front[-1] = c
            else:
                front.append(c)
    hull = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> c: drop it
            if ((errors[b] - errors[a]) * (costs[c] - costs[a])
                    >= (errors[c] - errors[a]) * (costs[b] - costs[a])):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate_bits(costs: dict, errors: dict, budget: float) -> dict:
    """Choose one candidate per layer, total cost <= budget, minimizing the summed error.

    costs {layer: {cand: stored bits}}, errors {layer: {cand: error}}.  Every layer starts at its
    cheapest candidate; steps along each layer's convex hull are taken in order of error removed
    per extra bit while they fit (the Lagrangian solution of the additive problem)."""
    hulls = {p: _hull(costs[p], errors[p]) for p in costs}
    pos = {p: 0 for p in costs}
    spent = sum(costs[p][h[0]] for p, h in hulls.items())
    if spent > budget:
        raise ValueError("budget below the cheapest choice of every layer")
    heap = []

    def push(p):
        h, i = hulls[p], pos[p]
        if i + 1 < len(h):
            extra = costs[p][h[i + 1]] - costs[p][h[i]]
            gain = (errors[p][h[i]] - errors[p][h[i + 1]]) / max(extra, 1e-9)
            heapq.heappush(heap, (-gain, p, extra))

    for p in hulls:
        push(p)
    while heap:
        _, p, extra = heapq.heappop(heap)
        if spent + extra > budget:
            continue  # this layer stops here; a cheaper step elsewhere may still fit
        pos[p] += 1
        spent += extra
        push(p)
    return {p: hulls[p][pos[p]] for p in hulls}


# ---------------------------------------------------------------- convert's calibration step

BPW_CANDIDATES = (2, 3, 4, 5, 6, 8)
TARGET_GROUPS = (32, 64, 128)


def _apply_target(plan, errors, weights, names, sizes, target, dsize, quant, log, out_nbytes):
    """Pick (bits, group size) for the calibrated layers so that the whole model averages at
    most `target` bits per weight with the least estimated loss; the other tensors (float
    ones, layers without a sensitivity) keep their plan."""
    def bpw(b, g):
        return formats.bits_per_weight("affine", b, g, scale_bits=dsize * 8)

    fixed = total = 0.0
    for k in names:
        p, n = k.rsplit(".", 1)[0], math.prod(weights[k].shape)
        total += n
        if k.endswith(".weight") and p in plan:
            if p not in errors:
                b, g, m = plan[p]
                fixed += n * bpw(b, g) if m == "affine" else sizes[k] * 8
        else:
            fixed += sizes[k] * 8
    counts = {p: math.prod(weights[f"{p}.weight"].shape) for p in errors}
    costs = {p: {c: counts[p] * bpw(*c) for c in errors[p]} for p in errors}
    low = (fixed + sum(min(c.values()) for c in costs.values())) / total
    high = (fixed + sum(max(c.values()) for c in costs.values())) / total
    if not low <= target <= high:
        raise ValueError(f"--target-bpw {target}: this model can reach {low:.3f} to {high:.3f} "
                         "bits per weight")
    choice = allocate_bits(costs, errors, target * total - fixed)
    for p, (b, g) in choice.items():
        plan[p] = (b, g, "affine")
    for p in list(quant):
        if isinstance(quant[p], dict):
            del quant[p]
    for p, (b, g, m) in sorted(plan.items()):
        if (b, g, m) != (quant["bits"], quant["group_size"], quant["mode"]):
            quant[p] = {"group_size": g, "bits": b, "mode": m}
    for p in errors:  # output sizes follow the new widths
        sizes[f"{p}.weight"] = out_nbytes(weights[f"{p}.weight"].shape, dsize, plan[p])
    hist = {}
    for c in choice.values():
        hist[c] = hist.get(c, 0) + 1
    log("target-bpw: layers per width " + ", ".join(f"{b}-bit g{g} {n}"
                                                    for (b, g), n in sorted(hist.items())))


def calibrate(path, config, plan, weights, names, sizes, quant, target, dsize, calibration,
              num_samples, seq_len, method, target_bpw, group_given, act_order, damp, skipped,
              log, out_nbytes) -> dict:
    """--target-bpw (per-layer widths from measured sensitivities, `plan` updated in place) and
    --method gptq (layer by layer) on the float32 model -> the GPTQ tensors {name: array}."""
    from .loader import load_model

    windows = calibration_windows(path, config, calibration, num_samples, seq_len)
    model, _ = load_model(path, dtype=mx.float32)
    try:
        if target_bpw is not None:
            groups = (quant["group_size"],) if group_given else TARGET_GROUPS
            cands = [(b, g) for b in BPW_CANDIDATES for g in groups]
            sens = [w[:SENS_TOKENS] for w in windows[:SENS_WINDOWS]]
            errors = sensitivities(model, sens, [p for p in plan if not p.endswith("mlp.gate")],
                                   cands, dtype=target, log=log)
            _apply_target(plan, errors, weights, names, sizes, target_bpw, dsize, quant, log,
                          out_nbytes)
        if method != "gptq":
            return {}
        from .gptq import gptq_quantize_model

        linear = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
        specs = {p: plan[p][:2] for p in plan if p in linear}
        skipped += [f"{p}: no Hessian (not a plain Linear), round-to-nearest" for p in plan
                    if p not in specs]
        log(f"gptq: {len(windows)} window(s) of up to {seq_len} tokens, {len(specs)} layers, "
            "one decoder layer at a time")
        inputs = [mx.array([w], dtype=mx.int32) for w in windows]
        return gptq_quantize_model(model, inputs, act_order=act_order, damp=damp, dtype=target,
                                   specs=specs, progress=lambda k: log(f"gptq: {k}"))
    finally:
        del model
