"""A decode step of the serving engine with an fp32 against a bf16 KV cache, side by side.

A 124M-shaped model with random fp32 weights (activations fp32 in both), the engine's slot programs
(gpt2jax/engine/device.py) with 16 slots x 1,024 positions. For each decode shape (cache window x leading
rows) and cache dtype: XLA's memory analysis of the compiled program (temporary bytes: a full up-cast copy
of the cache would show here as ~1.2 GB for the full window) and the time of a decode chunk with every row
live, repeats interleaved between the dtypes, median per step.

    python benchmarks/bench_kv_cache.py                     # windows 1024 and 128 at 16 and 1 rows

With the CPU attention kernel decode is compiled for the whole cache only (gpt2jax/engine/device.py): the
shapes of other windows are skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import gpt2_124m, machine, random_params  # noqa: E402
from gpt2jax.engine.device import SlotPrograms  # noqa: E402


def live_state(programs: SlotPrograms, position: int):
    """A fresh slot state with every slot live at `position`, never ending within the benchmark."""
    state = programs.init_state()
    S = programs.slots
    return state._replace(
        done=jnp.zeros((S,), bool),
        max_tokens=jnp.full((S,), 1 << 30, jnp.int32),
        position=jnp.full((S,), position, jnp.int32),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x16,1024x1,128x16,128x1", help="window x rows, comma list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args(argv)
    config = gpt2_124m()
    params = jax.device_put(random_params(config))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    programs = {
        name: SlotPrograms(config, params, jnp.float32, args.slots, 8, kv_dtype=kv)
        for name, kv in dtypes.items()
    }
    print(f"decode chunks of 8 steps, {args.slots} slots, 124M shapes, fp32 weights; {machine()}", flush=True)
    rows_out = []
    compiled_windows = next(iter(programs.values())).windows
    for window, rows in shapes:
        if window not in compiled_windows:
            print(
                f"window {window}: not compiled here (decode windows {compiled_windows}), skipped", flush=True
            )
            continue
        times: dict[str, list[float]] = {name: [] for name in dtypes}
        temp = {}
        active = np.ones(args.slots, bool)
        states = {}
        for name, p in programs.items():
            state = live_state(p, min(window, config.n_ctx) // 2)
            (lowered,) = p.lowered([("decode", window, rows)])
            compiled = lowered.compile()
            temp[name] = compiled.memory_analysis().temp_size_in_bytes
            state, out = p.decode(state, active, window, rows)  # the first call: not timed
            jax.block_until_ready(out)
            states[name] = state
        for _ in range(args.repeats):
            for name, p in programs.items():
                start = time.perf_counter()
                states[name], out = p.decode(states[name], active, window, rows)
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - start) / p.chunk_size)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows_out.append((window, rows, med, temp))
        print(window, rows, med, temp, flush=True)
    print(f"\nload average {os.getloadavg()}\n")
    print(
        "| window x rows | fp32 cache ms/step | bf16 cache ms/step | bf16 / fp32 | XLA temp fp32 | XLA temp bf16 |"
    )
    print("|---|---|---|---|---|---|")
    for window, rows, med, temp in rows_out:
        f, b = med["float32"], med["bfloat16"]
        print(
            f"| {window} x {rows} | {f:.1f} | {b:.1f} | {b / f:.2f} | {temp['float32'] / 2**20:.0f} MiB "
            f"| {temp['bfloat16'] / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
