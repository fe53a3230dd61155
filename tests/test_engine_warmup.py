"""Warm-up in two parts (gpt2jax/engine/warmup.py): what a lone short request needs before the engine is
ready, the other programs on a background thread; and the WARMUP setting that picks it for a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_engine import collect
from waits import HANG

import gpt2jax
from gpt2jax.engine.api import GenerationRequest
from gpt2jax.engine.engine import BatchEngine
from gpt2jax.engine.warmup import split
from serving.loading import load_all, registry_for
from serving.registry import READY
from serving.settings import Settings, SettingsError


def test_split_puts_a_lone_short_request_first_and_leaves_scoring_to_first_use():
    names = [("init",), ("first",)]
    for b in (16, 32, 64, 128):
        names += [("prefill", b, False, R) for R in (1, 4)] + [("prefill", b, True, 1), ("insert", b)]
    names += [("decode", w, r) for w in (64, 128) for r in (1, 4, 16)]
    now, later = split(names)
    assert now == [("init",), ("first",)] + [
        n for b in (16, 32, 64) for n in (("prefill", b, False, 1), ("insert", b))
    ] + [("decode", 64, 1)]
    scoring = [n for n in names if n[0] == "prefill" and n[2]]
    assert sorted(now + later + scoring) == sorted(names) and not set(now) & set(later)
    assert not set(scoring) & set(now + later)  # compiled on first use
    assert later[:2] == [("decode", 64, 4), ("decode", 64, 16)]  # several requests at once come next
    assert later[2:5] == [("prefill", 16, False, 4), ("prefill", 32, False, 4), ("prefill", 64, False, 4)]
    # Batch-invariant shapes (one prefill shape per bucket, one decode): the same rule picks them.
    now, later = split([("init",), ("first",), ("prefill", 16, False, 8), ("insert", 16), ("decode", 128, 8)])
    assert len(now) == 5 and later == []


def test_a_server_is_ready_before_the_rest_compiles_and_then_compiles_only_scoring(tiny_checkpoint, compiles):
    settings = Settings(slots=2, chunk_size=2)  # WARMUP=background, the default
    assert settings.warmup == "background"
    registry = registry_for([Path(tiny_checkpoint)], settings)
    calls = []

    def build(model, settings):
        engine = BatchEngine.from_model(model, slots=2, chunk_size=2, queue_timeout=HANG)
        real = engine.programs.compile
        engine.programs.compile = lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1]
        return engine

    asyncio.run(load_all(registry, settings, build))
    (model,) = registry.models.values()
    engine = model.engine
    try:
        assert model.status == READY
        all_names = engine.programs.program_names(engine.buckets, (False, True))
        now, later = split(all_names)
        assert [c.get("only") for c in calls] == [now, later] and calls[1]["threads"] == 1
        assert engine.compiling.done.wait(HANG)
        before = len(compiles)
        lm = gpt2jax.load(tiny_checkpoint)
        prompt = tuple(lm.tokenizer.encode("x " * 100))[:70]  # a prompt of the longest bucket
        r = GenerationRequest.of(prompt=prompt, max_tokens=50, temperature=0.0, ignore_eos=True, n=2)
        asyncio.run(collect(engine, r))
        assert len(compiles) == before  # everything else was compiled in the background
        scored = GenerationRequest.of(prompt=prompt[:5], max_tokens=3, prompt_logprobs=True, logprobs=1)
        asyncio.run(collect(engine, scored))
        assert len(compiles) == before + 1  # its prefill, on first use
        asyncio.run(collect(engine, scored))
        assert len(compiles) == before + 1
    finally:
        engine.stop(drain=False, timeout=HANG)


def test_requests_served_while_compiling_and_a_stop_that_interrupts_it(tiny_checkpoint):
    lm = gpt2jax.load(tiny_checkpoint)
    engine = BatchEngine.from_model(lm, slots=2, chunk_size=2, queue_timeout=HANG)
    text = "import os" + " x" * 40  # a longer prompt than the first programs cover
    r = GenerationRequest.of(prompt=tuple(lm.tokenizer.encode(text)), max_tokens=30, temperature=0.0)
    try:
        engine.warmup(background=True)
        got = asyncio.run(collect(engine, r))  # its programs compile now if the thread has not yet
        assert got[0].text == lm.generate(text, max_tokens=30, temperature=0)[0]
    finally:
        engine.stop(drain=False, timeout=HANG)
    assert engine.compiling.done.is_set()  # stopped: ended after the program it was compiling


def test_warmup_setting():
    assert Settings.from_env({}).warmup == "background"
    assert Settings.from_env({"WARMUP": "All"}).warmup == "all"
    with pytest.raises(SettingsError, match="WARMUP"):
        Settings.from_env({"WARMUP": "lazy"})


@pytest.mark.parametrize("setting", ["all", "background"])
def test_the_loader_asks_for_the_warmup_of_the_setting(tiny_checkpoint, setting):
    settings = Settings(warmup=setting)
    registry = registry_for([Path(tiny_checkpoint)], settings)
    calls = []

    def build(model, settings):
        engine = BatchEngine.from_model(model, slots=2, chunk_size=2)
        engine.warmup = lambda background=False: calls.append(background)  # records, compiles nothing
        engine.start = lambda: None
        return engine

    asyncio.run(load_all(registry, settings, build))
    assert calls == [setting == "background"]
    # An engine whose warmup has no such option (a test's, another kind) is warmed up whole.
    settings = Settings(warmup="background")
    registry = registry_for([Path(tiny_checkpoint)], settings)
    fake = type("Engine", (), {"warmup": lambda self: calls.append("whole"), "start": lambda self: None})
    asyncio.run(load_all(registry, settings, lambda model, settings: fake()))
    assert calls[-1] == "whole"
