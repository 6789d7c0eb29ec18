"""Comparison helpers shared by the parity tests (imported by name: pytest puts tests/ on the path)."""

import numpy as np


def rel_err(a, b) -> float:
    """The issues' parity measure: max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def hf_logits(hf, ids) -> np.ndarray:
    """Logits of a transformers model on token ids, as float32 NumPy."""
    import torch

    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def compiled_steps(model, prompt, steps: int = 4) -> list:
    """float64 logits of `steps` greedy decode steps through the compiled step (`decode_forward`
    with compilation) after prefilling `prompt` (1, L): the first step warms up, the rest replay
    the compiled graphs."""
    import mlx.core as mx

    from marlin_mlx.generation import decode_forward

    step = decode_forward(model, compile=True)
    cache = model.make_cache()
    logits = model(prompt, cache=cache)
    outs = []
    for _ in range(steps):
        tok = mx.argmax(logits[:, -1], -1, keepdims=True).astype(mx.int32)
        logits = step(tok, cache=cache)
        mx.eval(logits)
        outs.append(np.array(logits.astype(mx.float32), np.float64))
    return outs


def assert_same_steps(got: list, want: list, tol: float = 1e-4):
    """Each step's argmax equal and its logits within `tol` relative (Frobenius) error."""
    for a, b in zip(got, want):
        assert np.argmax(a[0, -1]) == np.argmax(b[0, -1])
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol

