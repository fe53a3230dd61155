"""What an engine compiles before it is ready, and what it compiles afterwards on a background thread.

Warm-up compiles every program a request may need (SlotPrograms.program_names): prefill per row length
(prompts packed back to back) x scored or not (echo logprobs), insert per row length, decode per cache
window x leading rows; compiling them was most of a cold start (README, "Start-up time"). Starting the
engine needs one (its first state), and a lone request with a short prompt four more: a one-prompt
prefill, its insert, first-token sampling, and decode over the smallest window for the fewest rows. So a
server compiles those (`split`'s first part; prompts up to SHORT_PROMPT tokens), reports ready, and
compiles the others on one thread while it serves, the likeliest first, all but the scoring prefills.
A request that needs one not compiled yet compiles it when it comes (JAX's jit), which holds up the
requests beside it, once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from gpt2jax.engine.heap import release_memory

log = logging.getLogger("gpt2jax.engine.engine")

# Tokens: once the engine is ready, a lone request with a prompt up to this long (and prompt + max_tokens
# within the smallest decode window) needs no compiling.
SHORT_PROMPT = 64


def split(names: Sequence[tuple]) -> tuple[list[tuple], list[tuple]]:
    """The programs to compile before the engine is ready, and those to compile after, the likeliest
    needed first; the scoring prefills (echo with logprobs) are in neither: they compile on first use.

    names: SlotPrograms.program_names, ("init",), ("first",), ("prefill", bucket, score, prompts),
    ("insert", bucket), ("decode", window, rows)."""
    decodes = [n for n in names if n[0] == "decode"]
    window = min((w for _, w, _ in decodes), default=None)
    rows = min((r for _, w, r in decodes if w == window), default=None)
    fewest = {}  # (bucket, score) -> the fewest prompts a prefill of that bucket is compiled for
    for n in names:
        if n[0] == "prefill":
            fewest[n[1:3]] = min(fewest.get(n[1:3], n[3]), n[3])

    def first(n: tuple) -> bool:
        kind = n[0]
        if kind == "prefill":
            return n[1] <= SHORT_PROMPT and not n[2] and n[3] == fewest[n[1:3]]
        if kind == "insert":
            return n[1] <= SHORT_PROMPT
        if kind == "decode":
            return n[1:] == (window, rows)
        return True  # init, first-token sampling

    def likelihood(n: tuple) -> tuple:
        kind = n[0]
        if kind == "decode":  # several requests at once, then longer texts
            return (0 if n[1] == window else 2, n[1], n[2])
        if kind == "prefill":  # several short prompts at once, then longer prompts
            return (1 if n[1] <= SHORT_PROMPT else 2, n[1], n[3])
        return (2, n[1], 0)  # the insert of a longer prompt

    # Scoring a prompt (echo with logprobs) is rare: its prefill programs compile on first use, and a
    # server does not hold ~10 MB for each of them until then.
    later = (n for n in names if not first(n) and not (n[0] == "prefill" and n[2]))
    return [n for n in names if first(n)], sorted(later, key=likelihood)


class BackgroundCompile:
    """Compiles some of an engine's programs on one thread (SlotPrograms.compile's `only`), in order.

    `done` is set once all are compiled, or the work was stopped or failed (logged)."""

    def __init__(self, programs: Any, buckets: Sequence[int], score: Sequence[bool], names: list, model: str):
        self.model, self.count = model, len(names)
        self.done, self._stop = threading.Event(), threading.Event()
        work = partial(programs.compile, buckets, score, only=names, threads=1, stop=self._stop)
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"compile-{model}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        start = time.monotonic()
        try:
            seen = cache_counts()
            work()
            release_memory()
            if not self._stop.is_set():
                took = time.monotonic() - start
                log.info(
                    "%s: the other %d programs compiled in the background (%.1f s; %s)",
                    self.model,
                    self.count,
                    took,
                    cache_note(seen),
                )
        except Exception:  # the programs still compile on first use
            log.exception("%s: compiling in the background failed", self.model)
        finally:
            self.done.set()

    def stop(self, timeout: float | None = None) -> None:
        """Ends the work after the program being compiled (XLA cannot be interrupted) and waits for it."""
        self._stop.set()
        self._thread.join(timeout)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Turns on JAX's persistent compilation cache so a restarted server skips most compiling.

    path: default $JAX_CACHE_DIR, else ~/.cache/gpt2jax/jax. Returns the folder used.
    """
    import jax
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
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return folder


# Programs served by the persistent compilation cache ("hits") and compiled then written to it ("misses",
# JAX's name), counted from JAX's monitoring events once the cache is enabled.
_CACHE_EVENTS = {
    "/jax/compilation_cache/cache_hits": "loaded",
    "/jax/compilation_cache/cache_misses": "compiled",
}
_counts: Counter = Counter()
_listening = False


def _count(event: str, **_: object) -> None:
    if event in _CACHE_EVENTS:
        _counts[_CACHE_EVENTS[event]] += 1


def cache_counts() -> Counter:
    """Programs loaded from / compiled and written to the persistent cache so far in this process."""
    return Counter(_counts)


def cache_note(since: Counter) -> str:
    """What the compile cache did since `since` (a `cache_counts()`), for a log line."""
    if not _listening:
        return "no compile cache"
    now = cache_counts()
    return f"compile cache: {now['loaded'] - since['loaded']} loaded, {now['compiled'] - since['compiled']} compiled"
