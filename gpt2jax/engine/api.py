"""The contract between the HTTP layer and the batching engine.

The HTTP layer validates a request, tokenizes it and submits a `GenerationRequest`; the engine answers with
an async iterator of `Event`s. The engine owns detokenization and stop strings (so text that may be the
start of a stop string is held back), logprobs and finish reasons; the HTTP layer only shapes JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from gpt2jax.sampling_params import SamplingParams
from gpt2jax.tokenizer import GPT2Tokenizer


class EngineOverloaded(Exception):
    """The waiting queue is full, or the request waited too long for a slot (HTTP 429)."""


class EngineError(Exception):
    """The request cannot be served (e.g. it does not fit the context); message is user-facing (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete: its token ids and its sampling record, passed whole to the device row."""

    prompt: tuple[int, ...]  # token ids, at least one
    params: SamplingParams = SamplingParams()
    strip_leading: str = ""  # characters dropped from the start of the text before stops (chat: " ")

    @classmethod
    def of(cls, prompt: Sequence[int], strip_leading: str = "", **settings: Any) -> GenerationRequest:
        """A request from SamplingParams fields given as keywords."""
        return cls(tuple(prompt), SamplingParams(**settings), strip_leading)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    text: str  # the token as OpenAI's `tokens` shows it
    logprob: float | None  # None for the first prompt token
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token text, logprob), best first


@dataclasses.dataclass(frozen=True)
class Event:
    """A piece of one choice's output. Events of different choices of one request may interleave."""

    index: int  # choice index within the request, 0..n-1
    text: str = ""  # new completion text (already cut at stop strings, never half a character)
    tokens: tuple[TokenLogprob, ...] = ()  # tokens behind `text`, with logprobs when asked for
    prompt: tuple[TokenLogprob, ...] = ()  # only in a choice's first event when echo_logprobs
    finish_reason: str | None = None  # "stop" or "length" in the choice's last event
    prompt_tokens: int = 0  # set in the last event of a choice
    completion_tokens: int = 0  # set in the last event of a choice (tokens generated for this choice)
    # best_of: tokens generated for the candidates that were not returned (in the last event of choice 0)
    discarded_tokens: int = 0


class Engine(Protocol):
    """What the HTTP layer needs of an engine (one per served model)."""

    name: str
    n_ctx: int
    tokenizer: GPT2Tokenizer

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Streams the request's events; raises EngineOverloaded / EngineError before the first event.

        Closing the iterator early (client gone) cancels the request and frees its slots.
        """
        ...
