"""Request bodies of /v1/chat/completions validated into frozen dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from serving.errors import invalid
from serving.fields import Field, boolean, integer, parse_fields, string, type_name
from serving.sampling_fields import SAMPLING_FIELDS, Sampling, check_max_tokens, sampling_from
from serving.settings import Settings

CHAT_ROLES = ("system", "developer", "user", "assistant")
# OpenAI's chat API allows 0..20 alternatives per token (completions' legacy `logprobs` stays at most 5);
# the engine computes gpt2jax.sampling.NUM_TOP_LOGPROBS of them (tests check it is at least this).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None


def parse_messages(value: Any, name: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise invalid(name, f"{name} must be a non-empty array of messages")
    return tuple(_message(m, f"{name}[{i}]") for i, m in enumerate(value))


def _message(m: Any, where: str) -> Message:
    if not isinstance(m, dict):
        raise invalid(where, f"{where} must be an object, not {type_name(m)}")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(f"{where}.content[{j}]", "only text content parts are supported by GPT-2")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise invalid(f"{where}.content", f"{where}.content must be a string or an array of text parts")
    who = m.get("name")
    if who is not None and not isinstance(who, str):
        raise invalid(f"{where}.name", f"{where}.name must be a string")
    return Message(role, content, who)


def _unsupported(value: Any, name: str) -> Any:
    if value not in ([], {}, "none", "auto"):
        raise invalid(name, f"{name} is not supported: GPT-2 cannot call tools or functions")
    return None


_MESSAGES_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": list(CHAT_ROLES)},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "name": {"type": "string"},
        },
    },
}
_ANY = {"type": "object"}

CHAT_FIELDS = (
    string("model", None, "A served model id or alias (see /v1/models). Required.", required=True),
    Field("messages", _MESSAGES_SCHEMA, parse_messages, None, "The conversation so far.", required=True),
    integer(
        "max_tokens",
        None,
        "Tokens to generate (at most MAX_TOKENS; default: MAX_TOKENS or the rest of the context).",
        1,
    ),
    integer("max_completion_tokens", None, "The same as max_tokens (OpenAI's newer name); wins if both.", 1),
    *SAMPLING_FIELDS,
    boolean("logprobs", False, "Return the logprobs of the chosen tokens."),
    integer("top_logprobs", None, "With logprobs: this many alternatives per token (0..20).", 0),
    Field("tools", _ANY, _unsupported, None, "Not supported (a non-empty value is a 400)."),
    Field("functions", _ANY, _unsupported, None, "Not supported (a non-empty value is a 400)."),
)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None  # None: as much as MAX_TOKENS and the context allow
    sampling: Sampling  # its params' logprobs: top_logprobs when logprobs is true, else None
    logprobs: bool = False


def parse_chat(body: Mapping[str, Any], settings: Settings) -> ChatRequest:
    """Validates a chat completions body."""
    v = parse_fields(body, CHAT_FIELDS)
    param = "max_completion_tokens" if v["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = v[param]
    if max_tokens is not None:
        check_max_tokens(max_tokens, settings, param)
    top = v["top_logprobs"]
    if top is not None:
        if not v["logprobs"]:
            raise invalid("top_logprobs", "top_logprobs requires logprobs to be true")
        if top > MAX_TOP_LOGPROBS:
            raise invalid("top_logprobs", f"top_logprobs is {top}, but it must be at most {MAX_TOP_LOGPROBS}")
    logprobs = (top or 0) if v["logprobs"] else None
    return ChatRequest(
        model=v["model"],
        messages=v["messages"],
        max_tokens=max_tokens,
        sampling=sampling_from(v, settings, logprobs=logprobs),
        logprobs=v["logprobs"],
    )
