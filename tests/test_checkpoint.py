"""Loading checkpoints: Hugging Face and OpenAI layouts, against transformers' own files and model."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_params_equal
from safetensors.numpy import load_file, save_file

from gpt2jax import checkpoint as ckpt
from gpt2jax.checkpoint import load_params
from gpt2jax.checkpoint_layout import CheckpointError, hf_name, iter_leaves, openai_name, openai_shape
from gpt2jax.checkpoint_save import save_openai
from gpt2jax.config import GPT2Config
from gpt2jax.tf_checkpoint import write_tf_checkpoint


def torch_state_dict(folder) -> dict[str, np.ndarray]:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_copy(src, dst, edit=None, config_edit=None):
    """A copy of an HF checkpoint folder, with its tensors and config.json optionally edited."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --- Hugging Face layout -------------------------------------------------------------------------


def test_load_hf_matches_torch_state_dict(tiny_checkpoint, tiny_params):
    config, params = tiny_params
    assert config == GPT2Config(n_vocab=512, n_ctx=128, n_embd=64, n_head=4, n_layer=2, eos_token_id=511)
    assert set(params) == {"wte", "wpe", "h0", "h1", "ln_f"}
    state = torch_state_dict(tiny_checkpoint)
    for path, arr in iter_leaves(params):
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, state["transformer." + hf_name(path)], err_msg=str(path))
    np.testing.assert_array_equal(params["wte"], state["lm_head.weight"])


def test_load_as_bfloat16(tiny_checkpoint, tiny_params):
    _, params = tiny_params
    _, bf16 = load_params(tiny_checkpoint, dtype=jnp.bfloat16)
    assert bf16["h0"]["attn"]["c_attn"]["w"].dtype == ml_dtypes.bfloat16
    assert_params_equal(bf16, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params))


def test_load_sharded_safetensors(tmp_path, tiny_checkpoint, tiny_params):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    config, params = load_params(tmp_path)
    assert config == tiny_params[0]
    assert_params_equal(params, tiny_params[1])


def test_keys_without_prefix_with_buffers_and_tied_head(tmp_path, tiny_checkpoint, tiny_params):
    # As on the hub for openai-community/gpt2: no "transformer." prefix, attention-mask buffers stored,
    # and in some files the (tied, equal) lm_head.weight too.
    def edit(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"].copy()

    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", edit)
    assert_params_equal(load_params(folder)[1], tiny_params[1])


def test_untied_head_is_rejected(tmp_path, tiny_checkpoint):
    def edit(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1

    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: lm_head\.weight differs.*untied"):
        load_params(folder)


def test_pytorch_bin_needs_opt_in(tmp_path, tiny_checkpoint, tiny_params):
    import torch

    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder)
    state = {k: torch.from_numpy(v) for k, v in load_file(tiny_checkpoint / "model.safetensors").items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # older transformers saved the tied head
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*pickle.*allow_pickle=True"):
        load_params(folder)
    config, params = load_params(folder, allow_pickle=True)
    assert config == tiny_params[0]
    assert_params_equal(params, tiny_params[1])

    torch.save({k: v.bfloat16() for k, v in state.items()}, folder / "pytorch_model.bin")
    _, bf16 = load_params(folder, allow_pickle=True, dtype=ml_dtypes.bfloat16)
    assert_params_equal(bf16, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), tiny_params[1]))


def test_progress_bar_only_for_big_checkpoints(tiny_checkpoint, capsys, monkeypatch):
    load_params(tiny_checkpoint)
    assert "loading weights" not in capsys.readouterr().err
    monkeypatch.setattr(ckpt, "PROGRESS_MIN_BYTES", 0)
    load_params(tiny_checkpoint)
    assert "loading weights" in capsys.readouterr().err
    load_params(tiny_checkpoint, progress=False)
    assert "loading weights" not in capsys.readouterr().err


# --- OpenAI layout -------------------------------------------------------------------------------


def test_openai_ignores_optimizer_state_and_needs_no_checkpoint_file(tmp_path, tiny_params):
    config, params = tiny_params
    tensors = {openai_name(p): a.reshape(openai_shape(p, a.shape)) for p, a in iter_leaves(params)}
    tensors["model/h0/attn/c_attn/w/Adam"] = tensors["model/h0/attn/c_attn/w"]
    tensors["global_step"] = np.array(10, np.int64)
    write_tf_checkpoint(tmp_path / "model.ckpt", tensors)
    (tmp_path / "checkpoint").unlink()
    (tmp_path / "hparams.json").write_text(json.dumps(config.to_hparams()))
    config2, params2 = load_params(tmp_path)
    assert config2 == config  # eos: n_vocab - 1 without encoder.json, as 50256 is out of range
    assert_params_equal(params2, params)


def test_openai_truncated_data_file(tmp_path, tiny_params):
    save_openai(tmp_path, *tiny_params)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor .*truncated"):
        load_params(tmp_path)


def test_openai_missing_index(tmp_path, tiny_params):
    save_openai(tmp_path, *tiny_params)
    (tmp_path / "model.ckpt.index").unlink()
    with pytest.raises(CheckpointError, match=r"no GPT-2 checkpoint found; expected .*model\.ckpt\.index"):
        load_params(tmp_path)


def test_openai_shape_mismatch(tmp_path, tiny_params):
    config, params = tiny_params
    save_openai(tmp_path, config, params)
    (tmp_path / "hparams.json").write_text(json.dumps({**config.to_hparams(), "n_ctx": 64}))
    with pytest.raises(CheckpointError, match=r"'model/wpe' has shape \(128, 64\), expected \(64, 64\)"):
        load_params(tmp_path)


# --- errors name the file and the problem --------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: no such checkpoint folder"):
        load_params(tmp_path / "nope")


def test_empty_folder_lists_expected_files(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"expected config\.json with model\.safetensors.*hparams\.json"
    ):
        load_params(tmp_path)


def test_config_without_weights(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"no GPT-2 checkpoint found; expected .*model\.safetensors"):
        load_params(tmp_path)


def test_bad_config_json(tmp_path, tiny_checkpoint):
    folder = hf_copy(tiny_checkpoint, tmp_path / "ck")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read JSON"):
        load_params(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a usable GPT-2 config"):
        load_params(folder)


def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    folder = hf_copy(tiny_checkpoint, tmp_path / "ck")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_params(folder)


def test_missing_tensor(tmp_path, tiny_checkpoint):
    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(
        CheckpointError, match=r"safetensors: missing tensor 'h\.1\.mlp\.c_fc\.bias' or 'transf"
    ):
        load_params(folder)


def test_unexpected_shape(tmp_path, tiny_checkpoint):
    def edit(t):
        t["transformer.h.0.attn.c_proj.weight"] = np.zeros((64, 65), np.float32)

    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", edit)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_proj\.weight' has shape \(64, 65\), "
        r"expected \(64, 64\)",
    ):
        load_params(folder)


def test_unsupported_dtype(tmp_path, tiny_checkpoint):
    def edit(t):
        t["transformer.ln_f.bias"] = t["transformer.ln_f.bias"].astype(np.int32)

    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", edit)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor 'transformer\.ln_f\.bias'.*dtype I32"
    ):
        load_params(folder)


def test_vocab_mismatch(tmp_path, tiny_checkpoint):
    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", config_edit=lambda c: c.update(vocab_size=600))
    with pytest.raises(CheckpointError, match=r"wte\.weight' has 512 rows .*config\.json says n_vocab=600"):
        load_params(folder)


def test_layer_count_mismatch(tmp_path, tiny_checkpoint):
    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", config_edit=lambda c: c.update(n_layer=1))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) transformer\.h\.1\..*n_layer=1"):
        load_params(folder)


def test_sharded_index_with_missing_shard(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: shard file\(s\) missing: model-00001-of-00002"):
        load_params(tmp_path)


def test_corrupt_pytorch_bin(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot load with torch\.load"):
        load_params(tmp_path, allow_pickle=True)
