"""Structured-output constraints: a request's JSON schema, JSON mode, regex or choice, compiled by
outlines-core into a token-level automaton over the model's vocabulary (host side, no JAX).

A `Constraint` is a frozen, hashable record that travels in SamplingParams; `compile_automaton` turns it
into an `Automaton` (dense state numbering, a packed allowed-token bitmask and sorted sparse transitions:
numpy arrays that gpt2jax/structured.py stacks into the device tables). Compiled automata are cached by
(constraint, tokenizer). The regex and JSON-schema compilers are outlines-core's (the library vLLM and
TGI use); this module only checks limits and the schema keywords outlines-core would silently ignore.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gpt2jax.closing import closing

# Limits (README, "Structured outputs"): bigger inputs or automata are refused with a ValueError (400).
MAX_SPEC_CHARS = 16_384  # a schema's JSON, a regex, or the choices joined
MAX_CHOICES = 256
# outlines-core's build time grows steeply with counted repetitions of a JSON string's character class
# (GPT-2-sized vocabularies: maxLength 12 takes ~0.5 s, 16 ~8 s, 24 minutes): bounds above these are 400s.
MAX_STRING_LENGTH = 12  # a schema's minLength / maxLength
MAX_REPEAT = 32  # a regex's counted repetition {n} / {n,m}
MAX_INTEGER_RANGE = 1024  # an integer bounded on both sides becomes an enum of at most this many values
MAX_STATES = 4_096  # automaton states of one constraint
MAX_TRANSITIONS = 4 * 1024 * 1024  # (state, token) -> state entries of one constraint
CACHE_SIZE = 64  # compiled automata kept (per process, by constraint and tokenizer)

KINDS = ("json", "json_object", "regex", "choice")
# JSON mode: one flat object whose values are strings, numbers, booleans or null (a schema of any JSON
# nests without bound; outlines-core's bounded-depth regex for it has ~1,600 states and takes ~25 s).
JSON_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
}

# JSON-schema keywords outlines-core enforces, and annotations that constrain nothing. Any other keyword
# (minimum, multipleOf, uniqueItems, not, if, patternProperties, ...) would be ignored: a 400 instead.
SUPPORTED_KEYWORDS = frozenset(
    [
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minItems",
        "maxItems",
    ]
)
ANNOTATIONS = frozenset(
    [
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "strict",
    ]
)
SUPPORTED_FORMATS = ("date-time", "date", "time", "uuid", "email", "uri")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a constrained completion must match: kind "json" (spec: a JSON schema as compact JSON text),
    "json_object" (any flat JSON object), "regex" (spec: the pattern, matched whole) or "choice" (one of
    `choices`, exactly). Raises ValueError for a malformed or unsupported one (message: user-facing)."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        size = len(self.spec) + sum(len(c) for c in self.choices)
        if size > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} constraint has {size} characters; at most {MAX_SPEC_CHARS}")
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            if len(self.choices) > MAX_CHOICES:
                raise ValueError(f"choice has {len(self.choices)} entries; at most {MAX_CHOICES}")
        if self.kind == "regex" and not self.spec:
            raise ValueError("regex must be a non-empty string")
        counts = [
            int(n) for pair in re.findall(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", self.spec) for n in pair if n
        ]
        if self.kind == "regex" and any(n > MAX_REPEAT for n in counts):
            raise ValueError(f"regex repetition counts must be at most {MAX_REPEAT}, got {max(counts)}")
        if self.kind == "json":
            check_schema(json.loads(self.spec))
        self.regex()  # a schema outlines-core rejects fails here

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """From a JSON schema (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, Mapping):
            raise ValueError("a JSON schema must be an object")
        schema = bounded_integers(schema)
        return cls("json", json.dumps(schema, separators=(",", ":")))  # property order matters

    @classmethod
    def of(
        cls,
        response_format: Mapping[str, Any] | type | None = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
    ) -> Constraint | None:
        """The one constraint these describe (None if none): OpenAI's response_format (a dict of type
        "text", "json_object" or "json_schema", or a pydantic model class), a regex, choices, or a schema.
        """
        given = [x for x in (response_format, regex, choice, json_schema) if x is not None]
        if isinstance(response_format, Mapping) and response_format.get("type", "text") == "text":
            given.remove(response_format)
        if len(given) > 1:
            raise ValueError("give only one of response_format, regex, choice and json_schema")
        if regex is not None:
            return cls("regex", regex)
        if choice is not None:
            return cls("choice", choices=tuple(choice))
        if json_schema is not None:
            return cls.json_schema(json_schema)
        if response_format is None or not given:
            return None
        if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
            return cls.json_schema(response_format.model_json_schema())  # a pydantic model
        kind = response_format.get("type")
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            inner = response_format.get("json_schema")
            if not isinstance(inner, Mapping) or not isinstance(inner.get("schema"), Mapping | str):
                raise ValueError('response_format json_schema needs {"json_schema": {"name", "schema"}}')
            return cls.json_schema(inner["schema"])
        raise ValueError(f'response_format type must be "text", "json_object" or "json_schema", not {kind!r}')

    def regex(self) -> str:
        """The regex outlines-core compiles (whole-match)."""
        return _regex(self)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _regex(c: Constraint) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    if c.kind == "regex":
        return c.spec
    if c.kind == "choice":
        return "|".join(re.escape(x) for x in c.choices)  # Rust's regex accepts Python's escapes
    spec = c.spec if c.kind == "json" else json.dumps(JSON_OBJECT_SCHEMA)
    try:
        return build_regex_from_schema(spec)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"unsupported JSON schema: {e}") from None


def bounded_integers(schema: Any) -> Any:
    """The schema with every integer bounded on both sides (minimum / maximum / exclusive ones, at most
    MAX_INTEGER_RANGE values) rewritten as the enum of its values, which outlines-core enforces (it
    ignores numeric bounds). Other bounds are left for `check_schema` to refuse."""
    if isinstance(schema, list):
        return [bounded_integers(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {
        k: v if k in ("enum", "const", "default", "examples") else bounded_integers(v)
        for k, v in schema.items()
    }
    if out.get("type") != "integer":
        return out
    lo, hi = _integer_bounds(out)
    if lo is None or hi is None or hi - lo + 1 > MAX_INTEGER_RANGE:
        return out
    bounds = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    return {k: v for k, v in out.items() if k not in bounds} | {"enum": list(range(lo, hi + 1))}


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The first and last integer an integer schema's bounds allow (None: unbounded on that side)."""
    number = lambda key: (
        (v := schema.get(key)) is not None and not isinstance(v, bool) and isinstance(v, int | float)
    )
    lows = [math.ceil(schema["minimum"])] if number("minimum") else []
    lows += [math.floor(schema["exclusiveMinimum"]) + 1] if number("exclusiveMinimum") else []
    highs = [math.floor(schema["maximum"])] if number("maximum") else []
    highs += [math.ceil(schema["exclusiveMaximum"]) - 1] if number("exclusiveMaximum") else []
    return (max(lows) if lows else None), (min(highs) if highs else None)


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raises ValueError naming every keyword of `schema` that outlines-core would not enforce."""
    bad: list[str] = []
    _walk(schema, where, bad)
    if bad:
        raise ValueError(f"unsupported JSON schema features: {', '.join(bad)}")


def _walk(s: Any, where: str, bad: list[str]) -> None:
    if isinstance(s, bool):
        return
    if not isinstance(s, Mapping):
        raise ValueError(f"{where} must be a JSON schema object, not {type(s).__name__}")
    for key, value in s.items():
        if key in ANNOTATIONS or key in ("enum", "const", "required", "type", "pattern"):
            continue
        if key not in SUPPORTED_KEYWORDS:
            bad.append(f"{where}.{key}")
        elif key in ("properties", "$defs", "definitions") and isinstance(value, Mapping):
            for name, sub in value.items():
                _walk(sub, f"{where}.{key}.{name}", bad)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for i, sub in enumerate(value):
                _walk(sub, f"{where}.{key}[{i}]", bad)
        elif key in ("items", "additionalProperties"):
            _walk(value, f"{where}.{key}", bad)
        elif key in ("minLength", "maxLength") and isinstance(value, int) and value > MAX_STRING_LENGTH:
            bad.append(f"{where}.{key}={value} (at most {MAX_STRING_LENGTH})")
        elif key == "format" and value not in SUPPORTED_FORMATS:
            bad.append(f"{where}.format={value!r} (supported: {', '.join(SUPPORTED_FORMATS)})")


@dataclasses.dataclass(frozen=True, eq=False)
class Automaton:
    """A constraint's token-level DFA over an n_vocab-token vocabulary, states numbered 0..n-1.

    allowed: [n, ceil(n_vocab / 32)] uint32, bit t % 32 of word t // 32 set when token t may follow
    state s (end-of-text only in accepting states). start: [n + 1] i32, state s's transitions are entries
    start[s]:start[s + 1] of token [T] i32 (ascending) and next [T] i32 (local state ids). dist [n] i32,
    maxd [n] i32 and closing (a bitmask like allowed) are gpt2jax/closing.py's, for finishing in budget.
    """

    initial: int
    allowed: np.ndarray
    start: np.ndarray
    token: np.ndarray
    next: np.ndarray
    dist: np.ndarray
    maxd: np.ndarray
    closing: np.ndarray
    build_seconds: float

    @property
    def n_states(self) -> int:
        return len(self.start) - 1

    @property
    def n_transitions(self) -> int:
        return len(self.token)

    @property
    def min_tokens(self) -> int:
        """The smallest max_tokens with which a row always finishes valid (the shortest accepted output
        plus its end-of-text)."""
        return int(self.dist[self.initial]) + 1

    @property
    def nbytes(self) -> int:
        """Bytes of its device tables."""
        return sum(
            a.nbytes for a in (self.allowed, self.start, self.token, self.next, self.maxd, self.closing)
        )


_lock = threading.Lock()
_vocabularies: dict[int, tuple[Any, Any]] = {}  # id(tokenizer) -> (tokenizer, outlines Vocabulary)


def _vocabulary(tokenizer: Any) -> Any:
    """outlines-core's Vocabulary of a GPT2Tokenizer: each token's raw bytes -> its ids, end-of-text apart."""
    from outlines_core import Vocabulary

    with _lock:
        hit = _vocabularies.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    tokens: dict[bytes, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        if i == tokenizer.eos_token_id:
            continue
        try:
            tokens.setdefault(tokenizer.token_bytes(i), []).append(i)
        except ValueError:  # an id the vocabulary skips: never allowed
            continue
    vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)
    with _lock:
        if len(_vocabularies) >= 8:
            _vocabularies.clear()
        _vocabularies[id(tokenizer)] = (tokenizer, vocabulary)
    return vocabulary


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile_automaton(constraint: Constraint, tokenizer: Any, n_vocab: int) -> Automaton:
    """The constraint's automaton over `tokenizer`'s vocabulary (a gpt2jax GPT2Tokenizer; the model's
    n_vocab may be larger), cached. Raises ValueError for a regex outlines-core rejects, one no token
    sequence can match, or one over the limits."""
    from outlines_core import Index

    began = time.perf_counter()
    try:
        index = Index(constraint.regex(), _vocabulary(tokenizer))
    except ValueError as e:
        raise ValueError(f"cannot compile the {constraint.kind} constraint: {str(e)[:300]}") from None
    transitions = index.get_transitions()  # {state: {token: next state}}, end-of-text in accepting ones
    if len(transitions) > MAX_STATES:
        raise ValueError(f"the {constraint.kind} constraint needs {len(transitions)} automaton states; "
                         f"at most {MAX_STATES}")  # fmt: skip
    total = sum(len(t) for t in transitions.values())
    if total > MAX_TRANSITIONS:
        raise ValueError(f"the {constraint.kind} constraint needs {total} token transitions; "
                         f"at most {MAX_TRANSITIONS}")  # fmt: skip
    reached = {d for t in transitions.values() for d in t.values()}
    ids = {s: i for i, s in enumerate(sorted(set(transitions) | reached | {index.get_initial_state()}))}
    n, words = len(ids), -(-n_vocab // 32)
    allowed = np.zeros((n, words), np.uint32)
    start = np.zeros(n + 1, np.int32)
    token, nxt = np.empty(total, np.int32), np.empty(total, np.int32)
    at = 0
    for s, i in ids.items():
        pairs = sorted(transitions.get(s, {}).items())
        toks = np.fromiter((t for t, _ in pairs), np.int32, len(pairs))
        token[at : at + len(pairs)] = toks
        nxt[at : at + len(pairs)] = [ids[d] for _, d in pairs]
        np.bitwise_or.at(allowed[i], toks >> 5, np.left_shift(np.uint32(1), (toks & 31).astype(np.uint32)))
        at += len(pairs)
        start[i + 1] = at
    accepting = np.zeros(n, bool)
    accepting[[ids[s] for s in index.get_final_states() if s in ids]] = True
    near = closing(start, token, nxt, accepting, tokenizer.eos_token_id, words)
    initial = ids[index.get_initial_state()]
    return Automaton(initial, allowed, start, token, nxt, *near, time.perf_counter() - began)
