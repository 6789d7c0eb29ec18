"""Sliding-window perplexity, as the Metal Marlin guide measures it (context 512, stride 256).

Windows start every `stride` tokens and span up to `context` tokens. Each window scores only
the targets the previous windows did not score, so every token after the first is scored
exactly once, and (after the first window) with at least `context - stride` tokens of history:

    window k = tokens[k*stride : k*stride + context]
    scored targets: positions from max(previous window's end, window start + 1) to its end

The first window scores its positions 1..L-1 (position 0 has no history). Perplexity is
exp(total negative log-likelihood / number of scored tokens), with log-softmax over the full
vocabulary computed in float32 and the NLL summed in float64 on the host.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from .errors import MarlinError


@dataclass
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    score_from: int  # first scored target position (absolute)

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def sliding_windows(n_tokens: int, context: int = 512, stride: int = 256) -> list:
    """The windows covering `n_tokens` tokens; every target 1..n_tokens-1 is in exactly one."""
    if context < 2:
        raise MarlinError(f"--context {context}: needs at least 2 tokens")
    if not 1 <= stride <= context:
        raise MarlinError(f"--stride {stride}: must be between 1 and the context ({context})")
    if n_tokens < 2:
        raise MarlinError(f"perplexity needs at least 2 tokens, the text has {n_tokens}")
    windows, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            return windows
        begin += stride


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    nll_sum: float
    n_scored: int
    n_tokens: int
    n_windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _window_nll(model, batch: mx.array, offsets: list, counts: list) -> list:
    """Summed NLL of the scored targets of each row of `batch` (B, L)."""
    logits = model(batch[:, :-1]).astype(mx.float32)  # predicts positions 1..L-1
    targets = batch[:, 1:]
    logz = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - picked  # (B, L-1)
    sums = []
    for i, (off, n) in enumerate(zip(offsets, counts)):
        sums.append(nll[i, off:off + n].sum())
    mx.eval(sums)
    return [s.item() for s in sums]


def perplexity(model, tokens: Sequence[int], context: int = 512, stride: int = 256,
               batch_size: int = 1, max_tokens: Optional[int] = None,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` (tokens (B, L) -> logits (B, L, V)) on the token sequence."""
    tokens = list(tokens)
    if max_tokens is not None:
        if max_tokens < 2:
            raise MarlinError(f"--max-tokens {max_tokens}: needs at least 2")
        tokens = tokens[:max_tokens]
    if batch_size < 1:
        raise MarlinError("--batch-size must be at least 1")
    windows = sliding_windows(len(tokens), context, stride)
    ids = mx.array(tokens, dtype=mx.int32)

    # rows of one batch must have one length: full windows batch together, a short last one alone
    groups, current = [], []
    for w in windows:
        if current and (len(current) == batch_size
                        or (w.end - w.begin) != (current[0].end - current[0].begin)):
            groups.append(current)
            current = []
        current.append(w)
    groups.append(current)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc=desc, unit="window", leave=False)
    total, scored = 0.0, 0
    t0 = time.perf_counter()
    try:
        for group in groups:
            batch = mx.stack([ids[w.begin:w.end] for w in group])
            # target at absolute position p sits at column p - begin - 1 of the shifted logits
            offsets = [w.score_from - w.begin - 1 for w in group]
            counts = [w.n_scored for w in group]
            for s in _window_nll(model, batch, offsets, counts):
                total += s
            scored += sum(counts)
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(ppl=f"{math.exp(total / scored):.3f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    mean = total / scored
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, nll_sum=total, n_scored=scored,
        n_tokens=len(tokens), n_windows=len(windows), context=context, stride=stride,
        seconds=seconds, tokens_per_s=sum(w.end - w.begin for w in windows) / seconds,
    )


def read_text(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise MarlinError(f"{p}: no such data file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MarlinError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise MarlinError(f"{p}: cannot read ({e.strerror or e})") from None


def tokenize(tokenizer, text: str) -> list:
    """Token ids of the whole text, with the tokenizer's usual special tokens (e.g. BOS)."""
    return list(tokenizer.encode(text))


def evaluate_file(model_path, data, context: int = 512, stride: int = 256,
                  max_tokens: Optional[int] = None, batch_size: int = 1, dtype=None,
                  progress: bool = True) -> dict:
    """Load a model and its tokenizer, read `data` (a text file) and compute its perplexity."""
    from .loader import load

    text = read_text(data)
    model, tokenizer = load(model_path, dtype=dtype)
    tokens = tokenize(tokenizer, text)
    result = perplexity(model, tokens, context=context, stride=stride, batch_size=batch_size,
                        max_tokens=max_tokens, progress=progress, desc=str(model_path))
    return {"model": str(model_path), "data": str(data), **result.to_dict(),
            "vocab_size": int(model.args.vocab_size)}
