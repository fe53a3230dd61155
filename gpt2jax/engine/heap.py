"""The process heap: glibc's malloc keeps what it frees for reuse, and a server holds it resident.

Compiling frees ~100 MB of heap on a 124M model, and a burst of requests ~60 MB (XLA's temporaries and
host copies; README, "Memory"); both are handed back to the system (`release_memory`), after the warm-up
and whenever the engine's worker goes idle. Each call is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes


def limit_heap_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas (M_ARENA_MAX; default 8 per core), as MALLOC_ARENA_MAX does. Call it
    before threads start: XLA's compile and intra-op threads each took an arena, and freed memory spread
    over them stayed resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX, malloc.h


def release_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim: a few ms for a 124M server)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
