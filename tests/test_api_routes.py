"""The HTTP layer in process (Quart's test client) over ScriptedEngine: routes, shapes, errors, keys, CORS."""

from __future__ import annotations

import json
import logging

import pytest
from fake_engine import ScriptedEngine, call, make_app, sse_payloads

from gpt2jax.engine.api import EngineError, EngineOverloaded
from serving.completions.schema import COMPLETION_FIELDS
from serving.openapi import build_spec
from serving.registry import LOADING, SHIPPED_DIR, ModelRegistry, ServedModel, owner_of


@pytest.fixture
def engine(tok) -> ScriptedEngine:
    return ScriptedEngine(tok, name="tiny", n_ctx=64)


@pytest.fixture
def app(engine):
    return make_app({"tiny": engine}, max_tokens=40, max_n=4)


def post(app, path, body, **kwargs):
    status, headers, text = call(app, "POST", path, json=body, **kwargs)
    return (
        status,
        headers,
        (json.loads(text) if headers.get("Content-Type", "").startswith("application/json") else text),
    )


def test_models_and_engines(app):
    for path in ("/v1/models", "/models"):
        status, _, body = call(app, "GET", path)
        data = json.loads(body)["data"]
        assert status == 200 and data[0]["id"] == "tiny" and data[0]["context_length"] == 64
    status, _, body = call(app, "GET", "/v1/models/davinci")  # an alias resolves to the served model
    assert status == 200 and json.loads(body)["id"] == "tiny"
    for path in ("/v1/engines", "/engines"):
        status, _, body = call(app, "GET", path)
        assert json.loads(body)["data"] == [
            {
                "id": "tiny",
                "object": "engine",
                "owner": "user",  # a model of the server's operator, not OpenAI's
                "ready": True,
                "created": pytest.approx(0, abs=1e10),
            }
        ]
    status, _, body = call(app, "GET", "/v1/engines/gpt-4")
    error = json.loads(body)["error"]
    assert status == 404 and "tiny" in error["message"] and error["code"] == "model_not_found"


def test_completion_maps_every_setting(app, engine):
    body = {
        "model": "text-davinci-003",
        "prompt": "Hello",
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 7,
        "n": 2,
        "best_of": 3,
        "stop": ["xyz"],
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "logit_bias": {"5": -100, "6": 2.5},
        "seed": 42,
        "user": "someone",
        "logprobs": 1,
    }
    status, _, r = post(app, "/v1/completions", body)
    assert status == 200, r
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and isinstance(r["created"], int)
    assert r["model"] == "tiny" and [c["index"] for c in r["choices"]] == [0, 1]
    req = engine.requests[-1]
    assert (
        req.params.max_tokens,
        req.params.temperature,
        req.params.top_p,
        req.params.top_k,
        req.params.n,
        req.params.best_of,
    ) == (
        3,
        0.5,
        0.9,
        7,
        2,
        3,
    )
    assert (
        req.params.stop == ("xyz",)
        and req.params.logit_bias == ((5, -100.0), (6, 2.5))
        and req.params.seed == 42
    )
    assert (
        req.params.presence_penalty,
        req.params.frequency_penalty,
        req.params.logprobs,
        req.params.prompt_logprobs,
    ) == (
        0.1,
        -0.2,
        1,
        False,
    )
    lp = r["choices"][0]["logprobs"]
    assert lp["text_offset"][0] == len("Hello")  # offsets count from the prompt's start, as OpenAI's do
    assert r["usage"]["prompt_tokens"] == len(engine.tokenizer.encode("Hello"))


def test_nulls_mean_unset(app, engine):
    """The legacy openai CLI sends null for every option it was not given."""
    nulls = {f.name: None for f in COMPLETION_FIELDS if f.name != "model"}
    status, _, r = post(app, "/v1/completions", nulls | {"model": "tiny"})
    assert status == 200, r
    req = engine.requests[-1]
    assert (
        req.params.max_tokens,
        req.params.n,
        req.params.temperature,
        req.params.logprobs,
        req.params.stop,
    ) == (16, 1, 1.0, None, ())
    assert req.prompt == (engine.tokenizer.eos_token_id,)  # the default prompt is <|endoftext|>


def test_prompt_kinds_and_choice_indexes(app, engine):
    ids = engine.tokenizer.encode("Hi there")
    for prompt, count in (("a", 1), (["a", "b c"], 2), (ids, 1), ([ids, ids[:1]], 2)):
        status, _, r = post(
            app, "/v1/completions", {"model": "tiny", "prompt": prompt, "n": 2, "max_tokens": 2}
        )
        assert status == 200, r
        assert [c["index"] for c in r["choices"]] == list(range(2 * count))
    assert engine.requests[-2].prompt == tuple(ids) and engine.requests[-1].prompt == tuple(ids[:1])


def test_echo_logprobs(app, engine):
    status, _, r = post(
        app,
        "/v1/completions",
        {"model": "tiny", "prompt": "Hello world", "echo": True, "logprobs": 0, "max_tokens": 0},
    )
    assert status == 200
    choice, n = r["choices"][0], len(engine.tokenizer.encode("Hello world"))
    assert choice["text"] == "Hello world" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == engine.tokenizer.text_offsets(engine.tokenizer.encode("Hello world"))
    assert engine.requests[-1].params.prompt_logprobs


def test_legacy_get_coerces_the_query(app, engine):
    status, headers, body = call(
        app,
        "GET",
        "/engines/davinci/completions?prompt=Hello,%20my&max_tokens=3&n=2&echo=true&temperature=0.5&stop=a&stop=b",
    )
    assert status == 200 and body.startswith("{\n  ")  # pretty-printed, for the browser
    r = json.loads(body)
    assert all(c["text"].startswith("Hello, my") for c in r["choices"]) and len(r["choices"]) == 2
    req = engine.requests[-1]
    assert (req.params.max_tokens, req.params.n, req.params.temperature, req.params.stop) == (
        3,
        2,
        0.5,
        ("a", "b"),
    )
    status, _, body = call(app, "GET", "/v1/engines/tiny/completions?max_tokens=lots")
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"


def test_long_prompts_truncated_on_legacy_routes_refused_on_v1(app, engine):
    prompt = list(range(1, 61))  # 60 token ids; n_ctx is 64
    status, _, r = post(app, "/v1/engines/tiny/completions", {"prompt": prompt, "max_tokens": 10})
    assert status == 200, r
    assert engine.requests[-1].prompt == tuple(prompt[-(64 - 10) :])  # the last n_ctx - max_tokens
    status, _, r = post(app, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 10})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"
    assert r["error"]["message"] == (
        "This model's maximum context length is 64 tokens, however you requested 70 tokens (60 in your prompt; "
        "10 for the completion). Please reduce your prompt; or completion length."
    )


def test_stream_chunks(app, engine):
    body = {
        "model": "tiny",
        "prompt": "Hi",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, text = call(app, "POST", "/v1/completions", json=body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_payloads(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == engine.tokenizer.decode(
        engine.tokenizer.encode(engine.reply)[:4]
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError("device on fire at 0xdeadbeef"), "server_error"),
        (EngineError("out of room"), "invalid_request_error"),
    ],
)
def test_error_after_the_stream_started_is_a_last_event(app, engine, error, kind):
    engine.fail_after_first = error
    status, _, text = call(
        app, "POST", "/v1/completions", json={"model": "tiny", "prompt": "Hi", "stream": True}
    )
    events = sse_payloads(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == kind and "deadbeef" not in text


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (EngineOverloaded("queue full"), 429, "overloaded"),
        (EngineError("too long"), 400, "invalid_request"),
        (RuntimeError("secret"), 500, "internal_error"),
    ],
)
def test_engine_refusals(app, engine, error, status, code):
    engine.error = error
    for stream in (False, True):
        got, headers, r = post(app, "/v1/completions", {"model": "tiny", "prompt": "Hi", "stream": stream})
        assert got == status and r["error"]["code"] == code and "secret" not in json.dumps(r)
    if status == 429:
        assert headers["Retry-After"]


@pytest.mark.parametrize(
    ("name", "path", "owner"),
    [
        ("117M", "checkpoints/117M", "openai"),  # download_model.py's names for OpenAI's GPT-2
        ("1558M", None, "openai"),
        ("gpt2-medium", None, "openai"),
        ("openai-community--gpt2-xl", None, "openai"),
        ("pydoc-tiny", str(SHIPPED_DIR / "pydoc-tiny"), "gpt2jax"),  # shipped with the project
        ("pydoc-tiny", "/elsewhere/pydoc-tiny", "user"),  # the same name in another folder is not ours
        ("someone--my-gpt2", "checkpoints/someone--my-gpt2", "someone"),  # a hub repo: its owner
        ("distilgpt2", None, "user"),
        ("tiny", None, "user"),
    ],
)
def test_model_owner(name, path, owner):
    assert owner_of(name, path) == owner


def test_owned_by_and_owner_agree(tok):
    models = [
        ServedModel(
            "pydoc-tiny", path=str(SHIPPED_DIR / "pydoc-tiny"), engine=ScriptedEngine(tok), status="ready"
        ),
        ServedModel("117M", n_params=124_439_808, engine=ScriptedEngine(tok), status="ready"),
        ServedModel("someone--my-gpt2", engine=ScriptedEngine(tok), status="ready"),
    ]
    app = make_app(ModelRegistry(models))
    want = {"pydoc-tiny": "gpt2jax", "117M": "openai", "someone--my-gpt2": "someone"}
    models = json.loads(call(app, "GET", "/v1/models")[2])["data"]
    assert {m["id"]: m["owned_by"] for m in models} == want
    engines = json.loads(call(app, "GET", "/v1/engines")[2])["data"]
    assert {e["id"]: e["owner"] for e in engines} == want
    assert json.loads(call(app, "GET", "/v1/models/davinci")[2])["owned_by"] == "openai"  # the largest


def test_model_still_loading(tok):
    registry = ModelRegistry(
        [ServedModel("big", status=LOADING), ServedModel("tiny", engine=ScriptedEngine(tok), status="ready")]
    )
    app = make_app(registry)
    status, _, body = call(app, "GET", "/health")
    assert status == 503 and json.loads(body)["models"]["big"]["status"] == "loading"
    status, _, r = post(app, "/v1/completions", {"model": "big"})
    assert status == 503 and r["error"]["code"] == "model_not_ready"


def test_api_keys(tok, caplog):
    app = make_app({"tiny": ScriptedEngine(tok)}, api_keys=("sk-one", "sk-two"))
    caplog.set_level(logging.INFO)
    assert call(app, "GET", "/v1/models")[0] == 401
    status, headers, body = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer sk-nope"})
    assert (
        status == 401
        and json.loads(body)["error"]["code"] == "invalid_api_key"
        and "WWW-Authenticate" in headers
    )
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer sk-two"})[0] == 200
    assert call(app, "GET", "/metrics", headers={"Authorization": "Basic sk-two"})[0] == 401
    assert call(app, "GET", "/health")[0] == 200 and call(app, "GET", "/")[0] == 200
    assert "sk-two" not in caplog.text and "sk-nope" not in caplog.text and "/v1/models" in caplog.text


def test_cors(tok):
    app = make_app({"tiny": ScriptedEngine(tok)}, api_keys=("k",), cors_origins=("http://ok.example",))
    preflight = {
        "Origin": "http://ok.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    status, headers, _ = call(app, "OPTIONS", "/v1/completions", headers=preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://ok.example"
    assert (
        "POST" in headers["Access-Control-Allow-Methods"]
        and headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    )
    status, headers, _ = call(app, "GET", "/v1/models", headers={"Origin": "http://ok.example"})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://ok.example"  # readable errors
    _, headers, _ = call(app, "GET", "/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers
    _, headers, _ = call(make_app({}), "GET", "/health", headers={"Origin": "http://any.example"})
    assert headers["Access-Control-Allow-Origin"] == "*"  # the default, as the original server


def test_metrics(app):
    post(app, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3})
    status, headers, text = call(app, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'gpt2jax_http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in text
    assert 'gpt2jax_tokens_total{kind="completion",model="tiny"} 3.0' in text
    assert 'gpt2jax_model_ready{model="tiny"} 1.0' in text


def test_tokenize_roundtrip(app, engine):
    status, _, r = post(app, "/tokenize", {"prompt": "Hello world"})
    assert (
        status == 200 and r["tokens"] == engine.tokenizer.encode("Hello world") and r["max_model_len"] == 64
    )
    status, _, r2 = post(app, "/detokenize", {"model": "tiny", "tokens": r["tokens"]})
    assert status == 200 and r2["prompt"] == "Hello world"


def test_openapi_describes_every_route_and_field(app):
    status, _, body = call(app, "GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and spec == json.loads(json.dumps(build_spec()))
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        assert path in spec["paths"], path
        assert {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}} <= set(spec["paths"][path]), path
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert set(props) == {f.name for f in COMPLETION_FIELDS}
