"""The shapes the engine's programs are compiled for: several, picked by load (fast), or one (batch-invariant).

Fast (the default): decode is compiled for a few cache windows and a few numbers of leading slots per
device, prefill for 1, 4, 16, ... prompts at once, and each call runs the smallest that covers its work.
But XLA picks its kernels, and with them the order of each sum, by shape: a row's logits differ in their
last bits with the shape of the call that computed them, hence with what runs beside it. One row's logits
after one decode step, 2-core CPU: rand-small gave 3 distinct results over 1-16 rows x windows 64-256 (1
row; 2-8 rows with rows x window <= 512; the rest), 124M shapes 5 over 1-16 rows x windows 128-1024 (1 row
up to window 256; 1 row above; 2 rows at 128; 2-4 rows otherwise; 16 rows), up to 3e-6 apart. A prefill of
one prompt differs from one of several. Within one shape, the slot a row sits in and what the other rows
hold changed nothing. A seeded sample drawn within a rounding error of a boundary then flips, and the rest
of the text with it.

Batch-invariant: decode always runs every slot over the whole context, prefill one prompt per call (the
length bucket is the prompt's own). A request's arithmetic is then the same whatever else runs.
"""

from __future__ import annotations

# A batched prefill covers at most this many prompt positions (rows x bucket). A prefill of one short
# prompt is a skinny matmul far below the machine's peak (benchmarks/README.md, "Engine defaults"); longer
# prompts fill the matmuls by themselves, and a bigger batch would hold up the running streams for longer.
PREFILL_TOKENS = 512


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
    """The numbers of leading slots per device that decode is compiled for."""
    return (local_slots,) if batch_invariant else counts_up_to(local_slots)


def prefill_row_counts(
    bucket: int, slots: int, score: bool, batch_invariant: bool = False
) -> tuple[int, ...]:
    """The numbers of prompts of one length bucket that prefill is compiled for; the last is the most one
    call takes (see PREFILL_TOKENS; 1 when scoring the prompt, or when batch-invariant)."""
    if score or batch_invariant:
        return (1,)
    return counts_up_to(max(1, min(slots, PREFILL_TOKENS // bucket)))
