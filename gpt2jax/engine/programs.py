"""The device side of the batching engine, as the worker sees it: the `DevicePrograms` interface.

The worker thread (gpt2jax/engine/worker.py) drives the device through these calls only; the engine
(gpt2jax/engine/engine.py) also compiles them ahead of time (warm-up). Three implement it: SlotPrograms
(gpt2jax/engine/device.py: the jitted programs on one mesh), LeaderPrograms (gpt2jax/engine/multihost.py:
process 0 of several, broadcasting each call first) and tests/fake_device.py's FakePrograms (numpy, no
weights: the scheduler's tests).

Shapes: S slots in all, split over D data shards of L = S / D local slots each; V the vocabulary size; K
sampling.NUM_TOP_LOGPROBS; T the chunk size (decode steps per call). The decode state is opaque to the
worker: it gets one from `init_state`, hands it to insert / decode (which donate it) and keeps what they
return.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from gpt2jax.config import GPT2Config
    from gpt2jax.engine.slots import Prefilled, SlotRow
    from gpt2jax.sampling import SampleOutput


class DevicePrograms(Protocol):
    """Prefill, insert into a decode slot, decode a chunk for all slots, and a fresh state."""

    config: GPT2Config  # the model's shape; config.n_vocab sizes the slot rows
    slots: int  # S, decode slots in all
    local_slots: int  # L, slots per data shard
    chunk_size: int  # T, decode steps per decode call
    windows: tuple[int, ...]  # the KV-cache windows decode runs over, ascending; the last is n_ctx
    prefill_tokens: int  # the longest prefill row that packs several prompts

    def init_state(self) -> Any:
        """A fresh decode state: every slot empty (done). SlotPrograms: a decode.DecodeState, each field
        with a leading [S] slot dim (the KV cache [S, n_head, n_ctx, head_dim] per layer)."""
        ...

    def prefill_rows(self, length: int, score: bool = False) -> int:
        """The most prompts that one `prefill` row of `length` tokens takes (1 when scoring)."""
        ...

    def prefill(self, prompts: Sequence[Sequence[int]], length: int, score: bool) -> list[Prefilled]:
        """Prefills up to `prefill_rows(length, score)` prompts of `length` tokens in all in one call,
        packed back to back in one row (a length of `prefill_tokens` at most when there are several).

        One Prefilled per prompt, in order: cache (the row's, per layer (k, v) [1, n_head, length,
        head_dim]; the prompt's entries from `offset`), logits [V] f32 at the last prompt token, scores
        (PromptScores: logprob [1, length] f32, top_tokens and top_logprobs [1, length, K]) when
        `score`, else None."""
        ...

    def insert(self, state: Any, pre: Prefilled, slot: int, row: SlotRow) -> tuple[Any, SampleOutput]:
        """Puts a prefilled prompt into `slot` with one choice's settings (`row`: device.make_row's),
        donating `state`. Returns the new state and the slot's first token: a SampleOutput of token [1]
        i32, logprob [1] f32, top_tokens [1, K] i32, top_logprobs [1, K] f32."""
        ...

    def window_for(self, end: int) -> int:
        """The smallest window (of `windows`) holding cache positions < end; the largest if none does."""
        ...

    def fill_order(self) -> list[int]:
        """All S slots in the order to fill them (so that busy slots lead each data shard's rows)."""
        ...

    def rows_for(self, slots: Sequence[int]) -> int:
        """The fewest leading slots per data shard that a decode must run to cover these slots."""
        ...

    def decoded_slots(self, rows: int) -> list[int]:
        """The slot of each output column of a decode of `rows` leading slots per shard (rows x D)."""
        ...

    def decode(
        self,
        state: Any,
        active: np.ndarray,
        window: int | None = None,
        rows: int | None = None,
        steps: int | None = None,
    ) -> tuple[Any, SampleOutput]:
        """Up to `steps` (default and at most T) steps for the first `rows` slots of each shard (default
        L), donating `state`; fewer once every row is done.

        active: [S] bool; rows where it is False are ended first. window: of `windows` (default the
        largest), above every position a live row reaches in the chunk. Returns the new state and the
        per-step outputs: token [T, rows x D] i32 (columns as `decoded_slots`; -1 where the row is done),
        logprob [T, rows x D] f32, top_tokens and top_logprobs [T, rows x D, K]; token -1 for the steps not
        run."""
        ...

    def program_names(self, buckets: Sequence[int], score: Sequence[bool] = (False,)) -> list[tuple]:
        """What `compile` compiles for these prefill row lengths: ("init",), ("first",), per length
        ("prefill", length, score, prompts) and ("insert", length), then ("decode", window, rows)."""
        ...

    def compile(
        self, buckets: Sequence[int], score: Sequence[bool] = (False,), *, only: Sequence[tuple] | None = None,
        threads: int | None = None, stop: threading.Event | None = None,
    ) -> None:  # fmt: skip
        """Compiles the programs (`program_names`, or just `only`, in order) and runs nothing; a set
        `stop` ends the work before the next program (with threads=1)."""
        ...
