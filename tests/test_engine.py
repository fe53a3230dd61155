"""The continuous-batching engine (gpt2jax/engine/engine.py) on the tiny random checkpoint.

One engine (8 slots, chunks of 4 steps) serves most tests, so that compiling happens once. Run as a script
(`python tests/test_engine.py CHECKPOINT`), this file prints the mixed workload's results as JSON: the test
for 8 devices runs it in a subprocess with XLA_FLAGS set before JAX starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from waits import HANG

import gpt2jax
from gpt2jax.engine.api import EngineError, EngineOverloaded, GenerationRequest
from gpt2jax.engine.choice import ChoiceStream, holdback
from gpt2jax.engine.engine import BatchEngine, EngineFault

SLOTS, CHUNK = 8, 4
PROMPTS = [
    "The",
    "Return the value of the named attribute of object.",
    "import os",
    "A class may define a method named __getitem__() that",
    "For example, the following code",
    "x = 1",
    "If the object supports the buffer protocol, then the result is an exception raised.",
    "Each time the loop runs, the statement is executed and the condition is checked again until it is false",
]


@dataclasses.dataclass
class Choice:
    text: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    prompt: tuple = ()
    finish_reason: str | None = None
    completion_tokens: int = 0
    events: int = 0


async def collect(engine: BatchEngine, request: GenerationRequest) -> list[Choice]:
    choices: dict[int, Choice] = {}
    async for ev in engine.generate(request):
        c = choices.setdefault(ev.index, Choice())
        assert c.finish_reason is None, "event after the last one"
        c.text += ev.text
        c.tokens += ev.tokens
        c.prompt = c.prompt or ev.prompt
        c.finish_reason, c.completion_tokens = ev.finish_reason, ev.completion_tokens
        c.events += 1
    return [choices[i] for i in sorted(choices)]


def mixed_requests(tokenizer) -> list[GenerationRequest]:
    """16 requests of different prompt lengths and settings."""
    settings = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=1),
        dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        dict(temperature=1.0, top_p=0.9, seed=2, logprobs=3),
        dict(temperature=0.9, seed=5, stop=("e", " t", "d d"), logprobs=0),
        dict(temperature=1.2, top_k=20, seed=3, stop=("on", "\n")),
        dict(temperature=0.7, n=2, seed=4, frequency_penalty=0.5),
        dict(temperature=0.0, logit_bias=((5, 5.0), (17, -100.0)), prompt_logprobs=True, logprobs=2),
    ]
    out = []
    for i in range(16):
        prompt = tuple(tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " x" * (i // 2)))
        out.append(
            GenerationRequest.of(prompt=prompt, max_tokens=6 + (i * 5) % 20, **settings[i % len(settings)])
        )
    return out


def summary(results: list[list[Choice]]) -> list:
    """What must agree between runs: texts, token ids, finish reasons, logprobs."""
    return [
        [
            dict(
                text=c.text,
                tokens=[t.token for t in c.tokens],
                logprobs=[t.logprob for t in c.tokens],
                top=[[x[0] for x in t.top] for t in c.tokens],
                finish=c.finish_reason,
                n=c.completion_tokens,
            )
            for c in choices
        ]
        for choices in results
    ]


def assert_same(a: list, b: list) -> None:
    for ra, rb in zip(a, b, strict=True):
        for ca, cb in zip(ra, rb, strict=True):
            assert {k: v for k, v in ca.items() if k != "logprobs"} == {
                k: v for k, v in cb.items() if k != "logprobs"
            }
            np.testing.assert_allclose(ca["logprobs"], cb["logprobs"], atol=1e-4)


async def run_batched(engine: BatchEngine, requests: list[GenerationRequest]) -> list[list[Choice]]:
    return list(await asyncio.gather(*(collect(engine, r) for r in requests)))


def make_engine(lm, **options) -> BatchEngine:
    # min_window 32: decode windows 32, 64 and 128 (n_ctx), so the mixed workload switches between them.
    # Requests wait for a slot as long as it takes: the queue timeout is a server's choice, and a slow
    # machine compiling the programs on first use must not turn the tests' queued requests into refusals.
    options.setdefault("queue_timeout", math.inf)
    return BatchEngine.from_model(lm, slots=SLOTS, chunk_size=CHUNK, min_window=32, **options)


# ---- the shared engine ----

import pytest  # noqa: E402  (the script mode above needs no pytest)


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return gpt2jax.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def engine(lm, compiles):
    eng = make_engine(lm)
    eng.warmup()
    eng.start()
    yield eng
    eng.stop(drain=False, timeout=HANG)


@pytest.fixture(scope="module")
def mixed(lm, engine, compiles):
    """The mixed workload, batched and one at a time (and how many compilations the runs needed)."""
    requests = mixed_requests(lm.tokenizer)
    before = len(compiles)
    real, windows = engine.programs.decode, set()

    def spy(state, active, window, rows=None, steps=None):
        windows.add(window)
        return real(state, active, window, rows, steps)

    engine.programs.decode = spy
    try:
        batched = asyncio.run(run_batched(engine, requests))
        alone = [asyncio.run(collect(engine, r)) for r in requests]
    finally:
        del engine.programs.decode
    # Short rows decode over a part of the cache; the CPU attention kernel reads only what rows see, in
    # place, so with it there is one window.
    assert windows == ({128} if engine.programs.kernel_attention else {32, 64, 128}), windows
    return requests, batched, alone, len(compiles) - before


# ---- 1. batching does not change results ----


def test_results_are_the_same_alone_and_batched(mixed):
    requests, batched, alone, _ = mixed
    assert_same(summary(batched), summary(alone))
    for r, choices in zip(requests, batched, strict=True):
        assert len(choices) == r.params.n
        for c in choices:
            assert c.finish_reason in ("stop", "length")
            assert c.completion_tokens <= r.params.max_tokens
            assert bool(c.prompt) == r.params.prompt_logprobs


def test_decode_runs_only_the_leading_slots_that_are_busy(lm, engine, monkeypatch):
    real, rows_seen = engine.programs.decode, []

    def spy(state, active, window, rows=None, steps=None):
        rows_seen.append((rows, int(active.sum())))
        return real(state, active, window, rows, steps)

    monkeypatch.setattr(engine.programs, "decode", spy)
    asyncio.run(collect(engine, long_request(lm)))
    assert rows_seen and {rows for rows, _ in rows_seen} == {1}  # a lone request: one row per step

    rows_seen.clear()

    async def three():
        return await asyncio.gather(*(collect(engine, long_request(lm)) for _ in range(3)))

    results = asyncio.run(three())
    assert max(busy for _, busy in rows_seen) == 3 and max(rows for rows, _ in rows_seen) == 4
    assert all(rows >= busy for rows, busy in rows_seen)
    assert results[0] == results[1] == results[2]  # same greedy request, same answer wherever it sat


def test_no_compilation_after_warmup(mixed):
    assert mixed[3] == 0


def test_greedy_and_seeded_outputs_match_the_notebook_api(lm, mixed):
    requests, batched, _, _ = mixed
    plain = [
        i
        for i, r in enumerate(requests)
        if r.params.temperature == 0 and not r.params.logit_bias and not r.params.stop
    ]
    for i in plain:
        r = requests[i]
        text = lm.tokenizer.decode(r.prompt)
        ref = lm.generate(
            text,
            max_tokens=r.params.max_tokens,
            temperature=0,
            frequency_penalty=r.params.frequency_penalty,
            presence_penalty=r.params.presence_penalty,
        )
        assert batched[i][0].text == ref[0]
    # n=2 with a seed: choice i has seed derive_seed(seed, i), as the notebook API's row i does.
    i = next(i for i, r in enumerate(requests) if r.params.n == 2)
    r = requests[i]
    ref = lm.generate(
        lm.tokenizer.decode(r.prompt),
        max_tokens=r.params.max_tokens,
        temperature=r.params.temperature,
        frequency_penalty=r.params.frequency_penalty,
        n=2,
        seed=r.params.seed,
    )
    assert [c.text for c in batched[i]] == ref
    assert ref[0] != ref[1]


# ---- 2. eight devices give the same results as one ----


def test_eight_devices_match_one(tiny_checkpoint, mixed, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cache = tmp_path / "jax-cache"
    proc = subprocess.run(
        [sys.executable, __file__, str(tiny_checkpoint), str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert_same(out["results"], summary(mixed[1]))
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"


def main(checkpoint: str, cache_dir: str) -> None:
    import jax

    from gpt2jax.engine.engine import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    lm = gpt2jax.load(checkpoint)
    engine = make_engine(lm)
    engine.start()
    results = asyncio.run(run_batched(engine, mixed_requests(lm.tokenizer)))
    engine.stop()
    print(json.dumps({"devices": len(jax.local_devices()), "results": summary(results)}))


# ---- 3. cancellation, back-pressure, no leaks ----


def slow_decode(engine: BatchEngine, monkeypatch, seconds: float) -> None:
    """Makes every decode call take at least `seconds` (the device stays busy long enough to test queues)."""
    real = engine.programs.decode

    def slow(*args):
        time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(engine.programs, "decode", slow)


def long_request(lm, **kw) -> GenerationRequest:
    return GenerationRequest.of(
        prompt=tuple(lm.tokenizer.encode("The")), max_tokens=100, ignore_eos=True, temperature=0.0, **kw
    )


async def until(cond, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_closing_or_cancelling_a_request_frees_its_slots(lm, engine, monkeypatch):
    slow_decode(engine, monkeypatch, 0.02)

    async def go():
        stream = engine.generate(long_request(lm, n=2))
        await anext(stream)
        assert engine.busy_slots == 2
        await stream.aclose()  # what the HTTP layer does when the client goes away
        await until(lambda: engine.busy_slots == 0)

        task = asyncio.ensure_future(collect(engine, long_request(lm)))
        await until(lambda: engine.busy_slots == 1)
        task.cancel()
        await until(lambda: engine.busy_slots == 0)

    asyncio.run(go())


def test_a_late_request_waits_for_one_chunk_not_two(lm, engine, monkeypatch):
    """With a slot free, the worker reads every chunk it dispatched before admitting again, so a request
    that arrives mid-chunk is prefilled right after that chunk instead of after a second one already
    queued behind it (measured on 124M: a late arrival's first token p50 ~600 -> ~210 ms). With every
    slot busy nobody can be admitted, and the next chunk is kept queued so the device never waits."""
    in_flight = {"prefill": [], "decode": []}
    for name in in_flight:
        real = getattr(engine.programs, name)

        def record(*args, _real=real, _name=name, **kw):
            in_flight[_name].append(engine.worker._inflight)  # outputs dispatched and not yet read
            return _real(*args, **kw)

        monkeypatch.setattr(engine.programs, name, record)

    async def go():
        running = engine.generate(long_request(lm, n=SLOTS - 1))
        await anext(running)
        await until(lambda: len(in_flight["decode"]) >= 3)
        in_flight["prefill"].clear()
        late = GenerationRequest.of(prompt=(5, 6), max_tokens=2, ignore_eos=True, temperature=0.0)
        await collect(engine, late)  # takes the last free slot
        assert in_flight["prefill"] == [0]
        while engine.busy_slots:
            await anext(running)
        await until(lambda: engine.busy_slots == 0)

    asyncio.run(go())
    assert 1 in in_flight["decode"]  # the chunks run while all slots were busy were pipelined


def test_the_worker_hands_the_freed_heap_back_once_each_time_it_goes_idle(lm, engine, monkeypatch):
    """Requests' temporaries leave freed heap behind (~60 MB for a burst on a 124M model): the worker
    trims it when it runs out of work, never while a slot is busy, and not again while it stays idle."""
    import gpt2jax.engine.worker as worker

    trims = []
    assert engine.wait_idle(HANG)
    monkeypatch.setattr(worker, "release_memory", lambda: trims.append(engine.busy_slots))
    request = GenerationRequest.of(prompt=tuple(lm.tokenizer.encode("Hello")), max_tokens=12, temperature=0.0)

    def trimmed(n: int) -> list:  # the trim comes as the worker finds itself idle
        deadline = time.monotonic() + HANG
        while len(trims) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return trims

    for _ in range(2):
        before = len(trims)
        asyncio.run(collect(engine, request))
        assert engine.wait_idle(HANG)
        assert len(trimmed(before + 1)) > before, trims
        count = len(trims)
        time.sleep(0.2)
        # one more at most: wait_idle may return before the worker's own trim, and a trim due from the
        # test before may come first; a worker trimming while idle would add many
        assert len(trims) <= count + 1 and set(trims) == {0}, trims  # and only with every slot free


def test_prompts_admitted_together_prefill_packed_in_one_row(lm, engine, monkeypatch):
    """Three prompts admitted in one wave are prefilled back to back in one row (of 32 tokens: the
    shortest that holds their 20 tokens), one call; their results are the ones they get alone."""

    def greedy(prompt: str) -> GenerationRequest:
        return GenerationRequest.of(prompt=tuple(lm.tokenizer.encode(prompt)), max_tokens=5, temperature=0.0)

    alone = [asyncio.run(collect(engine, greedy(p)))[0].text for p in PROMPTS[:3]]
    slow_decode(engine, monkeypatch, 0.05)
    rows = []
    real = engine.programs.prefill

    def record(prompts, length, score):
        rows.append(length)
        return real(prompts, length, score)

    monkeypatch.setattr(engine.programs, "prefill", record)

    async def go():
        running = engine.generate(long_request(lm))
        await anext(running)  # decoding: the next three wait in the queue and are admitted together
        rows.clear()
        texts = await asyncio.gather(*(collect(engine, greedy(p)) for p in PROMPTS[:3]))
        await running.aclose()
        return [t[0].text for t in texts]

    assert sum(len(lm.tokenizer.encode(p)) for p in PROMPTS[:3]) == 20
    assert asyncio.run(go()) == alone
    assert rows == [32], rows


def test_full_queue_refuses_at_once_and_long_waits_are_refused(lm, engine, monkeypatch):
    slow_decode(engine, monkeypatch, 0.05)
    monkeypatch.setattr(engine, "queue_timeout", 1.0)

    async def go():
        busy = [engine.generate(long_request(lm)) for _ in range(SLOTS)]
        await asyncio.gather(*(anext(s) for s in busy))
        assert engine.busy_slots == SLOTS
        monkeypatch.setattr(engine, "max_queue", 1)
        waiting = asyncio.ensure_future(collect(engine, long_request(lm)))
        await until(lambda: engine.queue_length == 1)
        # At once (the queue is full), not after the 1 s wait: that one says "no slot within".
        with pytest.raises(EngineOverloaded, match="1 requests waiting"):
            await anext(engine.generate(long_request(lm)))
        with pytest.raises(EngineOverloaded, match="no slot within"):
            await waiting
        for s in busy:
            await s.aclose()
        await until(lambda: engine.busy_slots == 0 and engine.queue_length == 0)

    asyncio.run(go())


def test_many_requests_with_random_cancellations_leak_nothing(lm, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queue", 1000)
    rng = random.Random(0)

    async def one(i: int):
        r = GenerationRequest.of(
            prompt=tuple(lm.tokenizer.encode(PROMPTS[i % len(PROMPTS)])),
            max_tokens=rng.choice([0, 1, 2, 5, 8]),
            n=rng.choice([1, 1, 2]),
            temperature=rng.choice([0.0, 1.0]),
            seed=i,
            prompt_logprobs=rng.random() < 0.2,
            logprobs=rng.choice([None, 2]),
            stop=rng.choice([(), ("e",)]),
        )
        stream = engine.generate(r)
        quit_after = rng.choice([0, 1, 2, None, None])
        seen = 0
        try:
            async for _ in stream:
                seen += 1
                if quit_after is not None and seen >= quit_after:
                    break
        finally:
            await stream.aclose()

    async def go():
        tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
        await asyncio.sleep(0.05)
        for t in rng.sample(tasks, 20):  # some are cancelled while waiting or running
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: engine.busy_slots == 0 and engine.queue_length == 0)

    asyncio.run(go())
    assert engine.wait_idle(timeout=HANG)
    assert sorted(engine.worker.free) == list(range(SLOTS))
    assert all(s is None for s in engine.worker.seats)


def test_errors_fail_the_affected_requests_and_the_engine_keeps_serving(lm, engine, monkeypatch):
    real = engine.programs.decode
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device failure")
        return real(*args)

    monkeypatch.setattr(engine.programs, "decode", fails_once)
    request = GenerationRequest.of(prompt=tuple(lm.tokenizer.encode("x = 1")), max_tokens=10, temperature=0)
    with pytest.raises(EngineFault, match="injected"):
        asyncio.run(collect(engine, request))
    assert asyncio.run(collect(engine, request))[0].completion_tokens == 10
    assert engine.wait_idle(timeout=HANG) and engine.busy_slots == 0


def test_invalid_requests_are_refused_before_any_event(lm, engine):
    async def first(r):
        return await anext(engine.generate(r))

    for bad in [
        GenerationRequest.of(prompt=()),
        GenerationRequest.of(prompt=(1,), max_tokens=engine.n_ctx),
        GenerationRequest.of(prompt=(1,), n=SLOTS + 1),
        GenerationRequest.of(prompt=(lm.config.n_vocab,)),
    ]:
        with pytest.raises(EngineError):
            asyncio.run(first(bad))


# ---- 4. stop strings, logprobs, echo ----


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(lm, engine):
    prompt = tuple(lm.tokenizer.encode("Return the value of"))
    free = asyncio.run(collect(engine, GenerationRequest.of(prompt=prompt, max_tokens=12, temperature=0)))[0]
    pieces = [lm.tokenizer.decode([t.token]) for t in free.tokens]
    k = next(i for i in range(2, len(pieces)) if pieces[i - 1] and pieces[i])
    stop = pieces[k - 1][-1:] + pieces[k][:1]  # the last character of one token and the first of the next
    cut = free.text.find(stop)
    r = GenerationRequest.of(
        prompt=prompt, max_tokens=12, temperature=0, stop=("zzz-not-there", stop), logprobs=1
    )
    got = asyncio.run(collect(engine, r))[0]
    assert got.text == free.text[:cut]
    assert got.finish_reason == "stop" and stop not in got.text
    assert "".join(lm.tokenizer.decode([t.token]) for t in got.tokens).startswith(got.text)
    assert free.finish_reason == "length" and free.completion_tokens == 12


def test_logprobs_agree_with_scoring(lm, engine):
    text = "Return the value of the named attribute"
    prompt = tuple(lm.tokenizer.encode(text))
    r = GenerationRequest.of(prompt=prompt, max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=True)
    c = asyncio.run(collect(engine, r))[0]
    expected = lm.score(text)
    assert c.prompt[0].logprob is None and c.prompt[0].top == ()
    np.testing.assert_allclose([t.logprob for t in c.prompt[1:]], expected[1:], atol=1e-4)
    assert all(len(t.top) == 3 for t in c.prompt[1:])
    # Generated tokens: their logprobs are those of scoring prompt + completion; greedy = the top choice.
    scores = lm.score_ids([list(prompt) + [t.token for t in c.tokens]])[0]
    np.testing.assert_allclose([t.logprob for t in c.tokens], scores.logprob[len(prompt) :], atol=1e-4)
    for t in c.tokens:
        assert len(t.top) == 3 and t.top[0][0] == t.token
        assert t.top[0][1] == lm.tokenizer.token_str(t.token)
        np.testing.assert_allclose(t.top[0][2], t.logprob, atol=1e-5)


def test_echo_scoring_with_zero_max_tokens(lm, engine):
    prompt = tuple(lm.tokenizer.encode("For example, the following code"))
    r = GenerationRequest.of(prompt=prompt, max_tokens=0, logprobs=1, prompt_logprobs=True, n=2)
    choices = asyncio.run(collect(engine, r))
    assert [c.finish_reason for c in choices] == ["length", "length"]
    assert all(c.text == "" and c.completion_tokens == 0 and len(c.prompt) == len(prompt) for c in choices)


def test_best_of_returns_the_choice_with_the_highest_mean_logprob(lm, engine):
    prompt = tuple(lm.tokenizer.encode("import os"))
    base = dict(prompt=prompt, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    all3 = asyncio.run(collect(engine, GenerationRequest.of(n=3, **base)))
    best = asyncio.run(collect(engine, GenerationRequest.of(n=1, best_of=3, **base)))
    assert len(best) == 1 and best[0].events == 1
    means = [np.mean([t.logprob for t in c.tokens]) for c in all3]
    assert best[0].text == all3[int(np.argmax(means))].text


def test_two_engines_serve_side_by_side(lm, engine, mixed):
    """A second engine (another model would be the same) has its own slots, thread and metrics."""
    other = BatchEngine.from_model(lm, name="other", slots=2, chunk_size=2)
    requests, batched, _, _ = mixed
    i = next(i for i, r in enumerate(requests) if r.params.temperature == 0 and r.params.n == 1)

    async def both():
        return await asyncio.gather(collect(engine, requests[i]), collect(other, requests[i]))

    try:
        a, b = asyncio.run(both())
    finally:
        other.stop()
    assert a[0].text == b[0].text == batched[i][0].text  # slot count and chunk size change nothing
    assert other.metrics.tokens_generated == b[0].completion_tokens


def test_engine_metrics_count_requests_tokens_and_steps(lm, engine, mixed):
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    from gpt2jax.engine.metrics import EngineCollector

    m = engine.metrics
    assert m.tokens_generated > 0 and m.ttft.count > 0 and m.step_time.count > 0
    assert m.queue_length == 0 and m.busy_slots == 0 and m.slots == SLOTS
    registry = CollectorRegistry()
    registry.register(EngineCollector([engine]))
    text = generate_latest(registry).decode()
    assert 'gpt2jax_engine_busy_slots{model="' in text
    assert "gpt2jax_engine_time_to_first_token_seconds_bucket" in text
    assert "gpt2jax_engine_tokens_generated_total" in text
    assert "gpt2jax_engine_step_seconds_count" in generate_latest(REGISTRY).decode()  # published on start


def test_stop_drains_running_requests(lm, engine, monkeypatch):
    """Stops the shared engine (so this test comes last), then starts it again."""
    eng = engine
    slow_decode(eng, monkeypatch, 0.02)
    r = GenerationRequest.of(prompt=(1,), max_tokens=20, temperature=0, ignore_eos=True)

    async def go():
        task = asyncio.ensure_future(collect(eng, r))
        await until(lambda: eng.busy_slots == 1)
        await asyncio.to_thread(eng.stop)
        with pytest.raises(EngineOverloaded):
            await anext(eng.generate(r))
        return await task

    assert asyncio.run(go())[0].completion_tokens == 20
    assert not eng.running
    eng.start()
    assert asyncio.run(collect(eng, r))[0].completion_tokens == 20


# ---- the host side of a choice, without a model ----


def test_holdback():
    assert holdback("abc", ["cde"]) == 1
    assert holdback("abcd", ["cde", "bcdx"]) == 3
    assert holdback("abc", ["abc"]) == 0  # a whole stop string is found, not held
    assert holdback("abc", []) == 0


def test_choice_stream_holds_back_and_never_splits_characters(lm):
    tok = lm.tokenizer
    ids = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    c3, a9 = ids[b"\xc3"], ids[b"\xa9"]  # "é" in two byte tokens
    pieces = [tok.encode(s) for s in ["ab", "cd", "ef"]]
    s = ChoiceStream(tok, 0, max_tokens=20, stop=["def"])
    events = []
    for t in [c3, a9, *sum(pieces, [])]:
        s.push(t, -1.0, np.zeros(5, np.int32), np.zeros(5, np.float32))
        if (e := s.take_event()) is not None:
            events.append(e)
    texts = [e.text for e in events]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == "éabc" and s.finish_reason == "stop"
    assert texts[0] == "" and texts[1] == "é"  # the first byte alone releases no text
    assert events[-1].finish_reason == "stop"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
