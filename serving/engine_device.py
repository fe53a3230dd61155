"""Device side of the batching engine: the slot state and the jitted programs that move it.

A request goes prefill (one prompt, right-padded to a length bucket) -> insert (its KV written into one
decode slot, the slot index traced, its first token sampled with the slot's own settings) -> decode (a
chunk of `lax.scan` steps for every slot at once, the state donated so the KV cache is updated in place).
Decode is compiled for a few cache windows (powers of two up to n_ctx): a chunk whose live rows are all
short attends over, and writes, only the start of the cache, so a step reads a fraction of it.

Everything lives on a ("data", "model") mesh (gpt2jax.sharding.Layout; default: every device on data).
The slot axis is split over "data"; the weights and the KV cache's heads over "model" (tensor parallel;
model 1 replicates them). Insert and decode are `shard_map`ped manually over "data" only: each data shard
updates and decodes only its own slots, so the data axis needs no collective, while inside a shard XLA's
SPMD partitioner splits the model over the "model" axis (two all-reduces per layer). Prefill (one prompt)
is replicated over "data" and split over "model". One code path serves 1 device, 8, and meshes that span
several processes (serving/multihost.py then makes the outputs readable by the first process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2jax import sampling
from gpt2jax.config import GPT2Config
from gpt2jax.model import KVCache, forward, init_cache
from gpt2jax.sampler import PromptScores, prompt_scores
from gpt2jax.sharding import Layout, make_mesh

AXIS = "data"


class SlotState(NamedTuple):
    """Everything the decode loop carries per slot, each with a leading slot dim S."""

    cache: KVCache  # per layer (k, v) [S, n_head, n_ctx, head_dim]
    token: jax.Array  # [S] i32, the last sampled token: the next step's input
    position: jax.Array  # [S] i32, where `token` sits in the sequence
    counts: jax.Array  # [S, V] i32, how often each token was generated (for penalties)
    step: jax.Array  # [S] i32, tokens generated so far (also indexes the row's random stream)
    max_tokens: jax.Array  # [S] i32
    eos: jax.Array  # [S] i32, the token that ends the row; -1 for none
    want_top: jax.Array  # [S] bool, the row asked for top logprobs
    done: jax.Array  # [S] bool, finished (end-of-text, max_tokens, or released by the host)
    params: sampling.SamplingParams  # [S] rows


class SlotRow(NamedTuple):
    """What insert writes into a slot besides the KV: one request choice's settings (scalars, 1-row params)."""

    length: np.ndarray  # [] i32, prompt length
    max_tokens: np.ndarray  # [] i32, >= 1
    eos: np.ndarray  # [] i32, -1 for none
    want_top: np.ndarray  # [] bool
    params: sampling.SamplingParams  # one row each


class Prefilled(NamedTuple):
    cache: KVCache  # per layer (k, v) [1, n_head, P, head_dim]
    logits: jax.Array  # [V] f32 at the last prompt token
    scores: PromptScores | None  # [1, P] prompt logprobs when asked for


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Turns on JAX's persistent compilation cache so a restarted server skips most compiling.

    path: default $JAX_CACHE_DIR, else ~/.cache/gpt2jax/jax. Returns the folder used.
    """
    from jax.experimental.compilation_cache import compilation_cache

    folder = os.fspath(path or os.environ.get("JAX_CACHE_DIR") or "~/.cache/gpt2jax/jax")
    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # JAX's default skips programs that compiled in under a second; the decode step of a small model is
    # one of those, and a restart should still find it.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # re-read the settings even if something was compiled already
    return folder


def make_row(
    length: int,
    max_tokens: int,
    eos: int,
    want_top: bool,
    n_vocab: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    presence_penalty: float,
    frequency_penalty: float,
    logit_bias: dict[int, float] | None,
    seed: int,
) -> SlotRow:
    """Host-side builder of one slot's settings."""
    sp = sampling.make_params(
        1,
        n_vocab,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=[logit_bias],
        seed=seed,
    )
    return SlotRow(np.int32(length), np.int32(max_tokens), np.int32(eos), np.bool_(want_top), sp)


def _advance(state: SlotState, out: sampling.SampleOutput, n_ctx: int) -> SlotState:
    """Records sampled tokens: each becomes its row's next input; rows may now be done (cf. Sampler)."""
    rows = state.token.shape[0]
    live = ~state.done
    counts = state.counts.at[jnp.arange(rows), out.token].add(live.astype(jnp.int32))
    step = state.step + live
    done = state.done | (out.token == state.eos) | (step >= state.max_tokens)
    position = jnp.where(live, jnp.minimum(state.position + 1, n_ctx - 1), state.position)
    token = jnp.where(live, out.token, state.token)
    return state._replace(token=token, position=position, counts=counts, step=step, done=done)


def _live_params(sp: sampling.SamplingParams, done: jax.Array) -> sampling.SamplingParams:
    """Finished rows made greedy and unfiltered, so they never force the costlier sampling branches."""
    return sp._replace(
        temperature=jnp.where(done, 0.0, sp.temperature),
        top_k=jnp.where(done, 0, sp.top_k),
        top_p=jnp.where(done, 1.0, sp.top_p),
    )


def _window(cache: KVCache, window: int) -> KVCache:
    return tuple((k[:, :, :window], v[:, :, :window]) for k, v in cache)


def _windows(smallest: int, n_ctx: int) -> tuple[int, ...]:
    out = [n_ctx]
    while out[-1] // 2 >= smallest:
        out.append(out[-1] // 2)
    return tuple(sorted(out))


def _put_row(dst: jax.Array, src: jax.Array, at: jax.Array, mine: jax.Array) -> jax.Array:
    """Writes src [1, ...] at row `at` of dst [S, ...] (from index 0 of the other axes) if `mine`."""
    start = (at,) + (0,) * (dst.ndim - 1)
    old = jax.lax.dynamic_slice(dst, start, src.shape)
    return jax.lax.dynamic_update_slice(dst, jnp.where(mine, src.astype(dst.dtype), old), start)


class SlotPrograms:
    """Owns the mesh, the placed weights and the compiled prefill / insert / decode of one model."""

    def __init__(
        self,
        config: GPT2Config,
        params: Any,
        dtype: Any,
        slots: int,
        chunk_size: int,
        devices: Sequence[jax.Device] | None = None,
        min_window: int = 128,
        layout: Layout | None = None,
    ) -> None:
        """params: placed by `layout` when one is given (as gpt2jax.load(..., mesh=...) does); otherwise
        checkpoint-layout params, replicated over `devices` (default: all) on the data axis."""
        if layout is None:
            layout = Layout(make_mesh(devices=devices))
            params = layout.shard_params(params, config)
        layout.check(config, slots)
        self.config, self.dtype, self.slots, self.chunk_size = config, dtype, slots, chunk_size
        # Decode attends over a window of the cache (the first `window` positions), compiled for each
        # power of two from min_window up to n_ctx: while every live row is short, a step reads a
        # fraction of the [slots, n_ctx] cache instead of all of it.
        self.windows = _windows(min(min_window, config.n_ctx), config.n_ctx)
        self.layout, self.mesh, self.params = layout, layout.mesh, params
        self.replicated = rep = layout.replicated
        self.by_slot = rows = layout.rows
        self.multiprocess = len({d.process_index for d in self.mesh.devices.flat}) > 1
        # The first process reads every slot's outputs: across processes they must be gathered to it.
        steps = rep if self.multiprocess else NamedSharding(self.mesh, P(None, AXIS))
        # XLA's CPU runtime can deadlock in a collective when many multi-device programs are in flight
        # (seen here from ~40): with collectives on the CPU, insert waits for its result (decode is
        # paced by the worker reading the previous chunk), which keeps a handful in flight.
        self._sync = self.mesh.devices.flat[0].platform == "cpu" and (layout.model > 1 or self.multiprocess)
        params_s = layout.param_shardings(params)
        # Shardings as pytree prefixes: a KV cache splits its heads over "model" (and slots over "data").
        self.kv_sharding = kv = layout.cache_sharding(split_rows=False)
        self.state_shardings = state_s = SlotState(*[rows] * len(SlotState._fields))._replace(
            cache=layout.cache_sharding(split_rows=True)
        )
        manual = frozenset({AXIS})  # shard_map is manual over "data"; "model" is left to GSPMD

        self._init = jax.jit(self._init_impl, out_shardings=state_s)
        self._prefill = {
            score: jax.jit(
                partial(self._prefill_impl, score=score),
                in_shardings=(params_s, rep, rep),
                out_shardings=Prefilled(kv, rep, rep if score else None),
            )
            for score in (False, True)
        }
        self._first = jax.jit(self._first_impl, in_shardings=(rep, rep), out_shardings=rep)
        insert = jax.shard_map(
            self._insert_local,
            mesh=self.mesh,
            in_specs=(P(AXIS), P(), P(), P()),
            out_specs=P(AXIS),
            axis_names=manual,
        )
        self._insert = jax.jit(
            insert, in_shardings=(state_s, kv, rep, rep), out_shardings=state_s, donate_argnums=0
        )
        self._decode = {}
        for window in self.windows:
            decode = jax.shard_map(
                partial(self._decode_local, window=window),
                mesh=self.mesh,
                in_specs=(P(), P(AXIS), P(AXIS)),
                out_specs=(P(AXIS), P(None, AXIS)),
                axis_names=manual,
                check_vma=False,  # sampling's lax.conds mix per-device and constant values
            )
            self._decode[window] = jax.jit(
                decode,
                in_shardings=(params_s, state_s, rows),
                out_shardings=(state_s, steps),
                donate_argnums=1,
            )

    # ---- jitted bodies ----

    def _init_impl(self) -> SlotState:
        S, V = self.slots, self.config.n_vocab
        zeros = lambda dtype: jnp.zeros((S,), dtype)
        sp = sampling.SamplingParams(
            temperature=zeros(jnp.float32),
            top_k=zeros(jnp.int32),
            top_p=jnp.ones((S,), jnp.float32),
            presence_penalty=zeros(jnp.float32),
            frequency_penalty=zeros(jnp.float32),
            logit_bias=jnp.zeros((S, V), jnp.float32),
            rng=jnp.zeros((S, 2), jnp.uint32),
        )
        cache = init_cache(self.config, S, self.config.n_ctx, self.dtype, self.layout.qkv_groups)
        return SlotState(
            cache=cache,
            token=zeros(jnp.int32),
            position=zeros(jnp.int32),
            counts=jnp.zeros((S, V), jnp.int32),
            step=zeros(jnp.int32),
            max_tokens=zeros(jnp.int32),
            eos=jnp.full((S,), -1, jnp.int32),
            want_top=zeros(jnp.bool_),
            done=jnp.ones((S,), jnp.bool_),
            params=sp,
        )

    def _prefill_impl(self, params: Any, tokens: jax.Array, length: jax.Array, score: bool) -> Prefilled:
        P_ = tokens.shape[1]
        positions = jnp.arange(P_, dtype=jnp.int32)[None]  # (1, P)
        cache = init_cache(self.config, 1, P_, self.dtype, self.layout.qkv_groups)
        cache = jax.lax.with_sharding_constraint(cache, self.layout.cache_sharding(split_rows=False))
        logits, cache = forward(
            params, self.config, tokens, positions, cache, self.dtype, self.layout.qkv_groups
        )  # (1, P, V)
        last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)  # (V,)
        return Prefilled(cache, last, prompt_scores(logits, tokens) if score else None)

    def _first_impl(self, logits: jax.Array, row: SlotRow) -> tuple[SlotState, sampling.SampleOutput]:
        """A slot's first token, sampled exactly as the notebook Sampler samples after its prefill.

        Returns the slot's row of state (without KV) and the sample. Kept out of insert so that the
        sampling code compiles once rather than once per prefill bucket.
        """
        one = lambda x, dtype: jnp.full((1,), x, dtype)
        row_state = SlotState(
            cache=(),
            token=one(0, jnp.int32),
            position=one(row.length - 1, jnp.int32),
            counts=jnp.zeros((1, self.config.n_vocab), jnp.int32),
            step=one(0, jnp.int32),
            max_tokens=one(row.max_tokens, jnp.int32),
            eos=one(row.eos, jnp.int32),
            want_top=one(row.want_top, jnp.bool_),
            done=one(row.max_tokens <= 0, jnp.bool_),
            params=row.params,
        )
        out = sampling.sample(logits[None], row_state.counts, row_state.step, row.params, row.want_top)
        return _advance(row_state, out, self.config.n_ctx), out

    def _insert_local(self, state: SlotState, kv: KVCache, row: SlotState, slot: jax.Array) -> SlotState:
        """Runs on each device with its own slots; only the device holding `slot` changes anything."""
        local_slots = state.token.shape[0]
        local = slot - jax.lax.axis_index(AXIS) * local_slots
        mine = (local >= 0) & (local < local_slots)
        at = jnp.clip(local, 0, local_slots - 1)
        cache = tuple(
            (_put_row(k, pk, at, mine), _put_row(v, pv, at, mine))
            for (k, v), (pk, pv) in zip(state.cache, kv, strict=True)
        )
        rest = jax.tree.map(lambda d, s: _put_row(d, s, at, mine), state._replace(cache=()), row)
        return rest._replace(cache=cache)

    def _decode_local(
        self, params: Any, state: SlotState, active: jax.Array, window: int
    ) -> tuple[SlotState, sampling.SampleOutput]:
        """`chunk_size` steps for this device's slots; per-step outputs [chunk, S_local], token -1 when done.

        Live rows must stay below position `window` (done rows may be anywhere: a write beyond the
        window is dropped and their outputs are ignored).
        """
        full = state.cache
        state = state._replace(done=state.done | ~active, cache=_window(full, window))

        def one_step(state: SlotState, _):
            logits, cache = forward(
                params,
                self.config,
                state.token[:, None],
                state.position[:, None],
                state.cache,
                self.dtype,
                self.layout.qkv_groups,
            )
            want_top = jnp.any(state.want_top & ~state.done)  # this device's rows only: no collective
            sp = _live_params(state.params, state.done)
            out = sampling.sample(logits[:, 0], state.counts, state.step, sp, want_top)
            emitted = out._replace(token=jnp.where(state.done, -1, out.token))
            return _advance(state._replace(cache=cache), out, self.config.n_ctx), emitted

        state, outs = jax.lax.scan(one_step, state, None, length=self.chunk_size)
        if window < self.config.n_ctx:
            cache = tuple(
                (
                    jax.lax.dynamic_update_slice(k, wk, (0, 0, 0, 0)),
                    jax.lax.dynamic_update_slice(v, wv, (0, 0, 0, 0)),
                )
                for (k, v), (wk, wv) in zip(full, state.cache, strict=True)
            )
            state = state._replace(cache=cache)
        return state, outs

    # ---- host side ----

    def init_state(self) -> SlotState:
        """A fresh state: every slot empty (done)."""
        return self._init()

    def prefill(self, prompt: Sequence[int], bucket: int, score: bool) -> Prefilled:
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        tokens, length = self.put((tokens, np.int32(len(prompt))), self.replicated)
        return self._prefill[score](self.params, tokens, length)

    def put(self, tree: Any, sharding: NamedSharding) -> Any:
        """Host values onto the mesh; with several processes each places its own devices' parts (every
        process passes the same values, as serving/multihost.py arranges)."""
        if not self.multiprocess:
            return jax.device_put(tree, sharding)
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i, a=np.asarray(a): a[i]),
            tree,
        )

    def insert(
        self, state: SlotState, pre: Prefilled, slot: int, row: SlotRow
    ) -> tuple[SlotState, sampling.SampleOutput]:
        """Puts a prefilled prompt into `slot` (donating `state`); returns the new state and the first token."""
        # Host inputs are placed explicitly so that their shardings match the warm-up's compiled programs.
        row, slot = self.put((row, np.int32(slot)), self.replicated)
        row_state, first = self._first(pre.logits, row)
        state = self._insert(state, pre.cache, row_state, slot)
        if self._sync:
            jax.block_until_ready(state)
        return state, first

    def window_for(self, end: int) -> int:
        """The smallest compiled window holding positions < end."""
        return next((w for w in self.windows if w >= end), self.windows[-1])

    def decode(
        self, state: SlotState, active: np.ndarray, window: int | None = None
    ) -> tuple[SlotState, sampling.SampleOutput]:
        """One chunk of steps for all slots (donating `state`); rows with active False are ended first.

        window: a compiled window (see `window_for`) above every position a live row reaches in the chunk.
        """
        decode = self._decode[window or self.windows[-1]]
        return decode(self.params, state, self.put(active, self.by_slot))

    def compile(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> None:
        """Compiles prefill and insert for each bucket, first-token sampling and decode; runs nothing.

        The abstract arguments carry the real shardings: the compiled programs are cached under them.
        """
        rep, rows = self.replicated, self.by_slot
        self._init.lower().compile()
        like = lambda tree, shardings: jax.tree.map(  # shardings: a prefix of tree
            lambda s, sub: jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), sub
            ),
            shardings,
            tree,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        row = make_row(
            1, 1, -1, False, self.config.n_vocab, temperature=0.0, top_k=0, top_p=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=0,
        )  # fmt: skip
        row, params = like(row, rep), like(self.params, self.layout.param_shardings(self.params))
        state = like(jax.eval_shape(self._init_impl), self.state_shardings)
        logits = like(jax.ShapeDtypeStruct((self.config.n_vocab,), jnp.float32), rep)
        self._first.lower(logits, row).compile()
        row_state = like(jax.eval_shape(self._first, logits, row)[0], rep)
        length, slot = like(np.int32(0), rep), like(np.int32(0), rep)
        for bucket in buckets:
            tokens = like(jax.ShapeDtypeStruct((1, bucket), jnp.int32), rep)
            for s in score:
                self._prefill[s].lower(params, tokens, length).compile()
            kv = like(jax.eval_shape(self._prefill[False], params, tokens, length).cache, self.kv_sharding)
            self._insert.lower(state, kv, row_state, slot).compile()
        for window in self.windows:
            self._decode[window].lower(params, state, like(np.zeros(self.slots, bool), rows)).compile()
