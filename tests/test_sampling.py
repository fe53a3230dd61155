"""Sampling transforms against straightforward numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import sampling

V = 300


def logits(batch: int, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).randn(batch, V) * 3).astype(np.float32)


def test_top_k_keeps_exactly_the_k_largest_per_row():
    x = logits(5)
    k = np.array([0, 1, 5, 40, V], np.int32)
    out = np.asarray(jax.jit(sampling.top_k_mask)(x, k))
    for row in range(5):
        kept = np.isfinite(out[row])
        if k[row] == 0:
            assert kept.all()
            continue
        expected = np.argsort(-x[row])[: k[row]]
        assert set(np.flatnonzero(kept)) == set(expected)
        np.testing.assert_array_equal(out[row][kept], x[row][kept])


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    x = logits(6, seed=1)
    p = np.array([1.0, 0.0, 0.1, 0.5, 0.9, 0.999], np.float32)
    out = np.asarray(jax.jit(sampling.top_p_mask)(x, p))
    for row in range(6):
        kept = np.isfinite(out[row])
        if p[row] >= 1.0:
            assert kept.all()
            continue
        order = np.argsort(-x[row])
        probs = np.exp(x[row] - x[row].max())
        probs /= probs.sum()
        cum = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(cum, p[row]) + 1)  # first index where the mass reaches p
        assert set(np.flatnonzero(kept)) == set(order[:n_keep])


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    x = logits(5, seed=3)
    min_p = np.array([0.0, 0.05, 0.3, 0.9, 1.0], np.float32)
    out = np.asarray(jax.jit(sampling.min_p_mask)(x, min_p))
    for row in range(5):
        probs = np.exp(x[row].astype(np.float64) - x[row].max())
        probs /= probs.sum()
        expected = probs >= min_p[row] * probs.max()  # vLLM's and llama.cpp's definition
        np.testing.assert_array_equal(np.isfinite(out[row]), expected)
    assert np.flatnonzero(np.isfinite(out[4])).tolist() == [int(np.argmax(x[4]))]  # min_p 1: greedy


def test_penalties_follow_openais_formula():
    x = logits(2, seed=2)
    counts = np.zeros((2, V), np.int32)
    counts[0, [3, 4]] = [1, 3]
    counts[1, 7] = 2
    params = sampling.make_params(
        2, V, presence_penalty=[0.5, -1.0], frequency_penalty=[0.25, 2.0], logit_bias=[{9: 100.0}, None]
    )
    out = np.asarray(sampling.apply_penalties(x, counts, params))
    expected = x.copy()
    expected[0, 3] -= 1 * 0.25 + 0.5
    expected[0, 4] -= 3 * 0.25 + 0.5
    expected[0, 9] += 100.0
    expected[1, 7] -= 2 * 2.0 - 1.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_inverse_cdf_sampling_matches_the_distribution():
    rows = 20000
    x = np.tile(np.log(np.array([[0.5, 0.3, 0.2, 0.0]], np.float32) + 1e-30), (rows, 1))
    x[:, 3] = -np.inf
    u = np.asarray(jax.random.uniform(jax.random.key(0), (rows,)))
    tokens = np.asarray(jax.jit(sampling.sample_from)(x, u))
    freq = np.bincount(tokens, minlength=4) / rows
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.015)


def test_row_streams_do_not_depend_on_the_rest_of_the_batch():
    rng = np.stack([sampling.seed_key(s) for s in (1, 2, 3)])
    steps = np.array([0, 5, 9], np.int32)
    together = np.asarray(sampling.row_uniforms(rng, steps))
    for i in range(3):
        alone = np.asarray(sampling.row_uniforms(rng[i : i + 1], steps[i : i + 1]))
        assert alone[0] == together[i]
    assert len(set(together.tolist())) == 3


def test_sample_greedy_rows_take_the_penalized_argmax_and_report_model_logprobs():
    x = logits(3, seed=4)
    counts = np.zeros((3, V), np.int32)
    best = x.argmax(-1)
    counts[0, best[0]] = 1  # row 0: presence penalty moves it off its argmax
    params = sampling.make_params(
        3, V, temperature=[0.0, 0.0, 0.7], presence_penalty=[100.0, 0.0, 0.0], seed=3
    )
    out = jax.jit(sampling.sample)(x, counts, jnp.zeros(3, jnp.int32), params, jnp.bool_(True))
    tok = np.asarray(out.token)
    assert tok[0] == np.argsort(-x[0])[1]
    assert tok[1] == best[1]
    log_softmax = (
        x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    )
    np.testing.assert_allclose(np.asarray(out.logprob), log_softmax[np.arange(3), tok], atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(out.top_tokens), np.argsort(-x, axis=-1)[:, : sampling.NUM_TOP_LOGPROBS]
    )


def test_top_k_one_is_greedy_even_at_high_temperature():
    x = logits(4, seed=5)
    params = sampling.make_params(4, V, temperature=2.0, top_k=1, seed=[1, 2, 3, 4])
    counts = np.zeros((4, V), np.int32)
    for step in range(5):
        out = sampling.sample(x, counts, jnp.full(4, step, jnp.int32), params, jnp.bool_(False))
        np.testing.assert_array_equal(np.asarray(out.token), x.argmax(-1))


def test_min_p_one_is_greedy_and_min_p_filters_the_sampled_tokens():
    x = logits(4, seed=6)
    counts = np.zeros((4, V), np.int32)
    greedy = sampling.make_params(4, V, temperature=2.0, min_p=1.0, seed=[1, 2, 3, 4])
    filtered = sampling.make_params(4, V, temperature=1.0, min_p=0.5, seed=[5, 6, 7, 8])
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for step in range(8):
        steps = jnp.full(4, step, jnp.int32)
        out = sampling.sample(x, counts, steps, greedy, jnp.bool_(False))
        np.testing.assert_array_equal(np.asarray(out.token), x.argmax(-1))
        tok = np.asarray(sampling.sample(x, counts, steps, filtered, jnp.bool_(False)).token)
        assert (probs[np.arange(4), tok] >= 0.5 * probs.max(-1)).all()
