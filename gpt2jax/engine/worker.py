"""The engine's worker thread: the waiting queue, the slot table and the loop that drives the device.

Each turn of the loop: free the slots of cancelled jobs and refuse jobs that waited too long; admit
waiting jobs into free slots (prefill, insert); dispatch one decode chunk for the busy slots; then read the
outputs dispatched before it (JAX dispatches asynchronously, so the device is already busy with the new
chunk while the host turns the previous one into events). Slots of finished choices are freed at once on
the host; the next chunk tells the device (its `active` mask).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import secrets
import threading
import time
from collections import deque
from typing import NamedTuple, Protocol

import jax
import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.engine.api import EngineOverloaded
from gpt2jax.engine.choice import ChoiceStream
from gpt2jax.engine.heap import release_memory
from gpt2jax.engine.job import Job
from gpt2jax.engine.metrics import EngineMetrics
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.shapes import pack
from gpt2jax.engine.slots import Prefilled, make_row
from gpt2jax.sampling import NUM_TOP_LOGPROBS, SampleOutput
from gpt2jax.sampling_params import derive_seed


class EngineView(Protocol):
    """What the worker reads of its engine (BatchEngine), at each use, so settings changed there apply."""

    name: str
    config: GPT2Config
    metrics: EngineMetrics
    chunk_size: int
    max_queue: int
    queue_timeout: float  # seconds


log = logging.getLogger("gpt2jax.engine.engine")


class EngineFault(RuntimeError):
    """An internal error (e.g. a failed device call) ended the request; the engine keeps serving."""


class _Seat(NamedTuple):
    slot: int
    job: Job
    choice: ChoiceStream


class _Dispatched(NamedTuple):
    """Device outputs not yet read: [T, W] tokens for the W seats in `seats`, of which the first `steps`
    rows were run."""

    out: SampleOutput
    seats: list[_Seat | None]
    dispatched: float
    is_chunk: bool  # a decode chunk (else a slot's first token from insert)
    steps: int = 1


class SlotWorker:
    """Owns the decode slots and the device state of one engine, and the thread that moves them.

    Settings (name, chunk_size, max_queue, queue_timeout, metrics) are read from the engine at use.
    """

    def __init__(self, engine: EngineView, programs: DevicePrograms) -> None:
        self.engine = engine
        self.programs = programs
        slots = programs.slots
        self.cv = threading.Condition()  # guards `waiting` and the run flags
        self.waiting: deque[Job] = deque()
        self.accepting, self.stopping, self.drain = True, False, True
        self.seats: list[_Seat | None] = [None] * slots
        # Free slots as a heap of their places in the fill order, so that busy slots stay at the front of
        # each device's rows and decode runs as few rows as it can.
        self._order = programs.fill_order()
        self._place = {slot: i for i, slot in enumerate(self._order)}
        self.free = list(range(slots))
        self.busy = 0
        # Per slot: cache positions its row reaches with the steps dispatched so far, and the most it can
        # reach (prompt + max_tokens): they pick the decode window.
        self._reach = np.zeros(slots, np.int64)
        self._limit = np.zeros(slots, np.int64)
        self._inflight = 0  # dispatched device outputs not yet read
        self._backlog = False  # requests were left waiting by the last admission
        self._state = None
        self._thread: threading.Thread | None = None
        self._last_ready = 0.0

    # ---- called from other threads ----

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self.cv:
            if self.running:
                return
            if self._state is None:
                self._state = self.programs.init_state()
            self.accepting, self.stopping = True, False
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.engine.name}", daemon=True)
            self._thread.start()

    def stop(self, drain: bool, timeout: float | None) -> None:
        with self.cv:
            self.accepting, self.stopping, self.drain = False, True, drain
            self.cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues a job, or raises EngineOverloaded (stopping, or the queue is full)."""
        e = self.engine
        with self.cv:
            if not self.accepting:
                e.metrics.requests_refused += 1
                raise EngineOverloaded(f"model {e.name} is shutting down")
            if len(self.waiting) >= e.max_queue:
                e.metrics.requests_refused += 1
                raise EngineOverloaded(f"model {e.name} is overloaded: {len(self.waiting)} requests waiting")
            self.waiting.append(job)
            self.cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The consumer is gone: the job's slots are freed at the next chunk boundary."""
        job.cancelled = True
        with self.cv:
            # Out of the queue at once, so that it does not count against max_queue until the next reap
            # (hang-ups under load made the queue look full: 429s with room to spare).
            with contextlib.suppress(ValueError):
                self.waiting.remove(job)
            self.cv.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self.cv:
            return self.cv.wait_for(self._idle, timeout)

    # ---- the loop ----

    def _idle(self) -> bool:
        return not self.waiting and self.busy == 0 and self._inflight == 0

    def _run(self) -> None:
        pending: deque[_Dispatched] = deque()
        while True:
            if self._idle():  # here only at the start and once work ran out (then it waits below)
                release_memory()  # what the requests' temporaries left in the heap
            with self.cv:
                self.cv.notify_all()  # wake wait_idle()
                self.cv.wait_for(lambda: not self._idle() or self.stopping)
                if self.stopping and (not self.drain or self._idle()):
                    break
            try:
                self._reap()
                self._admit(pending)
                dispatched = self._dispatch_decode(pending)
                # With every slot busy, or requests left waiting by this turn's admission, keep the newest
                # chunk running while reading the rest (the device never waits on the host). Otherwise
                # read it too: a request that arrives meanwhile is then prefilled after this chunk, not
                # after the one queued behind it.
                keep = dispatched and (not self.free or self._backlog)
                while len(pending) > keep:
                    self._process(pending.popleft())
                    self._inflight = len(pending)
            except Exception as exc:
                self._recover(exc, pending)
        self._shutdown(pending)

    def _reap(self) -> None:
        """Frees the slots of cancelled jobs; drops cancelled waiting jobs; refuses jobs waiting too long."""
        for seat in self.seats:
            if seat is not None and seat.job.cancelled:
                seat.choice.cancel()
                self._release(seat)
        e, now = self.engine, time.monotonic()
        with self.cv:
            keep = deque()
            for job in self.waiting:
                if job.cancelled:
                    continue
                if now - job.submitted > e.queue_timeout:
                    e.metrics.requests_refused += 1
                    job.fail(
                        EngineOverloaded(
                            f"model {e.name} is overloaded: no slot within {e.queue_timeout:g} s"
                        )
                    )
                    continue
                keep.append(job)
            self.waiting = keep

    def _admit(self, pending: deque[_Dispatched]) -> None:
        """Starts waiting jobs, oldest first, while their choices fit in the free slots.

        The prompts admitted together are prefilled packed into rows (gpt2jax/engine/shapes.py `pack`);
        a prompt whose logprobs are asked for (echo) is prefilled alone.
        """
        admitted, free = [], len(self.free)
        with self.cv:
            while self.waiting and self.waiting[0].slots_needed <= free:
                job = self.waiting.popleft()
                if not job.cancelled:
                    admitted.append(job)
                    free -= job.slots_needed
            self._backlog = bool(self.waiting)  # this turn's decode serves them (see _dispatch_decode)
        programs, n_ctx = self.programs, self.engine.config.n_ctx
        for score in (False, True):
            jobs = [job for job in admitted if bool(job.request.params.prompt_logprobs) == score]
            rows = lambda length, score=score: programs.prefill_rows(length, score)
            lengths = [len(job.request.prompt) for job in jobs]
            for length, which in pack(lengths, rows, programs.prefill_tokens, n_ctx):
                self._start_jobs([jobs[i] for i in which], length, score, pending)

    def _start_jobs(self, jobs: list[Job], length: int, score: bool, pending: deque[_Dispatched]) -> None:
        """Prefills the jobs' prompts (one row of `length` tokens) in one call, then seats each job."""
        try:
            prefilled = self.programs.prefill([job.request.prompt for job in jobs], length, score)
        except Exception as exc:  # the prefill touches no slot: only these jobs fail
            log.exception("prefill failed")
            for job in jobs:
                self._fail(job, exc)
            return
        for job, pre in zip(jobs, prefilled, strict=True):
            self._seat(job, pre, pending)

    def _seat(self, job: Job, pre: Prefilled, pending: deque[_Dispatched]) -> None:
        """Inserts a prefilled prompt into one slot per choice, each with its own seed."""
        r, config = job.request, self.engine.config
        p = r.params
        try:
            if p.prompt_logprobs:
                job.set_prompt_scores(*(np.asarray(a)[0, : len(r.prompt)] for a in pre.scores))
        except Exception as exc:  # reading the scores failed: the device may be at fault, but no slot is
            log.exception("prefill failed")
            self._fail(job, exc)
            return
        if p.max_tokens == 0:  # scoring only: no slot
            for c in job.choices:
                c.end("length")
            self._flush(job)
            return
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        eos = -1 if p.ignore_eos else config.eos_token_id
        for choice in job.choices:
            slot = self._order[heapq.heappop(self.free)]
            self.seats[slot] = seat = _Seat(slot, job, choice)
            self.busy += 1
            self._reach[slot], self._limit[slot] = len(r.prompt), len(r.prompt) + p.max_tokens
            row = make_row(
                len(r.prompt),
                eos,
                p.replace(seed=derive_seed(seed, choice.index)),
                config.n_vocab,
                job.automaton,
            )
            self._state, first = self.programs.insert(self._state, pre, slot, row)
            _copy_to_host_async(first)
            pending.append(_Dispatched(first, [seat], time.perf_counter(), False))
            self._inflight = len(pending)

    def _dispatch_decode(self, pending: deque[_Dispatched]) -> bool:
        """Dispatches one decode chunk for the busy slots.

        While requests wait for a slot, the chunk ends where the first row reaches its max_tokens, and
        the slots whose rows end there by length are freed at once: the next turn prefills into them
        before this chunk's outputs are read (the device runs the insert after the chunk), so a slot
        does not sit out the rest of a chunk, nor the next one.
        """
        if self.busy == 0:
            return False
        active = np.array([s is not None for s in self.seats])
        remaining = self._limit - self._reach - 1  # decode steps a row runs at most (its first is insert's)
        live = active & (remaining > 0)
        steps = self.engine.chunk_size
        with self.cv:  # left by this turn's admission, or come since (e.g. the rest of a burst)
            waiting = self._backlog or bool(self.waiting)
        if waiting and live.any():
            steps = int(min(steps, remaining[live].min()))
        self._reach = np.where(active, np.minimum(self._reach + steps, self._limit), self._reach)
        window = self.programs.window_for(int(self._reach[active].max()))
        rows = self.programs.rows_for(np.flatnonzero(active).tolist())
        self._state, out = self.programs.decode(self._state, active, window, rows, steps)
        _copy_to_host_async(out)
        seats = [self.seats[slot] for slot in self.programs.decoded_slots(rows)]
        pending.append(_Dispatched(out, seats, time.perf_counter(), True, steps))
        self._inflight = len(pending)
        if waiting:
            for slot in np.flatnonzero(active & (self._reach >= self._limit - 1)):
                self._release(self.seats[slot])  # done by length at the chunk's end: its outputs still come
        return True

    def _process(self, item: _Dispatched) -> None:
        """Feeds read-back tokens to their choices, sends events, frees the slots of finished choices."""
        metrics = self.engine.metrics
        out = jax.device_get(item.out)
        ready = time.perf_counter()
        if item.is_chunk:  # device time: from its dispatch, or from the previous chunk's end if later
            metrics.step_time.observe(ready - max(item.dispatched, self._last_ready))
            self._last_ready = ready
        W, K = len(item.seats), NUM_TOP_LOGPROBS
        tokens, logprobs = out.token.reshape(-1, W), out.logprob.reshape(-1, W)
        top_tokens, top_logprobs = out.top_tokens.reshape(-1, W, K), out.top_logprobs.reshape(-1, W, K)
        # Token by token, each choice's events are handed out as they form: a stream gets one event per
        # token (as OpenAI's and vLLM's do), not one per chunk.
        for t in range(min(tokens.shape[0], item.steps)):
            for w, seat in enumerate(item.seats):
                if seat is None or seat.choice.finished or seat.job.done:
                    continue
                job, choice = seat.job, seat.choice
                try:
                    if tokens[t, w] < 0:  # the device ended the row: cannot happen before the host did
                        choice.end("length")
                    else:
                        choice.push(int(tokens[t, w]), logprobs[t, w], top_tokens[t, w], top_logprobs[t, w])
                        metrics.tokens_generated += 1
                except Exception as exc:  # a host-side bug for this job only
                    log.exception("processing tokens failed")
                    self._fail(job, exc)
                    continue
                if choice.finished:
                    self._release(seat)
                self._flush(job)

    def _flush(self, job: Job) -> None:
        metrics = self.engine.metrics
        if job.first_token_at is None and any(c.generated for c in job.choices):
            job.first_token_at = time.monotonic()
            metrics.ttft.observe(job.first_token_at - job.submitted)
        if job.flush():
            metrics.requests_finished += 1

    def _release(self, seat: _Seat) -> None:
        """Frees the seat's slot, unless it was freed already (and may hold another choice by now)."""
        if self.seats[seat.slot] is seat:
            self.seats[seat.slot] = None
            heapq.heappush(self.free, self._place[seat.slot])
            self.busy -= 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not job.done:
            error = exc
            if not isinstance(exc, EngineFault | EngineOverloaded):
                error = EngineFault(f"{self.engine.name}: {exc!r}")
                error.__cause__ = exc
            job.fail(error)
            self.engine.metrics.requests_failed += 1
        for seat in self.seats:
            if seat is not None and seat.job is job:
                self._release(seat)

    def _recover(self, exc: Exception, pending: deque[_Dispatched]) -> None:
        """A device call failed: the donated state may be gone. Fail every running job, start afresh."""
        log.exception("engine %s: device step failed; failing the running requests", self.engine.name)
        jobs = {id(s.job): s.job for s in self.seats if s is not None}
        jobs.update({id(s.job): s.job for item in pending for s in item.seats if s is not None})
        pending.clear()
        self._inflight = 0
        for job in jobs.values():
            self._fail(job, exc)
        try:
            self._state = self.programs.init_state()
        except Exception:
            log.exception("engine %s: cannot reallocate its state; stopping", self.engine.name)
            with self.cv:
                self.accepting, self.stopping, self.drain = False, True, False

    def _shutdown(self, pending: deque[_Dispatched]) -> None:
        """Ends what is left (only when not draining)."""
        name = self.engine.name
        for seat in self.seats:
            if seat is not None:
                self._fail(seat.job, EngineFault(f"model {name} was stopped"))
        with self.cv:
            for job in self.waiting:
                job.fail(EngineOverloaded(f"model {name} is shutting down"))
            self.waiting.clear()
            pending.clear()
            self._inflight = 0
            self.cv.notify_all()


def _copy_to_host_async(out: SampleOutput) -> None:
    for a in out:
        a.copy_to_host_async()
