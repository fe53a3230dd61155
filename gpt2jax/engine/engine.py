"""The continuous-batching engine: one per served model, implementing `gpt2jax.engine.api.Engine`.

A fixed number of decode slots share one preallocated KV cache. A worker thread loops: admit waiting
requests into free slots (prefill, insert), dispatch one decode chunk for all slots, then read the previous
chunk's tokens while the new one runs (JAX dispatches asynchronously), turn them into events and free the
slots of finished choices. The asyncio side only enqueues requests and awaits events, so the event loop
serving HTTP never waits on the device.

    engine = BatchEngine.from_model(gpt2jax.load("checkpoints/124M"))
    engine.warmup(); engine.start()
    async for event in engine.generate(GenerationRequest.of((464, 2068), max_tokens=32)): ...
    engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from gpt2jax import packed
from gpt2jax.config import GPT2Config
from gpt2jax.constraint import Automaton, Constraint, compile_automaton
from gpt2jax.engine.api import EngineError, Event, GenerationRequest
from gpt2jax.engine.device import SlotPrograms
from gpt2jax.engine.heap import release_memory
from gpt2jax.engine.job import END, Job
from gpt2jax.engine.metrics import EngineMetrics, publish, unpublish
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.warmup import (
    BackgroundCompile,
    cache_counts,
    cache_note,
    enable_compilation_cache,
    split,
)
from gpt2jax.engine.worker import EngineFault, SlotWorker
from gpt2jax.kv_cache import kv_cache_dtype as kv_cache_dtype_for
from gpt2jax.sampler import MIN_BUCKET, bucket
from gpt2jax.sharding import Layout
from gpt2jax.tokenizer import GPT2Tokenizer


class LoadedModel(Protocol):
    """What `BatchEngine.from_model` takes of a gpt2jax.lm.LanguageModel (which builds its engine here)."""

    config: GPT2Config
    params: Any
    tokenizer: GPT2Tokenizer
    dtype: Any
    kv_dtype: Any  # the KV cache's dtype (gpt2jax.kv_cache)
    name: str
    layout: Layout | None


log = logging.getLogger(__name__)

__all__ = ["BatchEngine", "EngineFault", "default_chunk_size", "default_slots", "enable_compilation_cache"]

# Defaults chosen with benchmarks/bench_engine.py --sweep (figures: benchmarks/README.md, "Engine defaults"):
# a short chunk pays the per-call cost too often, a long one adds admission latency; more slots give
# throughput when all are busy but slow every stream and grow the KV cache.
CPU_CHUNK_SIZE = 8
ACCELERATOR_CHUNK_SIZE = 16  # unmeasured here: steps of a few ms want the per-call cost amortised more
CPU_SLOTS = 16  # all CPU "devices" of a host share its cores: this many slots in all, not per device
ACCELERATOR_SLOTS = 64  # per GPU/TPU, unmeasured here: a batch that keeps a big matmul unit busy
KV_MEMORY_FRACTION = 0.3  # at most this share of a device's memory for the slots' KV cache by default


def default_chunk_size(devices: Sequence[jax.Device]) -> int:
    return CPU_CHUNK_SIZE if devices[0].platform == "cpu" else ACCELERATOR_CHUNK_SIZE


def default_slots(config: GPT2Config, dtype: Any, devices: Sequence[jax.Device], model_axis: int = 1) -> int:
    """Slots for these devices: CPU_SLOTS on a CPU host, ACCELERATOR_SLOTS per accelerator, fewer if their
    KV cache would take more than KV_MEMORY_FRACTION of a device's memory; a multiple of the device count.

    dtype: the KV cache's. devices: those of the data axis; each slot's cache is split over `model_axis`
    devices."""
    n = len(devices)
    per_device = -(-CPU_SLOTS // n) if devices[0].platform == "cpu" else ACCELERATOR_SLOTS
    slot_bytes = 2 * config.n_layer * config.n_ctx * config.n_embd * jnp.dtype(dtype).itemsize // model_axis
    memory = _device_memory(devices[0])
    if memory and devices[0].platform == "cpu":
        memory //= n * model_axis  # host "devices" share the host's memory
    if memory:
        per_device = max(1, min(per_device, int(memory * KV_MEMORY_FRACTION // slot_bytes)))
    return per_device * n


def _device_memory(device: jax.Device) -> int | None:
    try:
        stats = device.memory_stats()
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # not every backend reports memory
        pass
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


class BatchEngine:
    """Continuous batching over a fixed set of decode slots, for one model.

    slots: decode slots (default: `default_slots`), a multiple of the device count. chunk_size: decode
    steps per device call (default: `default_chunk_size`). max_queue: requests that may wait for slots; beyond it new ones are refused
    with EngineOverloaded, as is one that waited more than queue_timeout seconds. devices: default all
    local devices; slots are sharded over them. layout: a gpt2jax.sharding.Layout whose mesh the params
    were placed on (from_model passes the model's): slots split over its data axis, the model over its
    model axis; then `devices` is not used. min_window: the shortest KV-cache window that decode is
    compiled for (windows double up to n_ctx; each chunk uses the smallest that holds its live rows).
    kv_cache_dtype: the KV cache's dtype, a name ("auto", "float32", "bfloat16") or a dtype; default
    (None, "auto"): bf16 for bf16 activations, else `dtype` (gpt2jax/kv_cache.py). bf16 halves the cache.
    batch_invariant: every decode runs all slots over the whole context and every prefill one prompt, so
    that a request's tokens and logprobs do not depend on what runs beside it (at a cost: README, "Seeds
    and batch invariance"; gpt2jax/engine/shapes.py).
    programs: device programs to drive instead of building SlotPrograms (e.g. tests/fake_device.py's);
    their slots and chunk size are the engine's, and params, dtype, devices, min_window, layout and
    batch_invariant are not used.
    `programs` (the compiled device side) and `worker` (the thread and slot table) are exposed for tests.
    """

    def __init__(
        self,
        config: GPT2Config,
        params: Any,
        tokenizer: GPT2Tokenizer,
        *,
        dtype: Any = jnp.float32,
        name: str = "gpt2",
        slots: int | None = None,
        chunk_size: int | None = None,
        max_queue: int = 64,
        queue_timeout: float = 30.0,
        devices: Sequence[jax.Device] | None = None,
        min_window: int = 128,
        layout: Layout | None = None,
        batch_invariant: bool = False,
        programs: DevicePrograms | None = None,
        kv_cache_dtype: Any = None,
    ) -> None:
        if programs is not None:
            slots, chunk_size = programs.slots, programs.chunk_size
        if layout is not None:  # slots split over the data axis: size them by its devices
            devices = list(layout.mesh.devices[:, 0])
        devices = list(devices if devices is not None else jax.local_devices())
        self.name = name
        self.config = config
        self.n_ctx = config.n_ctx
        self.tokenizer = tokenizer
        self.kv_dtype = kv = kv_cache_dtype_for(kv_cache_dtype, dtype, packed.weights_dtype(params))
        self.slots = slots or default_slots(config, kv, devices, layout.model if layout else 1)
        self.chunk_size = chunk_size or default_chunk_size(devices)
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.buckets = tuple(_powers_of_two(config.n_ctx))  # prefill lengths
        self.metrics = EngineMetrics(lambda: self.queue_length, lambda: self.busy_slots, self.slots)
        self.programs = programs or SlotPrograms(
            config, params, dtype, self.slots, self.chunk_size, devices, min_window, layout, batch_invariant,
            kv_dtype=kv,
        )  # fmt: skip
        self.worker = SlotWorker(self, self.programs)
        self.compiling: BackgroundCompile | None = None  # warmup(background=True)'s thread

    @classmethod
    def from_model(cls, model: LoadedModel, **options: Any) -> BatchEngine:
        """An engine for a loaded LanguageModel; options as for the constructor."""
        options.setdefault("name", model.name or "gpt2")
        options.setdefault("layout", model.layout)  # a model loaded onto a mesh is served on it
        options.setdefault("kv_cache_dtype", model.kv_dtype)
        return cls(model.config, model.params, model.tokenizer, dtype=model.dtype, **options)

    # ---- views ----

    @property
    def queue_length(self) -> int:
        return len(self.worker.waiting)

    @property
    def busy_slots(self) -> int:
        return self.worker.busy

    @property
    def running(self) -> bool:
        return self.worker.running

    # ---- lifecycle ----

    def warmup(
        self, buckets: Sequence[int] | None = None, score_prompt: bool = True, background: bool = False
    ) -> None:
        """Compiles prefill for `buckets` (default all: powers of two up to n_ctx), insert and decode.

        Nothing runs on the device, so this is safe at any time; with `enable_compilation_cache` a
        restart loads the programs from disk instead. score_prompt also compiles the echo-logprobs prefill.
        background: compile only what a lone short request needs before returning, and the rest on a
        thread (`compiling`; gpt2jax/engine/warmup.py); a request that needs one of those before it is
        compiled compiles it itself.
        """
        chosen = self.buckets if buckets is None else sorted({bucket(b, self.n_ctx) for b in buckets})
        score = (False, True) if score_prompt else (False,)
        names = self.programs.program_names(chosen, score)
        now, later = split(names) if background else (names, [])
        seen = cache_counts()
        self.programs.compile(chosen, score, only=now)
        release_memory()  # what compiling freed
        log.info("%s: %d programs compiled before ready (%s)", self.name, len(now), cache_note(seen))
        if later:
            self.compiling = BackgroundCompile(self.programs, chosen, score, later, self.name)

    def start(self) -> None:
        """Starts the worker thread (generate() also starts it on first use)."""
        self.worker.start()
        publish(self)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting requests; with drain, finishes queued and running ones first, else fails them.

        Blocks until the worker exits (from async code: `await asyncio.to_thread(engine.stop)`), and
        until a background compile (warmup's) has finished the program it was compiling.
        """
        if self.compiling is not None:
            self.compiling.stop(timeout)
        self.worker.stop(drain, timeout)
        unpublish(self)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until no request waits or runs; False on timeout."""
        return self.worker.wait_idle(timeout)

    # ---- the asyncio side ----

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Streams the request's events (see engine_api.Engine.generate)."""
        self._validate(request)
        automaton = None
        if request.params.constraint is not None and request.params.max_tokens > 0:
            if getattr(self.programs, "multiprocess", False) or not hasattr(self.programs, "automata"):
                raise EngineError("structured outputs are not supported on a server of several processes")
            automaton = await asyncio.to_thread(self.automaton, request.params.constraint)
        job = Job(request, self.tokenizer, self.config.eos_token_id, asyncio.get_running_loop(), automaton)
        self.worker.submit(job)
        if not self.running:
            self.start()
        try:
            while True:
                item = await job.queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                for event in item:
                    yield event
        finally:
            if not job.done:  # closed early or cancelled: the worker frees the slots at the next chunk
                self.worker.cancel(job)

    def automaton(self, constraint: Constraint) -> Automaton:
        """The constraint's automaton over this model's vocabulary (compiled once, then cached);
        EngineError (a 400) if outlines-core cannot compile it or it is over the limits."""
        try:
            return compile_automaton(constraint, self.tokenizer, self.config.n_vocab)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def _validate(self, r: GenerationRequest) -> None:
        if not r.prompt:
            raise EngineError("the prompt must have at least one token")
        if min(r.prompt) < 0 or max(r.prompt) >= self.config.n_vocab:
            raise EngineError(f"prompt token ids must be in [0, {self.config.n_vocab})")
        p = r.params  # its ranges were checked when it was made
        if len(r.prompt) + p.max_tokens > self.n_ctx:
            raise EngineError(
                f"this model's context length is {self.n_ctx} tokens; the prompt has {len(r.prompt)} "
                f"and max_tokens is {p.max_tokens}"
            )
        if p.max_tokens > 0 and p.candidates > self.slots:
            raise EngineError(
                f"n/best_of ({p.candidates}) exceeds the {self.slots} decode slots of {self.name}"
            )
        if any(not 0 <= t < self.config.n_vocab for t, _ in p.logit_bias):
            raise EngineError(f"logit_bias token ids must be in [0, {self.config.n_vocab})")


def _powers_of_two(n_ctx: int) -> list[int]:
    out, b = [], MIN_BUCKET
    while b < n_ctx:
        out.append(b)
        b *= 2
    return [*out, n_ctx]
