"""A run's saved state: restored as saved, and refused for another run."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import assert_params_equal

from gpt2jax.checkpoint_save import save_params
from gpt2jax.train_state import ResumeError, load_state, save_state
from gpt2jax.train_step import TrainConfig, make_optimizer


def test_state_is_restored_only_for_the_same_run(tmp_path, tiny_params):
    config, params = tiny_params
    tc = TrainConfig(steps=4)
    opt_state = make_optimizer(tc).init(params)
    save_state(tmp_path, config, params, opt_state, tc, {"step": 3, "data": "abc"})
    params2, opt_state2, step = load_state(tmp_path, config, opt_state, tc, "abc")
    assert step == 3
    assert_params_equal(params2, params)
    for a, b in zip(jax.tree.leaves(opt_state2), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    # Settings that only change what is printed or saved may differ; the others may not.
    load_state(tmp_path, config, opt_state, dataclasses.replace(tc, eval_every=1), "abc")
    with pytest.raises(ResumeError, match=r"warmup=100 \(now 5\)"):
        load_state(tmp_path, config, opt_state, dataclasses.replace(tc, warmup=5), "abc")
    with pytest.raises(ResumeError, match="other data"):
        load_state(tmp_path, config, opt_state, tc, "xyz")
    # Weights saved after the state (a crash between the two writes) are caught.
    save_params(tmp_path, config, jax.tree.map(lambda a: a + 1, params))
    with pytest.raises(ResumeError, match="not the one train_state.npz was saved with"):
        load_state(tmp_path, config, opt_state, tc, "abc")
