"""The wire between the processes of one cluster: process 0 broadcasts each device call, the others receive it.

A call is two broadcasts with `jax.experimental.multihost_utils.broadcast_one_to_all` (a JAX collective: an
all-reduce over the mesh where only process 0 contributes): a fixed int32 header (what to call, for which
engine, two small arguments, and how many payload bytes follow), then the payload (prompt tokens, a slot's
settings, the live-slot mask) padded to a power of two so that few broadcast shapes compile. The calls'
host inputs are encoded here too (encode_prompts, encode_row and their inverses); what the calls mean,
gpt2jax/engine/multihost.py.

While process 0 has nothing to run, it broadcasts a no-op every HEARTBEAT_SECONDS, so that the others
never wait in a collective for long; on shutdown it broadcasts a stop, and the others exit.

Start-up: the first collective between processes sets up their Gloo connection, and Gloo gives the
others a fixed 30 s to arrive (not configurable from JAX): a process still loading or compiling its models
then makes it fail. So every process first loads and compiles its models (warm-up runs nothing), then
they meet at a barrier of JAX's coordination service (waiting up to STARTUP_TIMEOUT), and only then does
the first broadcast run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpt2jax.cluster import Cluster

log = logging.getLogger("gpt2jax.engine.wire")

HEARTBEAT_SECONDS = 5.0
STARTUP_BARRIER = "gpt2jax-serving-warm"  # every process reaches it once its models are compiled
_HEADER = 8  # int32s: op, engine, a, b, nbytes, c, then unused
NOOP, STOP, INIT, PREFILL, INSERT, DECODE = range(6)
_MIN_PAYLOAD = 256


# ---- the broadcast channel ----


class Channel:
    """Process 0 sends calls, the others receive them; one lock orders every send and the call it
    precedes, so the processes dispatch their programs in one order even with several engines.

    Before its first broadcast each process waits at the start-up barrier (`meet`; default: JAX's
    coordination service, up to `startup_timeout` seconds), so that the first collective finds the
    others there (see the module's docstring). Tests pass their own `broadcast` and `meet`.
    """

    def __init__(
        self,
        broadcast: Callable[[Any], Any] | None = None,
        is_leader: bool | None = None,
        startup_timeout: int = Cluster.startup_timeout,
        meet: Callable[[], None] | None = None,
    ) -> None:
        import jax
        from jax.experimental import multihost_utils

        self.broadcast = broadcast or multihost_utils.broadcast_one_to_all
        self.is_leader = jax.process_index() == 0 if is_leader is None else is_leader
        self.processes = jax.process_count()
        if meet is None and broadcast is None:
            meet = lambda: _wait_for_all(STARTUP_BARRIER, startup_timeout)
        self._meet, self._met = meet, meet is None
        self.lock = threading.RLock()
        self.last_sent = time.monotonic()
        self.stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _meet_once(self) -> None:
        with self.lock:
            if not self._met:
                log.info("waiting for every process to be warm (the start-up barrier)")
                self._meet()
                self._met = True
                log.info("every process is warm")

    def send(
        self, op: int, engine: int = 0, a: int = 0, b: int = 0, payload: bytes = b"", c: int = 0
    ) -> None:
        """(Leader) broadcasts one call; hold `lock` across this and the call itself."""
        header = np.zeros(_HEADER, np.int32)
        header[:6] = op, engine, a, b, len(payload), c
        with self.lock:
            self._meet_once()
            self.broadcast(header)
            if payload:
                buf = np.zeros(_padded(len(payload)), np.uint8)
                buf[: len(payload)] = np.frombuffer(payload, np.uint8)
                self.broadcast(buf)
            self.last_sent = time.monotonic()

    def receive(self) -> tuple[int, int, int, int, int, bytes]:
        """(Follower) the next call: op, engine, a, b, c, payload."""
        self._meet_once()
        header = np.asarray(self.broadcast(np.zeros(_HEADER, np.int32)))
        op, engine, a, b, nbytes, c = (int(x) for x in header[:6])
        payload = b""
        if nbytes:
            payload = np.asarray(self.broadcast(np.zeros(_padded(nbytes), np.uint8)))[:nbytes].tobytes()
        return op, engine, a, b, c, payload

    def start_heartbeat(self, every: float = HEARTBEAT_SECONDS) -> None:
        """(Leader) a no-op whenever nothing was sent for `every` seconds."""

        def beat() -> None:
            while not self.stopped.wait(every / 2):
                with self.lock:
                    if not self.stopped.is_set() and time.monotonic() - self.last_sent >= every:
                        self.send(NOOP)

        self._heartbeat = threading.Thread(target=beat, name="multihost-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        """(Leader) tells the others to exit; idempotent."""
        with self.lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            self.send(STOP)
        if self._heartbeat is not None:
            self._heartbeat.join()


def _wait_for_all(barrier: str, timeout: int) -> None:
    """Blocks until every process of the cluster has called this with the same barrier name."""
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(barrier, timeout * 1000)


def _padded(n: int) -> int:
    size = _MIN_PAYLOAD
    while size < n:
        size *= 2
    return size


# ---- encoding the calls' host inputs ----


def encode_prompts(prompts: Sequence[Sequence[int]]) -> bytes:
    """Prompts as int32s: their count, their lengths, then their tokens."""
    lengths = [len(p) for p in prompts]
    flat = [t for p in prompts for t in p]
    return np.asarray([len(prompts), *lengths, *flat], np.int32).tobytes()


def decode_prompts(data: bytes) -> list[list[int]]:
    """The prompts that encode_prompts encoded."""
    values = np.frombuffer(data, np.int32)
    n, out, at = int(values[0]), [], 1 + int(values[0])
    for length in values[1 : 1 + n]:
        out.append(values[at : at + length].tolist())
        at += int(length)
    return out


def encode_row(row: Any) -> bytes:
    """A SlotRow as bytes: its leaves' raw bytes, the [1, V] logit_bias as its nonzero entries."""
    bias = np.asarray(row.params.logit_bias)[0]
    where = np.flatnonzero(bias).astype(np.int32)
    rest = row._replace(params=row.params._replace(logit_bias=np.zeros(0, np.float32)))
    parts = [np.ascontiguousarray(leaf).tobytes() for leaf in _leaves(rest)]
    parts += [np.int32(len(where)).tobytes(), where.tobytes(), bias[where].astype(np.float32).tobytes()]
    return b"".join(parts)


def decode_row(data: bytes, n_vocab: int) -> Any:
    """The SlotRow that encode_row encoded."""
    from gpt2jax.engine.slots import make_row
    from gpt2jax.sampling import NEUTRAL

    template = make_row(1, -1, NEUTRAL.replace(max_tokens=1), n_vocab)
    rest = template._replace(params=template.params._replace(logit_bias=np.zeros(0, np.float32)))
    leaves, offset = [], 0
    for leaf in _leaves(rest):
        leaf = np.asarray(leaf)
        leaves.append(np.frombuffer(data, leaf.dtype, leaf.size, offset).reshape(leaf.shape).copy())
        offset += leaf.nbytes
    (count,) = np.frombuffer(data, np.int32, 1, offset)
    where = np.frombuffer(data, np.int32, count, offset + 4)
    values = np.frombuffer(data, np.float32, count, offset + 4 + 4 * count)
    bias = np.zeros((1, n_vocab), np.float32)
    bias[0, where] = values
    row = _unflatten(rest, leaves)
    return row._replace(params=row.params._replace(logit_bias=bias))


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def _unflatten(like: Any, leaves: Sequence[Any]) -> Any:
    import jax

    return jax.tree.unflatten(jax.tree.structure(like), leaves)
