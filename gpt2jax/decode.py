"""The decode core: one state, one prefill, one first-token step, one decode step and one early-ending loop.

Both users build on these functions and nothing else decodes: the notebook `Sampler` (gpt2jax/sampler.py:
a static batch, its KV cache sized to the batch's bucket) and the serving engine's slot programs
(gpt2jax/engine/device.py: a fixed table of slots, decoded over a window of leading slots and cache
positions, manually sharded over the data axis). What differs between them (the batch is a set of
slots or a padded batch, the cache a window or all of it, per-row end-of-text, the mesh) is in the
arguments, not in a second copy of the loop. Everything here is traced inside the callers' jitted programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpt2jax import sampling, structured
from gpt2jax.config import GPT2Config
from gpt2jax.model import KVCache, forward, forward_last

# XLA options for programs that run the decode loop. On the CPU XLA gathers bf16 embedding rows through
# an f32 copy of the table; fused, only the gathered rows are widened, but inside a while loop the widening
# of the whole (loop-invariant) table is hoisted out first: a bf16 124M model then widened its 77 MB
# embedding into a 154 MB temporary on every decode call. Nothing else in the loop is worth hoisting.
DECODE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


class DecodeState(NamedTuple):
    """Everything the decode loop carries from one step to the next, each with a leading row dim B."""

    cache: KVCache  # per layer (k, v) [B, n_head, S, head_dim]; () while a row is being started
    token: jax.Array  # [B] i32, the last sampled token: the next step's input
    position: jax.Array  # [B] i32, where `token` sits in the sequence
    counts: jax.Array  # [B, V] i32, how often each token was generated (for penalties)
    step: jax.Array  # [B] i32, tokens generated so far (also indexes the row's random stream)
    max_tokens: jax.Array  # [B] i32, the row's generation limit
    eos: jax.Array  # [B] i32, the token that ends the row; -1 for none
    want_top: jax.Array  # [B] bool, the row asked for top logprobs
    done: jax.Array  # [B] bool, finished (end-of-text, max_tokens, or released by the host)
    params: sampling.SamplingTensors  # [B] rows
    fsm: jax.Array  # [B] i32, the row's structured-output automaton state (gpt2jax/structured.py); -1: none


class PromptScores(NamedTuple):
    """Log-probabilities of each prompt token given the ones before it (position 0 has none)."""

    logprob: jax.Array  # [B, P] f32; entry t is the logprob of token t (entry 0 meaningless)
    top_tokens: jax.Array  # [B, P, K] i32, top alternatives at position t
    top_logprobs: jax.Array  # [B, P, K] f32


class Model(NamedTuple):
    """What a forward pass needs besides the params: static under jit."""

    config: GPT2Config
    dtype: Any  # activation dtype (jnp.float32 or jnp.bfloat16)
    qkv_groups: int = 1  # gpt2jax.sharding.Layout.qkv_groups (1 on one device)


def prompt_scores(logits: jax.Array, tokens: jax.Array) -> PromptScores:
    """Scores of the prompt tokens [B, P] from the prefill's logits [B, P, V] f32."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predictions for tokens 1..P-1
    chosen = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_tok = jax.lax.top_k(lp, sampling.NUM_TOP_LOGPROBS)
    pad = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a], axis=1)
    return PromptScores(pad(chosen), pad(top_tok.astype(jnp.int32)), pad(top_lp))


def prefill(
    params: Any,
    model: Model,
    tokens: jax.Array,
    positions: jax.Array,
    last: jax.Array,
    cache: KVCache,
    score: bool,
) -> tuple[jax.Array, KVCache, PromptScores | None]:
    """Runs prompt tokens [B, P] i32 at `positions` [B, P] into an empty `cache` of at least P positions.

    A row is one right-padded prompt (positions 0..P-1, last [B, 1] its last token's index) or several
    prompts packed back to back (each one's positions from 0, last [B, R] their last tokens' indices;
    padding after them at position 0). Returns the logits at `last` [B, R, V] f32, the cache, and with
    `score` the prompt's scores (one prompt per row; needs every position's logits, otherwise only those
    at `last` are computed).
    """
    if not score:
        logits, cache = forward_last(
            params, model.config, tokens, positions, cache, last, model.dtype, model.qkv_groups
        )
        return logits, cache, None
    logits, cache = forward(params, model.config, tokens, positions, cache, model.dtype, model.qkv_groups)
    at_last = jnp.take_along_axis(logits, last[:, :, None], axis=1)
    return at_last, cache, prompt_scores(logits, tokens)


def start(
    logits: jax.Array,
    lengths: jax.Array,
    max_tokens: jax.Array,
    eos: jax.Array,
    want_top: jax.Array,
    sp: sampling.SamplingTensors,
    last_position: int,
    fsm: jax.Array | None = None,
    tables: structured.Tables | None = None,
) -> tuple[DecodeState, sampling.SampleOutput]:
    """Rows' first tokens, sampled from the prefill's logits [B, V]; returns their state (cache () for
    the caller to fill) and the sample. lengths, max_tokens, eos [B] i32, want_top [B] bool; fsm [B] i32
    the rows' initial automaton states in `tables` (default: all -1, unconstrained)."""
    B = logits.shape[0]
    fsm = jnp.full((B,), structured.UNCONSTRAINED, jnp.int32) if fsm is None else fsm
    state = DecodeState(
        cache=(),
        token=jnp.zeros((B,), jnp.int32),
        position=lengths - 1,
        counts=jnp.zeros(logits.shape, jnp.int32),
        step=jnp.zeros((B,), jnp.int32),
        max_tokens=max_tokens,
        eos=eos,
        want_top=want_top,
        done=max_tokens <= 0,
        params=sp,
        fsm=fsm,
    )
    constrain = lambda x: structured.constrain(x, tables, fsm, max_tokens)  # budget: all of max_tokens
    out = sampling.sample(logits, state.counts, state.step, sp, jnp.any(want_top), constrain)
    return advance(state, out, last_position, tables), out


def advance(
    state: DecodeState,
    out: sampling.SampleOutput,
    last_position: int,
    tables: structured.Tables | None = None,
) -> DecodeState:
    """Records sampled tokens: each live row's token becomes its next input (and moves its automaton
    state in `tables`); rows may now be done.

    last_position: the highest cache position a row may move to (positions are clamped there).
    """
    rows = state.token.shape[0]
    live = ~state.done
    counts = state.counts.at[jnp.arange(rows), out.token].add(live.astype(jnp.int32))
    step = state.step + live
    done = state.done | (out.token == state.eos) | (step >= state.max_tokens)
    position = jnp.where(live, jnp.minimum(state.position + 1, last_position), state.position)
    token = jnp.where(live, out.token, state.token)
    fsm = jnp.where(live, structured.next_state(tables, state.fsm, out.token), state.fsm)
    return state._replace(token=token, position=position, counts=counts, step=step, done=done, fsm=fsm)


def step(
    params: Any, model: Model, state: DecodeState, last_position: int, tables: structured.Tables | None = None
) -> tuple[DecodeState, sampling.SampleOutput]:
    """One decode step for every row: forward the last tokens, sample (within each constrained row's
    automaton, `tables`), advance. The outputs' token is -1 for rows that were already done (finished
    rows sample greedily, so they never force the costlier sampling branches)."""
    logits, cache = forward(
        params,
        model.config,
        state.token[:, None],
        state.position[:, None],
        state.cache,
        model.dtype,
        model.qkv_groups,
    )
    want_top = jnp.any(state.want_top & ~state.done)
    sp = sampling.neutral_where(state.params, state.done)
    fsm = jnp.where(state.done, structured.UNCONSTRAINED, state.fsm)
    constrain = lambda x: structured.constrain(x, tables, fsm, state.max_tokens - state.step)
    out = sampling.sample(logits[:, 0], state.counts, state.step, sp, want_top, constrain)
    emitted = out._replace(token=jnp.where(state.done, -1, out.token))
    return advance(state._replace(cache=cache), out, last_position, tables), emitted


def decode(
    params: Any,
    model: Model,
    state: DecodeState,
    max_steps: int,
    last_position: int,
    tables: structured.Tables | None = None,
    steps: jax.Array | None = None,
) -> tuple[jax.Array, DecodeState, sampling.SampleOutput]:
    """Up to `max_steps` decode steps (fewer with `steps`, a traced i32 <= max_steps), ending once every
    row is done; returns (steps run, final state, outputs stacked [max_steps, B, ...] with token -1 for
    rows done and for the steps not run)."""
    one_step = lambda s: step(params, model, s, last_position, tables)
    return steps_until_done(one_step, state, max_steps, steps)


def steps_until_done(
    one_step: Callable[[Any], tuple[Any, sampling.SampleOutput]],
    state: Any,
    max_steps: int,
    steps: jax.Array | None = None,
) -> tuple[jax.Array, Any, sampling.SampleOutput]:
    """Runs `state, out = one_step(state)` up to `max_steps` times (or `steps`, traced, at most that),
    stopping once every row of `state.done` is; returns (steps run, final state, outputs stacked
    [max_steps, ...], token -1 for the steps not run).

    A `lax.while_loop` rather than a fixed-length `lax.scan`, so that a chunk whose rows all finish early
    (or were done from the start) stops there; at full length it is as fast as the scan.
    """

    def unfinished(carry) -> jax.Array:
        i, state, _ = carry
        return (i < limit) & ~jnp.all(state.done)

    def body(carry):
        i, state, outs = carry
        state, out = one_step(state)
        write = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)
        return i + 1, state, jax.tree.map(write, outs, out)

    limit = max_steps if steps is None else jnp.minimum(steps, max_steps)
    _, out = jax.eval_shape(one_step, state)
    outs = jax.tree.map(lambda a: jnp.zeros((max_steps, *a.shape), a.dtype), out)
    outs = outs._replace(token=jnp.full(outs.token.shape, -1, jnp.int32))
    return jax.lax.while_loop(unfinished, body, (jnp.int32(0), state, outs))
