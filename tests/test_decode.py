"""gpt2jax/decode.py, the decode core the notebook Sampler and the serving engine share."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import decode, sampling
from gpt2jax.decode import steps_until_done
from gpt2jax.sampling import SampleOutput


class _Rows(NamedTuple):
    steps: jax.Array  # [B] steps each row has run
    limit: jax.Array  # [B] the row is done after this many
    done: jax.Array  # [B]


def _count_step(state: _Rows) -> tuple[_Rows, SampleOutput]:
    steps = state.steps + ~state.done
    out = SampleOutput(
        token=jnp.where(state.done, -1, steps),
        logprob=jnp.zeros(steps.shape),
        top_tokens=jnp.zeros((*steps.shape, 2), jnp.int32),
        top_logprobs=jnp.zeros((*steps.shape, 2)),
    )
    return state._replace(steps=steps, done=steps >= state.limit), out


@pytest.mark.parametrize("limits, want_ran", [([3, 5], 5), ([9, 2], 8), ([0, 0], 0)])
def test_steps_until_done_stops_when_every_row_is(limits, want_ran):
    """The decode loop of the sampler and of the serving engine: at most 8 steps here, fewer when every
    row is done sooner, none when all are done at the start; steps not run give token -1."""
    limit = jnp.array(limits)
    state = _Rows(jnp.zeros(2, jnp.int32), limit, limit <= 0)
    ran, state, outs = jax.jit(lambda s: steps_until_done(_count_step, s, 8))(state)
    assert int(ran) == want_ran
    assert state.steps.tolist() == [min(n, 8) for n in limits]
    tokens = np.asarray(outs.token)
    assert tokens.shape == (8, 2)
    for row, n in enumerate(limits):
        assert tokens[:, row].tolist() == [t + 1 if t < n else -1 for t in range(8)]


def test_start_and_advance_end_rows_by_their_own_limits():
    """Row 0 ends at its own end-of-text token, row 1 at max_tokens, row 2 (max_tokens 0) never starts;
    positions move on for live rows only, clamped at last_position."""
    V = 32  # at least NUM_TOP_LOGPROBS
    logits = jnp.zeros((3, V)).at[:, 5].set(10.0)  # every row's greedy token is 5
    sp = sampling.make_params(3, V, temperature=0.0)
    state, first = decode.start(
        logits,
        lengths=jnp.array([4, 6, 2]),
        max_tokens=jnp.array([9, 2, 0]),
        eos=jnp.array([5, -1, -1]),
        want_top=jnp.zeros(3, bool),
        sp=sp,
        last_position=6,
    )
    assert first.token.tolist() == [5, 5, 5]
    assert state.done.tolist() == [True, False, True]  # row 0 sampled its eos; row 2 had no tokens to make
    assert state.position.tolist() == [4, 6, 1] and state.step.tolist() == [1, 1, 0]
    state = decode.advance(state, first, last_position=6)
    assert state.done.tolist() == [True, True, True] and state.step.tolist() == [1, 2, 0]
    assert state.counts[1, 5] == 2 and state.counts[0, 5] == 1 and state.counts[2].sum() == 0
