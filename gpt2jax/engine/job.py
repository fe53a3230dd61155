"""One submitted request on its way through the engine, and the bridge from the worker thread to asyncio.

The worker thread owns the `ChoiceStream`s and calls `flush` / `fail`; the request's consumer awaits
`queue` on its event loop. Items cross threads only through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from gpt2jax.constraint import Automaton
from gpt2jax.engine.api import Event, GenerationRequest, TokenLogprob
from gpt2jax.engine.choice import choice_for
from gpt2jax.tokenizer import GPT2Tokenizer

END = object()  # the last item of a job's queue


class Job:
    """A request's choices, its delivery queue and its lifecycle flags."""

    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: GPT2Tokenizer,
        eos: int,
        loop: asyncio.AbstractEventLoop,
        automaton: Automaton | None = None,
    ) -> None:
        self.request = request
        self.automaton = automaton  # request.params.constraint compiled (gpt2jax/constraint.py), or None
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.cancelled = False  # set by the consumer's side; the worker frees the slots
        self.done = False  # the last item was handed to the queue
        n = request.params.candidates
        self.choices = [choice_for(tokenizer, request, i, eos) for i in range(n)]
        self._tokenizer = tokenizer

    @property
    def slots_needed(self) -> int:
        return len(self.choices) if self.request.params.max_tokens > 0 else 0

    @property
    def ranked(self) -> bool:
        """best_of > n: all choices are generated, then the best n are returned (so nothing streams)."""
        return len(self.choices) > self.request.params.n

    def set_prompt_scores(
        self, logprob: np.ndarray, top_tokens: np.ndarray, top_logprobs: np.ndarray
    ) -> None:
        """Attaches the echo logprobs ([P] arrays from the prefill) to every choice's first event."""
        k, tok = self.request.params.logprobs or 0, self._tokenizer
        prompt = self.request.prompt
        entries = [TokenLogprob(prompt[0], tok.token_str(prompt[0]), None)]
        for t in range(1, len(prompt)):
            top = tuple(
                (int(i), tok.token_str(int(i)), float(lp))
                for i, lp in zip(top_tokens[t, :k], top_logprobs[t, :k], strict=True)
            )
            entries.append(TokenLogprob(prompt[t], tok.token_str(prompt[t]), float(logprob[t]), top))
        for c in self.choices:
            c.prompt = tuple(entries)

    def flush(self) -> bool:
        """Hands new events to the consumer; returns True when the job is over (all choices finished)."""
        if self.done:
            return True
        over = all(c.finished for c in self.choices)
        if self.ranked:
            events = self._best_events() if over else []
        else:
            events = [e for c in self.choices if (e := c.take_event()) is not None]
        if events:
            self._send(events)
        if over:
            self._send(END)
            self.done = True
        return over

    def fail(self, error: BaseException) -> None:
        """Ends the job with `error`, raised from the consumer's iterator."""
        for c in self.choices:
            c.cancel()
        if not self.done:
            self._send(error)
            self.done = True

    def _best_events(self) -> list[Event]:
        """The n choices with the highest mean token logprob, each as one event, renumbered 0..n-1.

        The tokens of the candidates left out are generated work too: choice 0 carries their count.
        """
        ranked = sorted(self.choices, key=lambda c: c.mean_logprob, reverse=True)
        n = self.request.params.n
        best, rest = ranked[:n], ranked[n:]
        out = []
        for index, c in enumerate(best):
            parts = []
            while (e := c.take_event()) is not None:
                parts.append(e)
            last = parts[-1]
            out.append(
                Event(
                    index=index,
                    text="".join(e.text for e in parts),
                    tokens=tuple(t for e in parts for t in e.tokens),
                    prompt=parts[0].prompt,
                    finish_reason=last.finish_reason,
                    prompt_tokens=last.prompt_tokens,
                    completion_tokens=last.completion_tokens,
                    discarded_tokens=sum(c.generated for c in rest) if index == 0 else 0,
                )
            )
        return out

    def _send(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancelled = True
