"""Device side of the batching engine: the slot state and the jitted programs that move it.

A request goes prefill (one prompt, right-padded to a length bucket) -> insert (its KV written into one
decode slot, the slot index traced, its first token sampled with the slot's own settings) -> decode (a
chunk of steps for every slot at once, the state donated so the KV cache is updated in place; the chunk
stops early once every slot is done). Prefill, the first token and the decode loop are gpt2jax/decode.py's,
the same functions the notebook Sampler runs.
Decode is compiled for a few cache windows (powers of two up to n_ctx): a chunk whose live rows are all
short attends over, and writes, only the start of the cache, so a step reads a fraction of it. It is also
compiled for a few numbers of leading slots per device (powers of 4 and all of them): slots are filled in
that order, so a lone request decodes one row, not all of them (benchmarks/README.md: a step's cost
grows with its rows).

Everything lives on a ("data", "model") mesh (gpt2jax.sharding.Layout; default: every device on data).
The slot axis is split over "data"; the weights and the KV cache's heads over "model" (tensor parallel;
model 1 replicates them). Insert and decode are `shard_map`ped manually over "data" only: each data shard
updates and decodes only its own slots, so the data axis needs no collective, while inside a shard XLA's
SPMD partitioner splits the model over the "model" axis (two all-reduces per layer). Prefill (one prompt)
is replicated over "data" and split over "model". One code path serves 1 device, 8, and meshes that span
several processes (gpt2jax/engine/multihost.py then makes the outputs readable by the first process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2jax import decode, sampling
from gpt2jax.config import GPT2Config
from gpt2jax.decode import DecodeState
from gpt2jax.engine.automata import DeviceAutomata
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.shapes import decode_row_counts, decode_windows, prefill_row_counts
from gpt2jax.engine.slots import Prefilled, SlotRow, leading, make_row, put_row, write_back
from gpt2jax.model import KVCache, init_cache, kernel_attention
from gpt2jax.sharding import Layout, make_mesh

AXIS = "data"


class SlotPrograms(DevicePrograms):
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
        batch_invariant: bool = False,
        kv_dtype: Any = None,
    ) -> None:
        """params: placed by `layout` when one is given (as gpt2jax.load(..., mesh=...) does); otherwise
        checkpoint-layout params, replicated over `devices` (default: all) on the data axis.
        batch_invariant: one decode shape, and prefill one prompt at a time (gpt2jax/engine/shapes.py).
        kv_dtype: the KV cache's dtype, of the slots and of prefill (default: `dtype`)."""
        if layout is None:
            layout = Layout(make_mesh(devices=devices))
            params = layout.shard_params(params, config)
        layout.check(config, slots)
        self.config, self.dtype, self.slots, self.chunk_size = config, dtype, slots, chunk_size
        self.batch_invariant = batch_invariant
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.model = decode.Model(config, dtype, layout.qkv_groups)
        # XLA's attention reads a window of the cache (the first `window` positions), compiled for each
        # power of two from min_window up to n_ctx: while every live row is short, a step reads a
        # fraction of the [slots, n_ctx] cache. The CPU attention kernel reads only what each row sees,
        # in place: one window, nothing cut (cutting copied the window out and back every chunk).
        self.kernel_attention = kernel_attention(layout.qkv_groups)
        smallest = config.n_ctx if self.kernel_attention else min(min_window, config.n_ctx)
        self.windows = decode_windows(smallest, config.n_ctx, batch_invariant)
        self.layout, self.mesh, self.params = layout, layout.mesh, params
        self.replicated = rep = layout.replicated
        self.by_slot = rows = layout.rows
        self.data_shards = layout.data
        self.local_slots = slots // layout.data
        # Leading slots per data shard that decode runs.
        self.row_counts = decode_row_counts(self.local_slots, batch_invariant)
        self.multiprocess = len({d.process_index for d in self.mesh.devices.flat}) > 1
        # The first process reads every slot's outputs: across processes they must be gathered to it.
        steps = rep if self.multiprocess else NamedSharding(self.mesh, P(None, AXIS))
        # XLA's CPU runtime can deadlock in a collective when many multi-device programs are in flight
        # (seen here from ~40): with collectives on the CPU, insert waits for its result (decode is
        # paced by the worker reading the previous chunk), which keeps a handful in flight.
        self._sync = self.mesh.devices.flat[0].platform == "cpu" and (layout.model > 1 or self.multiprocess)
        self.params_shardings = params_s = layout.param_shardings(params)
        # Shardings as pytree prefixes: a KV cache splits its heads over "model" (and slots over "data").
        self.kv_sharding = kv = layout.cache_sharding(split_rows=False)
        self.state_shardings = state_s = DecodeState(*[rows] * len(DecodeState._fields))._replace(
            cache=layout.cache_sharding(split_rows=True)
        )
        manual = frozenset({AXIS})  # shard_map is manual over "data"; "model" is left to GSPMD
        self.automata = DeviceAutomata(config.n_vocab, slots, self.put, rep, rows, state_s)  # structured

        self._init = jax.jit(self._init_impl, out_shardings=state_s)
        self._prefill: dict[tuple[bool, int], Any] = {}  # (score, rows) -> jitted; see _prefill_program
        self._first = jax.jit(self._first_impl, in_shardings=(rep, rep, rep), out_shardings=rep)
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
            for n in self.row_counts:
                program = jax.shard_map(
                    partial(self._decode_local, window=window, rows=n),
                    mesh=self.mesh,
                    in_specs=(P(), P(AXIS), P(AXIS), P()),
                    out_specs=(P(AXIS), P(None, AXIS)),
                    axis_names=manual,
                    check_vma=False,  # sampling's lax.conds mix per-device and constant values
                )
                self._decode[window, n] = jax.jit(
                    program,
                    in_shardings=(params_s, state_s, rows, rep),
                    out_shardings=(state_s, steps),
                    donate_argnums=1,
                )

    # ---- jitted bodies ----

    def _init_impl(self) -> DecodeState:
        S, V = self.slots, self.config.n_vocab
        zeros = lambda dtype: jnp.zeros((S,), dtype)
        neutral = sampling.tensors_from([sampling.NEUTRAL], V)
        sp = jax.tree.map(lambda a: jnp.broadcast_to(a, (S, *a.shape[1:])), neutral)
        cache = init_cache(self.config, S, self.config.n_ctx, self.kv_dtype, self.layout.qkv_groups)
        return DecodeState(
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
            fsm=jnp.full((S,), -1, jnp.int32),
        )

    def _prefill_impl(
        self, params: Any, tokens: jax.Array, lengths: jax.Array, score: bool
    ) -> tuple[Prefilled, ...]:
        """Prompts right-padded to one bucket, tokens [R, P], lengths [R] -> one Prefilled per row.

        Only the last token's logits are computed unless the prompt is scored (echo logprobs). Each row's
        KV comes out as its own [1, ...] arrays, so that insert compiles once per bucket, whatever R.
        """
        R, P_ = tokens.shape
        cache = init_cache(self.config, R, P_, self.kv_dtype, self.layout.qkv_groups)
        cache = jax.lax.with_sharding_constraint(cache, self.layout.cache_sharding(split_rows=False))
        last, cache, scores = decode.prefill(params, self.model, tokens, lengths, cache, score)
        return tuple(
            Prefilled(
                tuple((k[r : r + 1], v[r : r + 1]) for k, v in cache),
                last[r],
                None if scores is None else jax.tree.map(lambda a, r=r: a[r : r + 1], scores),
            )
            for r in range(R)
        )

    def _first_impl(self, logits: jax.Array, row: SlotRow, tables: Any) -> tuple[DecodeState, Any]:
        """A slot's first token, sampled exactly as the notebook Sampler samples after its prefill.

        Returns the slot's row of state (without KV) and the sample. Kept out of insert so that the
        sampling code compiles once rather than once per prefill bucket.
        """
        one = lambda x: jnp.reshape(x, (1,))
        return decode.start(
            logits[None],
            one(row.length),
            one(row.max_tokens),
            one(row.eos),
            one(row.want_top),
            row.params,
            self.config.n_ctx - 1,
            one(row.fsm),
            tables,
        )

    def _insert_local(
        self, state: DecodeState, kv: KVCache, row: DecodeState, slot: jax.Array
    ) -> DecodeState:
        """Runs on each device with its own slots; only the device holding `slot` changes anything."""
        local_slots = state.token.shape[0]
        local = slot - jax.lax.axis_index(AXIS) * local_slots
        mine = (local >= 0) & (local < local_slots)
        at = jnp.clip(local, 0, local_slots - 1)
        cache = tuple(
            (put_row(k, pk, at, mine), put_row(v, pv, at, mine))
            for (k, v), (pk, pv) in zip(state.cache, kv, strict=True)
        )
        rest = jax.tree.map(lambda d, s: put_row(d, s, at, mine), state._replace(cache=()), row)
        return rest._replace(cache=cache)

    def _decode_local(
        self, params: Any, state: DecodeState, active: jax.Array, tables: Any, window: int, rows: int
    ) -> tuple[DecodeState, sampling.SampleOutput]:
        """Up to `chunk_size` steps for this device's first `rows` slots (the others are left as they
        are); per-step outputs [chunk, rows], token -1 when done.

        The loop ends early once all these rows are done: the chunk dispatched while the host reads the
        one in which its last request finished then runs no step, instead of `chunk_size` for nothing.
        Live rows must stay below position `window` (done rows may be anywhere: a write beyond the
        window is dropped and their outputs are ignored).
        """
        full = state
        state = leading(state, rows, None if self.kernel_attention else window)
        state = state._replace(done=state.done | ~active[:rows])

        # Each device decodes its own rows: want_top is over them only, so there is no collective.
        last = self.config.n_ctx - 1
        _, state, outs = decode.decode(params, self.model, state, self.chunk_size, last, tables)
        return write_back(full, state), outs

    # ---- host side ----

    def init_state(self) -> DecodeState:
        """A fresh state: every slot empty (done)."""
        return self._init()

    def prefill_rows(self, bucket: int, score: bool = False) -> int:
        """The most prompts of this bucket that one prefill takes (see PREFILL_TOKENS); 1 when scoring."""
        return self._prefill_row_counts(bucket, score)[-1]

    def _prefill_row_counts(self, bucket: int, score: bool) -> tuple[int, ...]:
        # Compiled for 1, 4, 16, ... prompts and a full batch; a partial batch is padded to the next count.
        # (Padded to a full batch, a wave of 2-4 late requests would pay for a 16-row prefill.)
        return prefill_row_counts(bucket, self.slots, score, self.batch_invariant)

    def _prefill_program(self, score: bool, rows: int) -> Any:
        key = score, rows
        if key not in self._prefill:
            one = Prefilled(self.kv_sharding, self.replicated, self.replicated if score else None)
            self._prefill[key] = jax.jit(
                partial(self._prefill_impl, score=score),
                in_shardings=(self.params_shardings, self.replicated, self.replicated),
                out_shardings=(one,) * rows,
            )
        return self._prefill[key]

    def prefill(self, prompts: Sequence[Sequence[int]], bucket: int, score: bool) -> list[Prefilled]:
        """Prefills up to `prefill_rows(bucket, score)` prompts of at most `bucket` tokens in one call."""
        n = len(prompts)
        R = next(r for r in self._prefill_row_counts(bucket, score) if r >= n)
        tokens, lengths = np.zeros((R, bucket), np.int32), np.ones(R, np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)], lengths[i] = prompt, len(prompt)
        tokens, lengths = self.put((tokens, lengths), self.replicated)
        return list(self._prefill_program(score, R)(self.params, tokens, lengths)[:n])

    def put(self, tree: Any, sharding: NamedSharding) -> Any:
        """Host values onto the mesh; with several processes each places its own devices' parts (every
        process passes the same values, as gpt2jax/engine/multihost.py arranges)."""
        if not self.multiprocess:
            return jax.device_put(tree, sharding)
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i, a=np.asarray(a): a[i]),
            tree,
        )

    def insert(
        self, state: DecodeState, pre: Prefilled, slot: int, row: SlotRow
    ) -> tuple[DecodeState, sampling.SampleOutput]:
        """Puts a prefilled prompt into `slot` (donating `state`); returns the new state and the first token."""
        state, row = self.automata.place(state, row, slot)  # structured outputs: the row's first state
        # Host inputs are placed explicitly so that their shardings match the warm-up's compiled programs.
        row, slot = self.put((row, np.int32(slot)), self.replicated)
        row_state, first = self._first(pre.logits, row, self.automata.tables())
        state = self._insert(state, pre.cache, row_state, slot)
        if self._sync:
            jax.block_until_ready(state)
        return state, first

    def window_for(self, end: int) -> int:
        """The smallest compiled window holding positions < end."""
        return next((w for w in self.windows if w >= end), self.windows[-1])

    def fill_order(self) -> list[int]:
        """Slots in the order to fill them: the first slot of every data shard, then the second, ..."""
        L = self.local_slots
        return [d * L + i for i in range(L) for d in range(self.data_shards)]

    def rows_for(self, slots: Sequence[int]) -> int:
        """The fewest leading slots per device (a compiled count) that decode must run to cover `slots`."""
        need = 1 + max((s % self.local_slots for s in slots), default=0)
        return next(n for n in self.row_counts if n >= need)

    def decoded_slots(self, rows: int) -> list[int]:
        """The slot of each output column of a decode of `rows` leading slots per device."""
        L = self.local_slots
        return [d * L + i for d in range(self.data_shards) for i in range(rows)]

    def decode(
        self, state: DecodeState, active: np.ndarray, window: int | None = None, rows: int | None = None
    ) -> tuple[DecodeState, sampling.SampleOutput]:
        """One chunk of steps (donating `state`) for the first `rows` slots of each device (default all);
        rows with active False are ended first. Outputs [chunk, rows x devices] (see `decoded_slots`).

        window: a compiled window (see `window_for`) above every position a live row reaches in the chunk.
        """
        program = self._decode[window or self.windows[-1], rows or self.local_slots]
        return program(self.params, state, self.put(active, self.by_slot), self.automata.tables())

    def program_names(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> list[tuple]:
        """What `compile` compiles for these prefill buckets: ("init",), ("first",) (first-token sampling),
        per bucket ("prefill", bucket, score, prompts) and ("insert", bucket), then ("decode", window, rows)."""
        names: list[tuple] = [("init",), ("first",)]
        for b in buckets:
            names += [("prefill", b, s, R) for s in score for R in self._prefill_row_counts(b, s)]
            names.append(("insert", b))
        return names + [("decode", *key) for key in self._decode]

    def compile(
        self,
        buckets: Sequence[int],
        score: Sequence[bool] = (False,),
        *,
        only: Sequence[tuple] | None = None,
        threads: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Compiles prefill and insert for each bucket, first-token sampling and decode; runs nothing.

        only: of those programs (`program_names`), just these, in this order. The abstract arguments
        carry the real shardings: the compiled programs are cached under them. The programs are traced
        one after another, then compiled on `threads` threads (default one per core; XLA compiles outside
        the GIL). With one thread, each is compiled once traced, and a set `stop` ends before the next.
        """
        rep = self.replicated
        like = lambda tree, shardings: jax.tree.map(  # shardings: a prefix of tree
            lambda s, sub: jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), sub
            ),
            shardings,
            tree,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        ints = lambda *shape: like(jax.ShapeDtypeStruct(shape, jnp.int32), rep)
        row = make_row(1, -1, sampling.NEUTRAL.replace(max_tokens=1), self.config.n_vocab)
        row, params = like(row, rep), like(self.params, self.layout.param_shardings(self.params))
        state = like(jax.eval_shape(self._init_impl), self.state_shardings)
        logits = like(jax.ShapeDtypeStruct((self.config.n_vocab,), jnp.float32), rep)
        tables = like(self.automata.host.empty(), rep)
        row_state = cache(lambda: like(jax.eval_shape(self._first, logits, row, tables)[0], rep))

        def lower(name: tuple) -> Any:
            kind, *key = name
            if kind == "init":
                return self._init.lower()
            if kind == "first":
                return self._first.lower(logits, row, tables)
            if kind == "prefill":
                bucket, s, R = key
                return self._prefill_program(s, R).lower(params, ints(R, bucket), ints(R))
            if kind == "insert":
                pre = jax.eval_shape(self._prefill_program(False, 1), params, ints(1, key[0]), ints(1))[0]
                kv = like(pre.cache, self.kv_sharding)
                return self._insert.lower(state, kv, row_state(), like(np.int32(0), rep))
            active = like(np.zeros(self.slots, bool), self.by_slot)
            return self._decode[tuple(key)].lower(params, state, active, tables)

        names = self.program_names(buckets, score) if only is None else only
        threads = threads or os.cpu_count() or 1
        if threads == 1:
            for name in names:
                if stop is not None and stop.is_set():
                    return
                lower(name).compile()
            return
        lowered = [lower(name) for name in names]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda program: program.compile(), lowered))
