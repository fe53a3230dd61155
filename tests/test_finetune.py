"""Fine-tuning (gpt2jax.finetune): its CLI, memorising a text, HF-loadable output, and the shipped model."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import data
from gpt2jax.checkpoint import load_params
from gpt2jax.finetune import main as finetune_main
from gpt2jax.finetune import parse_config
from gpt2jax.model import forward, init_cache
from gpt2jax.tokenizer import GPT2Tokenizer
from gpt2jax.train_step import token_losses

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints" / "pydoc-tiny"

TEXT = (
    "The while statement is used for repeated execution as long as an expression is true. "
    "This repeatedly tests the expression and, if it is true, executes the first suite."
)


def test_parse_config_takes_presets_overrides_and_the_tokenizer_vocab(tok):
    c = parse_config("124M,n_layer=3", tok)
    assert (c.n_layer, c.n_embd, c.n_vocab, c.eos_token_id) == (
        3,
        768,
        tok.vocab_size,
        tok.eos_token_id,
    )
    with pytest.raises(ValueError, match="n_lyr"):
        parse_config("n_lyr=3", tok)


# --- fine-tuning through the CLI ---------------------------------------------------------------------


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
