"""The body of POST /v1/completions (and of the legacy engines routes) validated into a frozen dataclass.

Checks that need the model (token ids in the vocabulary, the context length) are done by the routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gpt2jax.sampling_params import SamplingParams
from serving.errors import invalid
from serving.fields import Field, boolean, integer, parse_fields, string, token_ids, type_name
from serving.sampling_fields import SAMPLING_FIELDS, Sampling, check_max_tokens, sampling_from
from serving.settings import Settings

MAX_LOGPROBS = 5

Prompt = str | tuple[int, ...]  # text, or token ids


def parse_prompt(value: Any, name: str) -> tuple[Prompt, ...]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        what = "an empty array" if value == [] else type_name(value)
        raise invalid(name, f"{name} must be a string, an array of strings or of token ids, not {what}")
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return (token_ids(value, name),)
    if all(isinstance(p, list) for p in value):
        return tuple(token_ids(p, name) for p in value)
    raise invalid(name, f"{name} must be a string, an array of strings, of token ids or of token-id arrays")


_PROMPT_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    ]
}

COMPLETION_FIELDS = (
    string("model", None, "A served model id or alias (see /v1/models). Required.", required=True),
    Field("prompt", _PROMPT_SCHEMA, parse_prompt, ("<|endoftext|>",), "Prompt(s): text or token ids."),
    integer("max_tokens", 16, "Tokens to generate per choice (at most MAX_TOKENS); 0 with echo scores.", 0),
    *SAMPLING_FIELDS,
    integer("best_of", None, "Generate this many per prompt and return the n with the best mean logprob.", 1),
    boolean("echo", False, "Return the prompt before the completion (and its logprobs with logprobs)."),
    integer("logprobs", None, "Return the logprobs of the chosen tokens and this many alternatives.", 0, 5),
    string("suffix", None, "Not supported: GPT-2 cannot insert text; any non-empty value is a 400."),
)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]
    sampling: Sampling
    echo: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.sampling.params


def parse_completion(body: Mapping[str, Any], settings: Settings) -> CompletionRequest:
    """Validates a completions body (a JSON object, or a coerced query string)."""
    v = parse_fields(body, COMPLETION_FIELDS)
    if v["suffix"]:
        raise invalid("suffix", "suffix is not supported: GPT-2 can only continue text, not insert it")
    n = v["n"]
    check_max_tokens(v["max_tokens"], settings)
    if len(v["prompt"]) > settings.max_prompts:
        raise invalid("prompt", f"at most {settings.max_prompts} prompts per request (MAX_PROMPTS)")
    best_of = v["best_of"]
    if best_of is not None:
        if best_of < n:
            raise invalid("best_of", f"best_of ({best_of}) must be greater than or equal to n ({n})")
        if best_of > settings.max_n:
            raise invalid("best_of", f"best_of is {best_of}, but this server allows at most {settings.max_n}")
        if v["stream"] and best_of > 1:
            raise invalid(
                "best_of", "best_of cannot be used with stream: the best choices are known at the end"
            )
    extra = dict(max_tokens=v["max_tokens"], best_of=best_of, logprobs=v["logprobs"])
    prompt_logprobs = v["echo"] and v["logprobs"] is not None
    return CompletionRequest(
        v["model"],
        v["prompt"],
        sampling_from(v, settings, **extra, prompt_logprobs=prompt_logprobs),
        v["echo"],
    )
