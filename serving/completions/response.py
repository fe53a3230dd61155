"""Text completions: prompts to engine requests, engine events to OpenAI's `text_completion` objects."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gpt2jax.engine.api import Engine, GenerationRequest, TokenLogprob
from gpt2jax.tokenizer import GPT2Tokenizer
from serving.completions.schema import CompletionRequest
from serving.fanout import (
    ChoiceState,
    Primed,
    check_token_ids,
    collect,
    context_error,
    merge,
    new_id,
    start_all,
)
from serving.limits import check_prompt_text, keep_tail


@dataclasses.dataclass(frozen=True)
class PromptJob:
    ids: tuple[int, ...]
    text: str  # the prompt as the model sees it (what echo returns), up to an unfinished last character
    pending: bytes = b""  # that character's bytes: the completion's text starts by finishing it


def tokenize_prompts(req: CompletionRequest, engine: Engine, *, truncate: bool) -> list[PromptJob]:
    """Token ids of each prompt, checked against the vocabulary and the context.

    truncate=True is the original openai-server's behaviour (legacy engines routes): a prompt that does
    not fit keeps its last n_ctx - max_tokens tokens. Otherwise it is a 400 with OpenAI's message.
    """
    tok, n_ctx = engine.tokenizer, engine.n_ctx
    jobs = []
    for p in req.prompts:
        if isinstance(p, str):  # bounded before tokenizing (see serving/limits.py)
            if truncate:
                p = keep_tail(p, engine)
            else:
                check_prompt_text(p, engine, "prompt")
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        check_token_ids(engine, ids, "prompt")
        ids = ids or [tok.eos_token_id]  # an empty prompt starts a new document
        if len(ids) + req.params.max_tokens > n_ctx:
            keep = n_ctx - req.params.max_tokens
            if not truncate or keep < 1:
                raise context_error(n_ctx, len(ids), req.params.max_tokens)
            ids = ids[-keep:]
        jobs.append(PromptJob(tuple(ids), *tok.decode_complete(ids)))
    return jobs


async def start(engine: Engine, req: CompletionRequest, jobs: Sequence[PromptJob]) -> list[Primed]:
    """One engine request per prompt, all started (see generation.start_all)."""
    for token, _ in req.params.logit_bias:
        check_token_ids(engine, [token], "logit_bias")
    requests = [GenerationRequest(job.ids, req.params) for job in jobs]
    return await start_all(engine, requests)


def legacy_logprobs(
    tok: GPT2Tokenizer,
    entries: Sequence[TokenLogprob],
    start: int,
    before: Sequence[int] = (),
    pending: bytes = b"",
) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; `before` are ids already sent (for the offsets of a stream),
    `pending` the prompt's unfinished character when the entries continue it."""
    ids = [*before, *(t.token for t in entries)]
    offsets = tok.text_offsets(ids, start, pending)[len(before) :]
    return {
        "tokens": [t.text for t in entries],
        "token_logprobs": [t.logprob for t in entries],
        # The first prompt token has no logprob, hence no alternatives: null as OpenAI has it.
        "top_logprobs": [None if t.logprob is None else _top_dict(t) for t in entries],
        "text_offset": offsets,
    }


def _top_dict(t: TokenLogprob) -> dict[str, float]:
    """The alternatives, best first, and the chosen token itself (OpenAI's and vLLM's `logprobs + 1`)."""
    top: dict[str, float] = {}
    for _, text, logprob in t.top:  # two ids may show as the same text: keep the better
        top.setdefault(text, logprob)
    top.setdefault(t.text, t.logprob)
    return top


def usage(jobs: Sequence[PromptJob], states: Any) -> dict[str, int]:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(s.completion_tokens + s.discarded_tokens for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionShaper:
    """Shapes the events of one completions request into response bodies or stream chunks."""

    def __init__(
        self,
        req: CompletionRequest,
        model: str,
        tok: GPT2Tokenizer,
        jobs: Sequence[PromptJob],
        on_usage: Callable[[dict[str, int]], None] = lambda usage: None,
    ) -> None:
        self.req, self.model, self.tok, self.jobs = req, model, tok, jobs
        self.on_usage = on_usage  # called once with the usage when the request completes
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.per_prompt = req.params.n

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def _job(self, index: int) -> PromptJob:
        return self.jobs[index // self.per_prompt]

    async def body(self, primed: Sequence[Primed]) -> dict[str, Any]:
        states = await collect(primed, self.per_prompt)
        choices = []
        for index, st in states.items():
            job = self._job(index)
            text = "".join(st.text)
            logprobs = None
            if self.req.params.logprobs is not None:
                if self.req.echo:
                    logprobs = legacy_logprobs(self.tok, [*st.prompt, *st.tokens], 0)
                else:
                    logprobs = legacy_logprobs(self.tok, st.tokens, len(job.text), (), job.pending)
            choices.append(
                {
                    "text": job.text + text if self.req.echo else text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": st.finish_reason,
                }
            )
        total = usage(self.jobs, states.values())
        self.on_usage(total)
        return self._head() | {"choices": choices, "usage": total}

    async def chunks(self, primed: Sequence[Primed]) -> AsyncIterator[dict[str, Any]]:
        states: dict[int, ChoiceState] = {}
        sent_ids: dict[int, list[int]] = {}  # token ids already streamed per choice, for text offsets
        include_usage = self.req.sampling.include_usage
        async for i, event in merge(primed):
            index = i * self.per_prompt + event.index
            st = states.setdefault(index, ChoiceState())
            st.add(event)
            job = self._job(index)
            text, entries = event.text, list(event.tokens)
            first = not st.started
            if first and self.req.echo:
                text, entries = job.text + text, [*event.prompt, *entries]
            if not (text or entries or event.finish_reason or first):
                continue
            st.started = True
            logprobs = None
            if self.req.params.logprobs is not None:
                before = sent_ids.setdefault(index, [])
                if self.req.echo:
                    logprobs = legacy_logprobs(self.tok, entries, 0, before)
                else:
                    logprobs = legacy_logprobs(self.tok, entries, len(job.text), before, job.pending)
                before.extend(t.token for t in entries)
            choice = {
                "text": text,
                "index": index,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
            yield self._head() | {"choices": [choice]} | ({"usage": None} if include_usage else {})
        total = usage(self.jobs, states.values())
        self.on_usage(total)
        if include_usage:
            yield self._head() | {"choices": [], "usage": total}
