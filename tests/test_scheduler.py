"""The engine's scheduler (gpt2jax/engine/worker.py through BatchEngine) on a fake device: no weights.

tests/fake_device.py's FakePrograms gives every prompt a text known in advance and can hold decode calls,
so that a test fills the queue while the slots are busy and then lets the device go. No verdict here
depends on timing: every wait is for a condition (a call reached the fake, the queue holds n requests),
bounded only by tests/waits.py's HANG.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import Callable

import pytest
from fake_device import EOS, FakePrograms, expected_tokens
from waits import HANG

from gpt2jax.engine.api import EngineOverloaded, GenerationRequest
from gpt2jax.engine.engine import BatchEngine, EngineFault
from gpt2jax.engine.programs import DevicePrograms


@dataclasses.dataclass
class Outcome:
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: BaseException | None = None


async def consume(
    engine: BatchEngine, prompt: tuple, max_tokens: int = 4, events: int | None = None
) -> Outcome:
    """One request's tokens and finish reason (or the error it raised); with `events`, the consumer leaves
    (closes the iterator) after that many events."""
    out, seen = Outcome(), 0
    request = GenerationRequest.of(prompt, max_tokens=max_tokens)
    try:
        async with contextlib.aclosing(engine.generate(request)) as stream:
            async for ev in stream:
                out.tokens += [t.token for t in ev.tokens]
                out.finish = ev.finish_reason or out.finish
                seen += 1
                if seen == events:
                    break
    except (EngineOverloaded, EngineFault) as exc:
        out.error = exc
    return out


async def until(engine: BatchEngine, predicate: Callable[[BatchEngine], bool]) -> None:
    """Waits (off the event loop) until predicate(engine) holds, checked whenever the queue changes."""
    cv = engine.worker.cv

    def wait() -> bool:
        with cv:
            return cv.wait_for(lambda: predicate(engine), HANG)

    assert await asyncio.to_thread(wait), "the engine waited too long"


async def device(fake: FakePrograms, predicate: Callable[[FakePrograms], bool]) -> None:
    await asyncio.to_thread(fake.wait_for, predicate)


@contextlib.contextmanager
def engine_on(fake: FakePrograms, tok, **options):
    """A started BatchEngine driving `fake`; requests wait for a slot as long as it takes by default."""
    options.setdefault("queue_timeout", math.inf)
    engine = BatchEngine(fake.config, None, tok, name="fake", programs=fake, **options)
    engine.start()
    try:
        yield engine
    finally:
        fake.release()
        engine.stop(drain=False, timeout=HANG)


A, B, C, D, E = (1, 2), (3,) * 40, (5,), (7,) * 20, (11, 13)  # prompts of several length buckets


async def behind(
    engine: BatchEngine, fake: FakePrograms, first: tuple, *waiting: tuple, **first_options
) -> tuple[asyncio.Task, list[asyncio.Task]]:
    """Holds the fake, starts `first` (its first decode call then waits there) and queues `waiting`
    behind it, in that order; returns their consumers once all are in place."""
    fake.hold()
    running = asyncio.create_task(consume(engine, first, **first_options))
    await device(fake, lambda f: f.count("decode") >= 1)
    return running, await queue(engine, *waiting)


async def queue(engine: BatchEngine, *prompts: tuple, **kw) -> list[asyncio.Task]:
    """Submits requests in this order and returns once all of them wait in the queue."""
    before = engine.queue_length
    tasks = [asyncio.create_task(consume(engine, p, **kw)) for p in prompts]
    await until(engine, lambda e: e.queue_length == before + len(prompts))
    return tasks


def assert_full(outcome: Outcome, prompt: tuple, max_tokens: int = 4) -> None:
    assert outcome == Outcome(expected_tokens(prompt, max_tokens), "length")


# ---- the fake itself ----


def test_every_implementation_declares_all_of_device_programs():
    """A class that subclasses the Protocol inherits its `...` bodies: one it forgot would return None."""
    import gpt2jax.engine.device  # noqa: F401  (SlotPrograms, once it declares DevicePrograms)
    import gpt2jax.engine.multihost  # noqa: F401  (LeaderPrograms)

    methods = [n for n, v in vars(DevicePrograms).items() if callable(v) and not n.startswith("_")]
    assert {"init_state", "prefill", "insert", "decode"} <= set(methods)
    implementations = DevicePrograms.__subclasses__()
    assert FakePrograms in implementations and len(implementations) >= 2
    for cls in implementations:
        for name in methods:
            assert getattr(cls, name) is not getattr(DevicePrograms, name), (cls, name)


def test_the_fake_device_gives_the_text_its_docstring_derives(tok):
    fake = FakePrograms(ends={C: 2})
    with engine_on(fake, tok) as engine:

        async def run():
            return await asyncio.gather(consume(engine, A, 5), consume(engine, C, 5))

        a, c = asyncio.run(run())
    assert a == Outcome([3, 4, 5, 6, 7], "length")  # sum(A) = 3, then one more per token
    assert c == Outcome([5, 6, EOS], "stop")  # end-of-text as C's third token
    assert fake.generated == {A: 5, C: 3}  # end-of-text is generated too
    assert EOS == tok.eos_token_id == fake.config.eos_token_id


# ---- admission ----


def test_waiting_requests_start_in_the_order_they_came(tok):
    fake = FakePrograms(slots=2)
    with engine_on(fake, tok) as engine:

        async def run():
            first, later = await behind(engine, fake, A, B, C, D, E)  # prompts of different buckets
            fake.release()
            return await asyncio.gather(first, *later)

        outcomes = asyncio.run(run())
    assert [prompt for _, prompt in fake.inserted()] == [A, B, C, D, E]
    for prompt, outcome in zip((A, B, C, D, E), outcomes, strict=True):
        assert_full(outcome, prompt)


def test_prompts_admitted_together_are_packed_into_prefill_rows(tok):
    WAITING = (B, D, D, C, C, C, E)  # 40, 20, 20, 1, 1, 1, 2 tokens
    fake = FakePrograms(slots=8)
    fake.prefill_tokens = 64
    with engine_on(fake, tok) as engine:

        async def run():
            first, later = await behind(engine, fake, A, *WAITING)
            fake.release()
            return await asyncio.gather(first, *later)

        outcomes = asyncio.run(run())
    # Waiting prompts go in order into rows of at most 64 tokens and the fake's 4 prompts; each row is one
    # prefill call. (A came alone, before the others.)
    rows = [c[1] for c in fake.calls if c[0] == "prefill"]
    assert rows == [[A], [B, D], [D, C, C, C], [E]]
    for prompt, outcome in zip((A, *WAITING), outcomes, strict=True):
        assert_full(outcome, prompt)


def test_while_requests_wait_a_chunk_ends_where_a_row_reaches_max_tokens_and_its_slot_refills(tok):
    fake = FakePrograms(slots=2, chunk_size=8)
    with engine_on(fake, tok) as engine:

        async def run():
            first, _ = await behind(engine, fake, A, max_tokens=20)  # its first chunk (8 steps) is held
            b = asyncio.create_task(consume(engine, B, 3))
            await until(engine, lambda e: e.queue_length == 1)
            later = [b, *await queue(engine, C, D)]  # max_tokens 4
            fake.release()
            return await asyncio.gather(first, *later)

        outcomes = asyncio.run(run())
    assert_full(outcomes[0], A, 20)
    for outcome, prompt, n in zip(outcomes[1:], (B, C, D), (3, 4, 4), strict=True):
        assert_full(outcome, prompt, n)
    decodes = [c[1:] for c in fake.calls if c[0] == "decode"]
    # B (3 tokens, the first from insert) needs 2 steps, C 3: with requests waiting, each chunk ends
    # there, and the next request is prefilled into the freed slot before the next chunk.
    assert decodes[:4] == [((0,), 8), ((0, 1), 2), ((0, 1), 3), ((0, 1), 8)]
    order = [(c[0], c[1][0] if c[0] == "prefill" else None) for c in fake.calls if c[0] != "insert"]
    assert order[2:8] == [
        ("prefill", B),
        ("decode", None),
        ("prefill", C),
        ("decode", None),
        ("prefill", D),
        ("decode", None),
    ]


def test_pack_fills_rows_in_order_within_their_length_and_prompt_limits():
    from gpt2jax.engine.shapes import PREFILL_TOKENS, pack, prefill_rows

    assert PREFILL_TOKENS == 128  # the cases below are written for rows of up to 128 tokens
    rows = lambda T: prefill_rows(T, slots=16, score=False)  # rows of up to 128 tokens take several
    assert pack([50, 50, 50, 50, 20], rows, 128, 1024) == [(128, [0, 1]), (128, [2, 3, 4])]
    assert pack([30, 30, 30, 30, 10], rows, 128, 1024) == [(128, [0, 1, 2, 3]), (16, [4])]
    assert pack([300, 5, 5], rows, 128, 1024) == [(512, [0]), (16, [1, 2])]  # a long prompt alone
    assert pack([5] * 5, rows, 128, 1024) == [(32, [0, 1, 2, 3, 4])]  # a row of 16 takes 4 prompts
    assert pack([5, 5], lambda T: 1, 128, 1024) == [(16, [0]), (16, [1])]  # scoring: one per row
    assert pack([3] * 20, rows, 128, 1024) == [(64, list(range(16))), (16, [16, 17, 18, 19])]  # 16 slots
    assert pack([], rows, 128, 1024) == []
    assert pack([32] * 16, rows, 128, 1024) == [(128, list(range(i, i + 4))) for i in range(0, 16, 4)]
    # a model whose context is no longer than a packed row: 16 prompts of 32 fill two rows of 256
    several = lambda T: max(1, min(16, T // 4))
    assert pack([32] * 16, several, 256, 256) == [(256, list(range(8))), (256, list(range(8, 16)))]
    assert pack([3] * 9, rows, 128, 48) == [(48, list(range(9)))]  # the buckets end at n_ctx (48)


@pytest.mark.parametrize("n_ctx", [48, 64, 128, 256, 300, 1000, 1024])
def test_every_packed_row_holds_its_prompts(n_ctx):
    """Whatever the prompts and the context: each row's prompts fit its tokens (T <= n_ctx, a bucket)
    and its prompt count, and the rows take every prompt once, in order."""
    from gpt2jax.engine.shapes import pack, prefill_rows
    from gpt2jax.sampler import bucket

    rows = lambda T: prefill_rows(T, slots=16, score=False)
    rng = random.Random(n_ctx)
    for _ in range(300):
        lengths = [rng.randint(1, min(n_ctx, rng.choice([8, 40, 300]))) for _ in range(rng.randint(0, 20))]
        calls = pack(lengths, rows, 256, n_ctx)
        assert [i for _, which in calls for i in which] == list(range(len(lengths)))
        for T, which in calls:
            assert sum(lengths[i] for i in which) <= T <= n_ctx and bucket(T, n_ctx) == T, (lengths, calls)
            assert len(which) <= rows(T), (lengths, calls)


def test_a_request_that_needs_more_slots_than_are_free_is_not_overtaken(tok):
    fake = FakePrograms(slots=2)
    with engine_on(fake, tok) as engine:

        async def run():
            first, _ = await behind(engine, fake, A, max_tokens=6)  # one slot busy, one free
            pair = asyncio.create_task(engine_request(engine, B, n=2))
            await until(engine, lambda e: e.queue_length == 1)
            (single,) = await queue(engine, C)  # C would fit in the free slot, but B came first
            fake.release()
            return await asyncio.gather(first, pair, single)

        a, pair, c = asyncio.run(run())
    assert [prompt for _, prompt in fake.inserted()] == [A, B, B, C]
    assert_full(a, A, 6)
    assert_full(c, C)
    assert pair == 2 * expected_tokens(B, 4)


async def engine_request(engine: BatchEngine, prompt: tuple, n: int) -> list[int]:
    """The tokens of all n choices of one request, choice by choice."""
    tokens: dict[int, list[int]] = {}
    async for ev in engine.generate(GenerationRequest.of(prompt, max_tokens=4, n=n)):
        tokens.setdefault(ev.index, []).extend(t.token for t in ev.tokens)
    return [t for i in sorted(tokens) for t in tokens[i]]


# ---- cancellation ----


def test_a_consumer_that_leaves_frees_its_slot_for_the_next_request(tok):
    fake = FakePrograms(slots=1, chunk_size=2)
    with engine_on(fake, tok) as engine:

        async def run():
            leaver, (waiter,) = await behind(engine, fake, A, B, max_tokens=40, events=1)
            fake.allow(1)  # the first chunk: A's first token reaches its consumer, which leaves
            left = await leaver
            fake.release()
            return left, await waiter

        left, b = asyncio.run(run())
        assert engine.wait_idle(HANG) and engine.busy_slots == 0
    assert left == Outcome([3], None)
    assert fake.inserted() == [(0, A), (0, B)]
    assert_full(b, B)
    # A's row ran in at most the chunk in flight when its consumer left and the one dispatched before
    # the worker saw it: 1 + 2 x 2 of its 40 tokens.
    assert fake.generated[A] <= 5


def test_a_request_that_leaves_the_queue_frees_its_place_at_once(tok):
    fake = FakePrograms(slots=1)
    with engine_on(fake, tok, max_queue=1) as engine:

        async def run():
            first, (gone,) = await behind(engine, fake, A, B)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert engine.queue_length == 0
            (c,) = await queue(engine, C)  # the queue has room again before the worker runs
            fake.release()
            return await asyncio.gather(first, c)

        a, c = asyncio.run(run())
    assert fake.inserted() == [(0, A), (0, C)]
    assert_full(a, A)
    assert_full(c, C)


# ---- limits ----


def test_a_full_queue_refuses_a_request_before_its_first_event(tok):
    fake = FakePrograms(slots=1)
    with engine_on(fake, tok, max_queue=2) as engine:

        async def run():
            first, waiting = await behind(engine, fake, A, B, C)
            # The device is held: a refusal that waited for anything would hang here instead.
            refused = await asyncio.wait_for(consume(engine, D), HANG)
            fake.release()
            return refused, await asyncio.gather(first, *waiting)

        refused, outcomes = asyncio.run(run())
        assert engine.metrics.requests_refused == 1
    assert isinstance(refused.error, EngineOverloaded) and "2 requests waiting" in str(refused.error)
    assert refused.tokens == [] and D not in [p for c in fake.calls if c[0] == "prefill" for p in c[1]]
    for prompt, outcome in zip((A, B, C), outcomes, strict=True):
        assert_full(outcome, prompt)


def test_a_request_that_waited_longer_than_queue_timeout_is_refused(tok):
    fake = FakePrograms(slots=1)
    with engine_on(fake, tok, queue_timeout=30.0) as engine:

        async def run():
            first, (late,) = await behind(engine, fake, A, B)
            with engine.worker.cv:  # B has waited a minute (the worker is held in decode)
                engine.worker.waiting[0].submitted -= 60
            fake.release()
            return await asyncio.gather(first, late)

        a, b = asyncio.run(run())
        assert engine.metrics.requests_refused == 1
    assert_full(a, A)
    assert isinstance(b.error, EngineOverloaded) and "no slot within 30 s" in str(b.error)
    assert b.tokens == [] and fake.inserted() == [(0, A)]


# ---- stopping (SIGTERM) ----


@pytest.mark.parametrize("drain", [True, False])
def test_stop_refuses_new_requests_and_drains_or_ends_the_others(tok, drain):
    fake = FakePrograms(slots=1)
    with engine_on(fake, tok) as engine:

        async def run():
            running, (waiting,) = await behind(engine, fake, A, B, max_tokens=6)
            stopping = asyncio.create_task(asyncio.to_thread(engine.stop, drain, HANG))
            await until(engine, lambda e: not e.worker.accepting)
            late = await asyncio.wait_for(consume(engine, C), HANG)  # refused at once: the device is held
            fake.release()
            await stopping
            return await asyncio.gather(running, waiting), late

        (a, b), late = asyncio.run(run())
        assert not engine.running
    assert isinstance(late.error, EngineOverloaded) and "shutting down" in str(late.error)
    if drain:  # the running request and the queued one finish, whole
        assert_full(a, A, 6)
        assert_full(b, B)
    else:  # the running request ends after what was read, the queued one never starts
        assert isinstance(a.error, EngineFault) and "was stopped" in str(a.error)
        assert a.tokens == expected_tokens(A, 6)[: len(a.tokens)] and len(a.tokens) < 6
        assert isinstance(b.error, EngineOverloaded) and b.tokens == []
        assert fake.inserted() == [(0, A)]


# ---- metrics ----


def test_the_metrics_count_tokens_requests_and_chunks(tok):
    fake = FakePrograms(slots=2, ends={C: 1})
    with engine_on(fake, tok) as engine:

        async def run():
            return await asyncio.gather(consume(engine, A, 5), consume(engine, B, 3), consume(engine, C, 4))

        asyncio.run(run())
        assert engine.wait_idle(HANG)
        m = engine.metrics
        assert m.tokens_generated == sum(fake.generated.values()) == 5 + 3 + 2
        assert (m.requests_finished, m.requests_refused, m.requests_failed) == (3, 0, 0)
        assert m.ttft.count == 3
        assert m.step_time.count == fake.count("decode")
        assert (m.queue_length, m.busy_slots, m.slots) == (0, 0, 2)
