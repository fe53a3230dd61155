"""Sampling: pure, jittable functions of logits, every setting a traced per-row array.

A new temperature, top_k, top_p, penalty, bias or seed never recompiles: they are data, not code. Work that
no row of the batch needs is skipped with `lax.cond` (a full-vocabulary sort is never done: top-k and top-p
thresholds are found by bisection, which costs a few passes over the logits instead of a sort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.sampling_params import MAX_LOGPROBS, SamplingParams

NUM_TOP_LOGPROBS = MAX_LOGPROBS  # alternatives computed per token: OpenAI's chat allows top_logprobs up to 20
_BISECT_STEPS = 32
_NEG_INF = -jnp.inf


class SamplingTensors(NamedTuple):
    """Per-row settings as device arrays, each with a leading batch dimension B: what the jitted code sees
    of a batch's SamplingParams records (built by `tensors_from`)."""

    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] i32; 0 = off
    top_p: jax.Array  # [B] f32; 1 = off
    min_p: jax.Array  # [B] f32; 0 = off
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    logit_bias: jax.Array  # [B, V] f32, added to the logits
    rng: jax.Array  # [B, 2] uint32 raw threefry key data, one stream per row (from the record's seed)


# The per-row scalars, taken by name from each row's SamplingParams record.
SCALARS = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
}
# A finished or padding row: greedy and unfiltered, so it never forces the costlier sampling branches.
NEUTRAL = SamplingParams(temperature=0.0, seed=0)


class SampleOutput(NamedTuple):
    token: jax.Array  # [B] i32
    logprob: jax.Array  # [B] f32, log-probability of `token` under the model's distribution
    top_tokens: jax.Array  # [B, NUM_TOP_LOGPROBS] i32
    top_logprobs: jax.Array  # [B, NUM_TOP_LOGPROBS] f32


def tensors_from(rows: Sequence[SamplingParams], n_vocab: int) -> SamplingTensors:
    """Host-side numpy tensors of one record per row; a row's `seed` (None: 0) seeds its random stream."""
    bias = np.zeros((len(rows), n_vocab), np.float32)
    for i, p in enumerate(rows):
        for tok, value in p.logit_bias:
            bias[i, int(tok)] = value
    return SamplingTensors(
        **{name: np.array([getattr(p, name) for p in rows], dtype) for name, dtype in SCALARS.items()},
        logit_bias=bias,
        rng=np.stack([seed_key(p.seed or 0) for p in rows]).reshape(len(rows), 2),
    )


def make_params(batch: int, n_vocab: int, **settings: Any) -> SamplingTensors:
    """`batch` rows of SamplingParams fields: a value for every row, or a list of one per row."""
    per_row = lambda v, i: v[i] if isinstance(v, list) else v
    return tensors_from(
        [SamplingParams(**{k: per_row(v, i) for k, v in settings.items()}) for i in range(batch)], n_vocab
    )


def neutral_where(sp: SamplingTensors, done: jax.Array) -> SamplingTensors:
    """The rows where `done` replaced by NEUTRAL's settings (scalars only; bias and rng are kept)."""
    off = {name: jnp.where(done, getattr(NEUTRAL, name), getattr(sp, name)) for name in SCALARS}
    return sp._replace(**off)


def seed_key(seed: int) -> np.ndarray:
    """Raw threefry key data [2] uint32 for a (possibly 64-bit) seed, computed on the host."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def apply_penalties(logits: jax.Array, counts: jax.Array, params: SamplingTensors) -> jax.Array:
    """OpenAI's formula: logit -= count * frequency_penalty + (count > 0) * presence_penalty; plus bias."""
    counts = counts.astype(jnp.float32)
    penalty = counts * params.frequency_penalty[:, None] + (counts > 0) * params.presence_penalty[:, None]
    return logits + params.logit_bias - penalty


def _bisect_threshold(x: jax.Array, keep_enough) -> jax.Array:
    """Largest t (per row) with keep_enough(x >= t) true, snapped to an element of x. x: [B, V]."""
    finite = jnp.isfinite(x)
    hi = jnp.max(jnp.where(finite, x, _NEG_INF), axis=-1)
    lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=-1)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) * 0.5
        ok = keep_enough(x >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, step, (lo, hi))
    # Snap to the smallest element >= lo: the exact k-th value rather than a point between two values.
    return jnp.min(jnp.where(x >= lo[:, None], x, jnp.inf), axis=-1)


def top_k_mask(x: jax.Array, k: jax.Array) -> jax.Array:
    """Sets everything below each row's k-th largest value to -inf; k = 0 keeps the row as it is."""

    def masked(x):
        kk = jnp.where(k > 0, k, x.shape[-1])
        t = _bisect_threshold(x, lambda keep: jnp.sum(keep, -1) >= kk)
        return jnp.where((k[:, None] > 0) & (x < t[:, None]), _NEG_INF, x)

    return jax.lax.cond(jnp.any(k > 0), masked, lambda x: x, x)


def top_p_mask(x: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability reaches p."""

    def masked(x):
        probs = jax.nn.softmax(x, axis=-1)
        t = _bisect_threshold(x, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), -1) >= p)
        return jnp.where((p[:, None] < 1.0) & (x < t[:, None]), _NEG_INF, x)

    return jax.lax.cond(jnp.any(p < 1.0), masked, lambda x: x, x)


def min_p_mask(x: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keeps the tokens whose probability is at least min_p x the most likely token's; 0 = off.

    x [B, V] are temperature-scaled logits (min_p then sees the distribution that is sampled from, as in
    vLLM's sampler); min_p [B] f32 in [0, 1]. p_i >= min_p * p_max is x_i >= x_max + log(min_p), so no
    softmax is needed. min_p = 1 keeps only the most likely token(s): greedy.
    """

    def masked(x):
        top = jnp.max(x, axis=-1, keepdims=True)
        floor = top + jnp.log(jnp.maximum(min_p, jnp.finfo(jnp.float32).tiny))[:, None]
        return jnp.where((min_p[:, None] > 0) & (x < floor), _NEG_INF, x)

    return jax.lax.cond(jnp.any(min_p > 0), masked, lambda x: x, x)


def sample_from(x: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF sampling of one token per row from unnormalised logits x [B, V], with u [B] in [0, 1)."""
    probs = jax.nn.softmax(x, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    target = jnp.maximum(u * cdf[:, -1], jnp.finfo(jnp.float32).tiny)
    # The first index whose cdf reaches target always has a nonzero probability.
    return jnp.minimum(jnp.sum(cdf < target[:, None], axis=-1), x.shape[-1] - 1).astype(jnp.int32)


def row_uniforms(rng: jax.Array, step: jax.Array) -> jax.Array:
    """One uniform per row from that row's own stream at its own step: independent of batch composition."""

    def one(key_data, s):
        key = jax.random.wrap_key_data(key_data, impl="threefry2x32")
        return jax.random.uniform(jax.random.fold_in(key, s))

    return jax.vmap(one)(rng, step)


def sample(
    logits: jax.Array,
    counts: jax.Array,
    step: jax.Array,
    params: SamplingTensors,
    want_top: jax.Array,
    constrain: Callable[[jax.Array], jax.Array] | None = None,
) -> SampleOutput:
    """Chooses the next token of each row.

    logits [B, V] fp32; counts [B, V] tokens generated so far (for penalties); step [B] the index of the
    token being sampled in each row's stream; want_top: scalar bool, whether any row asked for top logprobs.
    constrain: applied to the penalised logits [B, V] before any filtering (structured outputs set the
    tokens a row's automaton forbids to -inf); logprobs stay those of the model's distribution.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = apply_penalties(logits, counts, params)
    if constrain is not None:
        x = constrain(x)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def stochastic(x):
        t = jnp.where(params.temperature > 0, params.temperature, 1.0)
        x = x / t[:, None]
        x = top_k_mask(x, params.top_k)
        x = top_p_mask(x, params.top_p)
        x = min_p_mask(x, params.min_p)
        return sample_from(x, row_uniforms(params.rng, step))

    any_sampled = jnp.any(params.temperature > 0)
    sampled_tok = jax.lax.cond(any_sampled, stochastic, lambda x: greedy_tok, x)
    token = jnp.where(params.temperature > 0, sampled_tok, greedy_tok)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]

    def top(lp):
        vals, idx = jax.lax.top_k(lp, NUM_TOP_LOGPROBS)
        return idx.astype(jnp.int32), vals

    def no_top(lp):
        b = lp.shape[0]
        return jnp.zeros((b, NUM_TOP_LOGPROBS), jnp.int32), jnp.zeros((b, NUM_TOP_LOGPROBS), jnp.float32)

    top_tokens, top_logprobs = jax.lax.cond(want_top, top, no_top, logprobs)
    return SampleOutput(token, chosen, top_tokens, top_logprobs)
