"""What the engine promises for seeds: with batch_invariant (BATCH_INVARIANT=1), a request gives the same
tokens, text and logprobs whatever runs beside it.

24 seeded requests at temperature 1 (some n=2, some streamed, some with logprobs, mixed prompt and
completion lengths) go through the real app and engine on rand-small (the real GPT-2 vocabulary on random
weights: near-uniform distributions, so a sample flips at the least change in the logits), first all
together (with a few other requests of other settings beside them), then each alone: every response must be
the same, bit for bit. The engine admits nothing until all of the together run is queued, so that run
really shares its decode steps (checked: every slot busy at once), whatever the machine's speed. On the
default engine the same test fails (here: the logprobs of 7 of the 10 choices that ask for them differ in
their last bits, 8 of 10 on 8 devices; a text differs less often). Run as a script
(`python tests/test_batch_invariance.py CHECKPOINT`) it prints both runs as JSON: the 8-device test runs it
in a subprocess with XLA_FLAGS set before JAX starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_engine, when run as a script

SLOTS, CHUNK = 16, 4
WORDS = ("the", "a", "once", "upon", "time", "there", "was", "king", "queen", "dragon", "castle", "river")


def seeded_bodies() -> list[dict]:
    """The 24 compared requests."""
    bodies = []
    for i in range(24):
        prompt = f"Story {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 5 * 6 + 1))
        body = dict(prompt=prompt, max_tokens=4 + (i * 5) % 21, temperature=1.0, seed=100 + i)
        body["logit_bias"] = {"50256": -100}  # no early end-of-text: lengths stay as asked
        if i % 4 == 1:
            body["n"] = 2
        if i % 3 == 0:
            body["stream"] = True
        elif i % 3 == 1:
            body["logprobs"] = 1
        bodies.append(body)
    return bodies


def neighbour_bodies() -> list[dict]:
    """Other requests that run beside the together run only: other settings, other program paths."""
    return [
        dict(prompt="The king", max_tokens=20, temperature=0),
        dict(prompt="Once upon a time there was", max_tokens=16, temperature=0.7, top_k=40, seed=1),
        dict(prompt="A river", max_tokens=12, top_p=0.5, frequency_penalty=1.5, presence_penalty=1.0),
        dict(prompt="The dragon slept", max_tokens=6, echo=True, logprobs=3, temperature=1.2, seed=2),
    ]


def outcome(body: dict, status: int, text: str) -> dict:
    """What must not change between runs: per choice index its text, finish reason and logprobs."""
    assert status == 200, text
    choices: dict[int, dict] = {}
    if body.get("stream"):
        payloads = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
        parts = [c for p in payloads for c in p["choices"]]
    else:
        parts = json.loads(text)["choices"]
    for c in parts:
        seen = choices.setdefault(c["index"], dict(text="", finish_reason=None, logprobs=[]))
        seen["text"] += c["text"]
        seen["finish_reason"] = c["finish_reason"] or seen["finish_reason"]
        if c.get("logprobs"):
            seen["logprobs"] += list(
                zip(c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"], strict=True)
            )
    return {str(i): choices[i] for i in sorted(choices)}


@contextlib.contextmanager
def held_until_queued(engine, n: int):
    """The engine admits nothing until `n` requests wait: they then start together, however slow the
    machine (no sleeps)."""
    worker, queued = engine.worker, threading.Event()
    submit, admit = worker.submit, worker._admit

    def submit_and_count(job) -> None:
        submit(job)
        if len(worker.waiting) >= n:
            queued.set()

    def admit_when_queued(pending) -> None:
        queued.wait(600)  # bounded only so that a request refused before queueing fails the test, not hangs
        admit(pending)

    worker.submit, worker._admit = submit_and_count, admit_when_queued
    try:
        yield
    finally:
        del worker.submit, worker._admit


def together_and_alone(checkpoint: str) -> dict:
    """Runs the 24 requests together (with the neighbours), then each alone, on a batch-invariant engine."""
    import jax
    from fake_engine import make_app

    import gpt2jax
    from gpt2jax.engine.engine import BatchEngine

    lm = gpt2jax.load(checkpoint)
    engine = BatchEngine.from_model(
        lm, slots=SLOTS, chunk_size=CHUNK, batch_invariant=True, queue_timeout=float("inf")
    )
    app = make_app({lm.name: engine}, max_n=4)
    bodies, neighbours = seeded_bodies(), neighbour_bodies()
    busy: list[int] = []
    decode = engine.programs.decode

    def counting_decode(state, active, window=None, rows=None, steps=None):
        busy.append(int(active.sum()))
        return decode(state, active, window, rows, steps)

    engine.programs.decode = counting_decode

    async def send(body: dict) -> dict:
        response = await app.test_client().post("/v1/completions", json=dict(body, model=lm.name))
        return outcome(body, response.status_code, await response.get_data(as_text=True))

    async def all_at_once() -> list[dict]:
        return list(await asyncio.gather(*(send(b) for b in bodies + neighbours)))[: len(bodies)]

    try:
        with held_until_queued(engine, len(bodies) + len(neighbours)):
            together = asyncio.run(all_at_once())
        most_busy = max(busy)
        alone = [asyncio.run(send(b)) for b in bodies]
    finally:
        engine.stop(drain=False, timeout=30)
    shapes = dict(windows=list(engine.programs.windows), rows=list(engine.programs.row_counts))
    return dict(
        devices=len(jax.local_devices()), together=together, alone=alone, most_busy=most_busy, shapes=shapes
    )


def check(out: dict) -> None:
    assert out["most_busy"] == SLOTS  # the together run filled every slot
    assert out["shapes"] == dict(windows=[256], rows=[SLOTS // out["devices"]])  # one decode program
    for body, together, alone in zip(seeded_bodies(), out["together"], out["alone"], strict=True):
        assert len(together) == body.get("n", 1)
        assert together == alone, body
    logprobs = [c for r in out["alone"] for c in r.values() if c["logprobs"]]
    assert logprobs and all(len(c["logprobs"]) > 1 for c in logprobs)


def test_the_setting_reaches_the_engine(monkeypatch):
    import pytest

    import gpt2jax.engine.engine
    from serving.loading import build_engine
    from serving.settings import Settings, SettingsError

    monkeypatch.setattr(gpt2jax.engine.engine, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(gpt2jax.engine.engine.BatchEngine, "from_model", lambda model, **options: options)
    assert build_engine(None, Settings.from_env({"BATCH_INVARIANT": "true"}))["batch_invariant"] is True

    assert Settings.from_env({}).batch_invariant is False  # the fast path by default
    assert Settings.from_env({"BATCH_INVARIANT": "1"}).batch_invariant is True
    assert Settings.from_env({"BATCH_INVARIANT": "off"}).batch_invariant is False
    with pytest.raises(SettingsError, match="BATCH_INVARIANT"):
        Settings.from_env({"BATCH_INVARIANT": "sometimes"})


def test_batch_invariant_programs_have_one_shape_each():
    from gpt2jax.engine.shapes import decode_row_counts, decode_windows, prefill_rows

    assert decode_windows(128, 1024) == (128, 256, 512, 1024) and decode_windows(128, 1024, True) == (1024,)
    assert decode_row_counts(16) == (1, 4, 8, 16) and decode_row_counts(16, True) == (16,)
    assert [prefill_rows(n, 16, False) for n in (16, 32, 64, 128, 256, 1024)] == [4, 8, 16, 16, 1, 1]
    assert prefill_rows(256, 16, False, True) == prefill_rows(256, 16, True) == 1


def test_seeded_requests_give_the_same_results_together_and_alone(rand_small):
    out = together_and_alone(str(rand_small))
    assert out["devices"] == 1
    check(out)


def test_eight_devices_give_the_same_results_together_and_alone(rand_small):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, str(rand_small)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    check(out)


if __name__ == "__main__":
    print(json.dumps(together_and_alone(sys.argv[1])))
