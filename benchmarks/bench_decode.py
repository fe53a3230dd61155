"""Decode speed: gpt2jax's Sampler against transformers' PyTorch `generate`, side by side in one run.

A 124M-shaped model with random GPT-2-initialised weights (no download), greedy decoding of a 32-token
prompt plus 128 new tokens (HF with `min_new_tokens=128`, so neither side stops early), each measured
after a warm-up as the best of 3 timed runs. The tokens/s counts only the new tokens and includes the
prompt's prefill, as a user sees it. gpt2jax also runs with its packed bf16 weights and weight-only int8
(gpt2jax.packed: what `gpt2jax.load(..., dtype="bfloat16")` / `quantization="int8"` give on the CPU).

    python benchmarks/bench_decode.py [--batch 1 8] [--new-tokens 128] [--repeats 3]

Read the numbers with the load average printed beside them. PyTorch's OpenMP threads wait for each other
at every parallel region, so another busy process on a 2-core machine slows HF's `generate` a lot
(batch 1 fell from ~38 to ~9 tok/s during one run here) while XLA's work-stealing pool degrades
gracefully: a ratio measured under load flatters gpt2jax. Prefer a quiet machine and more repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import gpt2_124m, hf_model, machine, random_params, timed  # noqa: E402
from gpt2jax import packed, sampling  # noqa: E402
from gpt2jax.sampler import Sampler  # noqa: E402

PROMPT_LEN = 32
PAUSE_S = 1.0


def prompts(batch: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, size=(batch, PROMPT_LEN), dtype=np.int32)


def gpt2jax_run(config, params, dtype, batch: int, new_tokens: int):
    """A no-argument function that generates `new_tokens` tokens for `batch` prompts with gpt2jax."""
    sampler = Sampler(config, dtype=dtype)
    toks = prompts(batch, config.n_vocab).tolist()
    sp = sampling.make_params(batch, config.n_vocab, temperature=0.0)

    def run():
        result = sampler.generate(params, toks, new_tokens, sp)
        assert all(len(t) == new_tokens for t in result.tokens), [len(t) for t in result.tokens]
        return result

    return run


def hf_run(model, config, batch: int, new_tokens: int, device: str = "cpu"):
    """A no-argument function that generates with transformers' `generate` on `device` (cpu or cuda)."""
    import torch

    toks = torch.from_numpy(prompts(batch, config.n_vocab).astype(np.int64)).to(device)
    mask = torch.ones_like(toks)

    def run():
        with torch.inference_mode():
            out = model.generate(
                toks,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                use_cache=True,
                pad_token_id=config.eos_token_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (batch, PROMPT_LEN + new_tokens), out.shape
        return out

    return run


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    load_start = _load()
    config = gpt2_124m()
    params = random_params(config)
    params_dev = jax.device_put(params)
    params_f32 = packed.pack_params(params, "float32")
    params_bf16 = packed.pack_params(params, "bfloat16")
    params_int8 = packed.pack_params(params, "int8")
    model = hf_model(config, params)

    rows = []
    for batch in args.batch:
        runs = {
            "HF transformers generate (PyTorch, KV cache)": hf_run(model, config, batch, args.new_tokens),
            "gpt2jax Sampler, fp32": gpt2jax_run(config, params_dev, jnp.float32, batch, args.new_tokens),
            "gpt2jax Sampler, fp32 weights (packed)": gpt2jax_run(
                config, params_f32, jnp.float32, batch, args.new_tokens
            ),
            "gpt2jax Sampler, bf16 weights (packed)": gpt2jax_run(
                config, params_bf16, jnp.float32, batch, args.new_tokens
            ),
            "gpt2jax Sampler, int8 weights (packed)": gpt2jax_run(
                config, params_int8, jnp.float32, batch, args.new_tokens
            ),
        }
        for fn in runs.values():
            fn()  # warm-up: compiles and fills caches
        # Interleave the repeats so that a noisy neighbour hurts every implementation alike, and pause
        # before each run: PyTorch's OpenMP threads and XLA's thread pool spin for a while after their
        # work, and timing one while the other's threads still spin slowed it down up to 10x here.
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, fn in runs.items():
                time.sleep(PAUSE_S)
                best[name] = min(best[name], timed(fn, repeats=1))
        base = batch * args.new_tokens / best[next(iter(runs))]
        ours = batch * args.new_tokens / best["gpt2jax Sampler, fp32"]
        for name, t in best.items():
            tps = batch * args.new_tokens / t
            rows.append((name, batch, tps, tps / base, tps / ours))

    print(f"\nDecode, GPT-2 124M shapes, random weights, {PROMPT_LEN}-token prompt + {args.new_tokens} new")
    print(f"tokens, greedy; torch threads {args.threads}; {machine()}")
    print(
        f"load average at start {load_start}, at end {_load()} (the machine is shared: see the docstring)\n"
    )
    print("| impl | batch | tok/s | ratio vs HF | ratio vs gpt2jax fp32 |")
    print("|---|---|---|---|---|")
    for name, batch, tps, ratio, own in rows:
        print(f"| {name} | {batch} | {tps:.1f} | {ratio:.2f}x | {own:.2f}x |")


if __name__ == "__main__":
    main()
