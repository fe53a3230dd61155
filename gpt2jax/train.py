"""The training API: loss, AdamW with warmup + cosine decay, a data-parallel train step, resumable training.

    from gpt2jax.train import TrainConfig, train
    result = train(config, params, train_tokens, heldout_tokens, TrainConfig(steps=1000), out_dir="out")

Batches are sharded over all local devices along a "data" mesh axis; params and optimizer state are
replicated, so XLA all-reduces the gradients. Params stay float32 (the master copy) even when the model
computes in bfloat16. `out_dir` gets Hugging Face-layout checkpoints plus `train_state.npz` (optimizer
state, step, data position, RNG); calling `train` again with the same out_dir and data resumes where the
last run saved and continues the same loss curve.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax import data
from gpt2jax.checkpoint import load_params, save_params
from gpt2jax.config import GPT2Config
from gpt2jax.lm import DTYPES
from gpt2jax.model import GPT2, init_cache, init_params
from gpt2jax.tokenizer import GPT2Tokenizer

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings. Those marked (curve) must match when a run resumes."""

    steps: int = 1000  # (curve) optimizer steps in all; the cosine decay ends here
    batch_size: int = 8  # (curve) sequences per micro-batch, over all devices
    grad_accum: int = 1  # (curve) micro-batches summed per optimizer step
    seq_len: int = 0  # (curve) tokens per sequence; 0 means the model's n_ctx
    lr: float = 3e-4  # (curve) peak learning rate, reached after `warmup` steps
    min_lr: float = 3e-5  # (curve) learning rate at the end of the cosine decay
    warmup: int = 100  # (curve)
    weight_decay: float = 0.1  # (curve) AdamW decay, applied to matrices only
    clip: float = 1.0  # (curve) gradient clipping by global norm; 0 turns it off
    dtype: str = "float32"  # (curve) compute dtype: float32 or bfloat16
    seed: int = 0  # (curve) data order (and init, when training from scratch)
    eval_every: int = 100  # held-out loss every this many steps (0: never)
    eval_batches: int = 8  # held-out batches per evaluation
    sample_every: int = 0  # print samples every this many steps (0: never)
    save_every: int = 500  # checkpoint every this many steps (0: only at the end)

    def seq_len_for(self, config: GPT2Config) -> int:
        return min(self.seq_len or config.n_ctx, config.n_ctx)


# Settings that only change what is printed or saved, not the loss curve.
NON_CURVE_FIELDS = ("eval_every", "eval_batches", "sample_every", "save_every")


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to min_lr at the last step."""
    warmup = min(tc.warmup, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1), tc.min_lr)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (GPT-3's betas) with the schedule, after clipping the gradients' global norm."""
    # Decaying biases and LayerNorm gains only pulls them towards 0 for no benefit.
    is_matrix = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=is_matrix)
    return optax.chain(optax.clip_by_global_norm(tc.clip), adamw) if tc.clip > 0 else adamw


def init_from_scratch(config: GPT2Config, seed: int) -> Params:
    """GPT-2's initialisation, with residual projections scaled by 1/sqrt(2 n_layer) as in the paper."""
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(seed)))
    scale = 1.0 / math.sqrt(2 * config.n_layer)
    for i in range(config.n_layer):
        for sub in ("attn", "mlp"):
            params[f"h{i}"][sub]["c_proj"]["w"] = params[f"h{i}"][sub]["c_proj"]["w"] * scale
    return params


def token_losses(params: Params, config: GPT2Config, windows: jax.Array, dtype: Any) -> jax.Array:
    """Cross-entropy [B, T] of each next token, for windows [B, T + 1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    # A fresh cache as long as the window makes the model's forward a plain causal pass.
    logits, _ = GPT2(config, dtype).apply(
        {"params": params}, inputs, positions, init_cache(config, B, T, dtype)
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, T), fp32 logits


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices; batches split along its "data" axis."""
    return Mesh(np.array(jax.devices()), ("data",))


def make_train_step(config: GPT2Config, optimizer: optax.GradientTransformation, dtype: Any, mesh: Mesh):
    """A jitted (params, opt_state, batch [accum, B, T + 1]) -> (params, opt_state, metrics)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))

    def step(params: Params, opt_state: Any, batch: jax.Array) -> tuple[Params, Any, dict[str, jax.Array]]:
        loss_of = lambda p, windows: token_losses(p, config, windows, dtype).mean()

        def accumulate(grad_sum: Params, windows: jax.Array) -> tuple[Params, jax.Array]:
            loss, grads = jax.value_and_grad(loss_of)(params, windows)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grad_sum, losses = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
        grads = jax.tree.map(lambda g: g / batch.shape[0], grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": losses.mean(), "grad_norm": global_norm(grads)}

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch_sharding),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(config: GPT2Config, dtype: Any, mesh: Mesh):
    """A jitted (params, windows [B, T + 1], mask [B]) -> summed loss of the unmasked windows' tokens."""
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def loss_sum(params: Params, windows: jax.Array, mask: jax.Array) -> jax.Array:
        return (token_losses(params, config, windows, dtype) * mask[:, None]).sum()

    return jax.jit(loss_sum, in_shardings=(NamedSharding(mesh, PartitionSpec()), rows, rows))


def heldout_loss(eval_step: Any, params: Params, windows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats) over all windows, in batches padded to batch_size with masked rows."""
    total = 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[: len(chunk)] = 1.0
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), np.int32)])
        total += float(eval_step(params, padded, mask))
    return total / (len(windows) * (windows.shape[1] - 1))


# --- resumable state -------------------------------------------------------------------------------

STATE_FILE = "train_state.npz"


class ResumeError(ValueError):
    """An output folder's train state does not fit the run that would resume it."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(
    out_dir: str | os.PathLike,
    config: GPT2Config,
    params: Params,
    opt_state: Any,
    tc: TrainConfig,
    meta: dict[str, Any],
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """A checkpoint (checkpoint.save_params) and then STATE_FILE: optimizer state, settings, `meta`.

    The state records the hash of the model.safetensors it belongs to, so a crash between the two writes
    is caught on resume rather than silently pairing new weights with an old step.
    """
    out_dir = os.fspath(out_dir)
    save_params(out_dir, config, jax.tree.map(np.asarray, params), tokenizer_dir=tokenizer_dir)
    meta = {
        **meta,
        "train_config": dataclasses.asdict(tc),
        "model_sha256": _sha256(os.path.join(out_dir, "model.safetensors")),
    }
    arrays = {f"opt_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = os.path.join(out_dir, f"{STATE_FILE}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def load_state(
    out_dir: str | os.PathLike, config: GPT2Config, opt_template: Any, tc: TrainConfig, data_id: str
) -> tuple[Params, Any, int]:
    """(params, optimizer state, step) saved in out_dir, after checking they fit this run.

    opt_template: optimizer.init(params) for the same model, whose tree structure the leaves fill.
    """
    out_dir = os.fspath(out_dir)
    with np.load(os.path.join(out_dir, STATE_FILE), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        leaves = [z[k] for k in sorted(k for k in z.files if k.startswith("opt_"))]
    saved_config, params = load_params(out_dir, progress=False)
    if saved_config != config:
        raise ResumeError(f"{out_dir}: holds a model with {saved_config}, not {config}")
    if _sha256(os.path.join(out_dir, "model.safetensors")) != meta["model_sha256"]:
        raise ResumeError(f"{out_dir}: model.safetensors is not the one {STATE_FILE} was saved with")
    saved_tc = meta["train_config"]
    differ = [
        f"{k}={saved_tc.get(k)!r} (now {v!r})"
        for k, v in dataclasses.asdict(tc).items()
        if k not in NON_CURVE_FIELDS and saved_tc.get(k) != v
    ]
    if differ:
        raise ResumeError(
            f"{out_dir}: was trained with other settings: {', '.join(differ)}. To go on with new settings, "
            f"start a new run from its weights (--model {out_dir} --out <new folder>)"
        )
    if meta["data"] != data_id:
        raise ResumeError(f"{out_dir}: was trained on other data (fingerprint {meta['data']}, now {data_id})")
    treedef = jax.tree.structure(opt_template)
    if treedef.num_leaves != len(leaves):
        raise ResumeError(
            f"{out_dir}: optimizer state has {len(leaves)} arrays, expected {treedef.num_leaves}"
        )
    return params, jax.tree.unflatten(treedef, leaves), int(meta["step"])


# --- the training loop ------------------------------------------------------------------------------


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
