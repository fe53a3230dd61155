"""What crosses between the engine's scheduler and its device programs for one slot: the settings insert
writes into it (SlotRow, made from a choice's SamplingParams record) and a prompt's prefill (Prefilled);
and how device.py's programs cut and write rows of the slot table (`leading`, `put_row`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import sampling
from gpt2jax.config import GPT2Config
from gpt2jax.constraint import Automaton
from gpt2jax.decode import DecodeState, PromptScores
from gpt2jax.model import KVCache, init_cache, through_bits
from gpt2jax.sampling_params import SamplingParams


class SlotRow(NamedTuple):
    """What insert writes into a slot besides the KV: one request choice's settings (scalars, 1-row params)."""

    length: np.ndarray  # [] i32, prompt length
    max_tokens: np.ndarray  # [] i32, >= 1
    eos: np.ndarray  # [] i32, -1 for none
    want_top: np.ndarray  # [] bool
    params: sampling.SamplingTensors  # one row each
    fsm: np.ndarray = np.int32(-1)  # [] i32, the row's first automaton state; set by insert from:
    automaton: Automaton | None = None  # the choice's structured-output automaton (host side)


class Prefilled(NamedTuple):
    """One prompt's prefill (a packed prefill returns one per prompt, sharing the row's cache)."""

    cache: KVCache  # per layer (k, v) [1, n_head, P, head_dim]: the row's; this prompt's from `offset`
    logits: jax.Array  # [V] f32 at the last prompt token
    scores: PromptScores | None  # [1, P] prompt logprobs when asked for (the prompt alone in its row)
    offset: int = 0  # where the prompt starts in the row


def make_row(
    length: int, eos: int, params: SamplingParams, n_vocab: int, automaton: Automaton | None = None
) -> SlotRow:
    """Host-side builder of one slot's settings: a choice's record (its own seed already derived) and
    its compiled constraint, if any."""
    return SlotRow(
        np.int32(length),
        np.int32(params.max_tokens),
        np.int32(eos),
        np.bool_(bool(params.logprobs)),
        sampling.tensors_from([params], n_vocab),
        automaton=automaton,
    )


def leading(state: DecodeState, rows: int, window: int | None) -> DecodeState:
    """The first `rows` slots of a slot table's state, their cache cut to its first `window` positions
    (what a decode of that many rows over that window runs on; traced inside it). window None: the
    whole cache, uncut (gpt2jax.model.kernel_attention reads its leading rows in place)."""
    cut = jax.tree.map(lambda a: a[:rows], state._replace(cache=()))
    if window is None:
        return cut._replace(cache=state.cache)
    return cut._replace(cache=tuple((k[:rows, :, :window], v[:rows, :, :window]) for k, v in state.cache))


def write_back(whole: DecodeState, part: DecodeState) -> DecodeState:
    """`whole` with `leading`'s part written over its first rows and positions (in place when `whole` is
    donated); an array that was not cut is taken whole."""
    at_zero = lambda w, p: jax.lax.dynamic_update_slice(w, p, (0,) * w.ndim)
    return jax.tree.map(lambda w, p: p if w.shape == p.shape else through_bits(at_zero, w, p), whole, part)


def put_row(dst: jax.Array, src: jax.Array, at: jax.Array) -> jax.Array:
    """Writes src [1, ...] at row `at` of dst [S, ...] (from index 0 of the other axes), cast to dst's dtype
    (a prefill's KV into a slot of the cache; traced inside insert). In place when dst is donated: a
    select between src and dst's old row would make XLA copy the whole of dst."""
    start = (at,) + (0,) * (dst.ndim - 1)
    return through_bits(lambda d, s: jax.lax.dynamic_update_slice(d, s, start), dst, src)


def empty_state(config: GPT2Config, slots: int, kv_dtype: Any, qkv_groups: int = 1) -> DecodeState:
    """A slot table with every slot empty (done): a zeroed KV cache [slots, heads, n_ctx, head_dim] per
    layer in `kv_dtype`, neutral sampling settings, no automaton (traced inside the engine's init)."""
    S, V = slots, config.n_vocab
    zeros = lambda dtype: jnp.zeros((S,), dtype)
    neutral = sampling.tensors_from([sampling.NEUTRAL], V)
    return DecodeState(
        cache=init_cache(config, S, config.n_ctx, kv_dtype, qkv_groups),
        token=zeros(jnp.int32),
        position=zeros(jnp.int32),
        counts=jnp.zeros((S, V), jnp.int32),
        step=zeros(jnp.int32),
        max_tokens=zeros(jnp.int32),
        eos=jnp.full((S,), -1, jnp.int32),
        want_top=zeros(jnp.bool_),
        done=jnp.ones((S,), jnp.bool_),
        params=jax.tree.map(lambda a: jnp.broadcast_to(a, (S, *a.shape[1:])), neutral),
        fsm=jnp.full((S,), -1, jnp.int32),
    )


def insert_row(
    state: DecodeState, kv: KVCache, row: DecodeState, at: jax.Array, offset: jax.Array
) -> DecodeState:
    """`state` with slot `at` holding a prompt: its KV, from `offset` in a prefill row's cache `kv` (per
    layer [1, H, T, D]), at the slot's first T positions, and `row`'s settings (traced inside insert).

    Past the row's end the slot gets zeros: it never reads beyond its own position, but the values must
    be finite (attention weighs them by zero)."""

    def shifted(a: jax.Array) -> jax.Array:  # a[:, :, offset:offset + T], zero-padded past T
        T = a.shape[2]
        padded = jnp.pad(a, ((0, 0), (0, 0), (0, T), (0, 0)))
        return jax.lax.dynamic_slice_in_dim(padded, offset, T, axis=2)

    cache = tuple(
        (put_row(k, shifted(pk), at), put_row(v, shifted(pv), at))
        for (k, v), (pk, pv) in zip(state.cache, kv, strict=True)
    )
    rest = jax.tree.map(lambda d, s: put_row(d, s, at), state._replace(cache=()), row)
    return rest._replace(cache=cache)
