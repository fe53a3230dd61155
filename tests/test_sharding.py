"""Meshes and the tensor-parallel layout (gpt2jax/sharding.py).

The test that matters runs the model on 8 forced CPU devices (a subprocess: the device count is fixed
when JAX starts) with data-parallel, tensor-parallel and mixed meshes, and compares with one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_checkpoint

import gpt2jax
from gpt2jax.config import GPT2Config, preset
from gpt2jax.model import GPT2, forward, init_cache, init_params
from gpt2jax.sharding import (
    MODEL,
    MeshShape,
    ShardingError,
    check_split,
    group_heads,
    param_bytes_per_device,
    param_specs,
    shard_shape,
)

ROOT = Path(__file__).resolve().parents[1]
# Data parallel, tensor parallel, mixed. (data:4,model:2 passes too; it is left out of the default run for
# time: TEST_MESHES="data:8 model:8 data:2,model:4 data:4,model:2" runs it.)
MESHES = os.environ.get("TEST_MESHES", "data:8 model:8 data:2,model:4").split()


def test_mesh_shapes_parse_and_resolve():
    assert MeshShape.parse("data:4,model:2").resolve(8) == (4, 2)
    assert MeshShape.parse("model:4").resolve(8) == (2, 4)
    assert MeshShape.parse("").resolve(8) == MeshShape.parse(None).resolve(8) == (8, 1)
    assert MeshShape.parse(" model:2 , data:1 ").resolve(2) == (1, 2)
    for bad in ("data=4", "data:0", "tensor:2", "model:x", "data:2,data:2"):
        with pytest.raises(ShardingError, match="data:4,model:2"):
            MeshShape.parse(bad)
    with pytest.raises(ShardingError, match="does not match the 8 devices"):
        MeshShape.parse("data:4,model:4").resolve(8)
    with pytest.raises(ShardingError, match="does not match the 8 devices"):
        MeshShape.parse("model:3").resolve(8)


def test_shapes_that_do_not_split_are_refused_with_the_reason(caplog):
    check_split(preset("1558M"), data=2, model=4, slots=16)  # 25 heads: padded to 28, with a warning
    assert "padded with 3 zero heads" in caplog.text
    with pytest.raises(ShardingError, match=r"model axis \(3\) must divide the MLP width 4\*n_embd \(40\)"):
        check_split(GPT2Config(n_embd=10, n_head=2, n_layer=1), data=1, model=3)
    with pytest.raises(ShardingError, match=r"slots \(6\) must be a multiple of the data axis \(4\)"):
        check_split(preset("124M"), data=4, model=2, slots=6)


def test_a_mesh_larger_than_the_devices_is_refused(tiny_checkpoint):
    with pytest.raises(ShardingError, match=f"does not match the {len(jax.devices())} devices"):
        gpt2jax.load(tiny_checkpoint, mesh=f"model:{len(jax.devices()) + 1}")


def test_heads_grouped_by_device_are_the_same_model():
    """Regrouping the attention by heads (padded with zero heads where the groups do not divide n_head),
    read back with qkv_groups, changes no logit (on one device)."""
    config = GPT2Config(n_vocab=97, n_ctx=32, n_embd=64, n_head=8, n_layer=2)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 9)).astype(np.int32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))

    @partial(jax.jit, static_argnums=1)
    def logits(p, groups):
        return forward(
            p, config, tokens, positions, init_cache(config, 2, 9, qkv_groups=groups), qkv_groups=groups
        )[0]

    reference = logits(params, 1)
    for groups in (2, 3, 16):  # whole heads; 9 heads (one zero head); 16 heads, one per group
        grouped = group_heads(params, config.n_head, groups)
        np.testing.assert_allclose(logits(grouped, groups), reference, atol=1e-5)
        back = group_heads(grouped, config.n_head, groups, inverse=True)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
    # Group g of the columns holds heads g*H/G.. of q, then of k, then of v (D = 8, 4 heads per group).
    w, orig = group_heads(params, 8, 2)["h1"]["attn"]["c_attn"]["w"], params["h1"]["attn"]["c_attn"]["w"]
    np.testing.assert_array_equal(w[:, 96:128], orig[:, 32:64])  # group 1's q: heads 4..7 of q
    np.testing.assert_array_equal(w[:, 128:160], orig[:, 96:128])  # group 1's k
    padded = group_heads(params, 8, 3)["h0"]["attn"]
    assert padded["c_attn"]["w"].shape == (64, 3 * 9 * 8) and padded["c_proj"]["w"].shape == (9 * 8, 64)
    assert not padded["c_proj"]["w"][64:].any()  # the zero head's output rows


def test_1558m_fits_on_devices_that_could_not_hold_it():
    """1558M's weights (from its shapes, nothing allocated): each device holds 1/model of the big ones."""
    config = preset("1558M")
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    specs = param_specs(shapes)
    total = sum(np.prod(s.shape) * 4 for s in jax.tree.leaves(shapes))
    assert total == config.num_params() * 4 and 6.2e9 < total < 6.3e9  # fp32
    held = {}
    for model in (1, 2, 4, 8):  # 25 heads: padded to 26, 28, 32
        sizes = {"data": 1, MODEL: model}
        grouped = jax.eval_shape(partial(grouped_params, config, model))  # the model's own shapes
        held[model] = sum(
            np.prod(shard_shape(s.shape, spec, sizes)) * 4
            for s, spec in zip(jax.tree.leaves(grouped), jax.tree.leaves(specs), strict=True)
        )
        assert held[model] == param_bytes_per_device(config, model)
    assert held[1] == total
    # fp32: 6.23 GB on one device; 3.32 over 2 (26 heads), 1.86 over 4 (28 heads), 1.14 over 8 (32 heads).
    assert held[1] > 6.2e9 and held[2] < 3.4e9 and held[4] < 1.9e9 and held[8] < 1.2e9


def grouped_params(config: GPT2Config, groups: int):
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(config, 1, 1, qkv_groups=groups)
    return GPT2(config, qkv_groups=groups).init(jax.random.key(0), tokens, tokens, cache)["params"]


@pytest.fixture(scope="module")
def checkpoint12(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 96-wide random GPT-2 with 12 heads (as 124M): model axes of 2 and 4 split its heads
    evenly, 8 pads them to 16 (two per device, the last two devices' all zero)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny-12-heads"), tokenizer_dir, n_embd=96, n_head=12)


def test_meshes_give_the_outputs_of_one_device(checkpoint12):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mesh_check.py"), str(checkpoint12), *MESHES],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a collective that hangs ends the run rather than the suite (no slow machine takes it)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    results = out["results"]
    one = results.pop("one")
    config = GPT2Config.from_dir(checkpoint12)
    assert set(results) == set(MESHES)
    for name, r in results.items():
        data, model = r["mesh"]["data"], r["mesh"]["model"]
        assert data * model == 8, name
        assert r["logits_max_diff"] < 1e-4, name
        for run, got in r["library"].items():
            want = one["library"][run]
            assert got["tokens"] == want["tokens"], (name, run)  # greedy and seeded tokens identical
            for a, b in zip(got["logprobs"], want["logprobs"], strict=True):
                np.testing.assert_allclose(a, b, atol=1e-4)
        assert len(r["engine"]) == len(one["engine"])
        for got, want in zip(r["engine"], one["engine"], strict=True):
            for a, b in zip(got, want, strict=True):
                assert {k: v for k, v in a.items() if k != "logprobs"} == {
                    k: v for k, v in b.items() if k != "logprobs"
                }, name
                np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)
        # Megatron's two all-reduces per layer in a decode step (in the scanned body), nothing else: no
        # weight or cache is ever gathered, and the data axis needs no collective at all.
        want = {"all-reduce": 2 * config.n_layer if model > 1 else 0}
        assert {k: v for k, v in r["decode_collectives"].items() if v} == {
            k: v for k, v in want.items() if v
        }, name
        # Each device holds its 1/model of the layers' matrices (read from the arrays' own shards).
        w = r["weights"]
        assert w["per_device"] == [param_bytes_per_device(config, model)], name
        assert w["c_fc_shard_shapes"] == [[96, 384 // model]], name
    assert results["model:8"]["weights"]["per_device"][0] < one["weights"]["total"] / 2
