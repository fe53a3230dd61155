"""An engine's compiled programs, by name: each compiled once (ahead, at warm-up, or on first use), then
called directly as an XLA executable (`jax.stages.Compiled`).

Not `jax.jit` wrappers kept for the engine's life: a jit wrapper keeps every trace and lowering it made
(jaxprs, MLIR modules) for as long as it lives, beside the executable it calls; here each program is lowered
from a jit made for that program alone, which is dropped once the program is compiled (README, "Memory":
the resident memory this saves).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax

Lower = Callable[[Sequence[Hashable]], Iterator[jax.stages.Lowered]]


class CompiledPrograms:
    """Compiled programs by key, each compiled at most once, however many threads ask for it.

    lower(keys): the programs traced and lowered, one at a time as iterated (SlotPrograms.lowered).
    """

    def __init__(self, lower: Lower) -> None:
        self._lower = lower
        self._programs: dict[Hashable, jax.stages.Compiled] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._programs

    def __getitem__(self, key: Hashable) -> jax.stages.Compiled:
        """The program, compiled now if it is not yet (a thread compiling it already is waited for)."""
        program = self._programs.get(key)
        return program if program is not None else self._compile(key)

    def _compile(self, key: Hashable, lowered: jax.stages.Lowered | None = None) -> jax.stages.Compiled:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one compile per program; other programs compile meanwhile (XLA releases the GIL)
            if key not in self._programs:
                lowered = lowered if lowered is not None else next(self._lower([key]))
                self._programs[key] = lowered.compile()
            return self._programs[key]

    def compile(
        self, keys: Sequence[Hashable], threads: int = 1, stop: threading.Event | None = None
    ) -> None:
        """Compiles those of `keys` not compiled yet, in order; runs nothing.

        threads > 1: all are traced first (tracing holds the GIL), then compiled on `threads` threads.
        threads == 1: each is compiled once traced, and a set `stop` ends the work before the next."""
        todo = [key for key in dict.fromkeys(keys) if key not in self._programs]
        if threads == 1:
            for key in todo:
                if stop is not None and stop.is_set():
                    return
                self[key]
            return
        lowered = list(zip(todo, self._lower(todo), strict=True))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda pair: self._compile(*pair), lowered))
