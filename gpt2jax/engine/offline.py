"""Blocking use of the batching engine, for notebooks and scripts: submit many requests at once, wait for
all of them, get one `Completion` per choice in request order.

Every request enters the engine's queue together, so they share the decode slots as HTTP requests do: a
short completion leaves its slot as soon as it ends and the next waiting prompt takes it. They enter
longest max_tokens first (the longest-processing-time rule): short ones then fill the slots that long
ones leave free towards the end, instead of long ones running on with few rows beside them. The engine's
asyncio side runs on a private event loop in its own thread, so this works inside a running loop
(Jupyter) as well as outside one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from gpt2jax.engine.api import Engine, Event, GenerationRequest, TokenLogprob


@dataclasses.dataclass(frozen=True)
class Completion:
    """One choice of one prompt."""

    text: str  # the completion, cut before a stop string; end-of-text is not in it
    token_ids: tuple[int, ...]  # the tokens behind `text` (end-of-text included when it was sampled)
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length" (max_tokens)
    logprobs: tuple[TokenLogprob, ...] | None = None  # per token, with top alternatives; when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # per prompt token (first: None); when asked
    prompt_index: int = 0  # which prompt of the call
    index: int = 0  # which choice of that prompt


def run_all(engine: Engine, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
    """Runs every request on `engine` at once; per request, its choices in index order.

    Raises the engine's error (EngineError, EngineOverloaded, ...) of the first request that fails.
    """

    async def one(i: int, request: GenerationRequest) -> list[Completion]:
        events: dict[int, list[Event]] = {}
        async for event in engine.generate(request):
            events.setdefault(event.index, []).append(event)
        return [_completion(i, index, parts, request) for index, parts in sorted(events.items())]

    async def main() -> list[list[Completion]]:
        order = sorted(range(len(requests)), key=lambda i: -requests[i].params.max_tokens)
        done = await asyncio.gather(*(one(i, requests[i]) for i in order))
        by_request = dict(zip(order, done, strict=True))
        return [by_request[i] for i in range(len(requests))]

    with ThreadPoolExecutor(1, thread_name_prefix="gpt2jax-offline") as pool:
        return pool.submit(asyncio.run, main()).result()


def _completion(prompt_index: int, index: int, parts: list[Event], request: GenerationRequest) -> Completion:
    tokens = tuple(t for e in parts for t in e.tokens)
    prompt = next((e.prompt for e in parts if e.prompt), ())
    return Completion(
        text="".join(e.text for e in parts),
        token_ids=tuple(t.token for t in tokens),
        finish_reason=parts[-1].finish_reason or "length",
        logprobs=tokens if request.params.logprobs is not None else None,
        prompt_logprobs=prompt if request.params.prompt_logprobs else None,
        prompt_index=prompt_index,
        index=index,
    )
