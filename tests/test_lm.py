"""The notebook API: gpt2jax.load, generate, score, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpt2jax


def test_load_by_name_from_the_models_dir(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(tiny_checkpoint.parent))
    assert gpt2jax.load(tiny_checkpoint.name).config.n_layer == 2


def test_load_of_a_missing_model_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download_model.py 117M"):
        gpt2jax.load("117M")


def test_generate_returns_one_completion_per_prompt_and_sample(tiny_model):
    out = tiny_model.generate(["Hello, my name is", "def f(x):"], max_tokens=8, n=3, seed=0)
    assert len(out) == 6 and all(isinstance(t, str) for t in out)


def test_seed_makes_sampling_reproducible(tiny_model):
    a = tiny_model.generate("The", max_tokens=24, temperature=1.0, seed=42, n=2)
    b = tiny_model.generate("The", max_tokens=24, temperature=1.0, seed=42, n=2)
    c = tiny_model.generate("The", max_tokens=24, temperature=1.0, seed=43, n=2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the n samples of one request differ


def test_greedy_is_deterministic_and_stop_cuts_before_the_stop_string(tiny_model):
    full = tiny_model.generate("The", max_tokens=30, temperature=0.0)[0]
    assert full == tiny_model.generate("The", max_tokens=30, temperature=0.0)[0]
    stop = full[5:8]
    cut = tiny_model.generate("The", max_tokens=30, temperature=0.0, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_score_equals_hf_logprobs(tiny_model, tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    text = "The quick brown fox jumps over the lazy dog."
    scores = tiny_model.score(text)
    ids = tiny_model.tokenizer.encode(text)
    assert len(scores) == len(ids) and scores[0] is None
    hf = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    expected = [logp[t - 1, ids[t]] for t in range(1, len(ids))]
    np.testing.assert_allclose(scores[1:], expected, atol=1e-4)


def test_tokenizer_round_trip(tiny_model):
    text = "naïve café — 日本語 🙂"
    assert tiny_model.tokenizer.decode(tiny_model.tokenizer.encode(text)) == text


def test_min_p_one_is_greedy_at_any_temperature(tiny_model):
    greedy = tiny_model.generate("The", max_tokens=16, temperature=0.0)
    assert tiny_model.generate("The", max_tokens=16, temperature=1.8, min_p=1.0, seed=5) == greedy
    assert tiny_model.generate("The", max_tokens=16, temperature=1.8, seed=5) != greedy  # it does sample
    with pytest.raises(ValueError, match="min_p"):
        tiny_model.generate("The", min_p=2.0)


def test_generate_takes_per_prompt_settings_and_records(tiny_model):
    prompts = ["The", "def f(x):", "Hello"]
    alone = [
        tiny_model.generate(p, max_tokens=m, temperature=0.0)[0]
        for p, m in zip(prompts, [3, 9, 5], strict=True)
    ]
    assert tiny_model.generate(prompts, [3, 9, 5], temperature=0.0) == alone
    records = [gpt2jax.SamplingParams(max_tokens=m, temperature=0.0) for m in (3, 9, 5)]
    assert tiny_model.generate(prompts, sampling_params=records) == alone  # the records' own max_tokens
    done = tiny_model.complete(prompts[:2], max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=True)
    assert [c.prompt_index for c in done] == [0, 1] and all(len(c.logprobs) == len(c.token_ids) for c in done)
    assert all(len(t.top) == 2 for c in done for t in c.logprobs)
    scores = tiny_model.score(prompts[1])
    np.testing.assert_allclose([t.logprob for t in done[1].prompt_logprobs[1:]], scores[1:], atol=1e-4)
