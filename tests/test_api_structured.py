"""Structured outputs through a real server on the production engine, with the clients people bring:
the `openai` package's `chat.completions.parse(response_format=PydanticModel)`, LangChain's
`with_structured_output`, and plain bodies for json_object, regex and choice, streamed and not.

Models: the shipped `pydoc-tiny`, and `rand-small` (random weights, GPT-2's own 50,257-token vocabulary),
both at temperature 1: the automaton, not the model, makes the output valid.
"""

from __future__ import annotations

import enum
import json
import re

import pytest
import test_api_clients
from pydantic import BaseModel, Field
from test_api_clients import stream
from waits import HANG

MODELS = ("pydoc-tiny", "rand-small")
server = test_api_clients.server  # its module fixture: both models served on the production engine
SEEDS = range(5)  # x n=4 choices: 20 streams per case
PHONE = r"[0-9]{3}-[a-z]{2}"


class Kind(str, enum.Enum):
    cat = "cat"
    dog = "dog"
    bird = "bird"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: Kind


class Tally(BaseModel):
    label: str = Field(max_length=8)
    count: int  # unbounded


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)


@pytest.mark.parametrize("model", MODELS)
def test_openai_parse_returns_a_pet_for_every_seed(client, model):
    for seed in range(3):
        r = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            response_format=Pet,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    for model in MODELS:
        llm = langchain_openai.ChatOpenAI(
            model=model,
            base_url=server.url + "/v1",
            api_key="unused",
            temperature=1.0,
            max_tokens=120,
            seed=7,
        )
        pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
        assert isinstance(pet, Pet)


def _choices(server, body: dict, streamed: bool) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice of a completions request, streamed or not."""
    if not streamed:
        status, r = server.post("/v1/completions", body)
        assert status == 200, r
        return [(c["text"], c["finish_reason"]) for c in r["choices"]]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream(server, "/v1/completions", body):
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return [(texts[i], reasons[i]) for i in sorted(texts)]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "field, valid",
    [
        ({"structured_outputs": {"regex": PHONE}}, lambda t: re.fullmatch(PHONE, t)),
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe")),
    ],
    ids=["regex", "choice"],
)
def test_regex_and_choice_are_always_valid(server, field, valid, streamed):
    for seed in SEEDS:
        body = {"model": "rand-small", "prompt": "Answer:", "max_tokens": 12, "n": 4, "seed": seed} | field
        for text, reason in _choices(server, body, streamed):
            assert valid(text) and reason == "stop", (text, reason)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("max_tokens", [24, 200])
@pytest.mark.parametrize("model", MODELS)
def test_json_object_always_closes_within_max_tokens(server, model, max_tokens, streamed):
    """JSON mode over 20 streams at temperature 1: keys, strings and numbers are unbounded and a random
    model would write them past max_tokens, but each row closes its object in time (budget-aware closing,
    gpt2jax/closing.py) and ends with end-of-text."""
    for seed in SEEDS:
        body = {"model": model, "prompt": "{", "max_tokens": max_tokens, "n": 4, "seed": seed}
        for text, reason in _choices(server, body | {"response_format": {"type": "json_object"}}, streamed):
            assert reason == "stop" and isinstance(json.loads(text), dict), (text, reason)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_unbounded_integer_closes_within_max_tokens(server, streamed):
    """A pydantic model with a plain `int`: the random model would write digits until max_tokens."""
    for seed in SEEDS:
        body = {"model": "rand-small", "prompt": "x", "max_tokens": 40, "n": 4, "seed": seed}
        for text, reason in _choices(
            server, body | {"structured_outputs": {"json": Tally.model_json_schema()}}, streamed
        ):
            assert reason == "stop", (text, reason)
            Tally.model_validate_json(text)


def test_chat_streams_a_schema(server):
    body = {
        "model": "rand-small",
        "messages": [{"role": "user", "content": "A pet?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()},
        },
        "max_tokens": 120,
        "seed": 3,
    }
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in stream(server, "/v1/chat/completions", body)
        if c["choices"]
    )
    Pet.model_validate_json(text)


def test_max_tokens_cut_mid_structure_is_length(server):
    body = {
        "model": "rand-small",
        "prompt": "x",
        "max_tokens": 2,
        "structured_outputs": {"json": Pet.model_json_schema()},
    }
    status, r = server.post("/v1/completions", body)
    assert status == 200 and r["choices"][0]["finish_reason"] == "length", r


@pytest.mark.parametrize(
    "field, message",
    [
        ({"structured_outputs": {"regex": "[a-"}}, "cannot compile"),
        ({"structured_outputs": {"regex": "a^b"}}, "cannot compile"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "number", "minimum": 1}},
                }
            },
            "minimum",
        ),
    ],
)
def test_bad_constraints_are_400_and_the_engine_keeps_serving(server, field, message):
    status, r = server.post("/v1/completions", {"model": "rand-small", "prompt": "x"} | field)
    assert status == 400 and message in r["error"]["message"], r
    status, r = server.post("/v1/completions", {"model": "rand-small", "prompt": "x", "max_tokens": 2})
    assert status == 200
