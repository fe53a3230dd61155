"""The KV cache's dtype: a setting of its own (`gpt2jax.load(..., kv_cache_dtype=...)`, the engine's
`kv_cache_dtype`, the server's KV_CACHE_DTYPE), independent of the weights' and activations' dtype.

The cache is written in this dtype and read back up-cast to the activation dtype (gpt2jax/model.py; the
CPU attention kernel widens it in registers, gpt2jax/cpu_kernels.py), so bf16 halves the cache's memory
(16 slots x 1,024 positions of a 124M model: 1.2 GB fp32, 0.6 GB bf16) and the bytes a decode step reads from it, at the cost of rounding each key and value to 8 bits of
mantissa (tests/test_kv_cache.py states how far the logprobs move).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

# The setting's values: "auto" is bf16 when the activations or the weights are narrower than fp32 (on the
# CPU packed bf16 / int8 weights run with fp32 activations), else the activation dtype.
KV_CACHE_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
}


def kv_cache_dtype(setting: Any, dtype: Any, weights: Any = None) -> jnp.dtype:
    """The KV cache dtype for a setting ("auto" or None, "float32", "bfloat16", or a dtype), the model's
    activation dtype `dtype` and its weights' dtype (default: `dtype`); ValueError for an unknown name."""
    if setting is None or setting == "auto":
        narrow = (
            jnp.dtype(dtype).itemsize == 2 or jnp.dtype(dtype if weights is None else weights).itemsize < 4
        )
        return jnp.dtype(jnp.bfloat16) if narrow else jnp.dtype(dtype)
    if isinstance(setting, str):
        if setting not in KV_CACHE_DTYPES:
            names = ", ".join(["auto", *KV_CACHE_DTYPES])
            raise ValueError(f"kv_cache_dtype must be one of {names}, not {setting!r}")
        return jnp.dtype(KV_CACHE_DTYPES[setting])
    return jnp.dtype(setting)
