"""Budget-aware closing (host side, numpy): how many tokens each automaton state is from acceptance, and
which tokens bring it closer, so that a constrained row can always finish valid before max_tokens.

For state s: `dist[s]` the fewest tokens from s to an accepting state (0 if accepting), `maxd[s]` the
largest dist of the states its allowed tokens lead to, and `closing[s]` the tokens whose next state is
nearer (dist < dist[s]) plus end-of-text where s accepts. The decode step (gpt2jax/structured.py) lets a
row with budget b (tokens it may still generate) sample freely while maxd[s] <= b - 2, and only closing
tokens otherwise: by induction dist[state] + 1 <= budget at every step, so when dist[initial] + 1 <=
max_tokens the row always reaches an accepting state with a token to spare for its end-of-text (and so
ends with finish_reason "stop", which clients such as openai's `parse` require).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

FAR = np.int32(2**30)  # dist of a state from which no accepting state is reachable


class Closing(NamedTuple):
    dist: np.ndarray  # [n] i32, fewest tokens to an accepting state (FAR: unreachable)
    maxd: np.ndarray  # [n] i32, max dist over the state's allowed tokens' next states (0 for none)
    closing: np.ndarray  # [n, W] u32 bitmask (as Automaton.allowed): tokens that bring the state closer


def closing(start: np.ndarray, token: np.ndarray, nxt: np.ndarray, accepting: np.ndarray, eos: int,
            words: int) -> Closing:  # fmt: skip
    """The closing tables of an automaton in Automaton's layout: start [n + 1] i32, token and nxt [T] i32
    (each state's transitions, end-of-text included in accepting ones), accepting [n] bool.

    Cost: O(T) numpy passes over the transitions plus a reverse breadth-first search over the deduplicated
    state graph held as a dense [n, n] bool matrix (16 MiB at constraint.MAX_STATES), one level per
    distance: tens of milliseconds for millions of transitions (README, "Structured outputs").
    """
    n = len(start) - 1
    counts = np.diff(start)
    src = np.repeat(np.arange(n, dtype=np.int32), counts)  # [T] the state each transition leaves
    edge = np.zeros((n, n), bool)  # edge[s, d]: some token moves s to d (deduplicates the T transitions)
    edge[src, nxt] = True
    dist = np.full(n, FAR, np.int32)
    frontier, d = accepting.copy(), 0
    while frontier.any():  # level d of the search backwards from the accepting states
        dist[frontier] = d
        frontier = edge[:, frontier].any(axis=1) & (dist == FAR)
        d += 1
    ahead = dist[nxt]  # [T]
    # A token into a dead state (outlines-core prunes them: none seen) makes maxd FAR: that state always
    # closes, and closing tokens never lead to a dead state, so the guarantee holds regardless.
    maxd = np.zeros(n, np.int32)
    rows = np.flatnonzero(counts > 0)
    maxd[rows] = np.maximum.reduceat(ahead, start[rows])
    near = (ahead < dist[src]) | (token == eos)
    bits = np.zeros((n, words), np.uint32)
    np.bitwise_or.at(
        bits, (src[near], token[near] >> 5), np.uint32(1) << (token[near] & 31).astype(np.uint32)
    )
    return Closing(dist, maxd, bits)
