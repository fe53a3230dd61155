"""gpt2jax.SamplingParams: its checks, per-prompt settings, and every HTTP sampling field walked from the
request body to the device row, so that a field dropped on the way fails here."""

from __future__ import annotations

import json
import urllib.parse

import numpy as np
import pytest
from fake_engine import ScriptedEngine, call, make_app

from gpt2jax.engine.slots import make_row
from gpt2jax.sampling import SCALARS, SamplingTensors, seed_key
from gpt2jax.sampling_params import SamplingParams, derive_seed, field_names, per_prompt
from serving.chat.schema import CHAT_FIELDS
from serving.completions.schema import COMPLETION_FIELDS

V = 50257
# Every SamplingParams field the HTTP API takes: (value sent, value the record must hold), none a default.
SENT = {
    "max_tokens": (5, 5),
    "temperature": (0.5, 0.5),
    "top_p": (0.75, 0.75),
    "top_k": (3, 3),
    "min_p": (0.25, 0.25),
    "presence_penalty": (0.5, 0.5),
    "frequency_penalty": (-0.5, -0.5),
    "logit_bias": ({"7": 3.0}, ((7, 3.0),)),
    "seed": (12, 12),
    "stop": (["q"], ("q",)),
    "n": (2, 2),
    "best_of": (3, 3),
    "logprobs": (2, 2),
}
# Fields the HTTP API sets from other fields (echo + logprobs; response_format / structured_outputs, walked
# in tests/test_api_structured.py) or does not offer.
NOT_SENT = {"prompt_logprobs", "ignore_eos", "constraint"}


def test_the_walk_covers_every_field():
    http = {f.name for f in (*COMPLETION_FIELDS, *CHAT_FIELDS)} & set(field_names())
    assert http == set(SENT), "a new HTTP sampling field: add it to SENT"
    assert set(field_names()) == set(SENT) | NOT_SENT, "a new SamplingParams field: walk it here"
    assert set(SamplingTensors._fields) == set(SCALARS) | {"logit_bias", "rng"}
    assert set(SCALARS) <= set(field_names())  # each device column is named after its record field
    defaults = SamplingParams()
    assert all(getattr(defaults, name) != want for name, (_, want) in SENT.items())


@pytest.fixture
def engine(tok) -> ScriptedEngine:
    return ScriptedEngine(tok, name="tiny", n_ctx=64)


def send(app, route: str) -> None:
    body = {name: sent for name, (sent, _) in SENT.items()}
    if route == "chat":  # chat's logprobs is a flag with top_logprobs; it has no best_of
        body |= {
            "logprobs": True,
            "top_logprobs": body.pop("logprobs"),
            "messages": [{"role": "user", "content": "x"}],
        }
        del body["best_of"]
        status, _, text = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", **body})
    elif route == "completions":
        status, _, text = call(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": "x", **body})
    else:  # the legacy GET: every value a query string
        query = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in body.items() if k != "stop"]
        query += [("stop", s) for s in body["stop"]] + [("prompt", "x")]
        status, _, text = call(app, "GET", "/engines/tiny/completions?" + urllib.parse.urlencode(query))
    assert status == 200, text


@pytest.mark.parametrize("route", ["completions", "chat", "legacy GET"])
def test_every_http_field_reaches_the_device_row(engine, route):
    send(make_app({"tiny": engine}, max_tokens=40, max_n=4), route)
    params = engine.requests[-1].params
    for name, (_, want) in SENT.items():
        if route == "chat" and name == "best_of":
            continue
        if route == "chat" and name == "stop":  # chat adds the template's turn markers
            assert params.stop[: len(want)] == want
            continue
        assert getattr(params, name) == want, name
    # The engine's worker makes each choice's row with make_row, the choice's own seed derived.
    choice = params.replace(seed=derive_seed(params.seed, 1))
    row = make_row(4, 50256, choice, V)
    for name in SCALARS:
        assert row.params._asdict()[name][0] == pytest.approx(getattr(params, name)), name
    bias = row.params.logit_bias[0]
    assert bias[7] == 3.0 and np.count_nonzero(bias) == 1
    np.testing.assert_array_equal(row.params.rng[0], seed_key(derive_seed(12, 1)))
    assert int(row.max_tokens) == 5 and bool(row.want_top) and int(row.length) == 4


def test_out_of_range_values_name_the_field():
    for name, value in [
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("top_p", 2.0),
        ("temperature", -1.0),
        ("logprobs", 21),
    ]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_per_prompt_settings():
    rows = per_prompt(2, temperature=[0.0, 0.7], stop=["a", "b"], max_tokens=4)
    assert [r.temperature for r in rows] == [0.0, 0.7] and all(r.stop == ("a", "b") for r in rows)
    rows = per_prompt(2, stop=[["a"], ["b", "c"]], logit_bias=[{1: 2.0}, None])
    assert [r.stop for r in rows] == [("a",), ("b", "c")] and [r.logit_bias for r in rows] == [
        ((1, 2.0),),
        (),
    ]
    base = [SamplingParams(top_k=1), SamplingParams(top_k=2)]
    assert [r.top_k for r in per_prompt(2, base, seed=3)] == [1, 2]
    with pytest.raises(ValueError, match="temperature"):
        per_prompt(3, temperature=[0.1, 0.2])
    with pytest.raises(TypeError, match="tempreature"):
        per_prompt(1, tempreature=0.5)
