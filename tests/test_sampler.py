"""The jitted sampler: compiled once per bucket, settings are data."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2jax
from gpt2jax.sampler import Sampler, bucket
from gpt2jax.sampling import make_params


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return gpt2jax.load(tiny_checkpoint)


def test_bucket_rounds_up_to_powers_of_two_and_caps():
    assert [bucket(n, 1024) for n in (1, 16, 17, 33, 1000, 1024)] == [16, 16, 32, 64, 1024, 1024]
    assert bucket(5000, 1024) == 1024
    assert bucket(3, 1 << 30, minimum=1) == 4


def test_no_recompilation_across_lengths_and_settings_within_a_bucket(model):
    cfg = model.config
    sampler = Sampler(cfg)
    rng = np.random.RandomState(0)
    settings = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=5),
        dict(temperature=0.9, top_k=40, top_p=0.5),
        dict(temperature=1.0, presence_penalty=1.5),
        dict(temperature=0.5, frequency_penalty=-0.7),
        dict(temperature=1.0, logit_bias=[{3: 5.0, 7: -100.0}] * 2),
        dict(temperature=2.0, seed=[123, 456]),
        dict(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),
    ]
    counts = []
    for i, kw in enumerate(settings):
        length = 17 + i  # prompts of 17..26 tokens share the 32 bucket
        prompts = [
            rng.randint(0, cfg.n_vocab, size=length).tolist(),
            rng.randint(0, cfg.n_vocab, size=3).tolist(),
        ]
        sampler.generate(model.params, prompts, 20, make_params(2, cfg.n_vocab, **kw))
        counts.append(sampler.compilations)
    assert counts[0] == 2  # one prefill, one decode chunk
    assert counts == [counts[0]] * len(settings)


def test_rows_stop_independently_at_max_tokens(model):
    cfg = model.config
    sampler = Sampler(cfg)
    bias = [{cfg.eos_token_id: -1e9}] * 3
    out = sampler.generate(
        model.params,
        [[1, 2], [3], [4, 5, 6]],
        [5, 0, 33],
        make_params(3, cfg.n_vocab, temperature=0.0, logit_bias=bias),
    )
    assert [len(t) for t in out.tokens] == [5, 0, 33]
    assert [len(lp) for lp in out.logprobs] == [5, 0, 33]
    # The first token comes from the prefill; decoding stops with the last live row, mid-chunk.
    assert sampler.decode_steps == 32


def test_decoding_ends_mid_chunk_when_every_row_is_done(model):
    """8 tokens with chunks of 16 steps run 7 decode steps (the prefill samples the first), not 16; and
    the result is the same as with chunks of 1 step."""
    cfg = model.config
    sp = make_params(2, cfg.n_vocab, temperature=0.8, seed=[1, 2], logit_bias=[{cfg.eos_token_id: -1e9}] * 2)
    prompts = [[5, 6, 7], [8]]
    chunked, stepwise = Sampler(cfg, chunk_size=16), Sampler(cfg, chunk_size=1)
    out = chunked.generate(model.params, prompts, 8, sp, logprobs=True)
    want = stepwise.generate(model.params, prompts, 8, sp, logprobs=True)
    assert chunked.decode_steps == 7 and stepwise.decode_steps == 7
    assert out.tokens == want.tokens and [len(t) for t in out.tokens] == [8, 8]
    np.testing.assert_allclose(np.array(out.logprobs), np.array(want.logprobs), atol=1e-5)
    force_eos = make_params(1, cfg.n_vocab, temperature=0.0, logit_bias=[{cfg.eos_token_id: 1e9}])
    assert chunked.generate(model.params, [[1]], 10, force_eos).tokens == [[cfg.eos_token_id]]
    assert chunked.decode_steps == 7  # done at the prefill: no decode call at all


def test_end_of_text_ends_a_row(model):
    cfg = model.config
    sampler = Sampler(cfg)
    force_eos = [{cfg.eos_token_id: 1e9}]
    out = sampler.generate(
        model.params, [[1, 2, 3]], 10, make_params(1, cfg.n_vocab, temperature=0.0, logit_bias=force_eos)
    )
    assert out.tokens == [[cfg.eos_token_id]]


def test_prompt_over_the_context_is_refused(model):
    cfg = model.config
    with pytest.raises(ValueError, match="context"):
        Sampler(cfg).generate(model.params, [[1] * (cfg.n_ctx - 3)], 4, make_params(1, cfg.n_vocab))
