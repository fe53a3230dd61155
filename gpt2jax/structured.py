"""Structured outputs on the device: automaton tables shared by every row, and the two per-row lookups
the decode loop makes (the tokens a row's state allows before sampling, the state after the sampled token).

A row whose budget (max_tokens - tokens generated) runs short samples only its state's closing tokens
(gpt2jax/closing.py), so that it ends valid, with its end-of-text, before max_tokens.

Each row of the decode state carries `fsm` [B] i32: a state id into the stacked tables, or -1 for an
unconstrained row. The tables hold every resident automaton (gpt2jax/constraint.py's Automaton, states
renumbered by an offset: gpt2jax/engine/automata.py places them) and are passed to the jitted programs as
arguments, padded to capacity buckets: a new schema changes their contents, not the compiled program.

Bytes: the allowed-token and closing-token bitmasks are [states, ceil(V / 32)] uint32 each (6,284 bytes a
state each for GPT-2's 50,257 tokens), the transitions 8 bytes each (sorted token, next state), plus 8
bytes a state of offsets and maxd: no dense [states, V] table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.constraint import Automaton

UNCONSTRAINED = -1


class Tables(NamedTuple):
    """Every resident automaton, stacked; padding states allow nothing and have no transitions."""

    allowed: jax.Array  # [S, ceil(V / 32)] u32, bit t % 32 of word t // 32: token t allowed in state s
    start: jax.Array  # [S + 1] i32, state s's transitions are entries start[s]:start[s + 1]
    token: jax.Array  # [T] i32, ascending within each state
    next: jax.Array  # [T] i32, the global state after that token
    maxd: jax.Array  # [S] i32, the most tokens any allowed token's next state is from acceptance
    closing: jax.Array  # [S, ceil(V / 32)] u32, like allowed: the tokens that bring the state closer


def stack(automata: Sequence[Automaton], n_vocab: int, states: int, transitions: int) -> Tables:
    """Host-side (numpy) tables of these automata in order, padded to `states` and `transitions`;
    automaton i's states start at sum of the earlier ones' n_states (see `offsets`)."""
    words = -(-n_vocab // 32)
    allowed = np.zeros((states, words), np.uint32)
    start = np.zeros(states + 1, np.int32)
    token = np.full(transitions, np.iinfo(np.int32).max, np.int32)
    nxt = np.zeros(transitions, np.int32)
    maxd, closing = np.zeros(states, np.int32), np.zeros((states, words), np.uint32)
    s = t = 0
    for a in automata:
        n, k = a.n_states, a.n_transitions
        allowed[s : s + n], closing[s : s + n], maxd[s : s + n] = a.allowed, a.closing, a.maxd
        start[s : s + n + 1] = a.start + t
        token[t : t + k], nxt[t : t + k] = a.token, a.next + s
        s, t = s + n, t + k
    start[s:] = t
    return Tables(allowed, start, token, nxt, maxd, closing)


def offsets(automata: Sequence[Automaton]) -> list[int]:
    """The first global state of each automaton in `stack`'s order."""
    return np.cumsum([0] + [a.n_states for a in automata[:-1]]).tolist() if automata else []


def allowed_tokens(tables: Tables, fsm: jax.Array, budget: jax.Array, n_vocab: int) -> jax.Array:
    """[B, V] bool: the tokens each row's state allows (every token for an unconstrained row), only its
    closing ones once a free choice could leave too few of its `budget` [B] i32 tokens (max_tokens minus
    those generated, counting the one about to be sampled) to reach acceptance and end-of-text."""
    s = jnp.maximum(fsm, 0)
    short = (jnp.asarray(tables.maxd)[s] >= budget - 1)[:, None]  # maxd + the end-of-text > budget - 1
    words = jnp.where(short, jnp.asarray(tables.closing)[s], jnp.asarray(tables.allowed)[s])  # [B, W]
    v = jnp.arange(n_vocab, dtype=jnp.uint32)
    bits = (words[:, v >> 5] >> (v & 31)[None]) & 1  # [B, V]
    return (bits != 0) | (fsm < 0)[:, None]


def constrain(x: jax.Array, tables: Tables | None, fsm: jax.Array, budget: jax.Array) -> jax.Array:
    """Logits x [B, V] f32 with the tokens each row's state forbids at -inf (`allowed_tokens`, `budget`
    [B] i32 the tokens each row may still generate); unconstrained rows are returned bit for bit, and a
    batch without a constrained row skips the work (`lax.cond`). The one mask of every sampling site."""
    if tables is None:
        return x

    def masked(x):
        return jnp.where(allowed_tokens(tables, fsm, budget, x.shape[-1]), x, -jnp.inf)

    return jax.lax.cond(jnp.any(fsm >= 0), masked, lambda x: x, x)


def next_state(tables: Tables | None, fsm: jax.Array, token: jax.Array) -> jax.Array:
    """Each row's state [B] i32 after `token` [B] i32: a binary search of the state's sorted
    transitions (log2 T steps of B gathers). Unconstrained rows stay -1; a token without a transition
    (only reachable by a row already done) leaves the state as it was."""
    if tables is None:
        return fsm
    tables = Tables(*map(jnp.asarray, tables))
    return jax.lax.cond(jnp.any(fsm >= 0), _search, lambda *_: fsm, tables, fsm, token)


def _search(tables: Tables, fsm: jax.Array, token: jax.Array) -> jax.Array:
    s = jnp.maximum(fsm, 0)
    lo, hi = tables.start[s], tables.start[s + 1]
    end = hi

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        below = (mid < hi) & (tables.token[jnp.minimum(mid, tables.token.shape[0] - 1)] < token)
        return jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)

    steps = max(1, int(tables.token.shape[0]).bit_length())
    at, _ = jax.lax.fori_loop(0, steps, halve, (lo, hi))
    at_c = jnp.minimum(at, tables.token.shape[0] - 1)
    found = (at < end) & (tables.token[at_c] == token)
    return jnp.where(fsm < 0, fsm, jnp.where(found, tables.next[at_c], fsm))
