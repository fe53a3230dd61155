"""The sampling fields /v1/completions and /v1/chat/completions share, parsed into one `Sampling` record
(the library's SamplingParams plus how to deliver it), with the server's limits checked.

Checks that need the model (token ids in the vocabulary, the context length) are done by the routes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt2jax.sampling_params import SamplingParams
from serving.errors import invalid
from serving.fields import (
    Field,
    boolean,
    integer,
    number,
    parse_bool,
    parse_float,
    parse_int,
    string,
    type_name,
)
from serving.settings import Settings
from serving.structured_fields import STRUCTURED_FIELDS, constraint_from

MAX_STOPS = 4


def parse_stop(value: Any, name: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(name, f"{name} must be a string or an array of strings, not {type_name(value)}")
    if len(stops) > MAX_STOPS:
        raise invalid(name, f"{name} may hold at most {MAX_STOPS} strings, got {len(stops)}")
    return tuple(dict.fromkeys(s for s in stops if s))  # empty strings stop nothing; drop duplicates


def parse_logit_bias(value: Any, name: str) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, dict):
        raise invalid(name, f"{name} must be an object of token id -> bias, not {type_name(value)}")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(name, f"{name}: key {key!r} is not a token id") from None
        if token < 0:
            raise invalid(name, f"{name}: token id {token} is negative")
        out.append((token, parse_float(bias, f"{name}[{key}]", -100, 100)))
    return tuple(out)


def parse_stream_options(value: Any, name: str) -> bool:
    """Returns include_usage."""
    if not isinstance(value, dict):
        raise invalid(name, f"{name} must be an object, not {type_name(value)}")
    include = value.get("include_usage")
    return False if include is None else parse_bool(include, f"{name}.include_usage")


def parse_seed(value: Any, name: str) -> int:
    return parse_int(value, name, -(1 << 63), (1 << 64) - 1)


_STOP_SCHEMA = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}
_BIAS_SCHEMA = {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
_STREAM_OPTIONS_SCHEMA = {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}

# Fields both endpoints share, with OpenAI's defaults and ranges.
SAMPLING_FIELDS = (
    number("temperature", 1.0, "Sampling temperature; 0 is greedy.", 0, 2),
    number("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.", 0, 1),
    # Bounded so that it fits the sampler's int32 (a larger one was a 500); any k >= the vocabulary is off.
    integer("top_k", 0, "Keep only the k most likely tokens (0: off). Not in OpenAI's API.", 0, 2**31 - 1),
    number(
        "min_p",
        0.0,
        "Keep tokens at least this fraction as likely as the top one (0: off). Not in OpenAI's API.",
        0,
        1,
    ),
    integer("n", 1, "Choices to return for each prompt (at most MAX_N).", 1),
    Field("stop", _STOP_SCHEMA, parse_stop, (), "Up to 4 strings; generation ends before any of them."),
    number("presence_penalty", 0.0, "Subtracted from the logit of every token generated so far.", -2, 2),
    number("frequency_penalty", 0.0, "Subtracted once per earlier occurrence of a token.", -2, 2),
    Field(
        "logit_bias", _BIAS_SCHEMA, parse_logit_bias, (), "Token id (string key) -> bias added to its logit."
    ),
    Field("seed", {"type": "integer"}, parse_seed, None, "Same seed and settings give the same output."),
    string("user", None, "An end-user id; accepted and ignored."),
    boolean("stream", False, "Stream the output as server-sent events."),
    Field(
        "stream_options",
        _STREAM_OPTIONS_SCHEMA,
        parse_stream_options,
        False,
        "With stream: {include_usage: true} adds a last chunk with the usage and no choices.",
    ),
    *STRUCTURED_FIELDS,
)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What both endpoints share: the sampling record handed to the engine, and how to deliver it."""

    params: SamplingParams
    user: str | None = None
    stream: bool = False
    include_usage: bool = False


def sampling_from(values: dict[str, Any], settings: Settings, **extra: Any) -> Sampling:
    """Builds Sampling from parsed field values: every value named like a SamplingParams field becomes
    part of the record (with `extra` on top), after the server's limits are checked."""
    if values["n"] > settings.max_n:
        raise invalid("n", f"n is {values['n']}, but this server allows at most {settings.max_n} (MAX_N)")
    if values["stream_options"] and not values["stream"]:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    try:
        fields = {f.name: values[f.name] for f in SAMPLING_FIELDS}
        params = SamplingParams.from_values(fields | {"constraint": constraint_from(values)} | extra)
    except ValueError as e:  # the record's own checks; its messages start with the field's name
        raise invalid(str(e).split()[0], str(e)) from None
    return Sampling(params, values["user"], values["stream"], values["stream_options"])


def check_max_tokens(max_tokens: int, settings: Settings, param: str = "max_tokens") -> None:
    if max_tokens > settings.max_tokens:
        raise invalid(
            param,
            f"{param} is {max_tokens}, but this server allows at most {settings.max_tokens} (MAX_TOKENS)",
        )
