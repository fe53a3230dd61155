"""Packed bf16 / int8 weights (gpt2jax.packed, gpt2jax.cpu_kernels): the kernel against XLA, quantisation
against fp32, the engine's batching, and the int8 folder round trip."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt2jax
from gpt2jax import cpu_kernels, packed
from gpt2jax.checkpoint_layout import CheckpointError


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the packed kernel is not built (XLA's path is tested elsewhere)")


def _xla_matmul(x, w):
    """XLA's reference: the dequantised matrix, dotted in f32 at full precision."""
    return jnp.dot(x, w.unpack(), precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("mode", packed.MODES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 65])
def test_matmul_matches_xla(kernel, mode, rows):
    # K odd and N not a multiple of the 16-column tile: the kernel's k-tail and the last partial tile.
    rng = np.random.default_rng(rows)
    w = packed.pack(rng.standard_normal((37, 50)).astype(np.float32), mode)
    x = jnp.asarray(rng.standard_normal((rows, 37)).astype(np.float32))
    got = jax.jit(packed.matmul)(x, w)
    assert got.shape == (rows, 50) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(_xla_matmul(x, w)), rtol=1e-5, atol=1e-5)


def test_cpu_products_run_in_the_kernel(kernel, monkeypatch):
    w = packed.pack(np.ones((32, 32), np.float32), "int8")
    # A new function each time: jit's trace cache would otherwise keep the first lowering.
    hlo = lambda rows: jax.jit(lambda x, w: packed.matmul(x, w)).lower(jnp.ones((rows, 32)), w).as_text()
    target = cpu_kernels.TARGETS[jnp.dtype(jnp.int8)]
    assert target in hlo(1) and target in hlo(512)  # decode steps and prefill alike
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert target not in hlo(1)  # without the kernel, XLA widens the tiles


def test_int8_quantisation_error_is_bounded():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps a finite scale
    p = packed.pack(w, "int8")
    assert p.data.dtype == jnp.int8 and p.data.shape == (3, 64, 16) and p.scale.shape == (48,)
    step = np.abs(w).max(axis=0) / 127
    err = np.abs(np.asarray(p.unpack()) - w)
    assert (err <= step / 2 + 1e-7).all()  # round to nearest: half a step per column at most
    np.testing.assert_array_equal(np.asarray(p.unpack())[:, 3], 0.0)
    q, scale = packed.to_quantized(p)
    again = packed.from_quantized(q, scale)
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(p.data))
    np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(p.scale))


def test_bf16_packing_is_exact_in_bf16():
    w = np.random.default_rng(1).standard_normal((16, 20)).astype(np.float32)
    want = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(packed.pack(w, "bfloat16").unpack()), want)


def test_pack_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        packed.pack(np.ones((2, 2)), "int4")


@pytest.fixture(scope="module")
def shipped():
    """The shipped model in fp32, int8 and packed bf16, with its held-out documentation topics."""
    import pydoc_data.topics

    info = json.loads(pathlib.Path("checkpoints/pydoc-tiny/training.json").read_text())
    texts = [pydoc_data.topics.topics[t][:600] for t in info["heldout_topics"]]
    models = {
        "float32": gpt2jax.load("pydoc-tiny"),
        "int8": gpt2jax.load("pydoc-tiny", quantization="int8"),
        "bfloat16": gpt2jax.load("pydoc-tiny", dtype="bfloat16"),
    }
    return models, texts


def _logprob_sum(model, texts):
    return sum(x for text in texts for x in model.score(text) if x is not None)


@pytest.mark.parametrize(("weights", "tolerance"), [("int8", 0.01), ("bfloat16", 0.01)])
def test_held_out_logprobs_close_to_fp32(shipped, weights, tolerance):
    models, texts = shipped
    assert models[weights].weights == weights
    ref, got = _logprob_sum(models["float32"], texts), _logprob_sum(models[weights], texts)
    assert abs(got - ref) <= tolerance * abs(ref), (got, ref)
    # Per token too: no single logprob moves by more than a few tenths of a nat.
    for text in texts[:3]:
        a = np.array(models["float32"].score(text)[1:])
        b = np.array(models[weights].score(text)[1:])
        assert np.abs(a - b).max() < 0.3


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_batched_equals_alone_within_one_dtype(shipped, weights):
    models, texts = shipped
    model = models[weights]
    prompts = [t[: 20 + 9 * i] for i, t in enumerate(texts[:4])]
    settings = dict(max_tokens=[3, 12, 1, 8], temperature=0.9, seed=7)
    together = model.generate(prompts, **settings)
    alone = [
        model.generate([p], max_tokens=n, temperature=0.9, seed=7)[0]
        for p, n in zip(prompts, settings["max_tokens"], strict=True)
    ]
    assert together == alone


def test_int8_folder_round_trip(shipped, tmp_path):
    models, texts = shipped
    model = models["int8"]
    model.save_quantized(tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.int8.safetensors" in files and "config.json" in files and "vocab.json" in files
    again = gpt2jax.load(tmp_path / "q")  # no quantization argument: the folder says int8
    assert again.weights == "int8"
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.score(texts[0]) == model.score(texts[0])
    with pytest.raises(ValueError, match="int8"):
        models["bfloat16"].save_quantized(tmp_path / "not-int8")


def test_int8_folder_errors_name_the_tensor(shipped, tmp_path):
    from safetensors.numpy import load_file, save_file

    models, _ = shipped
    models["int8"].save_quantized(tmp_path / "q")
    file = tmp_path / "q" / "model.int8.safetensors"
    tensors = load_file(file)
    del tensors["h0.mlp.c_fc.w.scale"]
    save_file(tensors, file, metadata={"format": "gpt2jax-int8"})
    with pytest.raises(CheckpointError, match="h0.mlp.c_fc.w"):
        gpt2jax.load(tmp_path / "q")


def test_load_arguments_are_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantization"):
        gpt2jax.load(tiny_checkpoint, quantization="int4")
    with pytest.raises(ValueError, match="mesh"):
        gpt2jax.load(tiny_checkpoint, quantization="int8", mesh="model:1")


def test_server_quantization_setting_reaches_the_model():
    import asyncio
    import pathlib

    from serving.loading import load_all, registry_for
    from serving.settings import Settings

    built = []

    class Engine:  # what load_all calls; the model is all this test looks at
        def warmup(self, **_):
            pass

        def start(self):
            pass

    def build(model, settings):
        built.append(model)
        return Engine()

    settings = Settings.from_env({"QUANTIZATION": "int8"})
    registry = registry_for([pathlib.Path("checkpoints/pydoc-tiny")], settings)
    asyncio.run(load_all(registry, settings, build))
    assert [m.weights for m in built] == ["int8"]


def test_unpack_params_inverts_fp32_packing(tiny_params):
    _, params = tiny_params
    plain = packed.unpack_params(packed.pack_params(params, "float32"))
    assert jax.tree.structure(plain) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))
