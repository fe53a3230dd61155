"""The training loop: resumable training with held-out evaluation, samples and checkpoints.

    from gpt2jax.train import train
    from gpt2jax.train_step import TrainConfig
    result = train(config, params, train_tokens, heldout_tokens, TrainConfig(steps=1000), out_dir="out")

Each step is train_step's jitted data-parallel step. `out_dir` gets Hugging Face-layout checkpoints plus
`train_state.npz` (train_state: optimizer state, step, data position, RNG); calling `train` again with the
same out_dir and data resumes where the last run saved and continues the same loss curve.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax import data
from gpt2jax.config import GPT2Config
from gpt2jax.lm import DTYPES
from gpt2jax.tokenizer import GPT2Tokenizer
from gpt2jax.train_state import STATE_FILE, load_state, save_state
from gpt2jax.train_step import (
    Params,
    TrainConfig,
    heldout_loss,
    lr_schedule,
    make_eval_step,
    make_mesh,
    make_optimizer,
    make_train_step,
)


class _StopFlag:
    """Turns Ctrl-C into a flag the loop checks between steps, so a checkpoint is never half a step."""

    def __enter__(self) -> _StopFlag:
        self.set = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@functools.lru_cache(maxsize=4)
def _compiled_steps(config: GPT2Config, tc: TrainConfig, mesh: Mesh) -> tuple[Any, Any]:
    """The jitted train and eval steps, kept so that a resumed run in the same process compiles nothing."""
    dtype = DTYPES[tc.dtype]
    return make_train_step(config, make_optimizer(tc), dtype, mesh), make_eval_step(config, dtype, mesh)


@dataclasses.dataclass
class TrainResult:
    params: Params  # float32, on the host
    step: int  # optimizer steps done in all (over resumed runs too)
    losses: dict[int, float]  # training loss of each step this run took, by step number (1-based)
    heldout: dict[int, float]  # held-out loss by step
    unigram: float | None  # the unigram baseline on the same held-out tokens
    interrupted: bool = False  # stopped by Ctrl-C (after saving)


def train(
    config: GPT2Config,
    params: Params,
    train_tokens: np.ndarray,
    heldout_tokens: np.ndarray | None,
    tc: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    sample_prompts: Sequence[str] = (),
    sample_tokens: int = 48,
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains `params` on windows of `train_tokens` for tc.steps steps (this run stops early at `stop_at`).

    If out_dir holds a train state from an earlier run, that run's params, optimizer state and step are
    restored instead of starting from `params`; the data order is a pure function of (seed, step), so it
    continues too. Checkpoints go to out_dir every tc.save_every steps, at the end, and on Ctrl-C.
    tokenizer_dir's files are copied into each checkpoint, and it provides the tokenizer for samples.
    """
    from tqdm import tqdm

    mesh = make_mesh()
    if tc.batch_size % mesh.size:
        raise ValueError(f"batch_size {tc.batch_size} does not split over {mesh.size} devices")
    seq_len = tc.seq_len_for(config)
    windows = data.Windows(train_tokens, seq_len, tc.seed)
    data_id = data.fingerprint(train_tokens)
    optimizer = make_optimizer(tc)
    schedule = lr_schedule(tc)
    replicated = NamedSharding(mesh, PartitionSpec())

    step = 0
    opt_state = optimizer.init(params)
    if out_dir is not None and os.path.isfile(os.path.join(out_dir, STATE_FILE)):
        params, opt_state, step = load_state(out_dir, config, opt_state, tc, data_id)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), replicated)
    opt_state = jax.device_put(opt_state, replicated)
    train_step, eval_step = _compiled_steps(config, tc, mesh)

    eval_set, unigram = None, None
    if heldout_tokens is not None and len(heldout_tokens) > 1 and tc.eval_every:
        eval_set = data.eval_windows(heldout_tokens, seq_len, tc.eval_batches * tc.batch_size)
        unigram = data.unigram_loss(train_tokens, eval_set[:, 1:], config.n_vocab)
    sampler = None
    if sample_prompts and tc.sample_every and tokenizer_dir is not None:
        from gpt2jax.lm import LanguageModel

        sampler = LanguageModel(config, params, GPT2Tokenizer.from_dir(tokenizer_dir))

    def save() -> None:
        if out_dir is not None:
            meta = {"step": step, "samples_seen": step * tc.grad_accum * tc.batch_size, "data": data_id}
            save_state(out_dir, config, params, opt_state, tc, meta, tokenizer_dir)

    result = TrainResult(params, step, {}, {}, unigram)
    last = min(tc.steps, stop_at if stop_at is not None else tc.steps)
    log = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        log = open(os.path.join(out_dir, "train_log.jsonl"), "a")  # noqa: SIM115
    tokens_per_step = tc.grad_accum * tc.batch_size * seq_len
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    with _StopFlag() as stop, bar:
        while step < last and not stop.set:
            t0 = time.perf_counter()
            batch = windows.batch(step * tc.grad_accum * tc.batch_size, (tc.grad_accum, tc.batch_size))
            params, opt_state, metrics = train_step(params, opt_state, batch)
            step += 1
            loss = float(metrics["loss"])  # also waits for the step, so the timing is honest
            tok_s = tokens_per_step / (time.perf_counter() - t0)
            result.losses[step] = loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{float(schedule(step - 1)):.2e}")
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": float(metrics["grad_norm"]),
                "tokens_per_s": tok_s,
            }
            if eval_set is not None and (step % tc.eval_every == 0 or step == last):
                record["heldout_loss"] = result.heldout[step] = heldout_loss(
                    eval_step, params, eval_set, tc.batch_size
                )
                bar.write(f"step {step}: held-out loss {record['heldout_loss']:.4f} (unigram {unigram:.4f})")
            if sampler is not None and (step % tc.sample_every == 0 or step == last):
                sampler.params = params
                texts = sampler.generate(list(sample_prompts), sample_tokens, temperature=0.8, seed=tc.seed)
                for prompt, text in zip(sample_prompts, texts, strict=True):
                    bar.write(f"step {step} sample: {prompt + text!r}")
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if tc.save_every and step % tc.save_every == 0 and step < last:
                save()
        if stop.set:
            bar.write(f"interrupted at step {step}; saving to {out_dir}" if out_dir else "interrupted")
        save()
    if log is not None:
        log.close()
    result.params = jax.tree.map(np.asarray, params)
    result.step = step
    result.interrupted = stop.set
    return result
