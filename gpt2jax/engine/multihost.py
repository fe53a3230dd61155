"""Serving from several processes (hosts) as one SPMD program: one HTTP front on process 0.

JAX is multi-controller: with a mesh spanning several processes, every process must dispatch the same
jitted programs, in the same order, with the same host inputs. So every process loads the same models
onto one global mesh and builds the same engines; process 0 also serves HTTP, and its engines' worker
threads decide what runs (which request goes into which slot, with which settings; which slots are still
live; when a slot is released). Before each device call, process 0 broadcasts the call to the others
(LeaderPrograms, over gpt2jax/engine/wire.py's Channel), and the others, in `follow`, make the same call
on their own copy of the engine state. Nothing else crosses between the processes: no home-made RPC.
The wire format, the heartbeat and the start-up barrier: gpt2jax/engine/wire.py.

Settings: gpt2jax/cluster.py (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID, DISTRIBUTED,
HEARTBEAT_TIMEOUT, STARTUP_TIMEOUT).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpt2jax.engine import wire
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.wire import Channel

log = logging.getLogger("gpt2jax.engine.multihost")


# ---- process 0: the engines' device calls, broadcast first ----


class LeaderPrograms(DevicePrograms):
    """Stands in for an engine's SlotPrograms on process 0: broadcasts each call that changes the
    device state (init, prefill, insert, decode), then makes it; the rest are the inner programs'."""

    def __init__(self, inner: DevicePrograms, index: int, channel: Channel) -> None:
        self.inner, self.index, self.channel = inner, index, channel
        self._prefilled: list[Any] = []  # the last prefill's results: insert names one by its index

    def __getattr__(self, name: str) -> Any:  # the attributes: config, slots, local_slots, windows, ...
        return getattr(self.inner, name)

    def prefill_rows(self, length: int, score: bool = False) -> int:
        return self.inner.prefill_rows(length, score)

    def window_for(self, end: int) -> int:
        return self.inner.window_for(end)

    def fill_order(self) -> list[int]:
        return self.inner.fill_order()

    def rows_for(self, slots: Sequence[int]) -> int:
        return self.inner.rows_for(slots)

    def decoded_slots(self, rows: int) -> list[int]:
        return self.inner.decoded_slots(rows)

    def program_names(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> list[tuple]:
        return self.inner.program_names(buckets, score)

    def compile(self, buckets: Sequence[int], score: Sequence[bool] = (False,), **options: Any) -> None:
        self.inner.compile(buckets, score, **options)  # compiling runs nothing: no broadcast

    def init_state(self) -> Any:
        with self.channel.lock:
            self.channel.send(wire.INIT, self.index)
            return self.inner.init_state()

    def prefill(self, prompts: Sequence[Sequence[int]], length: int, score: bool) -> Any:
        with self.channel.lock:
            self.channel.send(wire.PREFILL, self.index, length, int(score), wire.encode_prompts(prompts))
            self._prefilled = self.inner.prefill(prompts, length, score)
            return self._prefilled

    def insert(self, state: Any, pre: Any, slot: int, row: Any) -> Any:
        which = next(i for i, p in enumerate(self._prefilled) if p is pre)
        with self.channel.lock:
            self.channel.send(wire.INSERT, self.index, slot, which, wire.encode_row(row))
            return self.inner.insert(state, pre, slot, row)

    def decode(
        self,
        state: Any,
        active: np.ndarray,
        window: int | None = None,
        rows: int | None = None,
        steps: int | None = None,
    ) -> Any:
        window = window or self.inner.windows[-1]
        rows = rows or self.inner.local_slots
        steps = steps or self.inner.chunk_size
        with self.channel.lock:
            payload = np.asarray(active, np.bool_).tobytes()
            self.channel.send(wire.DECODE, self.index, window, rows, payload, steps)
            return self.inner.decode(state, active, window, rows, steps)


def lead(engine: Any, index: int, channel: Channel) -> Any:
    """Makes a BatchEngine's device calls go through the channel (process 0)."""
    engine.programs = engine.worker.programs = LeaderPrograms(engine.programs, index, channel)
    return engine


# ---- the other processes ----


def follow(programs: Sequence[Any], channel: Channel) -> None:
    """Makes process 0's calls on this process's SlotPrograms (one per engine, in its order) until STOP.

    A call that fails here failed on process 0 too (same program, same inputs): it is logged, and
    process 0's recovery (a fresh state) arrives as the next calls.
    """
    states: list[Any] = [None] * len(programs)
    prefilled: list[Any] = [None] * len(programs)
    while True:
        op, i, a, b, c, payload = channel.receive()
        if op == wire.STOP:
            log.info("process 0 stopped: leaving")
            return
        if op == wire.NOOP:
            continue
        p = programs[i]
        try:
            if op == wire.INIT:
                states[i] = p.init_state()
            elif op == wire.PREFILL:
                prefilled[i] = p.prefill(wire.decode_prompts(payload), a, bool(b))
            elif op == wire.INSERT:
                row = wire.decode_row(payload, p.config.n_vocab)
                states[i], _ = p.insert(states[i], prefilled[i][b], a, row)
            elif op == wire.DECODE:
                states[i], _ = p.decode(states[i], np.frombuffer(payload, np.bool_).copy(), a, b, c)
            else:
                raise ValueError(f"unknown call {op}")
        except Exception:
            log.exception("engine %d: call %d failed (as it did on process 0)", i, op)
