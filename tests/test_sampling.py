"""Sampling filters and samplers against hand computations and numpy references."""

import math

import mlx.core as mx
import numpy as np
import pytest

from marlin_mlx.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kept(filtered: mx.array) -> np.ndarray:
    return np.isfinite(np.array(filtered))


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(0, 2.0, size=(3, 97)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    out = apply_top_k(mx.array(logits), k)
    kept = _kept(out)
    assert (kept.sum(axis=-1) == k).all()
    for row, mask in zip(logits, kept):
        assert set(np.flatnonzero(mask)) == set(np.argsort(-row)[:k])
    # kept values are untouched
    np.testing.assert_array_equal(np.array(out)[kept], logits[kept])


def test_top_k_with_ties_still_keeps_exactly_k():
    x = mx.array([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    assert _kept(apply_top_k(x, 2)).sum() == 2
    assert set(np.flatnonzero(_kept(apply_top_k(x, 2))[0])) <= {1, 2, 3, 5}


def test_top_k_off():
    x = mx.array([[0.5, 1.0, -2.0]])
    assert _kept(apply_top_k(x, 0)).all() and _kept(apply_top_k(x, 3)).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    kept = _kept(apply_top_p(mx.array(logits), p))
    probs = _softmax(logits)
    for row_p, mask in zip(probs, kept):
        order = np.argsort(-row_p)
        n = int(np.searchsorted(np.cumsum(row_p[order]), p) + 1)  # reference: smallest prefix
        assert set(np.flatnonzero(mask)) == set(order[:n])
        mass = row_p[mask].sum()
        assert mass >= p - 1e-6
        assert mass - row_p[mask].min() < p  # dropping the least likely kept token falls short


def test_top_p_exact_boundary():
    # four tokens of probability 0.25 (exact in float): two reach p = 0.5, a third is not needed
    x = mx.zeros((1, 4))
    assert _kept(apply_top_p(x, 0.5)).sum() == 2
    assert _kept(apply_top_p(x, 0.51)).sum() == 3


def test_top_p_always_keeps_the_top_token_and_one_keeps_all():
    x = mx.array([[10.0, 0.0, -1.0]])  # p(top) ~ 0.99995
    assert _kept(apply_top_p(x, 0.01)).tolist() == [[True, False, False]]
    assert _kept(apply_top_p(x, 1.0)).all()


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_against_probability_ratio(logits, min_p):
    kept = _kept(apply_min_p(mx.array(logits), min_p))
    probs = _softmax(logits)
    expected = probs >= min_p * probs.max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(kept, expected)


def test_repetition_penalty_hand_computed():
    x = mx.array([[2.0, -1.0, 0.5, -3.0, 4.0]])
    out = apply_repetition_penalty(x, mx.array([0, 1, 1, 4]), 2.0)
    # positive logits are divided, negative multiplied; untouched ids stay; repeats count once
    assert np.array(out).tolist() == [[1.0, -2.0, 0.5, -3.0, 2.0]]


def test_repetition_penalty_context_window():
    proc = make_repetition_penalty(1.5, context_size=2)
    x = mx.array([[3.0, 3.0, 3.0, -3.0]])
    history = mx.array([0, 3, 1])  # only the last two (3 and 1) are in the window
    assert np.array(proc(history, x)).tolist() == [[3.0, 2.0, 3.0, -4.5]]
    whole = make_repetition_penalty(1.5, context_size=None)
    assert np.array(whole(history, x)).tolist() == [[2.0, 2.0, 3.0, -4.5]]


def test_logits_processors_only_when_asked():
    assert make_logits_processors(None) == [] and make_logits_processors(1.0) == []
    assert len(make_logits_processors(1.2, 10)) == 1
    with pytest.raises(ValueError):
        make_repetition_penalty(0.0)


def test_temperature_zero_is_argmax(logits):
    sample = make_sampler(0.0, top_p=0.5, top_k=3, seed=1)
    np.testing.assert_array_equal(np.array(sample(mx.array(logits))), logits.argmax(axis=-1))


def test_seed_reproducibility():
    x = mx.zeros((1, 1000))  # uniform: any difference in the random stream shows
    a = make_sampler(1.0, seed=7)
    b = make_sampler(1.0, seed=7)
    c = make_sampler(1.0, seed=8)
    seq_a = [a(x).item() for _ in range(20)]
    seq_b = [b(x).item() for _ in range(20)]
    seq_c = [c(x).item() for _ in range(20)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    assert len(set(seq_a)) > 1  # the key advances between calls


def test_seeded_sampler_ignores_global_random_state():
    x = mx.zeros((1, 1000))
    s1 = make_sampler(1.0, seed=11)
    first = s1(x).item()
    mx.random.seed(123)
    mx.random.uniform(shape=(10,))
    assert make_sampler(1.0, seed=11)(x).item() == first


def _frequencies(sample, row, n=6000):
    draws = np.array(sample(mx.broadcast_to(mx.array(row)[None], (n, len(row)))))
    return np.bincount(draws, minlength=len(row)) / n


def test_sampled_frequencies_follow_temperature():
    row = np.array([1.0, 0.0, -1.0, 0.5], np.float32)
    for temp in (0.5, 1.0, 2.0):
        freq = _frequencies(make_sampler(temp, seed=0), row)
        np.testing.assert_allclose(freq, _softmax(row / temp), atol=0.03)


def test_filters_apply_after_temperature_in_order():
    # top-k 3, then top-p 0.8 on the tempered distribution, then min-p
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
    temp = 2.0
    p = _softmax(row / temp)
    top3 = p[:3] / p[:3].sum()  # top-k=3 renormalized: [0.42, 0.33, 0.25]
    nucleus = np.cumsum(top3) - top3 < 0.6  # keeps the first two
    expected = np.zeros_like(p)
    expected[:3][nucleus] = top3[nucleus] / top3[nucleus].sum()
    freq = _frequencies(make_sampler(temp, top_k=3, top_p=0.6, seed=1), row)
    assert (freq[~(expected > 0)] == 0).all()
    np.testing.assert_allclose(freq, expected, atol=0.03)
    # min-p 0.9 leaves only tokens within 10% of the best one: here only token 0
    freq = _frequencies(make_sampler(temp, min_p=0.9, seed=1), row)
    assert freq[0] == 1.0


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
               dict(min_p=1.0), dict(min_p=-0.1)]
)
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**{"temperature": 1.0, **kwargs})


def test_min_p_threshold_is_in_log_space():
    # p_max / p_i = e^1: kept iff min_p <= e^-1
    x = mx.array([[1.0, 0.0]])
    assert _kept(apply_min_p(x, math.exp(-1) - 1e-4)).all()
    assert not _kept(apply_min_p(x, math.exp(-1) + 1e-4))[0, 1]
