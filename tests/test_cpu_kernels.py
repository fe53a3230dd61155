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
    got = jax.jit(cpu_kernels.decode_attention)(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, position
    )
    assert got.shape == (B, H, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(v[0, :, 0]), rtol=1e-6)  # softmax of one


def test_decode_attention_ignores_what_rows_cannot_see(kernel):
    rng = np.random.default_rng(0)
    q, k, v, k_cache, v_cache = _inputs(rng, 2, 2, 2, 16, 8, jnp.float32)
    position = jnp.array([5, 9], jnp.int32)
    run = lambda kc, vc: cpu_kernels.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], kc, vc, position)
    garbage = lambda c: c.at[0, :, 5:].set(jnp.nan).at[1, :, 9:].set(1e30)
    np.testing.assert_array_equal(np.asarray(run(garbage(k_cache), garbage(v_cache))), run(k_cache, v_cache))


def test_decode_attention_row_does_not_depend_on_batch(kernel):
    rng = np.random.default_rng(1)
    q, k, v, k_cache, v_cache = _inputs(rng, 6, 6, 4, 64, 64, jnp.float32)
    position = jnp.asarray(rng.integers(1, 64, 6), jnp.int32)
    call = jax.jit(cpu_kernels.decode_attention)
    batched = call(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, position)
    alone = call(q[4:5, :, 0], k[4:5, :, 0], v[4:5, :, 0], k_cache[4:5], v_cache[4:5], position[4:5])
    np.testing.assert_array_equal(np.asarray(batched[4:5]), np.asarray(alone))


def test_write_cache_writes_the_leading_rows_of_a_bigger_cache():
    cache = jnp.zeros((4, 2, 8, 3))
    new = jnp.ones((2, 2, 1, 3)) * jnp.array([1.0, 2.0])[:, None, None, None]
    out = np.array(model.write_cache(cache, new, jnp.array([3, 6])))
    assert (out[0, :, 3] == 1).all() and (out[1, :, 6] == 2).all()
    out[0, :, 3] = out[1, :, 6] = 0
    assert not out.any()  # nothing else written, rows 2-3 untouched


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
