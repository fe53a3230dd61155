"""Running requests on an engine: start several, turn refusals into HTTP errors, merge their events.

A completions request with several prompts becomes one engine request per prompt. All of them are started
and each one's first event awaited before any response byte is sent, so EngineOverloaded / EngineError
still become a 429 / 400 (the engine raises them before the first event). Also what the completions and
chat response shapers share: response ids, the checks on token ids and the context, each choice's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence

from gpt2jax.engine.api import Engine, Event, GenerationRequest, TokenLogprob
from serving.errors import APIError, from_engine_error, internal_error, invalid


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(18)}"


def check_token_ids(engine: Engine, ids: Sequence[int], param: str) -> None:
    size = engine.tokenizer.vocab_size
    bad = next((t for t in ids if t >= size), None)
    if bad is not None:
        raise invalid(param, f"{param}: token id {bad} is out of range (the vocabulary has {size} tokens)")


def context_error(n_ctx: int, prompt_tokens: int, max_tokens: int, param: str = "max_tokens") -> APIError:
    """OpenAI's wording for a request that does not fit the model's context."""
    return invalid(
        param,
        f"This model's maximum context length is {n_ctx} tokens, however you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
        "completion). Please reduce your prompt; or completion length.",
        code="context_length_exceeded",
    )


@dataclasses.dataclass
class Primed:
    """A started engine stream whose first event has already arrived."""

    first: Event
    rest: AsyncIterator[Event]


async def start_all(engine: Engine, requests: Sequence[GenerationRequest]) -> list[Primed]:
    """Starts every request; raises the HTTP error of the first refusal (closing the others)."""
    streams = [aiter(engine.generate(r)) for r in requests]
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((f for f in firsts if f.done() and not f.cancelled() and f.exception()), None)
    if failed is None:
        return [Primed(f.result(), s) for f, s in zip(firsts, streams, strict=True)]
    await _close(firsts, streams)
    error = failed.exception()
    if isinstance(error, StopAsyncIteration):
        raise internal_error() from error
    if isinstance(error, APIError):
        raise error
    raise from_engine_error(error) from error


async def merge(primed: Sequence[Primed]) -> AsyncIterator[tuple[int, Event]]:
    """Events of all streams as they come, each with its stream's index; closes them all at the end."""
    for i, p in enumerate(primed):
        yield i, p.first
    streams = [p.rest for p in primed]
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield i, event
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        await _close(list(pending), streams)


async def _close(tasks: Sequence[asyncio.Future], streams: Sequence[AsyncIterator[Event]]) -> None:
    """Cancels waiting reads, then closes the streams so the engine frees their slots."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


@dataclasses.dataclass
class ChoiceState:
    """What has arrived so far for one choice."""

    text: list[str] = dataclasses.field(default_factory=list)
    tokens: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    completion_tokens: int = 0
    discarded_tokens: int = 0  # best_of candidates not returned (see Event)
    started: bool = False  # whether a chunk of this choice was streamed yet

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        self.tokens.extend(event.tokens)
        if event.prompt:
            self.prompt = event.prompt
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.completion_tokens = event.completion_tokens
            self.discarded_tokens = event.discarded_tokens


async def collect(primed: Sequence[Primed], choices_per_stream: int) -> dict[int, ChoiceState]:
    """Every choice of every stream, by global index (stream * choices_per_stream + event.index)."""
    states: dict[int, ChoiceState] = {}
    async for i, event in merge(primed):
        states.setdefault(i * choices_per_stream + event.index, ChoiceState()).add(event)
    return dict(sorted(states.items()))
