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
