"""Acceptance tests through a real Hypercorn server on loopback (issue 3), with FakeEngine on a tiny model.

The server is the production `serving.__main__.serve` (loading, warm-up, /health, graceful stop) run in
a background thread; clients are the current `openai` package, the legacy `openai==0.28.1` CLI (installed
into a cached throwaway venv) and real curl.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fake_engine import FakeEngine, ServerThread
from waits import HANG

from serving.loading import registry_for
from serving.settings import Settings

LEGACY_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2jax-test" / "openai028"


def batch_engine(model):
    """The production engine, warmed up for the short prompts of these tests only (compiling is slow)."""
    from gpt2jax.engine.engine import BatchEngine

    engine = BatchEngine.from_model(model, slots=8)
    engine.warmup = lambda: BatchEngine.warmup(engine, buckets=(16, 32))
    return engine


@pytest.fixture(scope="module", params=["batch_engine", "fake_engine"])
def server(request, tiny_checkpoint):
    """A keyless server on the tiny model; checks /health is 503 until the warm-up ends, 200 after.

    Every test runs on the production engine and on FakeEngine (the same answers by a simpler route).
    """
    settings = Settings(max_n=4, max_tokens=64)
    registry = registry_for([Path(tiny_checkpoint)], settings)
    gate, loaded = threading.Event(), []

    def build(model, _settings):
        loaded.append(model)  # to compare with the model's own score()
        engine = batch_engine(model) if request.param == "batch_engine" else FakeEngine(model)
        warmup = engine.warmup
        engine.warmup = lambda: (gate.wait(HANG), warmup())
        return engine

    srv = ServerThread(settings, registry, build).start()
    try:
        srv.wait_for(lambda: srv.get("/health")[0] != 0, what="the server to listen")
        status, body = srv.get("/health")
        assert status == 503 and body["status"] == "loading", body
        gate.set()
        srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health 200")
        srv.name = next(iter(registry.models))
        srv.model = loaded[0]
        yield srv
    finally:
        gate.set()
        assert srv.shutdown() == 0


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0, timeout=HANG)


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.name]
    assert models.data[0].model_extra["context_length"] == server.model.config.n_ctx


def test_completions_n_logprobs_echo_stop(client, server):
    prompt = "Hello, my name is"
    r = client.completions.create(
        model=server.name, prompt=prompt, n=2, logprobs=2, echo=True, stop=["\n", "ed"], max_tokens=12, seed=1
    )
    assert r.object == "text_completion" and isinstance(r.created, int) and r.model == server.name
    assert [c.index for c in r.choices] == [0, 1]
    expected = server.model.score(prompt)
    n_prompt = len(expected)
    for c in r.choices:
        assert c.text.startswith(prompt) and c.finish_reason in ("stop", "length")
        assert "\n" not in c.text[len(prompt) :] and "ed" not in c.text[len(prompt) :]
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert np.allclose(lp.token_logprobs[1:n_prompt], expected[1:], atol=1e-4)
        # logprobs=2: the two best, and the chosen token when it is not among them (OpenAI's logprobs + 1)
        assert all(
            len(t) <= 3 and tok in t for tok, t in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True)
        )
        assert "".join(lp.tokens).startswith(prompt)
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_echo_scoring_matches_model_score(client, server):
    """echo + max_tokens 0 + logprobs scores a text (what lm-evaluation-harness relies on)."""
    text = "The quick brown fox jumps"
    r = client.completions.create(model=server.name, prompt=text, echo=True, max_tokens=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text
    assert lp.token_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1:], server.model.score(text)[1:], atol=1e-4)
    assert lp.text_offset[0] == 0 and r.usage.completion_tokens == 0


def test_stream_equals_non_stream(client, server):
    args = dict(model=server.name, prompt="Once upon a time", max_tokens=10, seed=7, temperature=0.9)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_include_usage(client, server):
    chunks = list(
        client.completions.create(
            model="davinci",  # an OpenAI name of 2020: served by the (only) model
            prompt=["One", "Two"],
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1, 2, 3}  # prompt-major choice indexes


def test_chat(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(
        model=server.name, messages=messages, max_tokens=8, seed=3, logprobs=True
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert "\nUser:" not in r.choices[0].message.content
    assert r.choices[0].logprobs.content and r.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=server.name, messages=messages, max_tokens=8, seed=3, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def _legacy_cli() -> Path | None:
    """openai==0.28.1 in a cached venv; None (with the reason printed) if it cannot be installed."""
    cli = LEGACY_VENV / "bin" / "openai"
    if cli.exists():
        return cli
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LEGACY_VENV)], check=True, timeout=HANG)
        pip = [str(LEGACY_VENV / "bin" / "pip"), "install", "-q", "openai==0.28.1"]
        subprocess.run(pip, check=True, timeout=HANG, capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"cannot install openai==0.28.1 into {LEGACY_VENV}: {e}")
        return None
    return cli if cli.exists() else None


def test_legacy_cli_readme_commands(server):
    cli = _legacy_cli()
    if cli is None:
        pytest.skip("openai==0.28.1 could not be installed (see the printed reason)")
    env = {**os.environ, "PORT": str(server.port), "OPENAI_API_KEY": "sk-anything"}
    env["PATH"] = f"{cli.parent}{os.pathsep}{env['PATH']}"
    env.pop("OPENAI_API_BASE", None)
    # The original README's commands, verbatim.
    completion = "OPENAI_API_BASE=http://localhost:$PORT openai api completions.create -e davinci -p 'Hello, world' -t 0.8 -M 16 -n 4"
    out = subprocess.run(["bash", "-c", completion], env=env, capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    assert [f"===== Completion {i} =====" in out.stdout for i in range(4)] == [True] * 4, out.stdout
    assert out.stdout.count("Hello, world") >= 4  # the CLI asks for echo

    engines = "OPENAI_API_BASE=http://localhost:$PORT openai api engines.list"
    out = subprocess.run(["bash", "-c", engines], env=env, capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    assert f'"id": "{server.name}"' in out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_get_engine_completions(server):
    import json

    url = (
        f"http://localhost:{server.port}/v1/engines/{server.name}/completions"
        "?prompt=Hello,%20my%20name%20is&max_tokens=32&n=4&temperature=0.9&echo=true"
    )
    out = subprocess.run(
        f"curl -s {shlex.quote(url)}", shell=True, capture_output=True, text=True, timeout=HANG
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert out.stdout.startswith("{\n  ")  # pretty-printed for the browser, as the original
    assert len(body["choices"]) == 4
    assert all(c["text"].startswith("Hello, my name is") for c in body["choices"])
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_examples(server, tmp_path):
    env = {**os.environ, "PORT": str(server.port), "T": "0.8", "M": "8"}
    env.pop("OPENAI_API_BASE", None)
    run = lambda *args, **extra: subprocess.run(
        ["bash", *map(str, args)], env=env | extra, capture_output=True, text=True, timeout=HANG
    )
    out = run(EXAMPLES / "001_test_list.sh")
    assert out.returncode == 0 and f'"id": "{server.name}"' in out.stdout, out.stderr
    out = run(EXAMPLES / "002_test_completion.sh", "Hello, my name is")
    assert out.returncode == 0 and out.stdout.startswith("Hello, my name is"), out.stderr
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time")
    out = run(EXAMPLES / "002_test_completion.sh", prompt_file)
    assert out.returncode == 0 and out.stdout.startswith("Once upon a time"), out.stderr
    out = run(EXAMPLES / "003_completions.sh", "Yo dawg", N="2")
    assert out.returncode == 0 and out.stdout.count("\033c") == 2 and "Yo dawg" in out.stdout, out.stderr
    out = subprocess.run(
        [sys.executable, EXAMPLES / "openai_client.py"], env=env, capture_output=True, text=True, timeout=HANG
    )
    assert out.returncode == 0 and "completion 1:" in out.stdout and "chat: " in out.stdout, out.stderr


def test_min_p_one_is_greedy_on_every_route(client, server):
    """min_p=1 keeps only the most likely token, so any temperature and seed give the greedy text."""
    import openai

    args = dict(model=server.name, max_tokens=12)
    greedy = client.completions.create(prompt="The", temperature=0, **args).choices[0].text
    for temperature, seed in ((0.7, 1), (2.0, 2)):
        r = client.completions.create(
            prompt="The", temperature=temperature, seed=seed, extra_body={"min_p": 1}, **args
        )
        assert r.choices[0].text == greedy
    status, body = server.get(
        f"/v1/engines/{server.name}/completions?prompt=The&max_tokens=12&temperature=2&min_p=1"
    )
    assert status == 200 and body["choices"][0]["text"] == greedy
    messages = [{"role": "user", "content": "Hi"}]
    greedy_chat = client.chat.completions.create(messages=messages, temperature=0, **args).choices[0].message
    hot = client.chat.completions.create(
        messages=messages, temperature=2, seed=3, extra_body={"min_p": 1.0}, **args
    )
    assert hot.choices[0].message.content == greedy_chat.content
    for bad in (1.5, -0.1):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(prompt="The", extra_body={"min_p": bad}, **args)
        assert e.value.body["param"] == "min_p" and "min_p" in e.value.body["message"]
