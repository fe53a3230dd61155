"""Checkpoint I/O: Hugging Face and OpenAI layouts, against transformers' own files and model."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gpt2jax import checkpoint as ckpt
from gpt2jax.checkpoint import CheckpointError, hf_name, load_params, param_shapes, save_openai, save_params
from gpt2jax.config import GPT2Config
from gpt2jax.tf_checkpoint import TFCheckpointReader, write_tf_checkpoint


def assert_params_equal(a: dict, b: dict) -> None:
    leaves_a, leaves_b = dict(ckpt._leaves(a)), dict(ckpt._leaves(b))
    assert sorted(leaves_a) == sorted(leaves_b)
    for path, x in leaves_a.items():
        y = leaves_b[path]
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


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


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_params(tiny_checkpoint)


# --- Hugging Face layout -------------------------------------------------------------------------


def test_param_tree_names_and_shapes():
    config = GPT2Config(n_vocab=10, n_ctx=8, n_embd=4, n_head=2, n_layer=2)
    shapes = param_shapes(config)
    assert shapes[("h1", "attn", "c_attn", "w")] == (4, 12)
    assert shapes[("h0", "mlp", "c_proj", "w")] == (16, 4)
    assert sum(int(np.prod(s)) for s in shapes.values()) == config.num_params()
    assert hf_name(("h1", "mlp", "c_fc", "b")) == "h.1.mlp.c_fc.bias"
    assert hf_name(("ln_f", "g")) == "ln_f.weight"
    assert hf_name(("wte",)) == "wte.weight"


def test_load_hf_matches_torch_state_dict(tiny_checkpoint, tiny):
    config, params = tiny
    assert config == GPT2Config(n_vocab=512, n_ctx=128, n_embd=64, n_head=4, n_layer=2, eos_token_id=511)
    assert set(params) == {"wte", "wpe", "h0", "h1", "ln_f"}
    state = torch_state_dict(tiny_checkpoint)
    for path, arr in ckpt._leaves(params):
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, state["transformer." + hf_name(path)], err_msg=str(path))
    np.testing.assert_array_equal(params["wte"], state["lm_head.weight"])


def test_load_as_bfloat16(tiny_checkpoint, tiny):
    _, params = tiny
    _, bf16 = load_params(tiny_checkpoint, dtype=jnp.bfloat16)
    assert bf16["h0"]["attn"]["c_attn"]["w"].dtype == ml_dtypes.bfloat16
    assert_params_equal(bf16, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params))


def test_save_params_round_trip(tmp_path, tiny, tokenizer_dir):
    config, params = tiny
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


def test_saved_checkpoint_loads_in_transformers(tmp_path, tiny):
    import torch
    from transformers import GPT2LMHeadModel

    config, params = tiny
    save_params(tmp_path, config, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    state = model.state_dict()
    assert len(state) == len(list(ckpt._leaves(params))) + 1  # + the tied lm_head.weight
    for path, arr in ckpt._leaves(params):
        assert torch.equal(state["transformer." + hf_name(path)], torch.from_numpy(arr)), path


def test_save_bfloat16_params(tmp_path, tiny):
    config, params = tiny
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)  # jax arrays are accepted
    save_params(tmp_path, config, bf16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
    _, back = load_params(tmp_path, dtype=ml_dtypes.bfloat16)
    assert_params_equal(back, jax.tree.map(np.asarray, bf16))


def test_load_sharded_safetensors(tmp_path, tiny_checkpoint, tiny):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    config, params = load_params(tmp_path)
    assert config == tiny[0]
    assert_params_equal(params, tiny[1])


def test_keys_without_prefix_with_buffers_and_tied_head(tmp_path, tiny_checkpoint, tiny):
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
    assert_params_equal(load_params(folder)[1], tiny[1])


def test_untied_head_is_rejected(tmp_path, tiny_checkpoint):
    def edit(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1

    folder = hf_copy(tiny_checkpoint, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: lm_head\.weight differs.*untied"):
        load_params(folder)


def test_pytorch_bin_needs_opt_in(tmp_path, tiny_checkpoint, tiny):
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
    assert config == tiny[0]
    assert_params_equal(params, tiny[1])

    torch.save({k: v.bfloat16() for k, v in state.items()}, folder / "pytorch_model.bin")
    _, bf16 = load_params(folder, allow_pickle=True, dtype=ml_dtypes.bfloat16)
    assert_params_equal(bf16, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), tiny[1]))


def test_progress_bar_only_for_big_checkpoints(tiny_checkpoint, capsys, monkeypatch):
    load_params(tiny_checkpoint)
    assert "loading weights" not in capsys.readouterr().err
    monkeypatch.setattr(ckpt, "PROGRESS_MIN_BYTES", 0)
    load_params(tiny_checkpoint)
    assert "loading weights" in capsys.readouterr().err
    load_params(tiny_checkpoint, progress=False)
    assert "loading weights" not in capsys.readouterr().err


# --- OpenAI layout -------------------------------------------------------------------------------


def test_openai_round_trip(tmp_path, tiny, tokenizer_dir):
    config, params = tiny
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
    assert len(entries) == len(list(ckpt._leaves(params)))
    # eos comes from encoder.json, since hparams.json has none.
    config2, params2 = load_params(tmp_path)
    assert config2 == config
    assert_params_equal(params2, params)


def test_openai_ignores_optimizer_state_and_needs_no_checkpoint_file(tmp_path, tiny):
    config, params = tiny
    tensors = {
        ckpt.openai_name(p): a.reshape(ckpt._openai_shape(p, a.shape)) for p, a in ckpt._leaves(params)
    }
    tensors["model/h0/attn/c_attn/w/Adam"] = tensors["model/h0/attn/c_attn/w"]
    tensors["global_step"] = np.array(10, np.int64)
    write_tf_checkpoint(tmp_path / "model.ckpt", tensors)
    (tmp_path / "checkpoint").unlink()
    (tmp_path / "hparams.json").write_text(json.dumps(config.to_hparams()))
    config2, params2 = load_params(tmp_path)
    assert config2 == config  # eos: n_vocab - 1 without encoder.json, as 50256 is out of range
    assert_params_equal(params2, params)


def test_openai_truncated_data_file(tmp_path, tiny):
    save_openai(tmp_path, *tiny)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor .*truncated"):
        load_params(tmp_path)


def test_openai_missing_index(tmp_path, tiny):
    save_openai(tmp_path, *tiny)
    (tmp_path / "model.ckpt.index").unlink()
    with pytest.raises(CheckpointError, match=r"no GPT-2 checkpoint found; expected .*model\.ckpt\.index"):
        load_params(tmp_path)


def test_openai_shape_mismatch(tmp_path, tiny):
    config, params = tiny
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


def test_save_rejects_params_that_do_not_match_config(tmp_path, tiny):
    config, params = tiny
    bad = {**params, "wpe": params["wpe"][:10]}
    with pytest.raises(CheckpointError, match=r"wpe has shape \(10, 64\), the config implies \(128, 64\)"):
        save_params(tmp_path, config, bad)
    with pytest.raises(CheckpointError, match=r"missing \['h1/ln_1/g'"):
        save_openai(
            tmp_path, config, {**params, "h1": {**params["h1"], "ln_1": {"b": params["h1"]["ln_1"]["b"]}}}
        )
    assert not list(tmp_path.iterdir())


def test_save_needs_tokenizer_files(tmp_path, tiny):
    (tmp_path / "tok").mkdir()
    with pytest.raises(CheckpointError, match=r"tok: no tokenizer file vocab\.json or encoder\.json"):
        save_params(tmp_path / "out", *tiny, tokenizer_dir=tmp_path / "tok")


def test_save_converts_openai_tokenizer_names(tmp_path, tiny, tokenizer_dir):
    oa = tmp_path / "oa"
    save_openai(oa, *tiny, tokenizer_dir=tokenizer_dir)
    save_params(tmp_path / "hf", *tiny, tokenizer_dir=oa)
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (tokenizer_dir / "merges.txt").read_bytes()
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()
