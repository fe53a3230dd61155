"""The shapes the engine's programs are compiled for: several, picked by load (fast), or one (batch-invariant).

Fast (the default): decode is compiled for a few cache windows and a few numbers of leading slots per
device, prefill for rows of a few lengths holding one prompt or several back to back, and each call runs
the smallest that covers its work.
But XLA picks its kernels, and with them the order of each sum, by shape: a row's logits differ in their
last bits with the shape of the call that computed them, hence with what runs beside it. One row's logits
after one decode step, 2-core CPU: rand-small gave 3 distinct results over 1-16 rows x windows 64-256 (1
row; 2-8 rows with rows x window <= 512; the rest), 124M shapes 5 over 1-16 rows x windows 128-1024 (1 row
up to window 256; 1 row above; 2 rows at 128; 2-4 rows otherwise; 16 rows), up to 3e-6 apart. A prefill of
one prompt differs from one of several. Within one shape, the slot a row sits in and what the other rows
hold changed nothing. A seeded sample drawn within a rounding error of a boundary then flips, and the rest
of the text with it.

Batch-invariant: decode always runs every slot over the whole context, prefill one prompt per call (the
row is the prompt's own length bucket). A request's arithmetic is then the same whatever else runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpt2jax.sampler import bucket

# A prefill packs several prompts back to back into one row of at most this many tokens (a prompt longer
# than that is prefilled alone). Rows of 128-512 tokens keep the matmuls near the kernel's peak; a longer
# row pays more for attention (every token against the whole row, masked) and for each insert's copy of
# the row, holds up the running streams for longer, and returns its prompts' first tokens later: a burst
# is prefilled row after row (benchmarks/README.md, "Engine defaults": 128 against 256).
PREFILL_TOKENS = 128
# The most prompts a packed row of T tokens takes is T // MIN_PROMPT_SPACE (at least 1): a row projects
# that many last tokens onto the vocabulary whatever it holds (at most ~11% of a row's work at 124M), and a
# wave of several very short prompts still fits the shortest rows.
MIN_PROMPT_SPACE = 4


def counts_up_to(most: int) -> tuple[int, ...]:
    """1, 4, 16, ... below `most`, then `most`."""
    out, rows = [], 1
    while rows < most:
        out.append(rows)
        rows *= 4
    return (*out, most)


def decode_windows(smallest: int, n_ctx: int, batch_invariant: bool = False) -> tuple[int, ...]:
    """The cache windows decode is compiled for: powers of two from `smallest` up to n_ctx (n_ctx alone
    when batch-invariant)."""
    out = [n_ctx]
    while not batch_invariant and out[-1] // 2 >= smallest:
        out.append(out[-1] // 2)
    return tuple(sorted(out))


def decode_row_counts(local_slots: int, batch_invariant: bool = False) -> tuple[int, ...]:
    """The numbers of leading slots per device that decode is compiled for: 1, 4, 16, ..., half of them
    and all of them (half: the last long requests of a batch often run on in the first half)."""
    if batch_invariant:
        return (local_slots,)
    counts = counts_up_to(local_slots)
    return tuple(sorted({*counts, local_slots // 2} - {0}))


def prefill_rows(length: int, slots: int, score: bool, batch_invariant: bool = False) -> int:
    """The most prompts one packed prefill row of `length` tokens takes (1 when scoring the prompt, when
    batch-invariant, or above PREFILL_TOKENS); never more than the slots."""
    if score or batch_invariant or length > PREFILL_TOKENS:
        return 1
    return max(1, min(slots, length // MIN_PROMPT_SPACE))


def pack(
    lengths: Sequence[int], rows: Callable[[int], int], most: int, n_ctx: int
) -> list[tuple[int, list[int]]]:
    """Groups prompts (their lengths, in order) into prefill calls of one packed row each.

    rows(T): the most prompts a row of T tokens takes. most: the longest row that packs several prompts.
    Returns (row length T, the prompts' indices) per call: T is the smallest bucket (gpt2jax.sampler.bucket)
    that holds the prompts' total and takes that many of them. A prompt longer than `most` is alone.
    """

    def length(total: int, count: int) -> int:
        row = bucket(total, n_ctx)
        while rows(row) < count and row < n_ctx:
            row = min(row * 2, n_ctx)  # the buckets end at n_ctx, a power of two or not
        return row

    calls: list[tuple[int, list[int]]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if current:
            row = length(total + n, len(current) + 1)
            # bucket() caps at n_ctx: a total past it does not fit any row (a model whose n_ctx <= most)
            if row > most or rows(row) <= len(current) or total + n > row:
                calls.append((length(total, len(current)), current))
                current, total = [], 0
        current.append(i)
        total += n
    if current:
        calls.append((length(total, len(current)), current))
    return calls
