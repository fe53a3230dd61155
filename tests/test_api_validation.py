"""Request validation: types, ranges, nulls as unset, query-string coercion (no app needed)."""

from __future__ import annotations

import pytest

from serving.chat.schema import parse_chat
from serving.completions.schema import COMPLETION_FIELDS, parse_completion, parse_prompt
from serving.errors import APIError
from serving.fields import coerce_query
from serving.sampling_fields import parse_stop
from serving.settings import Settings

S = Settings(max_tokens=100, max_n=4)


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


def test_prompt_forms():
    assert parse_prompt("hi", "prompt") == ("hi",)
    assert parse_prompt(["a", "b"], "prompt") == ("a", "b")
    assert parse_prompt([1, 2], "prompt") == ((1, 2),)
    assert parse_prompt([[1], [2, 3]], "prompt") == ((1,), (2, 3))
    for bad in ([], [[]], [True], [1, "a"], [-1], {"a": 1}, 3):
        assert error_of(parse_prompt, bad, "prompt").status == 400


def test_stop_forms():
    assert parse_stop("\n", "stop") == ("\n",)
    assert parse_stop(["a", "", "a", "b"], "stop") == ("a", "b")
    assert error_of(parse_stop, ["1", "2", "3", "4", "5"], "stop").param == "stop"


def test_defaults_and_nulls():
    req = parse_completion({"model": "m", "prompt": None, "max_tokens": None, "n": None, "stop": None}, S)
    assert (req.params.max_tokens, req.params.n, req.params.stop, req.prompts) == (
        16,
        1,
        (),
        ("<|endoftext|>",),
    )
    assert req.params.temperature == 1.0 and req.params.logprobs is None and not req.echo


def test_numbers_are_strict():
    assert (
        parse_completion({"model": "m", "max_tokens": 4.0}, S).params.max_tokens == 4
    )  # 4.0 is an integer in JSON
    for field, value in (("max_tokens", True), ("temperature", "1"), ("top_p", float("nan")), ("n", 1.5)):
        e = error_of(parse_completion, {"model": "m", field: value}, S)
        assert e.param == field and e.status == 400, e.message


def test_server_limits_named():
    e = error_of(parse_completion, {"model": "m", "max_tokens": 101}, S)
    assert "100" in e.message and "MAX_TOKENS" in e.message
    e = error_of(parse_completion, {"model": "m", "best_of": 5}, S)
    assert e.param == "best_of"


def test_query_coercion():
    args = {
        "max_tokens": ["32"],
        "temperature": ["0.9"],
        "echo": ["true"],
        "stop": ["a", "b"],
        "prompt": ["Hi, you"],
    }
    body = coerce_query(args, COMPLETION_FIELDS)
    assert body == {
        "max_tokens": 32,
        "temperature": 0.9,
        "echo": True,
        "stop": ["a", "b"],
        "prompt": "Hi, you",
    }
    assert coerce_query({"logit_bias": ['{"5": 1}'], "seed": ["null"]}, COMPLETION_FIELDS) == {
        "logit_bias": {"5": 1},
        "seed": None,
    }
    assert error_of(coerce_query, {"echo": ["maybe"]}, COMPLETION_FIELDS).param == "echo"


def test_chat_fields():
    req = parse_chat(
        {"model": "m", "messages": [{"role": "assistant", "content": None}], "max_completion_tokens": 5}, S
    )
    assert req.messages[0].content == "" and req.max_tokens == 5 and not req.logprobs
    assert (
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}, S).max_tokens
        is None
    )
    e = error_of(parse_chat, {"model": "m", "messages": [{"role": "user", "content": 3}]}, S)
    assert e.param == "messages[0].content"
