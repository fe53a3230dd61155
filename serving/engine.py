"""The continuous-batching engine: one per served model, implementing `serving.engine_api.Engine`.

A fixed number of decode slots share one preallocated KV cache. A worker thread loops: admit waiting
requests into free slots (prefill, insert), dispatch one decode chunk for all slots, then read the previous
chunk's tokens while the new one runs (JAX dispatches asynchronously), turn them into events and free the
slots of finished choices. The asyncio side only enqueues requests and awaits events, so the event loop
serving HTTP never waits on the device.

    engine = BatchEngine.from_model(gpt2jax.load("checkpoints/124M"))
    engine.warmup(); engine.start()
    async for event in engine.generate(GenerationRequest(prompt=(464, 2068), max_tokens=32)): ...
    engine.stop()
"""

from __future__ import annotations

import heapq
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.lm import LanguageModel, derive_seed
from gpt2jax.sampler import MIN_BUCKET, bucket
from gpt2jax.sampling import SampleOutput
from gpt2jax.tokenizer import GPT2Tokenizer
from serving.engine_api import EngineError, EngineOverloaded, Event, GenerationRequest
from serving.engine_choice import ChoiceStream
from serving.engine_device import SlotPrograms, enable_compilation_cache, make_row
from serving.engine_job import END, Job
from serving.engine_metrics import EngineMetrics, publish, unpublish

__all__ = ["BatchEngine", "EngineFault", "default_slots", "enable_compilation_cache"]

log = logging.getLogger(__name__)

# Measured on a 124M model, fp32, 2-core CPU (benchmarks/bench_engine.py --sweep): see default_slots.
DEFAULT_CHUNK_SIZE = 8
SLOTS_PER_DEVICE = {"cpu": 16, "gpu": 64, "tpu": 64}
KV_MEMORY_FRACTION = 0.3  # at most this share of a device's memory for the slots' KV cache by default


class EngineFault(RuntimeError):
    """An internal error (e.g. a failed device call) ended the request; the engine keeps serving."""


def default_slots(config: GPT2Config, dtype: Any, devices: Sequence[jax.Device]) -> int:
    """Slots for these devices: SLOTS_PER_DEVICE each, fewer if their KV cache would not fit comfortably."""
    device = devices[0]
    per_device = SLOTS_PER_DEVICE.get(device.platform, 16)
    slot_bytes = 2 * config.n_layer * config.n_ctx * config.n_embd * jnp.dtype(dtype).itemsize
    memory = _device_memory(device)
    if memory:
        per_device = max(1, min(per_device, int(memory * KV_MEMORY_FRACTION // slot_bytes)))
    return per_device * len(devices)


def _device_memory(device: jax.Device) -> int | None:
    try:
        stats = device.memory_stats()
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # not every backend reports memory
        pass
    if device.platform == "cpu":
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


class _Seat(NamedTuple):
    slot: int
    job: Job
    choice: ChoiceStream


class _Dispatched(NamedTuple):
    """Device outputs not yet read: [T, W] tokens for the seats in `seats` (W columns)."""

    out: SampleOutput
    seats: list[_Seat | None]
    dispatched: float
    is_chunk: bool  # a decode chunk (else a slot's first token from insert)


class BatchEngine:
    """Continuous batching over a fixed set of decode slots, for one model.

    slots: decode slots (default: `default_slots`), a multiple of the device count. chunk_size: decode
    steps per device call. max_queue: requests that may wait for slots; beyond it new ones are refused
    with EngineOverloaded, as is one that waited more than queue_timeout seconds. devices: default all
    local devices; slots are sharded over them.
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
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_queue: int = 64,
        queue_timeout: float = 30.0,
        devices: Sequence[jax.Device] | None = None,
        min_window: int = 128,
    ) -> None:
        devices = list(devices if devices is not None else jax.local_devices())
        self.name = name
        self.config = config
        self.n_ctx = config.n_ctx
        self.tokenizer = tokenizer
        self.slots = slots or default_slots(config, dtype, devices)
        self.chunk_size = chunk_size
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.buckets = tuple(sorted({bucket(n, config.n_ctx) for n in _powers_of_two(config.n_ctx)}))
        self.metrics = EngineMetrics(lambda: self.queue_length, lambda: self.busy_slots, self.slots)
        self._programs = SlotPrograms(config, params, dtype, self.slots, chunk_size, devices, min_window)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._seats: list[_Seat | None] = [None] * self.slots
        self._free = list(range(self.slots))  # a heap: the lowest free slot first
        self._busy = 0
        # Per slot: cache positions its row has reached with the steps dispatched so far, and the most it
        # can reach (prompt + max_tokens): they pick the decode window.
        self._reach = np.zeros(self.slots, np.int64)
        self._limit = np.zeros(self.slots, np.int64)
        self._inflight = 0  # dispatched device outputs not yet read
        self._state = None
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._drain = True
        self._last_ready = 0.0

    @classmethod
    def from_model(cls, model: LanguageModel, **options: Any) -> BatchEngine:
        """An engine for a loaded LanguageModel; options as for the constructor."""
        options.setdefault("name", model.name or "gpt2")
        return cls(model.config, model.params, model.tokenizer, dtype=model.dtype, **options)

    # ---- views ----

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return self._busy

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- lifecycle ----

    def warmup(self, buckets: Sequence[int] | None = None, score_prompt: bool = True) -> None:
        """Compiles prefill for `buckets` (default all: powers of two up to n_ctx), insert and decode.

        Nothing runs on the device, so this is safe at any time; with `enable_compilation_cache` a
        restart loads the programs from disk instead. score_prompt also compiles the echo-logprobs prefill.
        """
        chosen = self.buckets if buckets is None else sorted({bucket(b, self.n_ctx) for b in buckets})
        self._programs.compile(chosen, (False, True) if score_prompt else (False,))

    def start(self) -> None:
        """Starts the worker thread (generate() also starts it on first use)."""
        with self._cv:
            if self.running:
                return
            if self._state is None:
                self._state = self._programs.init_state()
            self._accepting, self._stopping = True, False
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
            self._thread.start()
        publish(self)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting requests; with drain, finishes queued and running ones first, else fails them.

        Blocks until the worker exits (from async code: `await asyncio.to_thread(engine.stop)`).
        """
        with self._cv:
            self._accepting = False
            self._stopping, self._drain = True, drain
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        unpublish(self)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until no request waits or runs; False on timeout."""
        with self._cv:
            return self._cv.wait_for(self._idle, timeout)

    # ---- the asyncio side ----

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Streams the request's events (see engine_api.Engine.generate)."""
        import asyncio

        job = self._submit(request, asyncio.get_running_loop())
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
                job.cancelled = True
                with self._cv:
                    self._cv.notify_all()

    def _submit(self, request: GenerationRequest, loop: Any) -> Job:
        self._validate(request)
        job = Job(request, self.tokenizer, self.config.eos_token_id, loop)
        with self._cv:
            if not self._accepting:
                self.metrics.requests_refused += 1
                raise EngineOverloaded(f"model {self.name} is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests_refused += 1
                raise EngineOverloaded(
                    f"model {self.name} is overloaded: {len(self._waiting)} requests waiting"
                )
            self._waiting.append(job)
            self._cv.notify_all()
        if not self.running:
            self.start()
        return job

    def _validate(self, r: GenerationRequest) -> None:
        if not r.prompt:
            raise EngineError("the prompt must have at least one token")
        if min(r.prompt) < 0 or max(r.prompt) >= self.config.n_vocab:
            raise EngineError(f"prompt token ids must be in [0, {self.config.n_vocab})")
        if r.max_tokens < 0:
            raise EngineError("max_tokens must be >= 0")
        if len(r.prompt) + r.max_tokens > self.n_ctx:
            raise EngineError(
                f"this model's context length is {self.n_ctx} tokens; the prompt has {len(r.prompt)} "
                f"and max_tokens is {r.max_tokens}"
            )
        if r.n < 1 or (r.best_of is not None and r.best_of < r.n):
            raise EngineError("n must be >= 1 and best_of >= n")
        choices = r.best_of or r.n
        if r.max_tokens > 0 and choices > self.slots:
            raise EngineError(f"n/best_of ({choices}) exceeds the {self.slots} decode slots of {self.name}")
        if r.logprobs is not None and not 0 <= r.logprobs <= 5:
            raise EngineError("logprobs must be between 0 and 5")
        if any(not 0 <= t < self.config.n_vocab for t, _ in r.logit_bias):
            raise EngineError(f"logit_bias token ids must be in [0, {self.config.n_vocab})")

    # ---- the worker thread ----

    def _idle(self) -> bool:
        return not self._waiting and self._busy == 0 and self._inflight == 0

    def _run(self) -> None:
        pending: deque[_Dispatched] = deque()
        while True:
            with self._cv:
                self._cv.notify_all()  # wake wait_idle()
                self._cv.wait_for(lambda: not self._idle() or self._stopping)
                if self._stopping and (not self._drain or self._idle()):
                    break
            try:
                self._reap()
                self._admit(pending)
                dispatched = self._dispatch_decode(pending)
                while len(pending) > dispatched:  # keep the newest chunk running while reading the rest
                    self._process(pending.popleft())
                    self._inflight = len(pending)
            except Exception as exc:
                self._recover(exc, pending)
        self._shutdown(pending)

    def _reap(self) -> None:
        """Frees the slots of cancelled jobs; drops cancelled waiting jobs; refuses jobs waiting too long."""
        for seat in self._seats:
            if seat is not None and seat.job.cancelled:
                seat.choice.cancel()
                self._release(seat.slot)
        now = time.monotonic()
        with self._cv:
            keep = deque()
            for job in self._waiting:
                if job.cancelled:
                    continue
                if now - job.submitted > self.queue_timeout:
                    self.metrics.requests_refused += 1
                    job.fail(
                        EngineOverloaded(
                            f"model {self.name} is overloaded: no slot within {self.queue_timeout:g} s"
                        )
                    )
                    continue
                keep.append(job)
            self._waiting = keep

    def _admit(self, pending: deque[_Dispatched]) -> None:
        """Starts waiting jobs, oldest first, while their choices fit in the free slots."""
        while True:
            with self._cv:
                if not self._waiting or self._waiting[0].slots_needed > len(self._free):
                    return
                job = self._waiting.popleft()
            if not job.cancelled:
                self._start_job(job, pending)

    def _start_job(self, job: Job, pending: deque[_Dispatched]) -> None:
        r = job.request
        try:
            pre = self._programs.prefill(r.prompt, bucket(len(r.prompt), self.n_ctx), r.echo_logprobs)
            if r.echo_logprobs:
                job.set_prompt_scores(*(np.asarray(a)[0, : len(r.prompt)] for a in pre.scores))
        except Exception as exc:  # the prefill touches no slot: only this job fails
            log.exception("prefill failed")
            self._fail(job, exc)
            return
        if r.max_tokens == 0:  # scoring only: no slot
            for c in job.choices:
                c.finish_reason = "length"
            self._flush(job)
            return
        seed = r.seed if r.seed is not None else secrets.randbits(63)
        eos = self.config.eos_token_id if r.stop_at_eos else -1
        for choice in job.choices:
            slot = heapq.heappop(self._free)
            self._seats[slot] = seat = _Seat(slot, job, choice)
            self._busy += 1
            self._reach[slot], self._limit[slot] = len(r.prompt), len(r.prompt) + r.max_tokens
            row = make_row(
                len(r.prompt),
                r.max_tokens,
                eos,
                bool(r.logprobs),
                self.config.n_vocab,
                temperature=r.temperature,
                top_k=r.top_k,
                top_p=r.top_p,
                presence_penalty=r.presence_penalty,
                frequency_penalty=r.frequency_penalty,
                logit_bias=dict(r.logit_bias),
                seed=derive_seed(seed, choice.index),
            )
            self._state, first = self._programs.insert(self._state, pre, slot, row)
            _copy_to_host_async(first)
            pending.append(_Dispatched(first, [seat], time.perf_counter(), False))
            self._inflight = len(pending)

    def _dispatch_decode(self, pending: deque[_Dispatched]) -> bool:
        if self._busy == 0:
            return False
        active = np.array([s is not None for s in self._seats])
        self._reach = np.where(active, np.minimum(self._reach + self.chunk_size, self._limit), self._reach)
        window = self._programs.window_for(int(self._reach[active].max()))
        self._state, out = self._programs.decode(self._state, active, window)
        _copy_to_host_async(out)
        pending.append(_Dispatched(out, list(self._seats), time.perf_counter(), True))
        self._inflight = len(pending)
        return True

    def _process(self, item: _Dispatched) -> None:
        """Feeds read-back tokens to their choices, sends events, frees the slots of finished choices."""
        out = jax.device_get(item.out)
        ready = time.perf_counter()
        if item.is_chunk:
            self.metrics.step_time.observe(ready - max(item.dispatched, self._last_ready))
            self._last_ready = ready
        W = len(item.seats)
        tokens, logprobs = out.token.reshape(-1, W), out.logprob.reshape(-1, W)
        top_tokens, top_logprobs = out.top_tokens.reshape(-1, W, 5), out.top_logprobs.reshape(-1, W, 5)
        touched: dict[int, Job] = {}
        for w, seat in enumerate(item.seats):
            if seat is None or seat.choice.finished or seat.job.done:
                continue
            job, choice = seat.job, seat.choice
            try:
                for t in range(tokens.shape[0]):
                    if tokens[t, w] < 0:  # the device ended the row: cannot happen before the host did
                        choice.finish_reason = choice.finish_reason or "length"
                        break
                    choice.push(int(tokens[t, w]), logprobs[t, w], top_tokens[t, w], top_logprobs[t, w])
                    self.metrics.tokens_generated += 1
                    if choice.finished:
                        break
            except Exception as exc:  # a host-side bug for this job only
                log.exception("processing tokens failed")
                self._fail(job, exc)
                continue
            if choice.finished:
                self._release(seat.slot)
            touched[id(job)] = job
        for job in touched.values():
            self._flush(job)

    def _flush(self, job: Job) -> None:
        if job.first_token_at is None and any(c.generated for c in job.choices):
            job.first_token_at = time.monotonic()
            self.metrics.ttft.observe(job.first_token_at - job.submitted)
        if job.flush():
            self.metrics.requests_finished += 1

    def _release(self, slot: int) -> None:
        if self._seats[slot] is not None:
            self._seats[slot] = None
            heapq.heappush(self._free, slot)
            self._busy -= 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        error = (
            exc if isinstance(exc, EngineFault | EngineOverloaded) else EngineFault(f"{self.name}: {exc!r}")
        )
        error.__cause__ = None if error is exc else exc
        job.fail(error)
        self.metrics.requests_failed += 1
        for seat in self._seats:
            if seat is not None and seat.job is job:
                self._release(seat.slot)

    def _recover(self, exc: Exception, pending: deque[_Dispatched]) -> None:
        """A device call failed: the donated state may be gone. Fail every running job, start afresh."""
        log.exception("engine %s: device step failed; failing the running requests", self.name)
        jobs = {id(s.job): s.job for s in self._seats if s is not None}
        jobs.update({id(s.job): s.job for item in pending for s in item.seats if s is not None})
        pending.clear()
        self._inflight = 0
        for job in jobs.values():
            self._fail(job, exc)
        try:
            self._state = self._programs.init_state()
        except Exception:
            log.exception("engine %s: cannot reallocate its state; stopping", self.name)
            with self._cv:
                self._accepting, self._stopping, self._drain = False, True, False

    def _shutdown(self, pending: deque[_Dispatched]) -> None:
        """Ends what is left (only when not draining)."""
        for seat in self._seats:
            if seat is not None:
                self._fail(seat.job, EngineFault(f"model {self.name} was stopped"))
        with self._cv:
            for job in self._waiting:
                job.fail(EngineOverloaded(f"model {self.name} is shutting down"))
            self._waiting.clear()
            pending.clear()
            self._inflight = 0
            self._cv.notify_all()


def _copy_to_host_async(out: SampleOutput) -> None:
    for a in out:
        a.copy_to_host_async()


def _powers_of_two(n_ctx: int) -> list[int]:
    out, b = [], MIN_BUCKET
    while b < n_ctx:
        out.append(b)
        b *= 2
    return [*out, n_ctx]
