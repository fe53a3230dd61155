"""GPT-2 in Flax: pure math, no I/O.

Parameter names are OpenAI's checkpoint names, so `model.init(...)["params"]` and a loaded checkpoint are
the same tree: ``wte, wpe, h0..h{n-1}/{ln_1,attn/{c_attn,c_proj},ln_2,mlp/{c_fc,c_proj}}, ln_f``, with
``w`` of shape [in, out] and LayerNorm scale/offset ``g``/``b``.

Every call goes through a preallocated KV cache: a row's tokens [T] are written into its cache as one
slice from index positions[0], then each attends to the entries from its own sequence's start up to
itself. This one path serves a full-sequence forward (a fresh cache of length T), a padded batch prefill
(each row's padding sits after its last real token, so no real token ever sees it), a packed prefill
(several prompts back to back in one row, each one's positions counting from 0: none sees another) and
a decode step (T = 1, each row at its own position). Entries beyond a row's position are never read, so
stale or padded entries are harmless until they are overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax import cpu_kernels, packed
from gpt2jax.config import GPT2Config

# One layer's cache: (keys, values), each [B, n_head, S, head_dim].
LayerCache = tuple[jax.Array, jax.Array]
KVCache = tuple[LayerCache, ...]


def init_cache(
    config: GPT2Config, batch: int, length: int, dtype: Any = jnp.float32, qkv_groups: int = 1
) -> KVCache:
    """A zeroed KV cache for `batch` rows of up to `length` positions (heads: see `padded_heads`)."""
    shape = (batch, padded_heads(config.n_head, qkv_groups), length, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


def padded_heads(n_head: int, qkv_groups: int) -> int:
    """Attention heads in params laid out in `qkv_groups` groups: n_head rounded up to a multiple."""
    return -(-n_head // qkv_groups) * qkv_groups


def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class LayerNorm(nn.Module):
    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.param("g", nn.initializers.ones, (x.shape[-1],))
        b = self.param("b", nn.initializers.zeros, (x.shape[-1],))
        # Statistics in fp32 even when activations are bf16.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * g.astype(jnp.float32) + b.astype(jnp.float32)).astype(self.dtype)


class Conv1D(nn.Module):
    """GPT-2's 'conv1d' is a dense layer with weight [in, out]."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.get_variable("params", "w") if self.has_variable("params", "w") else None
        if not isinstance(w, packed.PackedWeight):  # a packed weight is not checked against a shape
            w = self.param("w", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        if isinstance(w, packed.PackedWeight):
            return packed.matmul(x, w).astype(self.dtype) + b.astype(self.dtype)
        return matmul(x, w.astype(self.dtype)) + b.astype(self.dtype)


# Decoding one row at a time is bound by reading the weights. XLA's CPU dot runs a [1, K] x [K, N] product
# as one single-threaded matrix-vector product; the same product as a batched matmul over _K_SPLIT slices
# of K (a free reshape of w) runs the slices concurrently on the intra-op thread pool, and the partial
# products are summed afterwards (~1.3x the plain dot). Anything from 2 to 16 slices came within 2% in a
# full decode step; 8 was marginally best alone. Even so a step reads the weights at about the speed of
# PyTorch's matrix-vector product, ~85% of what two threads of plain streaming reads get here.
_K_SPLIT = 8


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N]; a single row is computed as a split-K batched matmul (see _K_SPLIT)."""
    K, N = w.shape
    rows = math.prod(x.shape[:-1])
    if rows != 1 or K % _K_SPLIT or jax.default_backend() != "cpu":
        return jnp.dot(x, w)
    xs = x.reshape(_K_SPLIT, 1, K // _K_SPLIT)
    out = jnp.matmul(xs, w.reshape(_K_SPLIT, K // _K_SPLIT, N)).sum(axis=0)  # (1, N)
    return out.reshape(*x.shape[:-1], N)


def unembed(x: jax.Array, wte: jax.Array | packed.PackedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """Logits x [B, T, E] @ wte [V, E]^T in fp32 (wte in `dtype`, or packed as its transpose).

    For a single row the vocabulary is cut into equal blocks (a free reshape of wte; 50257 = 29 * 1733)
    so that XLA runs them as concurrent matrix-vector products instead of one single-threaded one.
    """
    if isinstance(wte, packed.PackedWeight):
        return packed.matmul(x, wte)
    wte = wte.astype(dtype)
    B, T, E = x.shape
    V = wte.shape[0]
    blocks = _vocab_blocks(V)
    if B * T != 1 or blocks == 1 or jax.default_backend() != "cpu":
        return jnp.einsum("bte,ve->btv", x, wte, preferred_element_type=jnp.float32)
    xs = jnp.broadcast_to(x.reshape(1, 1, E), (blocks, 1, E))
    out = jnp.einsum(
        "cte,cve->ctv", xs, wte.reshape(blocks, V // blocks, E), preferred_element_type=jnp.float32
    )
    return out.reshape(B, T, V)


def _vocab_blocks(V: int, lo: int = 8, hi: int = 64) -> int:
    """The smallest divisor of V in [lo, hi] (1 if there is none)."""
    return next((d for d in range(lo, hi + 1) if V % d == 0), 1)


def kernel_attention(qkv_groups: int) -> bool:
    """Whether decode attention runs in gpt2jax.cpu_kernels: on the CPU with the kernels built, heads not
    split over devices (a kernel sees whole arrays; data-parallel slots are split by shard_map)."""
    return qkv_groups == 1 and cpu_kernels.enabled()


def through_bits(
    update: Callable[[jax.Array, jax.Array], jax.Array], dst: jax.Array, src: jax.Array
) -> jax.Array:
    """update(dst, src) with src cast to dst's dtype; a bf16 dst is updated through its bits (uint16).

    XLA:CPU has no bf16 dynamic-update-slice: it widens the whole destination to fp32 and back around
    each write (a 16-slot bf16 KV cache of 124M: 0.6 GB of temporaries and ~0.5 s per insert of a prompt).
    """
    if dst.dtype != jnp.bfloat16:
        return update(dst, src.astype(dst.dtype))
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
    return jax.lax.bitcast_convert_type(update(bits(dst), bits(src.astype(dst.dtype))), jnp.bfloat16)


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [B, H, T, D] into cache [B, H, S, D] at per-row time offsets start [B] (through_bits)."""

    def write(cache: jax.Array, new: jax.Array) -> jax.Array:
        if new.shape[0] == 1:
            return jax.lax.dynamic_update_slice(cache, new, (0, 0, start[0], 0))
        return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, start)

    return through_bits(write, cache, new)


def exact_zero(x: jax.Array) -> jax.Array:
    """A per-row zero [B, 1, ..., 1] (fp32) computed from x [B, ...].

    Adding it to a value changes nothing but makes the value depend on x, so that XLA schedules whatever
    consumes the value after x. (The guard keeps it zero when x holds an inf or a NaN.)
    """
    s = jnp.sum(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)), keepdims=True)
    return jnp.where(jnp.isfinite(s), s * 0.0, 0.0)


def upcast_after(cache: jax.Array, dtype: Any, x: jax.Array) -> jax.Array:
    """A layer's cache [B, ...] read in `dtype`, converted only once x [B, ...] is computed.

    A cache stored in a narrower dtype (gpt2jax/kv_cache.py) is converted for the attention matmuls. The
    conversions depend on nothing computed in the step, so XLA would run every layer's at its start and
    hold them all: a full-size copy of the cache (1.2 GB for 16 x 1,024 positions of 124M). Tied to the
    layer's own query, one layer's is converted at a time.
    """
    if cache.dtype == dtype:
        return cache
    return cache.astype(dtype) + exact_zero(x).astype(dtype)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax attention of q [B, H, T, D] over keys/values [B, H, S, D] where visible [B, T, S]."""
    scores = jnp.einsum("bhtd,bhsd->bhts", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None], scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, values)


def attend_decode(
    q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array, position: jax.Array
) -> jax.Array:
    """One new token per row (q, k, v [B, H, 1, D]) against the cache entries before `position` [B].

    Reading the old cache and the new token separately lets the caller write the cache afterwards, in
    place (reading a freshly written cache made XLA copy the whole cache per layer).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    past = jnp.einsum("bhtd,bhsd->bhts", q, k_cache, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(k_cache.shape[2])[None, :] < position[:, None]  # (B, S)
    past = jnp.where(visible[:, None, None, :], past, -jnp.inf)
    own = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True) * scale  # (B,H,1,1)
    top = jnp.maximum(jnp.max(past, axis=-1, keepdims=True), own)
    p_past, p_own = jnp.exp(past - top), jnp.exp(own - top)
    denom = jnp.sum(p_past, axis=-1, keepdims=True) + p_own
    out = jnp.einsum("bhts,bhsd->bhtd", p_past.astype(v_cache.dtype), v_cache) + p_own * v
    return (out / denom).astype(v.dtype)


class Attention(nn.Module):
    """Causal self-attention through the KV cache.

    qkv_groups (G): c_attn's columns are G blocks, each [q | k | v] of H / G consecutive heads, where H is
    n_head rounded up to a multiple of G. 1 is GPT-2's own layout; a tensor-parallel layout
    (gpt2jax.sharding) has one block per device of the "model" mesh axis, so that each device's columns
    hold whole heads. Heads beyond n_head (when G does not divide it) have zero weights in c_attn and zero
    rows in c_proj: their values are zero, so they add exactly nothing.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    qkv_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        cfg = self.config
        B, T, _ = x.shape
        G, H, D = self.qkv_groups, padded_heads(cfg.n_head, self.qkv_groups), cfg.head_dim
        qkv = Conv1D(3 * H * D, self.dtype, name="c_attn")(x)  # (B, T, 3E) when H = n_head
        qkv = qkv.reshape(B, T, G, 3, H // G, D)
        heads = lambda i: qkv[:, :, :, i].reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        q, k, v = heads(0), heads(1), heads(2)
        # Head-major cache layout: XLA's CPU batched matmul with (batch, head) leading is several times
        # faster than with the time axis between them.
        k_cache, v_cache = cache  # (B, H, S, D)
        start = positions[:, 0]
        if T == 1 and kernel_attention(self.qkv_groups):
            # Reads and writes the cache in place; it may hold more rows than x (a decode of leading slots).
            out, k_cache, v_cache = cpu_kernels.decode_attention(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, start
            )
            out = out[:, :, None].astype(self.dtype)
        elif T == 1:
            past_k, past_v = (upcast_after(c, self.dtype, q) for c in cache)
            out = attend_decode(q, k, v, past_k, past_v, start)
            # The cache is written after every read of it: in place, touching only the new entries. Were
            # the write free to run before the reads, XLA would copy each layer's cache to keep the old one.
            zero = exact_zero(out).astype(k.dtype)
            k_cache = write_cache(k_cache, (k + zero).astype(k_cache.dtype), start)
            v_cache = write_cache(v_cache, (v + zero).astype(v_cache.dtype), start)
        else:
            k_cache = write_cache(k_cache, k.astype(k_cache.dtype), start)
            v_cache = write_cache(v_cache, v.astype(v_cache.dtype), start)
            # Token t sits at cache index start + t; its sequence began `positions` entries before it.
            index = (start[:, None] + jnp.arange(T))[:, :, None]  # (B, T, 1)
            keys = jnp.arange(k_cache.shape[2])[None, None, :]
            visible = (keys <= index) & (keys >= index - positions[:, :, None])  # (B, T, S)
            out = attend(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), visible)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, E) when H = n_head
        return Conv1D(cfg.n_embd, self.dtype, name="c_proj")(out), (k_cache, v_cache)


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu(Conv1D(4 * self.config.n_embd, self.dtype, name="c_fc")(x))
        return Conv1D(self.config.n_embd, self.dtype, name="c_proj")(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    config: GPT2Config
    dtype: Any = jnp.float32
    qkv_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        eps = self.config.layer_norm_epsilon
        a, cache = Attention(self.config, self.dtype, self.qkv_groups, name="attn")(
            LayerNorm(eps, self.dtype, name="ln_1")(x), positions, cache
        )
        x = x + a
        x = x + MLP(self.config, self.dtype, name="mlp")(LayerNorm(eps, self.dtype, name="ln_2")(x))
        return x, cache


class GPT2(nn.Module):
    """GPT-2 language model; the output projection is tied to `wte`."""

    config: GPT2Config
    dtype: Any = jnp.float32  # activation dtype; params may be stored in another dtype
    qkv_groups: int = 1  # the layout of c_attn's columns (see Attention)

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, hidden_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """tokens, positions [B, T] -> logits [B, T, n_vocab] (fp32) and the updated cache.

        A row's tokens are written as one slice from cache index positions[:, 0]; its positions either
        count on from there, or restart at 0 for each of several sequences packed back to back (then
        positions[:, 0] must be 0 and the cache fresh).
        With hidden_only, returns the final hidden states [B, T, n_embd] instead of logits.
        """
        cfg = self.config
        if self.has_variable("params", "wte"):  # may be packed (gpt2jax.packed)
            wte = self.get_variable("params", "wte")
        else:
            wte = self.param("wte", nn.initializers.normal(0.02), (cfg.n_vocab, cfg.n_embd))
        wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.n_embd))
        rows = packed.embed(wte, tokens) if isinstance(wte, packed.PackedWeight) else wte[tokens]
        x = (rows + wpe[positions]).astype(self.dtype)  # (B, T, E)
        new_cache = []
        for i in range(cfg.n_layer):
            x, layer_cache = Block(cfg, self.dtype, self.qkv_groups, name=f"h{i}")(x, positions, cache[i])
            new_cache.append(layer_cache)
        x = LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="ln_f")(x)
        if hidden_only:
            return x, tuple(new_cache)
        return unembed(x, wte, self.dtype), tuple(new_cache)


def forward(
    params: Any,
    config: GPT2Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    dtype: Any = None,
    qkv_groups: int = 1,
    *,
    hidden_only: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Functional entry point: logits [B, T, V] and the updated cache.

    qkv_groups: the layout of c_attn's columns (1 for a checkpoint's params; see Attention).
    With hidden_only, the final hidden states [B, T, n_embd] instead of logits (`unembed` them, e.g. at
    one position per row: a prefill needs the logits of its last token only).
    """
    dtype = dtype if dtype is not None else jnp.float32
    return GPT2(config, dtype, qkv_groups).apply(
        {"params": params}, tokens, positions, cache, hidden_only=hidden_only
    )


def forward_last(
    params: Any,
    config: GPT2Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    last: jax.Array,
    dtype: Any = None,
    qkv_groups: int = 1,
) -> tuple[jax.Array, KVCache]:
    """Like `forward`, but logits [B, R, V] only at the token indices last [B, R] i32 (each prompt's last
    token: one per row of a padded batch, or R prompts packed in one row).

    A prefill needs no other: the vocabulary projection is a third of a 124M model's weights, so
    projecting every prompt position costs about half as much again as the rest of the prefill.
    """
    dtype = dtype if dtype is not None else jnp.float32
    hidden, cache = forward(
        params, config, tokens, positions, cache, dtype, qkv_groups, hidden_only=True
    )  # (B, T, E)
    hidden = jnp.take_along_axis(hidden, last[:, :, None], axis=1)  # (B, R, E)
    return unembed(hidden, params["wte"], dtype), cache


def init_params(config: GPT2Config, rng: jax.Array) -> Any:
    """Random params with GPT-2's initialisation (normal 0.02, zero biases, unit LayerNorms)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return GPT2(config).init(rng, tokens, tokens, init_cache(config, 1, 1))["params"]
