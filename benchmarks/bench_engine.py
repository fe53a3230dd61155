"""The batching engine under load: 16 concurrent requests vs the same requests one after another, and HF.

A 124M-shaped model with random GPT-2-initialised fp32 weights on the CPU (no download) and a synthetic
50257-token byte-level vocabulary. Each request: 32 random prompt tokens, 64 new tokens, greedy, end-of-text
ignored (so every request makes exactly its 64 tokens). Compared, side by side in one run:
- the engine with 16 concurrent requests (default slots and chunk size, or --slots / --chunk);
- the same requests one after another through the same engine (what one user alone gets; only the first
  --sequential of them are run and the rate is per token, so it is extrapolated);
- HF transformers' PyTorch `generate` on the same weights at batch 8 (two batches for 16 requests).
Time to first token (TTFT) is from a request's submission to its first event with text.

    python benchmarks/bench_engine.py              # the comparison, a few minutes
    python benchmarks/bench_engine.py --sweep      # tok/s and TTFT for slots x chunk (--settings 16x8 ...)

To reuse (e.g. over HTTP): `drive(stream, requests, concurrency)` times any async
`stream(request) -> AsyncIterator[Event]` and returns a `LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import gpt2_124m, hf_model, machine, random_params  # noqa: E402
from gpt2jax.engine.api import Event, GenerationRequest  # noqa: E402
from gpt2jax.engine.engine import BatchEngine  # noqa: E402
from gpt2jax.tokenizer import GPT2Tokenizer, bytes_to_unicode  # noqa: E402

Stream = Callable[[GenerationRequest], AsyncIterator[Event]]


@dataclasses.dataclass
class LoadResult:
    tokens: int  # completion tokens received
    seconds: float  # wall time of the whole run
    ttft: list[float]  # per request, seconds

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds

    def ttft_ms(self, q: float) -> float:
        return float(np.percentile(self.ttft, q)) * 1000 if self.ttft else float("nan")


async def drive(stream: Stream, requests: list[GenerationRequest], concurrency: int) -> LoadResult:
    """Runs `requests` with at most `concurrency` in flight (a new one starts as soon as one ends)."""
    gate = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tokens = 0

    async def one(r: GenerationRequest) -> None:
        nonlocal tokens
        async with gate:
            t0, first = time.perf_counter(), True
            async for ev in stream(r):
                if first and (ev.text or ev.tokens):
                    ttft.append(time.perf_counter() - t0)
                    first = False
                tokens += ev.completion_tokens

    t = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return LoadResult(tokens, time.perf_counter() - t, ttft)


def make_requests(n: int, prompt_tokens: int, new_tokens: int, n_vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        GenerationRequest.of(
            prompt=tuple(int(t) for t in rng.integers(0, n_vocab - 1, prompt_tokens)),
            max_tokens=new_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        for _ in range(n)
    ]


def synthetic_tokenizer(n_vocab: int) -> GPT2Tokenizer:
    """A byte-level vocabulary of n_vocab ids (256 bytes, then made-up words, then <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for i in range(len(vocab), n_vocab - 1):
        vocab[f"w{i}"] = i
    vocab["<|endoftext|>"] = n_vocab - 1
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return GPT2Tokenizer(tok)


def engine_load(engine: BatchEngine, requests: list, concurrency: int) -> LoadResult:
    """Compiles the engine's programs for these prompts, warms them with one request, then runs the load."""
    engine.warmup(buckets=sorted({len(r.prompt) for r in requests}), score_prompt=False)
    engine.start()
    asyncio.run(drive(engine.generate, requests[:1], 1))
    return asyncio.run(drive(engine.generate, requests, concurrency))


def hf_load(model, requests: list, batch: int) -> LoadResult:
    import torch

    def run(rs: list) -> int:
        toks = torch.tensor([r.prompt for r in rs])
        with torch.inference_mode():
            out = model.generate(
                toks,
                attention_mask=torch.ones_like(toks),
                do_sample=False,
                max_new_tokens=rs[0].params.max_tokens,
                min_new_tokens=rs[0].params.max_tokens,
                pad_token_id=0,
            )
        return (out.shape[1] - toks.shape[1]) * len(rs)

    run(requests[:batch])  # warm-up
    t, tokens = time.perf_counter(), 0
    for i in range(0, len(requests), batch):
        tokens += run(requests[i : i + batch])
    return LoadResult(tokens, time.perf_counter() - t, [])


def compare(args, config, params, tokenizer) -> None:
    import torch

    torch.set_num_threads(args.threads)
    requests = make_requests(args.requests, args.prompt_tokens, args.new_tokens, config.n_vocab)
    options = {k: v for k, v in dict(slots=args.slots, chunk_size=args.chunk).items() if v}
    batched = BatchEngine(config, params, tokenizer, name="batched", **options)
    rows = {f"engine, {args.requests} concurrent": engine_load(batched, requests, args.requests)}
    rows["engine, one after another"] = engine_load(batched, requests[: args.sequential], 1)
    batched.stop()
    rows[f"HF transformers generate, batch {args.hf_batch}"] = hf_load(
        hf_model(config, params), requests, args.hf_batch
    )

    base = rows["engine, one after another"].tok_per_s
    hf = rows[f"HF transformers generate, batch {args.hf_batch}"].tok_per_s
    print(f"\nEngine load, GPT-2 124M shapes, fp32 random weights, {args.prompt_tokens}-token prompts + ")
    print(f"{args.new_tokens} new tokens, greedy; engine slots {batched.slots}, chunk {batched.chunk_size}; ")
    print(f"torch threads {args.threads}; {machine()}\n")
    print("| run | tok/s | vs one after another | vs HF | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r.tok_per_s:.1f} | {r.tok_per_s / base:.2f}x | {r.tok_per_s / hf:.2f}x "
            f"| {r.ttft_ms(50):.0f} | {r.ttft_ms(99):.0f} |"
        )


def sweep(args, config, params, tokenizer) -> None:
    """Each setting: 2 x slots requests, `slots` at a time, so that half arrive while others decode.

    All engines are built and warmed first, then the rounds interleave the settings (a noisy neighbour
    then hurts them alike); the best round of each is shown.
    """
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings]
    engines = {}
    for slots, chunk in settings:
        engines[slots, chunk] = e = BatchEngine(
            config, params, tokenizer, name="sweep", slots=slots, chunk_size=chunk
        )
        engine_load(e, make_requests(1, args.prompt_tokens, args.new_tokens, config.n_vocab), 1)
    best: dict[tuple[int, int], LoadResult] = {}
    for _ in range(args.rounds):
        for (slots, chunk), e in engines.items():
            requests = make_requests(
                2 * slots, args.prompt_tokens, args.new_tokens, config.n_vocab, seed=slots
            )
            r = engine_load(e, requests, slots)
            if (slots, chunk) not in best or r.tok_per_s > best[slots, chunk].tok_per_s:
                best[slots, chunk] = r
    print(
        f"\nSweep, GPT-2 124M shapes, fp32, {args.prompt_tokens}+{args.new_tokens} tokens, best of {args.rounds}"
    )
    print(f"interleaved rounds; {machine()}\n")
    print("| slots | chunk | tok/s | TTFT p50 ms | TTFT p99 ms | mean step ms |")
    print("|---|---|---|---|---|---|")
    for (slots, chunk), r in best.items():
        h = engines[slots, chunk].metrics.step_time
        step = h.sum / max(h.count, 1) / chunk * 1000
        print(
            f"| {slots} | {chunk} | {r.tok_per_s:.1f} | {r.ttft_ms(50):.0f} | {r.ttft_ms(99):.0f} | {step:.1f} |"
        )
    for e in engines.values():
        e.stop()


def add_load_args(ap: argparse.ArgumentParser) -> None:
    """The load's options, shared with bench_batch_invariance."""
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=4, help="requests timed one after another")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=None, help="default: the engine's default")
    ap.add_argument("--chunk", type=int, default=None, help="default: the engine's default")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_args(ap)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--sweep", action="store_true", help="measure slots x chunk settings instead")
    ap.add_argument("--settings", nargs="+", default=["16x1", "16x2", "16x4", "16x8", "8x4", "32x4"])
    ap.add_argument("--rounds", type=int, default=2, help="sweep rounds")
    args = ap.parse_args(argv)

    config = gpt2_124m()
    params = random_params(config)
    tokenizer = synthetic_tokenizer(config.n_vocab)
    (sweep if args.sweep else compare)(args, config, params, tokenizer)


if __name__ == "__main__":
    main()
