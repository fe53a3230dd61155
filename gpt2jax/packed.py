"""Packed 16-bit and int8 weights: storage, quantisation, and the matmul that reads them.

A `PackedWeight` holds a [K, N] matrix as tiles data [T, K, 16] (T = ceil(N / 16), zero-padded columns)
in float32, bfloat16 or int8, with one f32 scale per output column (ones unless int8). int8 is weight-only,
symmetric, per output channel: scale[j] = max_k |W[k, j]| / 127, data = round(W / scale). Activations
stay f32. The tied embedding `wte` [V, E] is packed as its transpose [E, V], so the vocabulary projection
is a plain packed matmul and a token's embedding is one packed column (with a per-token scale).

On the CPU every product runs in gpt2jax.cpu_kernels (decode steps and prefill alike: at 64 rows and more it
keeps up with XLA's fp32 GEMM, while widening the tiles in XLA costs twice that; benchmarks/README.md,
"Packed weights"). Other backends, or a CPU without the kernel, widen the tiles in XLA and use its dot.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2jax import cpu_kernels

LANES = cpu_kernels.LANES
MODES = ("float32", "bfloat16", "int8")
# Params packed by `pack_params`: every Conv1D weight and the tied embedding.
PACKED_LAYERS = ("c_attn", "c_fc", "c_proj")


@struct.dataclass
class PackedWeight:
    """W [K, n] as data [T, K, 16] (bf16 or int8) and scale [T * 16] f32; see the module docstring."""

    data: jax.Array
    scale: jax.Array
    n: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] shape."""
        return (self.data.shape[1], self.n)

    def unpack(self) -> jax.Array:
        """The dequantised [K, N] f32 matrix (for tests and XLA's path; a full f32 copy)."""
        T, K, _ = self.data.shape
        w = self.data.astype(jnp.float32).transpose(1, 0, 2).reshape(K, T * LANES) * self.scale
        return w[:, : self.n]


def pack(w: np.ndarray, mode: str) -> PackedWeight:
    """Packs a [K, N] float matrix (host numpy) in `mode` (one of MODES). Raises ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    w = np.asarray(w, np.float32)
    if mode == "int8":
        amax = np.abs(w).max(axis=0)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return from_quantized(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale)
    tiles = _tiles(w.astype(mode))
    return PackedWeight(jnp.asarray(tiles), jnp.ones(tiles.shape[0] * LANES, jnp.float32), w.shape[1])


def from_quantized(q: np.ndarray, scale: np.ndarray) -> PackedWeight:
    """A PackedWeight from an int8 [K, N] matrix and its [N] scales as saved (no re-quantising)."""
    tiles = _tiles(np.asarray(q, np.int8))
    N = q.shape[1]
    scale = np.pad(np.asarray(scale, np.float32), (0, tiles.shape[0] * LANES - N), constant_values=1.0)
    return PackedWeight(jnp.asarray(tiles), jnp.asarray(scale), N)


def _tiles(data: np.ndarray) -> np.ndarray:
    """data [K, N] as [T, K, LANES] tiles of LANES columns, T = ceil(N / LANES), zeros past column N:
    written in place (padding first, then transposing, copied the matrix twice: seconds for 124M)."""
    K, N = data.shape
    full = N // LANES
    tiles = np.zeros((-(-N // LANES), K, LANES), data.dtype)
    tiles[:full] = data[:, : full * LANES].reshape(K, full, LANES).transpose(1, 0, 2)
    if full < tiles.shape[0]:
        tiles[full, :, : N - full * LANES] = data[:, full * LANES :]
    return tiles


def to_quantized(w: PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The int8 [K, N] matrix and [N] f32 scales of an int8 PackedWeight (inverse of `from_quantized`)."""
    T, K, _ = w.data.shape
    q = np.asarray(w.data).transpose(1, 0, 2).reshape(K, T * LANES)[:, : w.n]
    return np.ascontiguousarray(q), np.asarray(w.scale)[: w.n]


def pack_params(params: Any, mode: str) -> Any:
    """Checkpoint-layout params (numpy or jax, any float dtype) with every Conv1D weight and `wte` packed.

    Other params (biases, LayerNorms, wpe) become f32. Raises ValueError for an unknown mode.
    """

    def walk(tree: Any, key: str) -> Any:
        if isinstance(tree, dict):
            if key in PACKED_LAYERS and "w" in tree:
                return {**{k: np.asarray(v, np.float32) for k, v in tree.items()}, "w": pack(tree["w"], mode)}
            return {k: walk(v, k) for k, v in tree.items()}
        return np.asarray(tree, np.float32)

    out = walk({k: v for k, v in params.items() if k != "wte"}, "")
    out["wte"] = pack(np.asarray(params["wte"], np.float32).T, mode)
    return jax.device_put(out)


def unpack_params(params: Any) -> Any:
    """Plain checkpoint-layout params: every PackedWeight dequantised to its [K, N] f32 matrix (`wte`
    transposed back to [V, E]); other leaves as they are. The inverse of `pack_params` up to rounding."""
    is_leaf = lambda a: isinstance(a, PackedWeight)
    out = jax.tree.map(lambda a: a.unpack() if is_leaf(a) else a, {**params, "wte": None}, is_leaf=is_leaf)
    wte = params["wte"]
    out["wte"] = wte.unpack().T if is_leaf(wte) else wte
    return out


def weights_dtype(params: Any) -> jnp.dtype | None:
    """The dtype the weights are stored in: the packed tiles' (float32, bfloat16 or int8), else `wte`'s;
    None for params without a `wte` (a test's fake device)."""
    wte = params.get("wte") if isinstance(params, dict) else None
    if wte is None:
        return None
    return jnp.dtype(wte.data.dtype if isinstance(wte, PackedWeight) else wte.dtype)


def is_packed(params: Any) -> bool:
    """Whether params hold packed weights (their `wte` is a PackedWeight)."""
    return isinstance(params.get("wte") if isinstance(params, dict) else None, PackedWeight)


def matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [..., K] @ W [K, N] -> [..., N] f32."""
    K, N = w.shape
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, K).astype(jnp.float32)
    if cpu_kernels.enabled():
        y = cpu_kernels.packed_matmul(x2, w.data, w.scale, N)
    else:
        T = w.data.shape[0]
        y = jnp.einsum("mk,tkl->mtl", x2, w.data.astype(jnp.float32)).reshape(rows, T * LANES)
        y = (y * w.scale)[:, :N]
    return y.reshape(*x.shape[:-1], N)


def embed(wte: PackedWeight, tokens: jax.Array) -> jax.Array:
    """Rows of the tied embedding for tokens [...] -> [..., E] f32 (wte packed as its transpose)."""
    rows = wte.data[tokens // LANES, :, tokens % LANES].astype(jnp.float32)  # (..., E)
    return rows * wte.scale[tokens][..., None]
