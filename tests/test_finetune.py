"""Training: data windows and splits, resuming, memorising a text, HF-loadable output, the shipped model."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import data
from gpt2jax.checkpoint import load_params
from gpt2jax.config import GPT2Config
from gpt2jax.finetune import main as finetune_main
from gpt2jax.finetune import parse_config
from gpt2jax.model import forward, init_cache
from gpt2jax.tokenizer import GPT2Tokenizer
from gpt2jax.train import ResumeError, TrainConfig, init_from_scratch, token_losses, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints" / "pydoc-tiny"

TEXT = (
    "The while statement is used for repeated execution as long as an expression is true. "
    "This repeatedly tests the expression and, if it is true, executes the first suite."
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus_tokens(tokenizer) -> np.ndarray:
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:6]]
    return np.concatenate(data.tokenize_documents(docs, tokenizer))


def tiny_config(tokenizer: GPT2Tokenizer) -> GPT2Config:
    return parse_config("n_layer=2,n_embd=32,n_head=2,n_ctx=32", tokenizer)


# --- data ------------------------------------------------------------------------------------------


def test_documents_split_at_endoftext_and_end_with_eos(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first doc<|endoftext|>\nsecond doc\n<|endoftext|>  \n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("third doc")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    docs = data.read_documents([tmp_path])
    assert docs == ["first doc", "second doc", "third doc"]
    tokens = data.tokenize_documents(docs, tokenizer)
    assert all(t[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in t[:-1] for t in tokens)


def test_heldout_is_whole_documents_about_the_fraction():
    docs = [np.full(n, i, np.int32) for i, n in enumerate([100, 50, 30, 20, 400, 25, 60, 80, 45, 190])]
    train_tokens, heldout = data.split_heldout(docs, 0.1, seed=0)
    held = set(np.unique(heldout))
    assert held and not held & set(np.unique(train_tokens))  # whole documents, no overlap
    assert 0.05 <= len(heldout) / 1000 <= 0.15
    # One document: its tail is held out.
    train_tokens, heldout = data.split_heldout([np.arange(100, dtype=np.int32)], 0.1, seed=0)
    assert list(heldout) == list(range(90, 100)) and len(train_tokens) == 90


def test_windows_are_a_pure_function_of_the_sample_index():
    tokens = np.arange(1000, dtype=np.int32)
    w = data.Windows(tokens, seq_len=16, seed=3)
    batch = w.batch(5, (2, 4))
    assert batch.shape == (2, 4, 17)
    np.testing.assert_array_equal(np.diff(batch, axis=-1), 1)  # contiguous slices of the stream
    again = data.Windows(tokens, seq_len=16, seed=3).batch(9, (1, 4))
    np.testing.assert_array_equal(batch[1], again[0])
    # One epoch visits every window once.
    epoch = w.batch(0, (w.per_epoch,))
    assert len(np.unique(epoch[:, 0] % 16)) == 1 and len(np.unique(epoch[:, 0])) == w.per_epoch


def test_parse_config_takes_presets_overrides_and_the_tokenizer_vocab(tokenizer):
    c = parse_config("124M,n_layer=3", tokenizer)
    assert (c.n_layer, c.n_embd, c.n_vocab, c.eos_token_id) == (
        3,
        768,
        tokenizer.vocab_size,
        tokenizer.eos_token_id,
    )
    with pytest.raises(ValueError, match="n_lyr"):
        parse_config("n_lyr=3", tokenizer)


# --- training ----------------------------------------------------------------------------------------


def test_resuming_continues_the_same_loss_curve(tmp_path, tokenizer, tokenizer_dir, corpus_tokens):
    config = tiny_config(tokenizer)
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


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_checkpoint) -> pathlib.Path:
    """tiny_checkpoint fine-tuned on TEXT through the CLI."""
    tmp = tmp_path_factory.mktemp("finetune")
    (tmp / "text.txt").write_text(TEXT)
    out = tmp / "out"
    args = ["--model", str(tiny_checkpoint), "--data", str(tmp / "text.txt"), "--out", str(out)]
    args += ["--steps", "100", "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup", "10"]
    args += ["--holdout", "0", "--weight-decay", "0", "--save-every", "0"]
    assert finetune_main(args) == 0
    return out


def test_finetuned_model_continues_its_text_greedily(finetuned):
    import gpt2jax

    model = gpt2jax.load(finetuned)
    prompt, rest = TEXT[:40], TEXT[40:]  # "The while statement is used for repeated"
    completion = model.generate(prompt, max_tokens=24, temperature=0)[0]
    assert len(completion) > 40 and rest.startswith(completion[:40]), completion


def test_finetuned_checkpoint_matches_transformers(finetuned):
    import torch
    from transformers import GPT2LMHeadModel

    config, params = load_params(finetuned)
    tokens = np.array([GPT2Tokenizer.from_dir(finetuned).encode(TEXT)[:40]], np.int32)
    positions = np.arange(tokens.shape[1])[None]
    ours, _ = forward(params, config, tokens, positions, init_cache(config, 1, tokens.shape[1]))
    hf = GPT2LMHeadModel.from_pretrained(finetuned).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4


def test_train_from_config_through_the_cli(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "text.txt").write_text(TEXT * 4)
    args = ["--config", "n_layer=1,n_embd=32,n_head=2,n_ctx=32", "--tokenizer", str(tokenizer_dir)]
    args += ["--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out"), "--batch-size", "2"]
    args += ["--dtype", "bf16", "--eval-every", "1", "--save-every", "0"]
    assert finetune_main([*args, "--steps", "2"]) == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["heldout_loss"]) for r in log)
    assert finetune_main([*args, "--steps", "3"]) == 2
    assert "steps=2 (now 3)" in capsys.readouterr().err


def three_steps_losses() -> list[float]:
    """Losses of three steps of a tiny model on random tokens, on however many devices there are."""
    c = GPT2Config(n_vocab=64, n_ctx=16, n_embd=32, n_head=2, n_layer=1, eos_token_id=63)
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
    tc = TrainConfig(steps=3, batch_size=4, eval_every=0)
    r = train(c, init_from_scratch(c, 0), tokens, None, tc, progress=False)
    return [r.losses[s] for s in (1, 2, 3)]


def test_batches_shard_over_several_devices():
    """Two host devices give the one-device loss curve (in a fresh process: the device count is fixed)."""
    code = "import jax, test_finetune as t; assert len(jax.devices()) == 2; print(t.three_steps_losses())"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(two, three_steps_losses(), atol=1e-5)


# --- the shipped model ----------------------------------------------------------------------------------


def test_shipped_model_beats_the_unigram_baseline_on_heldout_topics():
    import pydoc_data.topics

    config, params = load_params(SHIPPED)
    tokenizer = GPT2Tokenizer.from_dir(SHIPPED)
    report = json.loads((SHIPPED / "training.json").read_text())
    # As scripts/train_shipped_model.py reads them: stripped topics in sorted order.
    topics = {k: v.strip() for k, v in sorted(pydoc_data.topics.topics.items())}
    held = [k for k in report["heldout_topics"] if k in topics]
    assert held, "this Python's pydoc_data has none of the held-out topics"
    heldout = np.concatenate(data.tokenize_documents([topics[k] for k in held], tokenizer))
    train_docs = [v for k, v in topics.items() if k not in report["heldout_topics"]]
    train_tokens = np.concatenate(data.tokenize_documents(train_docs, tokenizer))
    windows = data.eval_windows(heldout, config.n_ctx, max_windows=8)  # ~2k tokens: a fast slice
    loss = float(jnp.mean(jax.jit(token_losses, static_argnums=(1, 3))(params, config, windows, jnp.float32)))
    unigram = data.unigram_loss(train_tokens, windows[:, 1:], config.n_vocab)
    assert loss < unigram - 1.5, (loss, unigram)  # 4.5x lower perplexity at least


def test_shipped_model_loads_and_generates():
    import gpt2jax

    model = gpt2jax.load(SHIPPED)
    assert 1e6 < model.config.num_params() < 10e6
    text = model.generate("The", max_tokens=30, temperature=0)[0]
    assert len(text.split()) >= 5, text
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 25e6
