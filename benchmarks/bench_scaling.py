"""Decode speed on an accelerator (or a mesh of them): gpt2jax against transformers' PyTorch, same device.

GPT-2-shaped models with random weights (124M and 1558M by default; no download), greedy decoding of a
32-token prompt plus `--new-tokens` new ones, best of `--repeats` after a warm-up. gpt2jax runs its
Sampler on the mesh given by --mesh (gpt2jax.sharding; empty: one device); HF `generate` runs on CUDA when
PyTorch sees a GPU, else on the CPU, in the same dtype. A model whose weights do not fit one device is
skipped on the PyTorch side (it has no tensor parallelism here) and split by gpt2jax with --mesh model:N.

    python benchmarks/bench_scaling.py                                 # 124M and 1558M, batch 1 and 8
    python benchmarks/bench_scaling.py --sizes 1558M --mesh model:4 --dtype bfloat16

Weights are made on the host and placed device by device, so no device ever holds more than its part.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_decode import PROMPT_LEN, hf_run, prompts  # noqa: E402
from benchmarks.common import hf_model, machine, random_params, timed  # noqa: E402
from gpt2jax import sampling  # noqa: E402
from gpt2jax.config import preset  # noqa: E402
from gpt2jax.lm import DTYPES  # noqa: E402
from gpt2jax.sampler import Sampler  # noqa: E402
from gpt2jax.sharding import Layout, make_mesh, mesh_summary, param_bytes_per_device  # noqa: E402


def gpt2jax_run(config, params, layout: Layout, dtype, batch: int, new_tokens: int):
    sampler = Sampler(config, dtype=dtype, layout=layout)
    toks = prompts(batch, config.n_vocab).tolist()
    sp = sampling.make_params(batch, config.n_vocab, temperature=0.0)
    return lambda: sampler.generate(params, toks, new_tokens, sp)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["124M", "1558M"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mesh", default="", help='e.g. "model:4" (default: one device)')
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-hf", action="store_true", help="gpt2jax only")
    args = ap.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = make_mesh(args.mesh) if args.mesh else make_mesh("data:1", jax.devices()[:1])
    layout, dtype = Layout(mesh), DTYPES[args.dtype]
    rows = []
    for size in args.sizes:
        config = preset(size)
        layout.check(config)
        with jax.default_device(jax.devices("cpu")[0]):  # host weights: no device holds them whole
            host = random_params(config)
        params = layout.shard_params(host, config, dtype)
        runs = {}
        if not args.no_hf:
            try:
                model = hf_model(config, host).to(device=device, dtype=getattr(torch, args.dtype))
                runs["HF transformers generate (PyTorch)"] = lambda b, m=model, c=config: hf_run(
                    m, c, b, args.new_tokens, device
                )
            except RuntimeError as e:  # out of memory on the device
                print(f"{size}: PyTorch skipped ({str(e).splitlines()[0]})")
        runs[f"gpt2jax Sampler on {mesh_summary(mesh)}"] = lambda b, p=params, c=config: gpt2jax_run(
            c, p, layout, dtype, b, args.new_tokens
        )
        held = param_bytes_per_device(config, layout.model, np.dtype(dtype).itemsize) / 1e9
        for batch in args.batch:
            fns = {name: make(batch) for name, make in runs.items()}
            for fn in fns.values():
                fn()  # warm-up: compiles
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    time.sleep(0.5)
                    best[name] = min(best[name], timed(fn, repeats=1))
            base = batch * args.new_tokens / next(iter(best.values()))
            for name, t in best.items():
                tps = batch * args.new_tokens / t
                rows.append((size, name, batch, tps, tps / base, held))
        del params, host

    print(
        f"\nGreedy decode, random weights, {PROMPT_LEN}-token prompt + {args.new_tokens} new tokens, {args.dtype}"
    )
    print(f"{machine()}; PyTorch {torch.__version__} on {device}\n")
    print("| model | impl | batch | tok/s | ratio vs first | weights per device (GB) |")
    print("|---|---|---|---|---|---|")
    for size, name, batch, tps, ratio, held in rows:
        print(f"| {size} | {name} | {batch} | {tps:.1f} | {ratio:.2f}x | {held:.2f} |")


if __name__ == "__main__":
    main()
