"""A fake device for the engine's scheduler: FakePrograms implements DevicePrograms in numpy, with no weights.

Its text is fixed by hand. With E = config.eos_token_id (the last id, 511), a slot holding prompt p
generates, as its k-th token (k = 0 for the one insert samples):

    token(p, k) = (sum(p) + k) % E              (never E itself)

with logprob 0 and itself as every top alternative, except that a prompt listed in `ends` gives
end-of-text (E) as its token number ends[p]. So a request for max_tokens m (no stop strings) gets the
tokens sum(p), sum(p)+1, ..., sum(p)+m-1 (mod E) and ends with "length"; with ends[p] = e < m it gets
the first e of those, then end-of-text (its events carry the token, with no text) and ends with "stop".
`expected_tokens` says the same in code.

As the real programs do, insert returns the slot's first token as a SampleOutput of [1] rows, and decode
the outputs of `chunk_size` steps for its leading rows, [chunk, rows], token -1 where a row is done (its
host had ended it, it ended in the chunk, or it was empty). Outputs are jax Arrays (placed, never
compiled), as the worker expects of device outputs.

For tests that must see the queue fill, decode can be held: `hold()` makes every decode call wait (after
recording it) until `allow(n)` lets n more through or `release()` lets all through. Every call is
recorded in `calls`; `wait_for(predicate)` blocks until the predicate of the fake holds.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from waits import HANG

from gpt2jax.config import GPT2Config
from gpt2jax.decode import PromptScores
from gpt2jax.engine.programs import DevicePrograms
from gpt2jax.engine.slots import Prefilled
from gpt2jax.sampling import NUM_TOP_LOGPROBS, SampleOutput

K = NUM_TOP_LOGPROBS
EOS = 511  # the tiny tokenizer's <|endoftext|> (tests/conftest.py: the last of TINY_VOCAB ids)


class FakeState(NamedTuple):
    """The fake's decode state, one entry per slot."""

    prompt_sum: np.ndarray  # [S] i64, sum of the slot's prompt tokens: its text's start
    step: np.ndarray  # [S] i32, tokens generated so far
    max_tokens: np.ndarray  # [S] i32
    eos: np.ndarray  # [S] i32, the token that ends the row (-1: none, i.e. ignore_eos)
    end_at: np.ndarray  # [S] i32, the step that gives end-of-text (-1: none)
    done: np.ndarray  # [S] bool
    prompt: tuple[tuple[int, ...], ...]  # each slot's prompt, for the record


def expected_tokens(
    prompt: Sequence[int], max_tokens: int, ends: Mapping[tuple, int] | None = None
) -> list[int]:
    """The tokens of a request's events from FakePrograms (see the module's docstring)."""
    n = (ends or {}).get(tuple(prompt), max_tokens)
    text = [(sum(prompt) + k) % EOS for k in range(min(n, max_tokens))]
    return text + [EOS] if n < max_tokens else text


class FakePrograms(DevicePrograms):
    """DevicePrograms on numpy: one data shard, every window and row count "compiled"."""

    def __init__(
        self, slots: int = 2, chunk_size: int = 2, n_ctx: int = 128, ends: Mapping[tuple, int] | None = None
    ) -> None:
        self.config = GPT2Config(
            n_vocab=EOS + 1, n_ctx=n_ctx, n_embd=8, n_head=2, n_layer=1, eos_token_id=EOS
        )
        self.slots = self.local_slots = slots
        self.chunk_size = chunk_size
        self.windows = (n_ctx,)
        self.prefill_tokens = n_ctx
        self.ends = {tuple(p): e for p, e in (ends or {}).items()}
        self.calls: list[
            tuple
        ] = []  # ("prefill", prompts), ("insert", slot, prompt), ("decode", live slots, steps)
        self.generated: Counter[tuple[int, ...]] = Counter()  # tokens emitted per prompt (end-of-text too)
        self.cv = threading.Condition()  # guards the record and the gate
        self._allowed: int | None = None  # decode calls that may still run; None: all

    # ---- what tests use ----

    def hold(self) -> None:
        """Every decode call from now on waits (recorded) until allowed."""
        with self.cv:
            self._allowed = 0

    def allow(self, n: int = 1) -> None:
        """Lets n more held decode calls run."""
        with self.cv:
            self._allowed = (self._allowed or 0) + n
            self.cv.notify_all()

    def release(self) -> None:
        """Lets every decode call run, now and later."""
        with self.cv:
            self._allowed = None
            self.cv.notify_all()

    def wait_for(self, predicate: Callable[[FakePrograms], bool]) -> None:
        """Blocks until predicate(self) holds (checked at every call); fails after HANG seconds."""
        with self.cv:
            assert self.cv.wait_for(lambda: predicate(self), HANG), "the fake device waited too long"

    def count(self, kind: str) -> int:
        """How many calls of this kind ("prefill", "insert", "decode") were made (or are held)."""
        with self.cv:
            return sum(c[0] == kind for c in self.calls)

    def inserted(self) -> list[tuple[int, tuple[int, ...]]]:
        """(slot, prompt) of every insert, in order."""
        with self.cv:
            return [c[1:] for c in self.calls if c[0] == "insert"]

    # ---- DevicePrograms ----

    def init_state(self) -> FakeState:
        S = self.slots
        zeros = lambda: np.zeros(S, np.int32)
        return FakeState(
            np.zeros(S, np.int64), zeros(), zeros(), zeros() - 1, zeros() - 1, np.ones(S, bool), ((),) * S
        )

    def prefill_rows(self, length: int, score: bool = False) -> int:
        return 1 if score else 4

    def prefill(self, prompts: Sequence[Sequence[int]], length: int, score: bool) -> list[Prefilled]:
        """The fake's "KV cache" of a prompt is the prompt itself, [1, P]; its prompt scores are 0."""
        self._record("prefill", [tuple(p) for p in prompts])
        out = []
        for p in prompts:
            P = len(p)
            scores = PromptScores(
                np.zeros((1, P), np.float32), np.broadcast_to(np.asarray(p, np.int32)[None, :, None], (1, P, K)),
                np.zeros((1, P, K), np.float32),
            ) if score else None  # fmt: skip
            out.append(
                Prefilled(np.asarray([p], np.int32), np.zeros(self.config.n_vocab, np.float32), scores)
            )
        return out

    def insert(self, state: FakeState, pre: Prefilled, slot: int, row: Any) -> tuple[FakeState, SampleOutput]:
        prompt = tuple(int(t) for t in np.asarray(pre.cache)[0])
        self._record("insert", slot, prompt)
        s = _copy(state)
        s.prompt_sum[slot], s.step[slot], s.done[slot] = sum(prompt), 0, False
        s.max_tokens[slot], s.eos[slot] = int(row.max_tokens), int(row.eos)
        s.end_at[slot] = self.ends.get(prompt, -1)
        s = s._replace(prompt=(*s.prompt[:slot], prompt, *s.prompt[slot + 1 :]))
        return s, _outputs(self._step(s, [slot]))

    def window_for(self, end: int) -> int:
        return self.windows[-1]

    def fill_order(self) -> list[int]:
        return list(range(self.slots))

    def rows_for(self, slots: Sequence[int]) -> int:
        return 1 + max(slots, default=0)

    def decoded_slots(self, rows: int) -> list[int]:
        return list(range(rows))

    def decode(
        self,
        state: FakeState,
        active: np.ndarray,
        window: int | None = None,
        rows: int | None = None,
        steps: int | None = None,
    ) -> tuple[FakeState, SampleOutput]:
        rows = rows or self.local_slots
        s = _copy(state)
        s.done[:rows] |= ~np.asarray(active, bool)[:rows]
        run = min(steps or self.chunk_size, self.chunk_size)
        with self.cv:
            self.calls.append(("decode", tuple(np.flatnonzero(~s.done[:rows]).tolist()), run))
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: self._allowed is None or self._allowed > 0, HANG), "held too long"
            if self._allowed is not None:
                self._allowed -= 1
        tokens = np.full((self.chunk_size, rows), -1, np.int32)
        for t in range(run):
            tokens[t] = self._step(s, range(rows))
        return s, _outputs(tokens)

    def program_names(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> list[tuple]:
        return [("init",), ("decode", self.windows[-1], self.slots)]

    def compile(self, buckets: Sequence[int], score: Sequence[bool] = (False,), **options: Any) -> None:
        self._record("compile")

    # ---- the fake's arithmetic ----

    def _step(self, s: FakeState, slots: Sequence[int] | range) -> np.ndarray:
        """One token for each of these slots (in place); -1 for those done."""
        out = np.full(len(slots), -1, np.int32)
        for i, slot in enumerate(slots):
            if s.done[slot]:
                continue
            k = int(s.step[slot])
            token = EOS if k == s.end_at[slot] else (int(s.prompt_sum[slot]) + k) % EOS
            s.step[slot] += 1
            s.done[slot] = token == s.eos[slot] or s.step[slot] >= s.max_tokens[slot]
            out[i] = token
            with self.cv:
                self.generated[s.prompt[slot]] += 1
        return out

    def _record(self, *call: Any) -> None:
        with self.cv:
            self.calls.append(call)
            self.cv.notify_all()


def _copy(state: FakeState) -> FakeState:
    return FakeState(*(np.copy(a) for a in state[:-1]), state.prompt)


def _outputs(tokens: np.ndarray) -> SampleOutput:
    """Outputs for sampled tokens [...]: logprob 0, the token itself as each top alternative."""
    top = np.repeat(np.maximum(tokens, 0)[..., None], K, -1).astype(np.int32)
    zeros = np.zeros(tokens.shape, np.float32)
    return jax.device_put(SampleOutput(tokens.astype(np.int32), zeros, top, np.zeros(top.shape, np.float32)))
