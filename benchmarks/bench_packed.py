"""Matmul formulations for decode-sized products: XLA's dots against gpt2jax's packed-weight kernel.

Eight [768, 3072] weight matrices (a fifth of GPT-2 124M's weights) applied to 1, 8 and 16 rows in one
jitted call, each formulation timed interleaved with the others over many rounds (a noisy neighbour
hurts every one alike): the minimum and the median in ms, and the minimum's ratio to XLA fp32.

    python benchmarks/bench_packed.py [--rows 1 8 16] [--rounds 40]
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

from benchmarks.common import machine  # noqa: E402
from gpt2jax import cpu_kernels, packed  # noqa: E402

K, N, MATRICES = 768, 3072, 8


def formulations(ws: list[np.ndarray]) -> dict:
    """name -> (jitted function of (x, weights), weights) for every formulation compared."""
    f32 = [jnp.asarray(w) for w in ws]
    bf16 = [jnp.asarray(w, jnp.bfloat16) for w in ws]
    int8 = [packed.pack(w, "int8") for w in ws]
    plain_int8 = [(p.unpack() / p.scale[: p.n]).astype(jnp.int8) for p in int8]  # [K, N] int8
    scales = [p.scale[: p.n] for p in int8]
    out = {
        "XLA fp32 dot": (lambda x, ws: sum(jnp.dot(x, w) for w in ws), f32),
        "XLA bf16 dot (f32 accumulate)": (
            lambda x, ws: sum(
                jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32) for w in ws
            ),
            bf16,
        ),
        "XLA int8 widened then dot": (
            lambda x, ws: sum(jnp.dot(x, q.astype(jnp.float32)) * s for q, s in ws),
            list(zip(plain_int8, scales, strict=True)),
        ),
    }
    if cpu_kernels.available():
        out["gpt2jax packed bf16 kernel"] = (
            lambda x, ws: sum(packed.matmul(x, w) for w in ws),
            [packed.pack(w, "bfloat16") for w in ws],
        )
        out["gpt2jax packed int8 kernel"] = (lambda x, ws: sum(packed.matmul(x, w) for w in ws), int8)
    return {name: (jax.jit(fn), w) for name, (fn, w) in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((K, N)).astype(np.float32) * 0.02 for _ in range(MATRICES)]
    fs = formulations(ws)
    print(f"{MATRICES} matrices [{K}, {N}] in one jit; {machine()}; load {os.getloadavg()[0]:.2f}")
    print("| rows | formulation | min ms | median ms | vs XLA fp32 (min) |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, K)).astype(np.float32))
        for fn, w in fs.values():
            jax.block_until_ready(fn(x, w))
        times: dict[str, list[float]] = {name: [] for name in fs}
        for _ in range(args.rounds):
            for name, (fn, w) in fs.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(x, w))
                times[name].append(time.perf_counter() - t)
        base = min(times["XLA fp32 dot"])
        for name, ts in times.items():
            print(
                f"| {rows} | {name} | {min(ts) * 1e3:.2f} | {np.median(ts) * 1e3:.2f} | "
                f"{base / min(ts):.2f}x |"
            )


if __name__ == "__main__":
    main()
