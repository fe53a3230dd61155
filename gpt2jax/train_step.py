"""What one training step is: settings, loss, AdamW with warmup + cosine decay, the jitted data-parallel steps.

Batches are sharded over all local devices along a "data" mesh axis; params and optimizer state are
replicated, so XLA all-reduces the gradients. Params stay float32 (the master copy) even when the model
computes in bfloat16. The loop that runs these steps: gpt2jax.train.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax.config import GPT2Config
from gpt2jax.model import GPT2, init_cache, init_params

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
