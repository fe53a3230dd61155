"""What the batch-invariant engine costs, measured side by side with the default one, and what it buys.

The 124M-shaped random model of bench_engine.py (fp32, 50257-token synthetic vocabulary), two engines with
the same slots and chunk size: the default (fast) one and one built with batch_invariant=True. Each
request: 32 random prompt tokens, 64 new tokens, temperature 1 with its own seed, end-of-text ignored.
Rounds interleave the two engines (a noisy neighbour hurts both alike); in each round each engine runs
--sequential requests one after another (what one user alone gets) and --requests at once. It also
reports how many of the concurrent requests' texts differ from the same requests run alone.

    python benchmarks/bench_batch_invariance.py            # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_engine import (  # noqa: E402
    LoadResult,
    add_load_args,
    drive,
    make_requests,
    synthetic_tokenizer,
)
from benchmarks.common import gpt2_124m, machine, random_params  # noqa: E402
from gpt2jax.engine.api import GenerationRequest  # noqa: E402
from gpt2jax.engine.engine import BatchEngine  # noqa: E402


def run(engine: BatchEngine, requests: list[GenerationRequest], concurrency: int) -> tuple[LoadResult, list]:
    """Drives the requests; returns the load result and each request's generated token ids."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    index = {id(r): i for i, r in enumerate(requests)}

    async def stream(r: GenerationRequest):
        async for ev in engine.generate(r):
            tokens[index[id(r)]].extend(t.token for t in ev.tokens)
            yield ev

    result = asyncio.run(drive(stream, requests, concurrency))
    return result, [tokens[i] for i in range(len(requests))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_args(ap)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    config = gpt2_124m()
    params = random_params(config)
    tokenizer = synthetic_tokenizer(config.n_vocab)
    greedy = make_requests(args.requests, args.prompt_tokens, args.new_tokens, config.n_vocab)
    requests = [dataclasses.replace(r, temperature=1.0, seed=1000 + i) for i, r in enumerate(greedy)]
    options = {k: v for k, v in dict(slots=args.slots, chunk_size=args.chunk).items() if v}
    engines = {}
    for invariant in (False, True):
        t = time.perf_counter()
        e = BatchEngine(config, params, tokenizer, name="bench", batch_invariant=invariant, **options)
        e.warmup(buckets=[args.prompt_tokens], score_prompt=False)
        e.start()
        run(e, requests[:1], 1)
        engines["batch-invariant" if invariant else "default"] = e
        print(f"{'batch-invariant' if invariant else 'default'}: warm-up {time.perf_counter() - t:.1f} s")

    results: dict[str, dict[str, list[LoadResult]]] = {n: {"alone": [], "together": []} for n in engines}
    differ: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, e in engines.items():
            alone, alone_tokens = run(e, requests[: args.sequential], 1)
            together, together_tokens = run(e, requests, args.requests)
            results[name]["alone"].append(alone)
            results[name]["together"].append(together)
            differ[name] = max(
                differ.get(name, 0),
                sum(a != b for a, b in zip(alone_tokens, together_tokens[: args.sequential], strict=True)),
            )
    for e in engines.values():
        e.stop()

    e = engines["default"]
    print(
        f"\nBatch invariance, GPT-2 124M shapes, fp32 random weights, {args.prompt_tokens}-token prompts + "
    )
    print(f"{args.new_tokens} new tokens, temperature 1, seeded; slots {e.slots}, chunk {e.chunk_size}; ")
    print(f"{args.rounds} interleaved rounds (each shown); {machine()}\n")
    print(
        f"| engine | one after another tok/s | TTFT ms | {args.requests} at once tok/s | TTFT p50 ms "
        f"| texts differing (of {args.sequential}) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cell = lambda rs, f: " / ".join(f(x) for x in rs)
        print(
            f"| {name} | {cell(r['alone'], lambda x: f'{x.tok_per_s:.1f}')} "
            f"| {cell(r['alone'], lambda x: f'{x.ttft_ms(50):.0f}')} "
            f"| {cell(r['together'], lambda x: f'{x.tok_per_s:.1f}')} "
            f"| {cell(r['together'], lambda x: f'{x.ttft_ms(50):.0f}')} | {differ[name]} |"
        )
    base, inv = results["default"], results["batch-invariant"]
    for kind in ("alone", "together"):
        ratio = statistics.median(
            i.tok_per_s / b.tok_per_s for i, b in zip(inv[kind], base[kind], strict=True)
        )
        print(f"batch-invariant / default, {kind}: {ratio:.2f}x tok/s")


if __name__ == "__main__":
    main()
