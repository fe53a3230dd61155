"""Saving checkpoints: Hugging Face and OpenAI layouts, loaded back and by transformers."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_params_equal
from safetensors import safe_open

from gpt2jax.checkpoint import load_params
from gpt2jax.checkpoint_layout import CheckpointError, hf_name, iter_leaves
from gpt2jax.checkpoint_save import save_openai, save_params
from gpt2jax.tf_checkpoint import TFCheckpointReader


def test_save_params_round_trip(tmp_path, tiny_params, tokenizer_dir):
    config, params = tiny_params
    save_params(tmp_path / "out", config, params, tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "vocab.json",
    ]
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()
    config2, params2 = load_params(tmp_path / "out")
    assert config2 == config
    assert_params_equal(params2, params)
    with safe_open(tmp_path / "out" / "model.safetensors", "numpy") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    # Tied: the output head is not stored a second time (transformers' own save_pretrained omits it too).
    assert "lm_head.weight" not in keys
    assert "transformer.h.1.attn.c_attn.weight" in keys


def test_saved_checkpoint_loads_in_transformers(tmp_path, tiny_params):
    import torch
    from transformers import GPT2LMHeadModel

    config, params = tiny_params
    save_params(tmp_path, config, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    state = model.state_dict()
    assert len(state) == len(list(iter_leaves(params))) + 1  # + the tied lm_head.weight
    for path, arr in iter_leaves(params):
        assert torch.equal(state["transformer." + hf_name(path)], torch.from_numpy(arr)), path


def test_save_bfloat16_params(tmp_path, tiny_params):
    config, params = tiny_params
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)  # jax arrays are accepted
    save_params(tmp_path, config, bf16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
    _, back = load_params(tmp_path, dtype=ml_dtypes.bfloat16)
    assert_params_equal(back, jax.tree.map(np.asarray, bf16))


def test_openai_round_trip(tmp_path, tiny_params, tokenizer_dir):
    config, params = tiny_params
    save_openai(tmp_path, config, params, tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint",
        "encoder.json",
        "hparams.json",
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
        "vocab.bpe",
    ]
    assert json.loads((tmp_path / "hparams.json").read_text()) == config.to_hparams()
    assert (tmp_path / "vocab.bpe").read_bytes() == (tokenizer_dir / "merges.txt").read_bytes()
    entries = TFCheckpointReader(tmp_path / "model.ckpt").entries
    assert entries["model/h0/attn/c_attn/w"].shape == (1, 64, 192)  # OpenAI's conv1d layout
    assert entries["model/ln_f/g"].shape == (64,)
    assert len(entries) == len(list(iter_leaves(params)))
    # eos comes from encoder.json, since hparams.json has none.
    config2, params2 = load_params(tmp_path)
    assert config2 == config
    assert_params_equal(params2, params)


def test_save_rejects_params_that_do_not_match_config(tmp_path, tiny_params):
    config, params = tiny_params
    bad = {**params, "wpe": params["wpe"][:10]}
    with pytest.raises(CheckpointError, match=r"wpe has shape \(10, 64\), the config implies \(128, 64\)"):
        save_params(tmp_path, config, bad)
    with pytest.raises(CheckpointError, match=r"missing \['h1/ln_1/g'"):
        save_openai(
            tmp_path, config, {**params, "h1": {**params["h1"], "ln_1": {"b": params["h1"]["ln_1"]["b"]}}}
        )
    assert not list(tmp_path.iterdir())


def test_save_needs_tokenizer_files(tmp_path, tiny_params):
    (tmp_path / "tok").mkdir()
    with pytest.raises(CheckpointError, match=r"tok: no tokenizer file vocab\.json or encoder\.json"):
        save_params(tmp_path / "out", *tiny_params, tokenizer_dir=tmp_path / "tok")


def test_save_converts_openai_tokenizer_names(tmp_path, tiny_params, tokenizer_dir):
    oa = tmp_path / "oa"
    save_openai(oa, *tiny_params, tokenizer_dir=tokenizer_dir)
    save_params(tmp_path / "hf", *tiny_params, tokenizer_dir=oa)
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (tokenizer_dir / "merges.txt").read_bytes()
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()
