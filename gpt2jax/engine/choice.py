"""Host side of one choice: detokenizing, stop strings with holdback, logprobs and the finish reason.

Text reaches the client only when it is known not to be part of a stop string: the longest tail of the
decoded text that is a proper prefix of some stop string is held back until later tokens decide. The
tokenizer's incremental decoder keeps half UTF-8 characters back the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpt2jax.engine.api import Event, GenerationRequest, TokenLogprob
from gpt2jax.tokenizer import GPT2Tokenizer


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `stops`."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits, default=-1)


class ChoiceStream:
    """Turns one choice's sampled tokens into Events.

    Feed tokens with `push`; collect what became final with `take_event`. `finish_reason` is set once the
    choice is over (end-of-text or a stop string: "stop"; max_tokens: "length").
    """

    def __init__(
        self,
        tokenizer: GPT2Tokenizer,
        index: int,
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        eos: int | None = None,
        top_logprobs: int = 0,
        prompt_tokens: int = 0,
        prompt: tuple[TokenLogprob, ...] = (),
        pending: bytes = b"",
        strip_leading: str = "",
    ) -> None:
        """pending: bytes of a character the prompt left unfinished (the completion's text continues
        them); strip_leading: characters dropped from the start of the text, tokens' texts included."""
        self.index = index
        self.max_tokens = max_tokens
        self.stops = tuple(s for s in stop if s)
        self.eos = eos
        self.top_logprobs = top_logprobs
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self.generated = 0  # tokens sampled, end-of-text included
        self.logprob_sum = 0.0
        self._tokenizer = tokenizer
        self._decoder = tokenizer.incremental_decoder(pending)
        self._strip = strip_leading  # "" once the text has begun
        self.prompt = prompt  # echo logprobs: go out with the first event
        self._held = ""  # decoded text not yet released
        self._released = 0  # characters released so far
        self._tokens: list[tuple[int, int, TokenLogprob]] = []  # (start, end, token) not yet released
        self._out_text: list[str] = []
        self._out_tokens: list[TokenLogprob] = []
        self._sent_first = False
        self._sent_last = False
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / max(self.generated, 1)

    def push(self, token: int, logprob: float, top_tokens: np.ndarray, top_logprobs: np.ndarray) -> None:
        """Adds one sampled token (ignored once finished).

        Every token counted in `generated` gets its TokenLogprob, end-of-text included (text
        "<|endoftext|>", adding nothing to the choice's text), unless a stop string cut it off.
        """
        if self.finished:
            return
        self.generated += 1
        self.logprob_sum += float(logprob)
        top = tuple(
            (int(t), self._tokenizer.token_str(int(t)), float(lp))
            for t, lp in zip(top_tokens[: self.top_logprobs], top_logprobs[: self.top_logprobs], strict=True)
        )
        shown = self._tokenizer.token_str(int(token))
        if token == self.eos:
            self._finish("stop", TokenLogprob(int(token), shown, float(logprob), top))
            return
        start = self._released + len(self._held)
        piece = self._decoder.push(token)
        if self._strip:
            kept = piece.lstrip(self._strip)
            cut = len(piece) - len(kept)
            if shown.startswith(piece[:cut]):  # the token's own text loses the same characters
                shown = shown[cut:]
            piece = kept
            if piece:
                self._strip = ""
        self._held += piece
        entry = TokenLogprob(int(token), shown, float(logprob), top)
        self._tokens.append((start, self._released + len(self._held), entry))
        if self._cut_at_stop():
            return
        if self.generated >= self.max_tokens:
            self._finish("length")
            return
        self._release(len(self._held) - holdback(self._held, self.stops))

    def end(self, reason: str) -> None:
        """Ends the choice now (e.g. max_tokens 0): held text is released, an unfinished character as
        U+FFFD."""
        if not self.finished:
            self._finish(reason)

    def cancel(self) -> None:
        """Ends the choice without further events."""
        self.cancelled = True

    def take_event(self) -> Event | None:
        """The text and tokens that became final since the last call, as an Event (None if nothing new)."""
        last = self.finish_reason is not None
        news = self._out_text or self._out_tokens or last or (self.prompt and not self._sent_first)
        if self._sent_last or self.cancelled or not news:
            return None
        event = Event(
            index=self.index,
            text="".join(self._out_text),
            tokens=tuple(self._out_tokens),
            prompt=self.prompt if not self._sent_first else (),
            finish_reason=self.finish_reason if last else None,
            prompt_tokens=self.prompt_tokens if last else 0,
            completion_tokens=self.generated if last else 0,
        )
        self._out_text, self._out_tokens = [], []
        self._sent_first, self._sent_last = True, last
        return event

    def _cut_at_stop(self) -> bool:
        """Ends the choice at the earliest stop string in the held text, if there is one.

        Text released earlier never starts a stop string (it was held back while it could), so searching
        the held text is enough.
        """
        cut = find_stop(self._held, self.stops)
        if cut < 0:
            return False
        self._held = self._held[:cut]
        end = self._released + cut
        self._tokens = [t for t in self._tokens if t[0] < end]
        self._release(cut, all_tokens=True)
        self.finish_reason = "stop"
        return True

    def _finish(self, reason: str, eos: TokenLogprob | None = None) -> None:
        self._held += self._decoder.flush().lstrip(self._strip)
        if self._cut_at_stop():
            return
        if eos is not None:  # at the end of the text
            end = self._released + len(self._held)
            self._tokens.append((end, end, eos))
        self._release(len(self._held), all_tokens=True)
        self.finish_reason = reason

    def _release(self, n_chars: int, all_tokens: bool = False) -> None:
        if n_chars > 0:
            self._out_text.append(self._held[:n_chars])
            self._held = self._held[n_chars:]
            self._released += n_chars
        keep = len(self._tokens)
        if not all_tokens:  # a token goes out once all of its text has
            keep = next((i for i, (_, end, _) in enumerate(self._tokens) if end > self._released), keep)
        self._out_tokens.extend(t for _, _, t in self._tokens[:keep])
        del self._tokens[:keep]


def choice_for(tokenizer: GPT2Tokenizer, request: GenerationRequest, index: int, eos: int) -> ChoiceStream:
    """The ChoiceStream of choice `index` of `request`; `eos` is the model's end-of-text id."""
    _, pending = tokenizer.decode_complete(request.prompt[-8:])  # a character has at most 4 bytes
    return ChoiceStream(
        tokenizer,
        index,
        max_tokens=request.params.max_tokens,
        stop=request.params.stop,
        eos=None if request.params.ignore_eos else eos,
        top_logprobs=request.params.logprobs or 0,
        prompt_tokens=len(request.prompt),
        pending=pending,
        strip_leading=request.strip_leading,
    )
