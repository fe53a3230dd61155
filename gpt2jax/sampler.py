"""The jitted sampler: prefill a padded batch of prompts, then decode in compiled chunks of steps.

Shapes are kept static so that XLA compiles once per bucket: prompts are right-padded to a power-of-two
length, the batch to a power-of-two size, and the KV cache to a power-of-two length that fits prompt and
completion. Sampling settings are traced per-row arrays, so new settings reuse the compiled code.
The params enter every jitted function as an argument (closing over them would bake the weights into the
program as constants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import decode, sampling
from gpt2jax.config import GPT2Config
from gpt2jax.decode import DecodeState, PromptScores
from gpt2jax.model import init_cache
from gpt2jax.sharding import Layout

MIN_BUCKET = 16


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n (at least `minimum`), capped at `cap`."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap)


class Sampler:
    """Owns the compiled prefill and decode functions of one model configuration.

    `compilations` counts traces (each trace means one XLA compilation) and `decode_steps` the decode
    steps run (all rows together): tests assert on them.
    """

    def __init__(
        self,
        config: GPT2Config,
        dtype: Any = jnp.float32,
        chunk_size: int = 16,
        layout: Layout | None = None,
        kv_dtype: Any = None,
    ) -> None:
        """layout: the params were placed by this gpt2jax.sharding.Layout (None: one device, as loaded).
        kv_dtype: the KV cache's dtype (default: the activation dtype `dtype`).

        On a mesh, batches whose size divides the data axis are split over it; the KV cache is split on
        its heads over the model axis; GSPMD partitions the rest along the params.
        """
        self.config = config
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.chunk_size = chunk_size
        self.layout = layout
        self.model = decode.Model(config, dtype, layout.qkv_groups if layout is not None else 1)
        self.compilations = 0
        self.decode_steps = 0
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "score_prompt"))
        self._decode = jax.jit(
            self._decode_impl,
            donate_argnames=("state",),
            compiler_options=decode.DECODE_COMPILER_OPTIONS,
        )

    # ---- jitted bodies (Python runs these only while tracing) ----

    def _prefill_impl(
        self,
        params: Any,
        tokens: jax.Array,  # [B, P] right-padded prompts
        lengths: jax.Array,  # [B] true prompt lengths (>= 1)
        max_tokens: jax.Array,  # [B]
        sp: sampling.SamplingTensors,
        want_top: jax.Array,  # [B] bool
        *,
        cache_len: int,
        score_prompt: bool,
    ) -> tuple[DecodeState, sampling.SampleOutput, PromptScores | None]:
        self.compilations += 1
        B = tokens.shape[0]
        cache = init_cache(self.config, B, cache_len, self.kv_dtype, self.model.qkv_groups)
        if self.layout is not None:
            split_rows = B % self.layout.data == 0
            cache = jax.lax.with_sharding_constraint(cache, self.layout.cache_sharding(split_rows))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        last, cache, scores = decode.prefill(
            params, self.model, tokens, positions, (lengths - 1)[:, None], cache, score_prompt
        )
        last = last[:, 0]
        eos = jnp.full((B,), self.config.eos_token_id, jnp.int32)
        state, out = decode.start(last, lengths, max_tokens, eos, want_top, sp, cache_len - 1)
        return state._replace(cache=cache), out, scores

    def _decode_impl(
        self, params: Any, state: DecodeState
    ) -> tuple[DecodeState, sampling.SampleOutput, jax.Array]:
        """Up to `chunk_size` decode steps; returns the final state, per-step outputs [chunk, B, ...]
        (token -1 for a row that was done) and how many steps ran. It ends as soon as every row is done,
        so a short generation does not pay for the rest of the chunk."""
        self.compilations += 1
        cache_len = state.cache[0][0].shape[2]
        ran, state, outs = decode.decode(params, self.model, state, self.chunk_size, cache_len - 1)
        return state, outs, ran

    # ---- host side ----

    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        sampling_params: sampling.SamplingTensors,
        *,
        logprobs: bool = False,
        score_prompt: bool = False,
        should_stop=None,
    ) -> GenerationResult:
        """Generates for a batch of token-id prompts; returns per-row token ids and their logprobs.

        `should_stop(row, tokens)` may be given to end rows early (e.g. on a stop string); it is checked
        between chunks, and the rows' tokens are still cut by the caller.
        """
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        limits = np.broadcast_to(np.asarray(max_tokens, np.int32), (n,)).copy()
        cfg = self.config
        if int((lengths + limits).max()) > cfg.n_ctx:
            raise ValueError(f"prompt + max_tokens exceeds the context length {cfg.n_ctx}")

        B = bucket(n, cap=1 << 30, minimum=1)
        P = bucket(int(lengths.max()), cap=cfg.n_ctx)
        S = bucket(P + int(limits.max()), cap=cfg.n_ctx)
        tokens = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        pad_rows = B - n
        lengths_b = np.concatenate([lengths, np.ones(pad_rows, np.int32)])
        limits_b = np.concatenate([limits, np.zeros(pad_rows, np.int32)])  # padding rows start done
        sp = pad_sampling_params(sampling_params, B)
        want_top = np.full(B, logprobs, np.bool_)
        if self.layout is not None:  # rows over the data axis when they split evenly, else replicated
            rows = self.layout.rows if B % self.layout.data == 0 else self.layout.replicated
            tokens, lengths_b, limits_b, sp, want_top = jax.device_put(
                (tokens, lengths_b, limits_b, sp, want_top), rows
            )

        state, first, scores = self._prefill(
            params, tokens, lengths_b, limits_b, sp, want_top, cache_len=S, score_prompt=score_prompt
        )
        steps = [jax.device_get(first._replace(token=jnp.where(limits_b > 0, first.token, -1)))]
        done = np.asarray(state.done)
        while not done[:n].all():
            if should_stop is not None:
                so_far = _collect(steps, n)
                if all(done[i] or should_stop(i, so_far.tokens[i]) for i in range(n)):
                    break
            state, chunk, ran = self._decode(params, state)
            chunk, ran = jax.device_get((chunk, ran))
            steps.extend(sampling.SampleOutput(*(a[j] for a in chunk)) for j in range(ran))
            self.decode_steps += int(ran)
            done = np.asarray(state.done)
        result = _collect(steps, n)
        if score_prompt:
            scores = jax.device_get(scores)
            result = result._replace(prompt_scores=PromptScores(*(a[:n] for a in scores)))
        return result


class GenerationResult(NamedTuple):
    tokens: list[list[int]]  # generated ids per row (end-of-text included when it was sampled)
    logprobs: list[list[float]]
    top_tokens: list[np.ndarray]  # [len, K] per row
    top_logprobs: list[np.ndarray]
    prompt_scores: PromptScores | None = None


def _collect(steps: list[sampling.SampleOutput], n: int) -> GenerationResult:
    tok = np.stack([s.token for s in steps], axis=1)[:n]  # [n, T]; -1 after a row finished
    lp = np.stack([s.logprob for s in steps], axis=1)[:n]
    tt = np.stack([s.top_tokens for s in steps], axis=1)[:n]
    tl = np.stack([s.top_logprobs for s in steps], axis=1)[:n]
    lens = [int(np.argmax(row < 0)) if (row < 0).any() else len(row) for row in tok]
    return GenerationResult(
        tokens=[tok[i, : lens[i]].tolist() for i in range(n)],
        logprobs=[lp[i, : lens[i]].tolist() for i in range(n)],
        top_tokens=[tt[i, : lens[i]] for i in range(n)],
        top_logprobs=[tl[i, : lens[i]] for i in range(n)],
    )


def pad_sampling_params(sp: sampling.SamplingTensors, batch: int) -> sampling.SamplingTensors:
    """Pads per-row settings to `batch` rows of sampling.NEUTRAL (greedy)."""
    pad = batch - sp.temperature.shape[0]
    if pad == 0:
        return sp
    fill = sampling.tensors_from([sampling.NEUTRAL] * pad, sp.logit_bias.shape[1])
    return jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), b]), sp, fill)
