"""Shared pieces of the benchmarks: a random 124M-shaped model, the same weights in transformers, and a wait
for an idle machine before each timed run (the machines are shared)."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPT2Config, preset
from gpt2jax.model import init_params


def random_params(config: GPT2Config, seed: int = 0) -> Any:
    """GPT-2-initialised random weights as numpy (host) arrays."""
    return jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed)))


def gpt2_124m() -> GPT2Config:
    return preset("124M")


def hf_model(config: GPT2Config, params: Any):
    """transformers' PyTorch GPT2LMHeadModel holding exactly `params`."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf_cfg = HFConfig(**{k: v for k, v in config.to_hf_config().items() if k not in ("architectures",)})
    model = GPT2LMHeadModel(hf_cfg).eval()
    sd = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"]}
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = params["ln_f"]["g"], params["ln_f"]["b"]
    for i in range(config.n_layer):
        h = params[f"h{i}"]
        for part in ("ln_1", "ln_2"):
            sd[f"transformer.h.{i}.{part}.weight"] = h[part]["g"]
            sd[f"transformer.h.{i}.{part}.bias"] = h[part]["b"]
        for block, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            sd[f"transformer.h.{i}.{block}.{layer}.weight"] = h[block][layer]["w"]
            sd[f"transformer.h.{i}.{block}.{layer}.bias"] = h[block][layer]["b"]
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), (
        missing,
        unexpected,
    )
    return model


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}; jax {jax.__version__} ({jax.default_backend()})"


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_idle_fraction(sample_s: float = 0.5) -> float:
    """The share of all CPUs' time spent idle (or waiting on I/O) over `sample_s` seconds, from /proc/stat."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, user..steal

    idle0, total0 = read()
    time.sleep(sample_s)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(min_idle: float = 0.9, timeout_s: float = 120, sample_s: float = 0.5) -> float:
    """Waits until the machine is at least `min_idle` idle over one sample, or `timeout_s` has passed.

    Returns the idle share of the last sample, so that a caller can report runs that started on a busy
    machine (after a timeout) instead of silently timing them. Without /proc/stat it returns 1.0 at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            idle = cpu_idle_fraction(sample_s)
        except OSError:
            return 1.0
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle


__all__ = [
    "cpu_idle_fraction",
    "gpt2_124m",
    "hf_model",
    "jnp",
    "machine",
    "random_params",
    "timed",
    "wait_for_idle",
]
