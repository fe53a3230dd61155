"""The KV cache's dtype setting (gpt2jax/kv_cache.py): names, where it applies, a bf16 cache against an
fp32 one, and batched == alone within one cache dtype.

Tolerance: on the tiny random checkpoint the greedy tokens of a bf16 cache are the fp32 cache's, and every
logprob (of generated and of prompt tokens) is within 1e-2 of it (2-5e-5 seen here). On the shipped
pydoc-tiny, README "KV cache dtype" gives the figures on a trained model.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import gpt2jax
from gpt2jax.kv_cache import kv_cache_dtype

PROMPTS = [
    "The",
    "Return the value of the named attribute of object.",
    "import os",
    "A class may define a method named __getitem__() that",
    "x = 1",
    "Each time the loop runs, the statement is executed",
]
TOLERANCE = 1e-2  # absolute, on each logprob


def test_names_resolve_against_the_activation_dtype():
    assert kv_cache_dtype("auto", jnp.float32) == jnp.float32
    assert kv_cache_dtype(None, jnp.bfloat16) == jnp.bfloat16
    assert kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_cache_dtype("bf16", jnp.float32) == jnp.bfloat16
    assert kv_cache_dtype("float32", jnp.bfloat16) == jnp.float32
    assert kv_cache_dtype(jnp.bfloat16, jnp.float32) == jnp.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_dtype("int8", jnp.float32)


def test_load_refuses_an_unknown_name_before_reading(tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        gpt2jax.load(tmp_path, kv_cache_dtype="float8")


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """The tiny model with an fp32 and with a bf16 cache; batch-invariant engines (4 slots)."""
    out = {}
    for kv in ("float32", "bfloat16"):
        model = gpt2jax.load(tiny_checkpoint, kv_cache_dtype=kv)
        model.start_engine(slots=4, chunk_size=4, batch_invariant=True)
        out[kv] = model
    yield out
    for model in out.values():
        model.engine.stop()


def test_the_cache_is_stored_in_the_chosen_dtype(models):
    for kv, model in models.items():
        assert model.kv_dtype == jnp.dtype(kv) and model.sampler.kv_dtype == jnp.dtype(kv)
        k, v = model.engine.programs.init_state().cache[0]
        assert k.dtype == v.dtype == jnp.dtype(kv)
        pre = model.engine.programs.prefill([[1, 2, 3]], 16, False)[0]
        assert pre.cache[0][0].dtype == jnp.dtype(kv)
    assert models["float32"].dtype == models["bfloat16"].dtype == jnp.float32  # activations unchanged


def test_a_bf16_cache_is_close_to_an_fp32_one(models):
    got = {
        kv: m.complete(PROMPTS, max_tokens=24, temperature=0, logprobs=1, ignore_eos=True)
        for kv, m in models.items()
    }
    for a, b in zip(got["float32"], got["bfloat16"], strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) <= TOLERANCE
    for prompt in PROMPTS:  # prompt scoring goes through the notebook Sampler's cache
        a, b = models["float32"].score(prompt), models["bfloat16"].score(prompt)
        assert a[0] is None and b[0] is None
        assert max((abs(x - y) for x, y in zip(a[1:], b[1:], strict=True)), default=0) <= TOLERANCE


def test_with_a_bf16_cache_batched_equals_alone(models):
    model = models["bfloat16"]
    settings = dict(max_tokens=12, temperature=1.0, seed=7, logprobs=1, ignore_eos=True)
    together = model.complete(PROMPTS, **settings)
    alone = [model.complete(prompt, **settings)[0] for prompt in PROMPTS]
    for a, b in zip(together, alone, strict=True):
        assert a.token_ids == b.token_ids
        assert [t.logprob for t in a.logprobs] == [t.logprob for t in b.logprobs]


def test_the_engine_option_overrides_the_model(tiny_model):
    from gpt2jax.engine.engine import BatchEngine

    engine = BatchEngine.from_model(tiny_model, slots=2, chunk_size=2, kv_cache_dtype="bfloat16")
    assert engine.kv_dtype == jnp.bfloat16 and engine.programs.kv_dtype == jnp.bfloat16
    assert BatchEngine.from_model(tiny_model, slots=2, chunk_size=2).kv_dtype == tiny_model.kv_dtype


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_no_program_widens_a_bf16_cache_or_table_whole(weights):
    """XLA's memory analysis of the engine's insert and decode programs with a bf16 cache: their
    temporaries stay below one layer's cache in fp32 and below the embedding table in fp32, and no value
    of the cache's shape is fp32.

    XLA:CPU has no bf16 dynamic-update-slice or gather: it widens the whole operand to fp32 around them.
    Seen: the decode step's cache writes held a full fp32 copy of the cache (the step 3x slower); each
    insert widened the whole cache and back (1.2 GB of temporaries and ~0.5 s per insert at 124M x 16 x
    1,024, the engine 2.5x slower with a bf16 cache than an fp32 one); and with packed bf16 weights the
    decode loop widened the whole embedding table on every call (hoisted out of the loop: 154 MB at 124M,
    a bf16 engine 1.7x slower at one row)."""
    import jax

    from gpt2jax import cpu_kernels, packed
    from gpt2jax.config import GPT2Config
    from gpt2jax.engine.device import SlotPrograms
    from gpt2jax.model import init_params

    config = GPT2Config(n_vocab=4096, n_ctx=512, n_embd=256, n_head=4, n_layer=4)
    slots = 8
    params = init_params(config, jax.random.key(0))
    if weights == "bfloat16":
        if not cpu_kernels.enabled():
            pytest.skip("packed weights need the CPU kernels (a C++ compiler)")
        params = packed.pack_params(params, "bfloat16")
    programs = SlotPrograms(config, params, jnp.dtype(weights), slots, 4, kv_dtype=jnp.bfloat16)
    names = [("insert", 16), ("decode", config.n_ctx, slots), ("decode", config.n_ctx, 1)]
    layer_fp32 = slots * config.n_ctx * config.n_embd * 4
    table_fp32 = config.n_vocab * config.n_embd * 4
    # (a bf16 write widened in place leaves no temporary, but an fp32 value of the cache's shape)
    cache_fp32 = f"f32[{slots},{config.n_head},{config.n_ctx},{config.n_embd // config.n_head}]"
    for name, lowered in zip(names, programs.lowered(names), strict=True):
        compiled = lowered.compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < min(layer_fp32, table_fp32), (name, temp)
        assert cache_fp32 not in compiled.as_text(), name
