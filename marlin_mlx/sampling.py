"""Token sampling: temperature, top-k, top-p, min-p, repetition penalty, seeded randomness.

Everything here is plain lazy MLX so that a whole decode step (model, logits processors,
sampler) stays one graph that the generator evaluates asynchronously; nothing syncs with the
host.

Semantics follow Hugging Face `transformers` so results are comparable:
- the repetition penalty acts on the raw logits (divide positive ones, multiply negative ones
  by the penalty) of every token in the recent context window, prompt tokens included;
- the temperature divides the (penalized) logits first, then the filters are applied in the
  order top-k, top-p, min-p, each to the distribution left by the previous one;
- temperature 0 means greedy decoding (argmax); the filters are then irrelevant.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_NEG_INF = -float("inf")


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the `k` largest logits along the last axis (ties broken arbitrarily);
    the rest become -inf. `k <= 0` or `k >= vocab` keeps everything."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    # argpartition picks exactly k indices even when values tie, unlike a threshold compare.
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, drop, mx.array(_NEG_INF, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches `p` (the most likely token is always kept). `p >= 1` keeps everything."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # A token stays if the mass of the tokens strictly ahead of it is still below p.
    mass_before = mx.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, mx.array(_NEG_INF, logits.dtype))


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the top token's probability."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)  (softmax shift cancels)
    threshold = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= threshold, logits, mx.array(_NEG_INF, logits.dtype))


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float) -> mx.array:
    """Penalize every token id in `tokens` (1-D, may repeat): positive logits are divided by
    `penalty`, negative ones multiplied, as in the CTRL paper and `transformers`.
    `logits` is (batch, vocab); the same ids are penalized for every row."""
    if penalty == 1.0 or tokens.size == 0:
        return logits
    idx = mx.broadcast_to(tokens.reshape(1, -1), (logits.shape[0], tokens.size))
    picked = mx.take_along_axis(logits, idx, axis=-1)
    picked = mx.where(picked < 0, picked * penalty, picked / penalty)
    # Duplicate ids write the same value, so the scatter is well defined.
    return mx.put_along_axis(logits, idx, picked, axis=-1)


def make_repetition_penalty(penalty: float, context_size: Optional[int] = 20) -> LogitsProcessor:
    """A logits processor `(tokens, logits) -> logits` penalizing the last `context_size`
    tokens of the history (all of it when `context_size` is None or <= 0)."""
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if context_size and context_size > 0:
            tokens = tokens[-context_size:]
        return apply_repetition_penalty(logits, tokens, penalty)

    return processor


def make_logits_processors(
    repetition_penalty: Optional[float] = None, repetition_context_size: Optional[int] = 20
) -> List[LogitsProcessor]:
    """The processors the generation options ask for (an empty list when none)."""
    processors: List[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors


def validate_sampling(temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    """Raise ValueError with one clear sentence for out-of-range options."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
) -> Sampler:
    """Build a sampler mapping logits or log-probabilities (batch, vocab) to token ids (batch,).

    With a `seed` the sampler owns a PRNG key and splits it once per call, so the same seed
    gives the same tokens regardless of other users of MLX's global random state. Without a
    seed it draws from the global state (`mx.random.seed` controls it).
    """
    validate_sampling(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    key = mx.random.key(seed) if seed is not None else None

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        x = logits.astype(mx.float32) / temperature
        x = apply_top_k(x, top_k)
        x = apply_top_p(x, top_p)
        x = apply_min_p(x, min_p)
        if key is None:
            return mx.random.categorical(x, axis=-1)
        key, sub = mx.random.split(key)
        return mx.random.categorical(x, axis=-1, key=sub)

    return sample
