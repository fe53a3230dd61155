"""The CPU decode-attention kernel (gpt2jax.cpu_kernels.decode_attention) against XLA's attention
(gpt2jax.model.attend_decode), and the engine's use of it: the cache read in place, one window.

The packed matmul kernel is tested in test_packed.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import cpu_kernels, model


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.enabled():
        pytest.skip("no C++ compiler or not on the CPU: the kernels are not built")


def _inputs(rng, B, cache_rows, H, S, D, dtype):
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, 1, D)), jnp.float32) for _ in range(3))
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((cache_rows, H, S, D)), dtype) for _ in range(2))
    return q, k, v, k_cache, v_cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("B", "cache_rows", "D"), [(1, 1, 64), (3, 5, 16), (4, 4, 12)])
def test_decode_attention_matches_xla(kernel, dtype, B, cache_rows, D):
    # D = 12 takes the scalar path; a cache with more rows than the batch uses its first B rows.
    rng = np.random.default_rng(B * 100 + D)
    H, S = 3, 37
    q, k, v, k_cache, v_cache = _inputs(rng, B, cache_rows, H, S, D, dtype)
    position = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32).at[0].set(0)  # row 0 sees only itself
    f32 = lambda c: c[:B].astype(jnp.float32)
    want = model.attend_decode(q, k, v, f32(k_cache), f32(v_cache), position)[:, :, 0]
    got, k_out, v_out = jax.jit(cpu_kernels.decode_attention)(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, position
    )
    assert got.shape == (B, H, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(v[0, :, 0]), rtol=1e-6)  # softmax of one
    # The new entries are written where each row's next step sees them, rounded as XLA rounds; nothing else.
    want_k = model.write_cache(k_cache[:B], k.astype(dtype), jnp.minimum(position, S - 1))
    want_v = model.write_cache(v_cache[:B], v.astype(dtype), jnp.minimum(position, S - 1))
    full = position < S  # a row at the end writes nothing (write_cache would clamp into the last entry)
    for out, want, old in ((k_out, want_k, k_cache), (v_out, want_v, v_cache)):
        assert out.dtype == dtype and out.shape == old.shape
        np.testing.assert_array_equal(
            np.asarray(out[:B][full], np.float32), np.asarray(want[full], np.float32)
        )
        np.testing.assert_array_equal(np.asarray(out[B:], np.float32), np.asarray(old[B:], np.float32))


def test_decode_attention_ignores_what_rows_cannot_see(kernel):
    rng = np.random.default_rng(0)
    q, k, v, k_cache, v_cache = _inputs(rng, 2, 2, 2, 16, 8, jnp.float32)
    position = jnp.array([5, 9], jnp.int32)
    run = lambda kc, vc: cpu_kernels.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], kc, vc, position)[0]
    garbage = lambda c: c.at[0, :, 5:].set(jnp.nan).at[1, :, 9:].set(1e30)
    np.testing.assert_array_equal(np.asarray(run(garbage(k_cache), garbage(v_cache))), run(k_cache, v_cache))


def test_decode_attention_row_does_not_depend_on_batch(kernel):
    rng = np.random.default_rng(1)
    q, k, v, k_cache, v_cache = _inputs(rng, 6, 6, 4, 64, 64, jnp.float32)
    position = jnp.asarray(rng.integers(1, 64, 6), jnp.int32)
    call = jax.jit(cpu_kernels.decode_attention)
    batched = call(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, position)[0]
    alone = call(q[4:5, :, 0], k[4:5, :, 0], v[4:5, :, 0], k_cache[4:5], v_cache[4:5], position[4:5])[0]
    np.testing.assert_array_equal(np.asarray(batched[4:5]), np.asarray(alone))


def test_a_bf16_cache_is_updated_in_place(kernel):
    # XLA copied a bf16 cache around its write when the read was a separate op; in the kernel it is not.
    q = jnp.ones((1, 12, 64))
    cache = jnp.zeros((16, 12, 1024, 64), jnp.bfloat16)
    step = jax.jit(
        lambda kc, vc, q: cpu_kernels.decode_attention(q, q, q, kc, vc, jnp.array([3])), donate_argnums=(0, 1)
    )
    temp = step.lower(cache, cache, q).compile().memory_analysis().temp_size_in_bytes
    assert temp < cache.nbytes // 16, temp


def test_engine_decodes_one_window_in_place_with_the_kernel(kernel, tiny_model):
    engine = tiny_model.start_engine()
    try:
        assert engine.programs.kernel_attention
        assert engine.programs.windows == (
            tiny_model.config.n_ctx,
        )  # nothing to cut: reads stop at positions
        texts = tiny_model.generate(["a b c", "hello there world"], [5, 9], temperature=0.0, ignore_eos=True)
        alone = [tiny_model.generate(p, m, temperature=0.0, ignore_eos=True)[0] for p, m in
                 [("a b c", 5), ("hello there world", 9)]]  # fmt: skip
        assert texts == alone
    finally:
        engine.stop()
