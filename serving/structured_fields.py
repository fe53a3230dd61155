"""The structured-output fields both endpoints take, parsed into one gpt2jax Constraint.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
"schema", "strict"}}) and vLLM's `structured_outputs` ({"json" | "regex" | "choice" | "json_object"}; the
`openai` client sends it through `extra_body`). The automaton is compiled by the engine (a regex that
outlines-core rejects is a 400 from there); schema keywords it would not enforce are a 400 here.
"""

from __future__ import annotations

from typing import Any

from gpt2jax.constraint import Constraint
from serving.errors import invalid
from serving.fields import Field, type_name

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
STRUCTURED_KEYS = ("json", "regex", "choice", "json_object")


def parse_response_format(value: Any, name: str) -> Any:
    """OpenAI's response_format, checked; returned as given (None for text)."""
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise invalid(name, f"{name}.type must be one of {', '.join(RESPONSE_FORMATS)}")
    if value["type"] == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise invalid(f"{name}.json_schema", f'{name}.json_schema must be {{"name", "schema": {{...}}}}')
    return None if value["type"] == "text" else value


def parse_structured_outputs(value: Any, name: str) -> Any:
    """vLLM's structured_outputs: exactly one of json, regex, choice and json_object."""
    if not isinstance(value, dict):
        raise invalid(name, f"{name} must be an object, not {type_name(value)}")
    if value.get("grammar") is not None:
        raise invalid(f"{name}.grammar", f"{name}.grammar is not supported: use json, regex or choice")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise invalid(name, f"{name} must set exactly one of {', '.join(STRUCTURED_KEYS)}")
    return value


def constraint_from(values: dict[str, Any]) -> Constraint | None:
    """The Constraint of the parsed response_format / structured_outputs values; a 400 naming the field."""
    fmt, so = values.get("response_format"), values.get("structured_outputs")
    if fmt is not None and so is not None:
        raise invalid("structured_outputs", "give response_format or structured_outputs, not both")
    name = "response_format" if fmt is not None else "structured_outputs"
    try:
        if fmt is not None:
            return Constraint.of(response_format=fmt)
        if so is None:
            return None
        if so.get("json_object"):
            return Constraint("json_object")
        if so.get("choice") is not None:
            choice = so["choice"]
            if not isinstance(choice, list):
                raise ValueError("choice must be an array of strings")
            return Constraint.of(choice=choice)
        if so.get("regex") is not None:
            if not isinstance(so["regex"], str):
                raise ValueError("regex must be a string")
            return Constraint.of(regex=so["regex"])
        return Constraint.of(json_schema=so["json"])
    except ValueError as e:
        raise invalid(name, f"{name}: {e}") from None


_SCHEMA_OBJECT = {"type": "object"}
_RESPONSE_FORMAT_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": list(RESPONSE_FORMATS)},
        "json_schema": {
            "type": "object",
            "required": ["schema"],
            "properties": {
                "name": {"type": "string"},
                "schema": _SCHEMA_OBJECT,
                "strict": {"type": "boolean"},
                "description": {"type": "string"},
            },
        },
    },
}
_STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "json": {"oneOf": [_SCHEMA_OBJECT, {"type": "string"}]},
        "regex": {"type": "string"},
        "choice": {"type": "array", "items": {"type": "string"}},
        "json_object": {"type": "boolean"},
    },
}

STRUCTURED_FIELDS = (
    Field(
        "response_format",
        _RESPONSE_FORMAT_SCHEMA,
        parse_response_format,
        None,
        "OpenAI's: json_object (a flat JSON object) or json_schema (README, Structured outputs), enforced "
        "token by token.",
    ),
    Field(
        "structured_outputs",
        _STRUCTURED_SCHEMA,
        parse_structured_outputs,
        None,
        "vLLM's: one of json (a JSON schema), regex (matched whole), choice (one of the strings) or "
        "json_object. Not in OpenAI's API (the openai client sends it with extra_body).",
    ),
)
