"""Runs one model on several meshes and reports what must agree with one device (run in a subprocess).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_check.py CHECKPOINT data:8 model:8 ...

Prints one JSON line: for one device and for each mesh, the library path (forward logits of a padded batch,
the Sampler's greedy and seeded tokens and logprobs with 8 rows and with 3 rows) and the serving engine's
results on test_engine's mixed workload, plus the bytes of weights each device holds. Logits are compared
here (they are large); everything else goes back to the test. The device count is fixed when JAX starts,
hence a separate process.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import mixed_requests, run_batched, summary  # noqa: E402

import gpt2jax  # noqa: E402
from gpt2jax.engine.engine import BatchEngine  # noqa: E402
from gpt2jax.model import forward, init_cache  # noqa: E402
from gpt2jax.sampling import make_params  # noqa: E402
from gpt2jax.sharding import make_mesh  # noqa: E402

PROMPTS = [
    "The",
    "import os",
    "A class may define a method",
    "x = 1",
    "For example, the",
    "If",
    "def f(",
    "Each",
]


def library(lm: gpt2jax.LanguageModel) -> tuple[np.ndarray, dict]:
    """Forward logits of 8 padded prompts, and Sampler outputs for 8 rows and 3 rows."""
    cfg, layout = lm.config, lm.layout
    ids = [lm.tokenizer.encode(p) for p in PROMPTS]
    tokens = np.zeros((8, 16), np.int32)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = p
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16))

    def logits_of(params, tokens, positions):
        cache = jax.lax.with_sharding_constraint(
            init_cache(cfg, 8, 16, qkv_groups=layout.qkv_groups), layout.cache_sharding()
        )
        return forward(params, cfg, tokens, positions, cache, qkv_groups=layout.qkv_groups)[0]

    logits = np.asarray(jax.jit(logits_of)(lm.params, *jax.device_put((tokens, positions), layout.rows)))
    out = {}
    for rows in (8, 3):
        for name, kw in (("greedy", dict(temperature=0.0)), ("seeded", dict(temperature=0.9, seed=7))):
            sp = make_params(rows, cfg.n_vocab, **kw)
            r = lm.sampler.generate(lm.params, ids[:rows], 12, sp, logprobs=True)
            out[f"{name}{rows}"] = {"tokens": r.tokens, "logprobs": r.logprobs}
    return logits, out


def engine_results(lm: gpt2jax.LanguageModel) -> tuple[list, dict]:
    """The mixed workload's results, and the collectives in the compiled decode step."""
    # No queue timeout: requests wait for a slot while the programs compile, however slow the machine.
    engine = BatchEngine.from_model(lm, slots=8, chunk_size=4, min_window=128, queue_timeout=math.inf)
    engine.start()
    try:
        results = summary(asyncio.run(run_batched(engine, mixed_requests(lm.tokenizer)[:10])))
    finally:
        engine.stop()
    p = engine.programs
    (program,) = p.lowered([("decode", p.windows[-1], p.local_slots)])
    hlo = program.compile().as_text()
    ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
    return results, {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in ops}


def weights_per_device(lm: gpt2jax.LanguageModel) -> dict:
    held = lm.layout.bytes_per_device(lm.params)
    total = sum(np.asarray(a).nbytes for a in jax.tree.leaves(lm.params))
    # A matrix split over "model": the shape of the part each device holds.
    w = lm.params["h0"]["mlp"]["c_fc"]["w"]
    return {
        "total": total,
        "per_device": sorted(set(held.values())),
        "c_fc_shard_shapes": sorted({tuple(s.data.shape) for s in w.addressable_shards}),
        "c_fc_shape": list(w.shape),
    }


def main(checkpoint: str, meshes: list[str]) -> None:
    results = {}
    reference = None
    for name in ["one", *meshes]:
        mesh = make_mesh("data:1", jax.devices()[:1]) if name == "one" else make_mesh(name)
        lm = gpt2jax.load(checkpoint, mesh=mesh)
        logits, lib = library(lm)
        reference = logits if reference is None else reference
        engine, collectives = engine_results(lm)
        results[name] = {
            "mesh": dict(mesh.shape),
            "logits_max_diff": float(np.abs(logits - reference).max()),
            "library": lib,
            "engine": engine,
            "decode_collectives": collectives,
            "weights": weights_per_device(lm),
        }
    print(json.dumps({"devices": len(jax.devices()), "results": results}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
