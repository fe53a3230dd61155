"""Request fields declared once: each knows its JSON schema (for /openapi.json) and how to parse a value.

JSON `null` means "not set" everywhere (the legacy openai CLI sends nulls for every option it was not
given). Booleans are never accepted as numbers. A GET query string gives every value as a string:
`coerce_query` turns them into the types the fields declare first.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serving.errors import invalid

Parser = Callable[[Any, str], Any]  # (value, field name) -> parsed value; raises APIError


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    schema: dict[str, Any]  # JSON schema of a non-null value
    parse: Parser
    default: Any = None
    doc: str = ""
    required: bool = False


def type_name(value: Any) -> str:
    """The JSON type of a parsed value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _range_check(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise invalid(name, f"{name} must be between {lo} and {hi}, got {value}")
        bound = f">= {lo}" if lo is not None else f"<= {hi}"
        raise invalid(name, f"{name} must be {bound}, got {value}")


def parse_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"{name} must be an integer, not {type_name(value)}", "invalid_type")
    if isinstance(value, float):
        if not value.is_integer():
            raise invalid(name, f"{name} must be an integer, got {value}", "invalid_type")
        value = int(value)
    _range_check(name, value, lo, hi)
    return value


def parse_float(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"{name} must be a number, not {type_name(value)}", "invalid_type")
    if not math.isfinite(value):
        raise invalid(name, f"{name} must be a finite number")
    _range_check(name, value, lo, hi)
    return float(value)


def parse_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be a boolean, not {type_name(value)}", "invalid_type")
    return value


def parse_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"{name} must be a string, not {type_name(value)}", "invalid_type")
    return value


def integer(name: str, default: Any, doc: str, lo: int | None = None, hi: int | None = None) -> Field:
    schema: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return Field(name, schema, lambda v, n: parse_int(v, n, lo, hi), default, doc)


def number(name: str, default: Any, doc: str, lo: float | None = None, hi: float | None = None) -> Field:
    schema: dict[str, Any] = {"type": "number"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return Field(name, schema, lambda v, n: parse_float(v, n, lo, hi), default, doc)


def boolean(name: str, default: bool, doc: str) -> Field:
    return Field(name, {"type": "boolean"}, parse_bool, default, doc)


def string(name: str, default: str | None, doc: str, required: bool = False) -> Field:
    return Field(name, {"type": "string"}, parse_str, default, doc, required)


def parse_fields(body: Mapping[str, Any], fields: Sequence[Field]) -> dict[str, Any]:
    """Parses the declared fields of a JSON object; null or absent gives the default; others are ignored."""
    out = {}
    for f in fields:
        value = body.get(f.name)
        if value is None:
            if f.required:
                raise invalid(f.name, f"you must provide a {f.name} parameter", "missing_required_parameter")
            out[f.name] = f.default
        else:
            out[f.name] = f.parse(value, f.name)
    return out


def coerce_query(args: Mapping[str, list[str]], fields: Sequence[Field]) -> dict[str, Any]:
    """Query-string values (all strings) to JSON-like values, by each field's declared type.

    A repeated key becomes a list (`stop=a&stop=b`); objects and arrays may be given as JSON text.
    """
    types = {f.name: f.schema.get("type") for f in fields}
    out: dict[str, Any] = {}
    for key, values in args.items():
        coerced = [_coerce(key, v, types.get(key)) for v in values]
        out[key] = coerced[0] if len(coerced) == 1 else coerced
    return out


def _coerce(name: str, raw: str, kind: str | None) -> Any:
    text = raw.strip()
    if text.lower() in ("null", "none"):
        return None
    if kind == "boolean":
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise invalid(name, f"{name} must be a boolean (true or false), got {raw!r}", "invalid_type")
    if kind in ("integer", "number"):
        try:
            return int(text) if kind == "integer" and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise invalid(name, f"{name} must be a number, got {raw!r}", "invalid_type") from None
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            return raw
    return raw


def token_ids(ids: Any, name: str) -> tuple[int, ...]:
    if not isinstance(ids, list):
        raise invalid(name, f"{name} must be an array of token ids, not {type_name(ids)}")
    if not ids:
        raise invalid(name, f"{name} has an empty array of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise invalid(name, f"{name}: token ids must be integers >= 0, got {t!r}")
    return tuple(ids)
