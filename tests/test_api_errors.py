"""Bad requests through a real Hypercorn server: each gets its 4xx and the error envelope, and the server
answers normally afterwards. Also: a SIGTERM-style stop finishes the in-flight stream, then refuses.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from fake_engine import ScriptedEngine, ServerThread
from waits import HANG

from gpt2jax.engine.api import EngineOverloaded
from serving.registry import ModelRegistry
from serving.settings import Settings

KEY = "sk-test-key"
BODY_LIMIT = 4096


def send(port: int, method: str, path: str, body=None, headers=None, key: str | None = KEY):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict | list):
        body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
    h.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=h)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tokenizer_dir):
    from gpt2jax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(tokenizer_dir)
    busy = ScriptedEngine(tok, name="busy")
    busy.error = EngineOverloaded("all slots busy")
    engines = {"tiny": ScriptedEngine(tok, name="tiny", n_ctx=64), "busy": busy}
    settings = Settings(api_keys=(KEY,), max_tokens=40, max_n=4, max_body_bytes=BODY_LIMIT)
    srv = ServerThread(settings, ModelRegistry.from_engines(engines)).start()
    srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health")
    yield srv
    assert srv.shutdown() == 0


C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "Hello"}
MSG = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}

# (name, method, path, body, status, param); body: dict (JSON), bytes (raw) or None.
BAD_REQUESTS = [
    ("bad json", "POST", C, b'{"model": "tiny", "prompt": ', 400, None),
    ("json array", "POST", C, b"[1, 2]", 400, None),
    ("empty body", "POST", C, b"", 400, None),
    ("not utf-8", "POST", C, b"\xff\xfe{}", 400, None),
    ("missing model", "POST", C, {"prompt": "Hi"}, 400, "model"),
    ("model not a string", "POST", C, {"model": 3}, 400, "model"),
    ("unknown model", "POST", C, {"model": "gpt-99", "prompt": "Hi"}, 404, "model"),
    ("max_tokens string", "POST", C, OK | {"max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens negative", "POST", C, OK | {"max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens fractional", "POST", C, OK | {"max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens over MAX_TOKENS", "POST", C, OK | {"max_tokens": 41}, 400, "max_tokens"),
    ("temperature too high", "POST", C, OK | {"temperature": 2.5}, 400, "temperature"),
    ("temperature string", "POST", C, OK | {"temperature": "hot"}, 400, "temperature"),
    ("top_p over 1", "POST", C, OK | {"top_p": 1.5}, 400, "top_p"),
    ("top_k negative", "POST", C, OK | {"top_k": -3}, 400, "top_k"),
    ("n zero", "POST", C, OK | {"n": 0}, 400, "n"),
    ("n over MAX_N", "POST", C, OK | {"n": 5}, 400, "n"),
    ("n boolean", "POST", C, OK | {"n": True}, 400, "n"),
    ("n over best_of", "POST", C, OK | {"n": 3, "best_of": 2}, 400, "best_of"),
    ("stream with best_of", "POST", C, OK | {"stream": True, "best_of": 2}, 400, "best_of"),
    ("logprobs over 5", "POST", C, OK | {"logprobs": 6}, 400, "logprobs"),
    ("logprobs negative", "POST", C, OK | {"logprobs": -1}, 400, "logprobs"),
    ("too many stops", "POST", C, OK | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop a number", "POST", C, OK | {"stop": 12}, 400, "stop"),
    ("prompt an object", "POST", C, {"model": "tiny", "prompt": {"text": "Hi"}}, 400, "prompt"),
    ("prompt empty list", "POST", C, {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("prompt mixed list", "POST", C, {"model": "tiny", "prompt": [1, "a"]}, 400, "prompt"),
    ("token id out of range", "POST", C, {"model": "tiny", "prompt": [99999]}, 400, "prompt"),
    ("presence_penalty out of range", "POST", C, OK | {"presence_penalty": 3}, 400, "presence_penalty"),
    ("logit_bias bad key", "POST", C, OK | {"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias out of range", "POST", C, OK | {"logit_bias": {"1": 200}}, 400, "logit_bias[1]"),
    ("logit_bias token out of vocab", "POST", C, OK | {"logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("echo not boolean", "POST", C, OK | {"echo": "yes"}, 400, "echo"),
    ("seed a string", "POST", C, OK | {"seed": "x"}, 400, "seed"),
    ("suffix", "POST", C, OK | {"suffix": " and then"}, 400, "suffix"),
    (
        "stream_options without stream",
        "POST",
        C,
        OK | {"stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "over-long prompt",
        "POST",
        C,
        {"model": "tiny", "prompt": list(range(60)), "max_tokens": 10},
        400,
        "max_tokens",
    ),
    ("too many prompts", "POST", C, {"model": "tiny", "prompt": ["a"] * 17}, 400, "prompt"),
    ("legacy GET bad number", "GET", "/v1/engines/tiny/completions?max_tokens=lots", None, 400, "max_tokens"),
    ("legacy GET bad boolean", "GET", "/engines/tiny/completions?echo=maybe", None, 400, "echo"),
    ("unknown engine", "GET", "/v1/engines/nope/completions?prompt=Hi", None, 404, "model"),
    ("chat no messages", "POST", CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (
        "chat bad role",
        "POST",
        CHAT,
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "chat image part",
        "POST",
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("chat top_logprobs without logprobs", "POST", CHAT, MSG | {"top_logprobs": 2}, 400, "top_logprobs"),
    (
        "chat top_logprobs over 20",
        "POST",
        CHAT,
        MSG | {"logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    ("chat tools", "POST", CHAT, MSG | {"tools": [{"type": "function"}]}, 400, "tools"),
    (
        "chat response_format xml",
        "POST",
        CHAT,
        MSG | {"response_format": {"type": "xml"}},
        400,
        "response_format",
    ),
    (
        "unsupported schema feature",
        "POST",
        C,
        {"model": "tiny", "structured_outputs": {"json": {"type": "integer", "multipleOf": 2}}},
        400,
        "structured_outputs",
    ),
    (
        "grammar",
        "POST",
        CHAT,
        MSG | {"structured_outputs": {"grammar": "root ::= 'a'"}},
        400,
        "structured_outputs.grammar",
    ),
    ("chat max_tokens zero", "POST", CHAT, MSG | {"max_tokens": 0}, 400, "max_tokens"),
    ("tokenize without prompt", "POST", "/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("detokenize out of vocab", "POST", "/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None),
    ("method not allowed", "GET", C, None, 405, None),
    ("method not allowed (legacy)", "DELETE", "/v1/engines/tiny/completions", None, 405, None),
    ("body too large", "POST", C, b'{"model": "tiny", "prompt": "' + b"x" * BODY_LIMIT + b'"}', 413, None),
    ("overloaded", "POST", C, {"model": "busy", "prompt": "Hi"}, 429, None),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "status", "param"), BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_request(server, name, method, path, body, status, param):
    got, content_type, raw = send(server.port, method, path, body)
    assert got == status, raw
    assert content_type.startswith("application/json")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["param"] == param
    assert b"Traceback" not in raw and b"<html" not in raw.lower()
    assert send(server.port, "GET", "/v1/models")[0] == 200  # the server still answers


@pytest.mark.parametrize("key", [None, "sk-wrong"], ids=["missing key", "wrong key"])
def test_bad_key(server, key):
    got, _, raw = send(server.port, "POST", C, OK, key=key)
    error = json.loads(raw)["error"]
    assert got == 401 and error["code"] in ("missing_api_key", "invalid_api_key") and KEY not in raw.decode()
    assert send(server.port, "GET", "/health", key=None)[0] == 200


def test_stop_finishes_in_flight_stream_then_refuses(tokenizer_dir):
    """What SIGTERM does: stop accepting, let the running stream end with [DONE], exit 0."""
    from gpt2jax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(tokenizer_dir)
    engine = ScriptedEngine(tok, name="slow", reply=" one two three four five six seven eight nine ten")
    engine.delay = 0.1
    srv = ServerThread(Settings(), ModelRegistry.from_engines({"slow": engine})).start()
    srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG)
    body = json.dumps({"model": "slow", "prompt": "Count:", "max_tokens": 30, "stream": True})
    conn.request("POST", C, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    assert first.startswith(b"data: {")
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
            return False
        except OSError:
            return True

    srv.wait_for(refused, what="the port to stop accepting")
    rest = response.read()
    assert rest.rstrip().endswith(b"data: [DONE]") and b'"finish_reason":"' in rest
    stopper.join(HANG)
    assert srv.exit_code == 0


def test_client_gone_closes_the_engine_stream(server):
    engine = server.registry.models["tiny"].engine
    # An event a second: the stream would run 30 s; the server sees the client gone far sooner.
    engine.delay, engine.reply, before = 1.0, " word" * 30, engine.events_sent
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
        body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 30, "stream": True})
        conn.request(
            "POST",
            C,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        response = conn.getresponse()
        assert response.readline().startswith(b"data: {")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        server.wait_for(lambda: engine.open_streams == 0, what="the engine stream to be closed")
        assert engine.events_sent - before < 30  # it did not run to the end
    finally:
        engine.delay, engine.reply = 0.0, ScriptedEngine(engine.tokenizer).reply
