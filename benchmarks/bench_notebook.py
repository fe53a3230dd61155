"""The notebook API's continuous batching: `model.generate` of many prompts at once against the same prompts
one at a time, side by side in one run, on a random 124M-shaped GPT-2.

48 prompts of mixed lengths (8..120 tokens), max_tokens alternating 4 and 64, greedy, end-of-text ignored
(so every run generates the same number of tokens). Both ways run through the same engine; the texts must be
identical. Repeats are interleaved (batch, one at a time, batch, ...); the ratio is of the medians.
Results: benchmarks/README.md and the README's "Notebook API".

    python benchmarks/bench_notebook.py [--prompts 48] [--repeats 2] [--batch-invariant] [--weights int8] [--unpacked]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from bench_engine import synthetic_tokenizer  # noqa: E402
from common import gpt2_124m, machine, random_params  # noqa: E402

from gpt2jax import cpu_kernels, packed  # noqa: E402
from gpt2jax.lm import LanguageModel  # noqa: E402


def prompts_and_limits(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts of 8..120 single-byte tokens (the synthetic vocabulary has no merges), and max_tokens 4 / 64."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    prompts = ["".join(rng.choice(list(letters), int(rng.integers(8, 121)))) for _ in range(count)]
    return prompts, [4 if i % 2 == 0 else 64 for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-invariant", action="store_true", help="the engine's BATCH_INVARIANT mode")
    ap.add_argument("--weights", choices=packed.MODES, default="float32")
    ap.add_argument("--unpacked", action="store_true", help="fp32 weights as plain arrays: XLA's dot")
    args = ap.parse_args(argv)

    config = gpt2_124m()
    params = random_params(config)
    if args.weights != "float32" or (cpu_kernels.enabled() and not args.unpacked):  # as gpt2jax.load packs
        params = packed.pack_params(params, args.weights)
    model = LanguageModel(config, params, synthetic_tokenizer(config.n_vocab))
    model.start_engine(batch_invariant=args.batch_invariant)
    prompts, limits = prompts_and_limits(args.prompts)
    settings = dict(temperature=0.0, ignore_eos=True)

    def batched() -> list[str]:
        return model.generate(prompts, limits, **settings)

    def one_at_a_time() -> list[str]:
        return [model.generate(p, m, **settings)[0] for p, m in zip(prompts, limits, strict=True)]

    t = time.perf_counter()
    reference = batched()  # compiles what the batch needs
    alone = one_at_a_time()  # and what single prompts need
    print(f"warm-up (compiling) {time.perf_counter() - t:.0f} s")
    times: dict[str, list[float]] = {"batched": [], "one at a time": []}
    outputs = {"batched": [reference], "one at a time": [alone]}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("one at a time", one_at_a_time)):
            t = time.perf_counter()
            outputs[name].append(fn())
            times[name].append(time.perf_counter() - t)
    identical = all(out == reference for outs in outputs.values() for out in outs)
    tokens = sum(limits)
    print(f"machine: {machine()}")
    print(f"{args.prompts} prompts, max_tokens 4/64 ({tokens} tokens), slots {model.engine.slots}, "
          f"batch_invariant={args.batch_invariant}, weights {args.weights}"
          f"{' unpacked' if args.unpacked else ' packed'}")  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med:.1f} s | {tokens / med:.0f} tok/s | runs {', '.join(f'{x:.1f}' for x in ts)} |"
        )
    ratio = statistics.median(times["one at a time"]) / statistics.median(times["batched"])
    print(f"batched is {ratio:.1f}x faster than one at a time; texts identical: {identical}")
    model.engine.stop()


if __name__ == "__main__":
    main()
