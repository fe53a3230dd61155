"""One training step: the learning-rate schedule, and data parallelism that keeps the loss curve."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gpt2jax.config import GPT2Config
from gpt2jax.train import train
from gpt2jax.train_step import TrainConfig, init_from_scratch, lr_schedule

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_schedule_warms_up_then_decays_to_min_lr():
    schedule = lr_schedule(TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup=10))
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert float(schedule(50)) < float(schedule(20))


def three_steps_losses() -> list[float]:
    """Losses of three steps of a tiny model on random tokens, on however many devices there are."""
    c = GPT2Config(n_vocab=64, n_ctx=16, n_embd=32, n_head=2, n_layer=1, eos_token_id=63)
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
    tc = TrainConfig(steps=3, batch_size=4, eval_every=0)
    r = train(c, init_from_scratch(c, 0), tokens, None, tc, progress=False)
    return [r.losses[s] for s in (1, 2, 3)]


def test_batches_shard_over_several_devices():
    """Two host devices give the one-device loss curve (in a fresh process: the device count is fixed)."""
    code = "import jax, test_train_step as t; assert len(jax.devices()) == 2; print(t.three_steps_losses())"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(two, three_steps_losses(), atol=1e-5)
