"""Device side of the batching engine: the slot state and the jitted programs that move it.

A request goes prefill (its prompt packed with others back to back into one row, padded to a length
bucket) -> insert (its part of the row's KV written into one decode slot, the slot index and the prompt's
offset traced, its first token sampled with the slot's own settings) -> decode (a
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
SPMD partitioner splits the model over the "model" axis (two all-reduces per layer). Prefill (one row)
is replicated over "data" and split over "model". One code path serves 1 device, 8, and meshes that span
several processes (gpt2jax/engine/multihost.py then makes the outputs readable by the first process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
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
from gpt2jax.engine.compiled import CompiledPrograms
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.shapes import PREFILL_TOKENS, decode_row_counts, decode_windows, prefill_rows
from gpt2jax.engine.slots import Prefilled, SlotRow, empty_state, insert_row, leading, make_row, write_back
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
        self.prefill_tokens = PREFILL_TOKENS
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
        self._steps = rep if self.multiprocess else NamedSharding(self.mesh, P(None, AXIS))
        # XLA's CPU runtime can deadlock in a collective when many multi-device programs are in flight
        # (seen here from ~40): with collectives on the CPU, insert waits for its result (decode is
        # paced by the worker reading the previous chunk), which keeps a handful in flight.
        self._sync = self.mesh.devices.flat[0].platform == "cpu" and (layout.model > 1 or self.multiprocess)
        self.params_shardings = layout.param_shardings(params)
        # Shardings as pytree prefixes: a KV cache splits its heads over "model" (and slots over "data").
        self.kv_sharding = layout.cache_sharding(split_rows=False)
        self.state_shardings = state_s = DecodeState(*[rows] * len(DecodeState._fields))._replace(
            cache=layout.cache_sharding(split_rows=True)
        )
        self.automata = DeviceAutomata(config.n_vocab, slots, self.put, rep, rows, state_s)  # structured
        self._decode_keys = [(window, n) for window in self.windows for n in self.row_counts]
        self._programs = CompiledPrograms(self.lowered)

    def _jit(self, name: tuple) -> Any:
        """A jax.jit of the named program (`program_names`), made for lowering that program once."""
        kind, *key = name
        rep, state_s, manual = self.replicated, self.state_shardings, frozenset({AXIS})
        if kind == "init":
            return jax.jit(self._init_impl, out_shardings=state_s)
        if kind == "first":
            return jax.jit(self._first_impl, in_shardings=(rep, rep, rep), out_shardings=rep)
        if kind == "prefill":
            length, score = key[:2]
            logits = (rep,) * self.prefill_rows(length, score)
            return jax.jit(
                partial(self._prefill_impl, score=score),
                in_shardings=(self.params_shardings, rep, rep, rep),
                out_shardings=(self.kv_sharding, logits, rep if score else None),
            )
        if kind == "insert":  # shard_map is manual over "data"; "model" is left to GSPMD
            insert = jax.shard_map(
                self._insert_local,
                mesh=self.mesh,
                in_specs=(P(AXIS), P(), P(), P(), P()),
                out_specs=P(AXIS),
                axis_names=manual,
            )
            in_shardings = (state_s, self.kv_sharding, rep, rep, rep)
            return jax.jit(insert, in_shardings=in_shardings, out_shardings=state_s, donate_argnums=0)
        window, rows = key[:2]
        program = jax.shard_map(
            partial(self._decode_local, window=window, rows=rows),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(AXIS), P(), P()),
            out_specs=(P(AXIS), P(None, AXIS)),
            axis_names=manual,
            check_vma=False,  # sampling's lax.conds mix per-device and constant values
        )
        return jax.jit(
            program,
            in_shardings=(self.params_shardings, state_s, self.by_slot, rep, rep),
            out_shardings=(state_s, self._steps),
            donate_argnums=1,
            compiler_options=decode.DECODE_COMPILER_OPTIONS,
        )

    # ---- jitted bodies ----

    def _init_impl(self) -> DecodeState:
        return empty_state(self.config, self.slots, self.kv_dtype, self.layout.qkv_groups)

    def _prefill_impl(
        self, params: Any, tokens: jax.Array, positions: jax.Array, last: jax.Array, score: bool
    ) -> tuple[KVCache, tuple[jax.Array, ...], Any]:
        """One packed row: tokens, positions [1, T] i32 (prompts back to back, each from position 0),
        last [R] i32 each prompt's last token. Returns the row's cache, each prompt's logits [V] f32 as
        its own output (so insert and first-token sampling compile once, whatever R), and with `score`
        the prompt's scores (one prompt in the row).

        Only the last tokens' logits are computed unless the prompt is scored (echo logprobs).
        """
        cache = init_cache(self.config, 1, tokens.shape[1], self.kv_dtype, self.layout.qkv_groups)
        cache = jax.lax.with_sharding_constraint(cache, self.layout.cache_sharding(split_rows=False))
        logits, cache, scores = decode.prefill(
            params, self.model, tokens, positions, last[None], cache, score
        )
        return cache, tuple(logits[0, r] for r in range(last.shape[0])), scores

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
        self, state: DecodeState, kv: KVCache, row: DecodeState, slot: jax.Array, offset: jax.Array
    ) -> DecodeState:
        """Runs on each device with its own slots; only the device holding `slot` changes anything
        (slots.insert_row: kv, a prefill row's cache, the prompt's entries from `offset`)."""
        local_slots = state.token.shape[0]
        local = slot - jax.lax.axis_index(AXIS) * local_slots
        mine = (local >= 0) & (local < local_slots)
        at = jnp.clip(local, 0, local_slots - 1)
        put = lambda state: insert_row(state, kv, row, at, offset)
        return jax.lax.cond(mine, put, lambda state: state, state)

    def _decode_local(
        self,
        params: Any,
        state: DecodeState,
        active: jax.Array,
        tables: Any,
        steps: jax.Array,
        window: int,
        rows: int,
    ) -> tuple[DecodeState, sampling.SampleOutput]:
        """Up to `steps` (<= chunk_size) steps for this device's first `rows` slots (the others are left
        as they are); per-step outputs [chunk, rows], token -1 when done.

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
        _, state, outs = decode.decode(params, self.model, state, self.chunk_size, last, tables, steps)
        return write_back(full, state), outs

    # ---- host side ----

    def init_state(self) -> DecodeState:
        """A fresh state: every slot empty (done)."""
        return self._program("init")()

    def prefill_rows(self, length: int, score: bool = False) -> int:
        """The most prompts one prefill row of `length` tokens takes (gpt2jax/engine/shapes.py)."""
        return prefill_rows(length, self.slots, score, self.batch_invariant)

    def prefill(self, prompts: Sequence[Sequence[int]], length: int, score: bool) -> list[Prefilled]:
        """Prefills up to `prefill_rows(length, score)` prompts of `length` tokens in all, packed back to
        back in one row, in one call."""
        R = self.prefill_rows(length, score)
        if len(prompts) > R or sum(map(len, prompts)) > length:
            raise ValueError(f"{len(prompts)} prompts do not fit a prefill row of {length} tokens")
        tokens, positions = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
        last, offsets, at = np.zeros(R, np.int32), [], 0
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            tokens[0, at : at + n], positions[0, at : at + n] = prompt, np.arange(n)
            offsets.append(at)
            last[i], at = at + n - 1, at + n
        args = self.put((tokens, positions, last), self.replicated)
        cache, logits, scores = self._program("prefill", length, score, R)(self.params, *args)
        return [Prefilled(cache, logits[i], scores, offsets[i]) for i in range(len(prompts))]

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
        row, slot, offset = self.put((row, np.int32(slot), np.int32(pre.offset)), self.replicated)
        row_state, first = self._program("first")(pre.logits, row, self.automata.tables())
        state = self._program("insert", pre.cache[0][0].shape[2])(state, pre.cache, row_state, slot, offset)
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
        self,
        state: DecodeState,
        active: np.ndarray,
        window: int | None = None,
        rows: int | None = None,
        steps: int | None = None,
    ) -> tuple[DecodeState, sampling.SampleOutput]:
        """One chunk of `steps` steps (default and at most chunk_size; donating `state`) for the first
        `rows` slots of each device (default all); rows with active False are ended first. Outputs
        [chunk, rows x devices] (see `decoded_slots`; token -1 for the steps not run).

        window: a compiled window (see `window_for`) above every position a live row reaches in the chunk.
        """
        program = self._program("decode", window or self.windows[-1], rows or self.local_slots)
        steps = self.put(np.int32(steps or self.chunk_size), self.replicated)
        return program(self.params, state, self.put(active, self.by_slot), self.automata.tables(), steps)

    def program_names(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> list[tuple]:
        """What `compile` compiles for these prefill row lengths: ("init",), ("first",) (first-token
        sampling), per length ("prefill", length, score, prompts) and ("insert", length), then ("decode",
        window, rows)."""
        names: list[tuple] = [("init",), ("first",)]
        for b in buckets:
            names += [("prefill", b, s, self.prefill_rows(b, s)) for s in score]
            names.append(("insert", b))
        return names + [("decode", *key) for key in self._decode_keys]

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
        only: of those programs (`program_names`), just these, in this order; threads (default one per
        core) and stop: CompiledPrograms.compile's."""
        names = self.program_names(buckets, score) if only is None else only
        keys = [self._key(name) for name in names]
        self._programs.compile(keys, threads or os.cpu_count() or 1, stop)

    def _key(self, name: tuple) -> tuple:
        """A program's name (`program_names`), for first-token sampling and decode with the structured-
        output tables' current capacity (their shapes: those programs recompile when the tables grow)."""
        return (*name, self.automata.host.capacity) if name[0] in ("first", "decode") else name

    def _program(self, *name: Any) -> jax.stages.Compiled:
        """The compiled program `name` (`program_names`), compiled now if it is not yet."""
        return self._programs[self._key(name)]

    def lowered(self, names: Sequence[tuple]) -> Iterator[jax.stages.Lowered]:
        """The named programs (`program_names`, or `_key`s) traced and lowered, one at a time as iterated;
        runs nothing. `.compile().memory_analysis()` of one gives its temporary bytes (tests check those).

        Each is lowered from a jit of its own (`_jit`), dropped after, with abstract arguments that carry
        the shardings of the values a call passes."""
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
        row, params = like(row, rep), like(self.params, self.params_shardings)
        state = like(jax.eval_shape(self._init_impl), self.state_shardings)
        logits = like(jax.ShapeDtypeStruct((self.config.n_vocab,), jnp.float32), rep)
        tables = lambda capacity: like(self.automata.host.empty(capacity), rep)
        row_state = cache(lambda: like(jax.eval_shape(self._first_impl, logits, row, tables(None))[0], rep))

        def lower(name: tuple) -> jax.stages.Lowered:
            kind, *key = name
            program = self._jit(name)
            if kind == "init":
                return program.lower()
            if kind == "first":
                return program.lower(logits, row, tables(key[0] if key else None))
            if kind == "prefill":
                length, _, R = key
                return program.lower(params, ints(1, length), ints(1, length), ints(R))
            if kind == "insert":
                T = key[0]
                kv = jax.eval_shape(
                    lambda: init_cache(self.config, 1, T, self.kv_dtype, self.layout.qkv_groups)
                )
                at = like(np.int32(0), rep)
                return program.lower(state, like(kv, self.kv_sharding), row_state(), at, at)
            active = like(np.zeros(self.slots, bool), self.by_slot)
            capacity = key[2] if len(key) > 2 else None
            return program.lower(params, state, active, tables(capacity), like(np.int32(0), rep))

        return (lower(name) for name in names)
