"""The training loop: a run stopped and resumed continues the same loss curve."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gpt2jax import data
from gpt2jax.config import GPT2Config
from gpt2jax.finetune import parse_config
from gpt2jax.tokenizer import GPT2Tokenizer
from gpt2jax.train import train
from gpt2jax.train_state import ResumeError
from gpt2jax.train_step import TrainConfig, init_from_scratch


@pytest.fixture(scope="module")
def corpus_tokens(tok) -> np.ndarray:
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:6]]
    return np.concatenate(data.tokenize_documents(docs, tok))


def tiny_config(tok: GPT2Tokenizer) -> GPT2Config:
    return parse_config("n_layer=2,n_embd=32,n_head=2,n_ctx=32", tok)


def test_resuming_continues_the_same_loss_curve(tmp_path, tok, tokenizer_dir, corpus_tokens):
    config = tiny_config(tok)
    tc = TrainConfig(
        steps=6, batch_size=4, grad_accum=2, seq_len=16, lr=3e-3, warmup=2, eval_every=0, save_every=2
    )
    run = lambda out, seed=0, **kw: train(
        config, init_from_scratch(config, seed), corpus_tokens, None, tc, out_dir=out, progress=False, **kw
    )
    whole = run(tmp_path / "whole")
    first = run(tmp_path / "split", stop_at=3)
    # Different starting params: the resumed run must take everything from the saved state.
    second = run(tmp_path / "split", seed=1)
    assert sorted(first.losses) == [1, 2, 3] and sorted(second.losses) == [4, 5, 6]
    for step, loss in {**first.losses, **second.losses}.items():
        assert loss == pytest.approx(whole.losses[step], abs=1e-5), step
    assert whole.losses[6] < whole.losses[1]
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # A resume with settings that change the curve is refused rather than silently diverging.
    with pytest.raises(ResumeError, match="lr="):
        train(
            config,
            whole.params,
            corpus_tokens,
            None,
            dataclasses.replace(tc, lr=1e-3),
            out_dir=tmp_path / "whole",
        )
