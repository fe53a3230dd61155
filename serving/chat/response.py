"""Chat completions on a plain language model: the transcript template in, `chat.completion` objects out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gpt2jax.engine.api import Engine, GenerationRequest, TokenLogprob
from gpt2jax.tokenizer import EOS_TOKEN, GPT2Tokenizer
from serving.chat.schema import ChatRequest
from serving.fanout import ChoiceState, Primed, check_token_ids, collect, context_error, merge, new_id
from serving.limits import check_prompt_text
from serving.registry import ServedModel
from serving.settings import Settings


def prepare(req: ChatRequest, model: ServedModel, engine: Engine, settings: Settings) -> GenerationRequest:
    """Renders the transcript and builds the engine request; the reply ends at the next turn marker."""
    text, turn_markers = model.chat_template.render(req.messages)
    check_prompt_text(text, engine, "messages")
    tok = engine.tokenizer
    ids = tok.encode(text) or [tok.eos_token_id]
    room = engine.n_ctx - len(ids)
    max_tokens = req.max_tokens
    if max_tokens is None:  # OpenAI's default is "as long as it takes": here what fits, up to MAX_TOKENS
        max_tokens = min(settings.max_tokens, room)
    if max_tokens < 1 or max_tokens > room:
        raise context_error(engine.n_ctx, len(ids), max(max_tokens, 1), param="messages")
    params = req.sampling.params
    for token, _ in params.logit_bias:
        check_token_ids(engine, [token], "logit_bias")
    stop = tuple(dict.fromkeys((*params.stop, *turn_markers)))
    # After "Assistant:" the model writes " Hello": the space belongs to the template, so the reply (and
    # what its stop strings are matched against) starts after it.
    return GenerationRequest(tuple(ids), params.replace(max_tokens=max_tokens, stop=stop), strip_leading=" ")


def logprob_entry(tok: GPT2Tokenizer, t: TokenLogprob) -> dict[str, Any]:
    def one(token: int, text: str, logprob: float | None) -> dict[str, Any]:
        raw, shown = tok.token_bytes(token), tok.token_str(token)
        if text != shown and shown.endswith(text):  # the reply's leading space was cut off this token
            raw = raw[len(shown.encode()) - len(text.encode()) :]
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return one(t.token, t.text, t.logprob) | {"top_logprobs": [one(*alt) for alt in t.top]}


class ChatShaper:
    """Shapes the events of one chat request into a `chat.completion` or `chat.completion.chunk`s."""

    def __init__(
        self,
        req: ChatRequest,
        model: str,
        tok: GPT2Tokenizer,
        prompt_tokens: int,
        on_usage: Callable[[dict[str, int]], None] = lambda usage: None,
    ) -> None:
        self.req, self.model, self.tok, self.prompt_tokens = req, model, tok, prompt_tokens
        self.on_usage = on_usage
        self.id = new_id("chatcmpl")
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _usage(self, states: Sequence[ChoiceState]) -> dict[str, int]:
        completion = sum(s.completion_tokens + s.discarded_tokens for s in states)
        total = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion}
        total["total_tokens"] = self.prompt_tokens + completion
        self.on_usage(total)
        return total

    def _logprobs(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's chat logprobs: the tokens' texts join to exactly the content, so end-of-text (which
        ends the reply but is not in it) is left out, as OpenAI leaves out its end-of-turn token."""
        if not self.req.logprobs:
            return None
        eos = self.tok.eos_token_id
        content = [logprob_entry(self.tok, t) for t in tokens if not (t.token == eos and t.text == EOS_TOKEN)]
        return {"content": content, "refusal": None}

    async def body(self, primed: Sequence[Primed]) -> dict[str, Any]:
        states = await collect(primed, self.req.sampling.params.n)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(st.text), "refusal": None},
                "logprobs": self._logprobs(st.tokens),
                "finish_reason": st.finish_reason,
            }
            for index, st in states.items()
        ]
        return self._head("chat.completion") | {
            "choices": choices,
            "usage": self._usage(list(states.values())),
        }

    async def chunks(self, primed: Sequence[Primed]) -> AsyncIterator[dict[str, Any]]:
        include_usage = self.req.sampling.include_usage
        extra = {"usage": None} if include_usage else {}
        states: dict[int, ChoiceState] = {}

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None):
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]} | extra

        async for _, event in merge(primed):
            st = states.setdefault(event.index, ChoiceState())
            if not st.started:
                st.started = True
                yield chunk(event.index, {"role": "assistant", "content": ""})
            text = event.text
            st.add(event)
            logprobs = self._logprobs(event.tokens)
            if text or (logprobs and logprobs["content"]):
                yield chunk(event.index, {"content": text}, logprobs)
            if event.finish_reason is not None:
                yield chunk(event.index, {}, None, event.finish_reason)
        total = self._usage(list(states.values()))
        if include_usage:
            yield self._head("chat.completion.chunk") | {"choices": [], "usage": total}
