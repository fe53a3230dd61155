"""Chat completions: the transcript template, turn-marker stops, the chat shapes (in process)."""

from __future__ import annotations

import json

import pytest
from fake_engine import ScriptedEngine, call, make_app, sse_payloads

from serving.chat.schema import Message
from serving.chat.template import ChatTemplate, load_template
from serving.registry import READY, ModelRegistry, ServedModel

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]},
]


@pytest.fixture
def engine(tok) -> ScriptedEngine:
    return ScriptedEngine(tok, name="tiny", n_ctx=128, reply=" Fine, thanks")


@pytest.fixture
def app(engine):
    return make_app({"tiny": engine}, max_tokens=40)


def chat(app, **body):
    status, headers, text = call(
        app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES} | body
    )
    return status, (json.loads(text) if "json" in headers["Content-Type"] else text)


def test_default_template():
    text, stop = ChatTemplate().render(
        [
            Message("system", "Be nice."),
            Message("user", "Hi"),
            Message("assistant", "Hey"),
            Message("user", "Bye"),
        ]
    )
    assert text == "Be nice.\n\nUser: Hi\nAssistant: Hey\nUser: Bye\nAssistant:"
    assert stop == ("\nUser:", "\nAssistant:")


def test_template_from_model_folder_then_env(tmp_path):
    env_file = tmp_path / "env.txt"
    env_file.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<bot>")
    assert load_template(tmp_path, str(env_file)).render([Message("user", "x")]) == ("<user>x<bot>", ())
    (tmp_path / "chat_template.txt").write_text('{%- set stop = "<user>" -%}{{ messages[0].content }}')
    assert load_template(tmp_path, str(env_file)).render([Message("user", "x")]) == ("x", ("<user>",))
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate("{% for %}")


def test_chat_completion(app, engine):
    status, r = chat(app, max_tokens=10, seed=5, stop="!")
    assert status == 200, r
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Fine, thanks", "refusal": None}
    assert r["choices"][0]["finish_reason"] == "stop"  # the scripted reply ended before max_tokens
    req = engine.requests[-1]
    prompt = engine.tokenizer.decode(req.prompt)
    assert prompt.startswith("You are terse.\n\nUser: Hi\n") and prompt.endswith(
        "User: How are you?\nAssistant:"
    )
    assert (
        req.params.stop == ("!", "\nUser:", "\nAssistant:")
        and req.params.seed == 5
        and req.params.max_tokens == 10
    )
    assert r["usage"]["prompt_tokens"] == len(req.prompt)


def test_max_tokens_defaults_and_limits(app, engine):
    assert chat(app)[0] == 200 and engine.requests[-1].params.max_tokens == 40  # MAX_TOKENS fits the context
    assert (
        chat(app, max_tokens=5, max_completion_tokens=7)[0] == 200
        and engine.requests[-1].params.max_tokens == 7
    )
    status, r = chat(app, max_completion_tokens=41)
    assert (
        status == 400
        and r["error"]["param"] == "max_completion_tokens"
        and "MAX_TOKENS" in r["error"]["message"]
    )
    long = [{"role": "user", "content": "word " * 200}]
    status, r = chat(app, messages=long)
    assert (
        status == 400
        and r["error"]["code"] == "context_length_exceeded"
        and r["error"]["param"] == "messages"
    )


def test_chat_logprobs(app, engine):
    status, r = chat(app, max_tokens=3, logprobs=True, top_logprobs=1)
    assert status == 200 and engine.requests[-1].params.logprobs == 1
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert bytes(content[1]["bytes"]).decode() == content[1]["token"] and len(content[1]["top_logprobs"]) == 1


def test_chat_stream(app):
    status, text = chat(app, max_tokens=10, n=2, stream=True, stream_options={"include_usage": True})
    events = sse_payloads(text)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Fine, thanks"  # leading space dropped
        assert mine[-1]["finish_reason"] == "stop" and mine[-1]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_per_model_template(tok):
    engine = ScriptedEngine(tok)
    model = ServedModel(
        "m", engine=engine, status=READY, chat_template=ChatTemplate("Q: {{ messages[-1].content }}\nA:")
    )
    app = make_app(ModelRegistry([model]))
    status, _, _ = call(
        app,
        "POST",
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "2+2?"}]},
    )
    assert (
        status == 200
        and tok.decode(engine.requests[-1].prompt) == "Q: 2+2?\nA:"
        and engine.requests[-1].params.stop == ()
    )
