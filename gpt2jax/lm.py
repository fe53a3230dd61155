"""The notebook API: `gpt2jax.load(...)` returns a `LanguageModel` with `generate`, `score` and `tokenizer`."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gpt2jax import cpu_kernels, packed, sampling
from gpt2jax.checkpoint import load_params
from gpt2jax.config import GPT2Config
from gpt2jax.constraint import Constraint
from gpt2jax.engine.api import GenerationRequest
from gpt2jax.engine.offline import Completion, run_all
from gpt2jax.kv_cache import kv_cache_dtype as kv_cache_dtype_for
from gpt2jax.quantized_checkpoint import is_quantized_folder, load_quantized, save_quantized
from gpt2jax.sampler import GenerationResult, Sampler
from gpt2jax.sampling_params import SamplingParams, per_prompt
from gpt2jax.sharding import Layout, MeshShape, make_mesh
from gpt2jax.tokenizer import GPT2Tokenizer

if TYPE_CHECKING:
    from gpt2jax.engine.engine import BatchEngine

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}
QUANTIZATIONS = (None, "int8")


def _on_cpu(mesh: object) -> bool:
    """Whether a model loaded with `mesh` runs on the CPU backend with one device."""
    return mesh is None and jax.default_backend() == "cpu"


def _cpu_pack_mode(dtype: Any) -> str | None:
    """How a model of `dtype` is packed on the CPU: bf16 always (XLA has no fast bf16 decode path), fp32
    when the kernel is built (it is faster than XLA's dot at every row count measured)."""
    if dtype == jnp.bfloat16:
        return "bfloat16"
    return "float32" if cpu_kernels.enabled() else None


def models_root(models_dir: str | os.PathLike | None = None) -> Path:
    """Where model names live: `models_dir`, else $MODELS_DIR, else ./checkpoints."""
    return Path(models_dir or os.environ.get("MODELS_DIR", "checkpoints"))


def resolve_checkpoint(path_or_name: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path:
    """A folder path as given, else `<models_root>/<name>` ("/" in the name becomes "--")."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    root = models_root(models_dir)
    name = str(path_or_name).replace("/", "--")
    if name not in (".", "..") and (root / name).is_dir():
        return root / name
    raise FileNotFoundError(
        f"no model folder {str(path_or_name)!r} (looked in {root}/); "
        f"download one with: python3 download_model.py {path_or_name}"
    )


class LanguageModel:
    """A loaded GPT-2: config, params (a plain pytree on the device), tokenizer and sampler."""

    def __init__(
        self,
        config: GPT2Config,
        params: Any,
        tokenizer: GPT2Tokenizer,
        dtype: Any = jnp.float32,
        name: str = "",
        layout: Layout | None = None,
        kv_cache_dtype: Any = "auto",
    ) -> None:
        """params: checkpoint-layout params; with a `layout` (gpt2jax.sharding), they are placed by it
        (each device gets its part, c_attn regrouped) and `self.params` is that placed tree.
        kv_cache_dtype: the KV cache's dtype (gpt2jax.kv_cache; "auto": bf16 for bf16 activations or
        weights narrower than fp32, else the activation dtype), in the engine and the sampler alike."""
        if tokenizer.vocab_size > config.n_vocab:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.n_vocab}"
            )
        self.config = config
        self.layout = layout
        if layout is None:
            self.params = jax.device_put(params)
        else:
            layout.check(config)
            self.params = layout.shard_params(params, config, dtype)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.kv_dtype = kv_cache_dtype_for(kv_cache_dtype, dtype, packed.weights_dtype(self.params))
        self.name = name
        self.sampler = Sampler(config, dtype, layout=layout, kv_dtype=self.kv_dtype)
        self.source: Path | None = None  # the folder it was loaded from (tokenizer files for saving)
        self._engine: BatchEngine | None = None

    def generate(
        self,
        prompt_or_prompts: str | Sequence[str],
        max_tokens: int | Sequence[int] | None = None,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **settings: Any,
    ) -> list[str]:
        """Completes each prompt `n` times; returns the completion texts (without the prompt).

        The list has one entry per prompt and choice, prompt-major: [p0c0, p0c1, ..., p1c0, ...]. Settings
        are SamplingParams fields (temperature, top_p, top_k, min_p, n, stop, seed, penalties, logit_bias,
        ...), each one value for every prompt or a list of one per prompt (see `per_prompt`); or pass
        `sampling_params`. All prompts run at once through the continuous-batching engine (`self.engine`),
        so each one's text is what it would be alone, and a short one does not wait for a long one.
        Generation ends at end-of-text, after `max_tokens` tokens, or before the first `stop` string. The
        same `seed` gives the same texts; temperature 0 is greedy. Raises ValueError for a bad setting.
        """
        completions = self.complete(
            prompt_or_prompts, max_tokens, sampling_params=sampling_params, **settings
        )
        return [c.text for c in completions]

    def complete(
        self,
        prompt_or_prompts: str | Sequence[str],
        max_tokens: int | Sequence[int] | None = None,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **settings: Any,
    ) -> list[Completion]:
        """As `generate`, but each choice as a `Completion`: text, token ids, finish reason, and with
        `logprobs=k` each token's logprob and top k alternatives, with `prompt_logprobs=True` the prompt's.

        Structured outputs (one for every prompt): `response_format=` OpenAI's dict ({"type":
        "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) or a pydantic model
        class, `json_schema=` a schema, `regex=` a pattern the whole text matches, or `choice=` a list of
        strings (gpt2jax/constraint.py; README, "Structured outputs")."""
        prompts = [prompt_or_prompts] if isinstance(prompt_or_prompts, str) else list(prompt_or_prompts)
        structured = {
            k: settings.pop(k) for k in ("response_format", "regex", "choice", "json_schema") if k in settings
        }
        if (constraint := Constraint.of(**structured)) is not None:
            settings["constraint"] = constraint
        if max_tokens is not None:  # else the records' own (default 16)
            settings["max_tokens"] = max_tokens
        rows = per_prompt(len(prompts), sampling_params, **settings)
        requests = []
        for prompt, params in zip(prompts, rows, strict=True):
            if params.seed is None:  # a fresh seed per call, each choice its own stream from it
                params = params.replace(seed=secrets.randbits(63))
            ids = self.tokenizer.encode(prompt) or [self.config.eos_token_id]
            requests.append(GenerationRequest(tuple(ids), params))
        return [c for choices in run_all(self.engine, requests) for c in choices]

    @property
    def engine(self) -> BatchEngine:
        """The continuous-batching engine `generate` runs on, started on first use (`start_engine`)."""
        if self._engine is None:
            self.start_engine()
        return self._engine

    def start_engine(self, **options: Any) -> BatchEngine:
        """(Re)builds the engine with BatchEngine's options (slots, chunk_size, batch_invariant, ...).

        The notebook's engine never refuses work: its queue is unbounded and nothing times out in it.
        """
        from gpt2jax.engine.engine import BatchEngine  # the engine imports this module

        if self._engine is not None:
            self._engine.stop()
        options = {"max_queue": 1 << 30, "queue_timeout": float("inf")} | options
        self._engine = BatchEngine.from_model(self, **options)
        self._engine.start()
        return self._engine

    def score(self, text: str) -> list[float | None]:
        """Log-probability of each token of `text` given the tokens before it; the first entry is None."""
        ids = self.tokenizer.encode(text)
        if not ids:
            return []
        scores = self.score_ids([ids])[0]
        return [None] + [float(x) for x in scores.logprob[1:]]

    def score_ids(self, prompts: Sequence[Sequence[int]]) -> list[Any]:
        """Per-prompt PromptScores (numpy) for token-id prompts, as `echo` with `max_tokens=0` needs."""
        sp = sampling.make_params(len(prompts), self.config.n_vocab, temperature=0.0)
        result: GenerationResult = self.sampler.generate(self.params, prompts, 0, sp, score_prompt=True)
        s = result.prompt_scores
        return [type(s)(*(np.asarray(a[i, : len(p)]) for a in s)) for i, p in enumerate(prompts)]

    @property
    def weights(self) -> str:
        """How the weights are stored: "float32", "bfloat16" or "int8" (packed: see gpt2jax.packed)."""
        return packed.weights_dtype(self.params).name

    def save_quantized(self, path: str | os.PathLike) -> None:
        """Writes this int8 model (`load(..., quantization="int8")`) as a folder that `load` reads back
        without re-quantising (gpt2jax.quantized_checkpoint). Raises ValueError for other weights."""
        save_quantized(path, self.config, self.params, tokenizer_dir=self.source)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LanguageModel({self.name!r}, n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, "
            f"n_ctx={c.n_ctx}, n_vocab={c.n_vocab}, dtype={jnp.dtype(self.dtype).name}, weights={self.weights})"
        )


def load(
    path_or_name: str | os.PathLike,
    dtype: str = "float32",
    *,
    quantization: str | None = None,
    allow_pickle: bool = False,
    mesh: Mesh | MeshShape | str | None = None,
    download: bool = False,
    kv_cache_dtype: str = "auto",
) -> LanguageModel:
    """Loads a GPT-2 checkpoint folder (Hugging Face or OpenAI layout) or a model name under ./checkpoints.

    dtype: "float32" (default, exact) or "bfloat16": half the bytes per weight. On the CPU the weights are
    packed for gpt2jax.packed's kernel (fp32 too, when the kernel could be built) and activations stay
    f32; elsewhere activations are bf16 too.
    quantization: None, or "int8": weight-only int8 with a scale per output channel (gpt2jax.packed);
    activations in `dtype`. A folder saved by `save_quantized` loads as int8 without re-quantising.
    mesh: spread the model over devices (gpt2jax.sharding): a Mesh, or a shape such as "model:4" or
    "data:2,model:4" over all devices. The weights go from the host straight to the devices, each device
    receiving only its part, so a model too big for one device loads. None: one device.
    download: a name with no folder yet (a GPT-2 size such as "124M", or a Hugging Face repo id) is
    downloaded first into $MODELS_DIR or ./checkpoints, as `python3 download_model.py NAME` would.
    kv_cache_dtype: "auto" (bf16 with bf16 or int8 weights or activations, else float32), "float32" or
    "bfloat16": the dtype the KV cache is stored in (bf16 halves its memory; gpt2jax/kv_cache.py).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    kv_cache_dtype_for(kv_cache_dtype, DTYPES[dtype])  # a bad name fails before anything is read
    try:
        folder = resolve_checkpoint(path_or_name)
    except FileNotFoundError as e:
        if not download:
            raise FileNotFoundError(f"{e}, or load it with download=True") from None
        from gpt2jax.download import download as fetch  # only a download needs the HTTP code

        folder = fetch(str(path_or_name), dest_root=models_root())
    jdtype = DTYPES[dtype]
    tokenizer = GPT2Tokenizer.from_dir(folder)
    pack_mode = "int8" if quantization else _cpu_pack_mode(jdtype) if _on_cpu(mesh) else None
    if is_quantized_folder(folder) or pack_mode is not None:
        if mesh is not None:
            raise ValueError("packed or int8 weights run on one device: load them without a mesh")
        if is_quantized_folder(folder):
            config, params = load_quantized(folder)
        else:
            config, params = load_params(folder, dtype=np.float32, allow_pickle=allow_pickle)
            params = packed.pack_params(params, pack_mode)
        act = jnp.float32 if jax.default_backend() == "cpu" else jdtype
        model = LanguageModel(config, params, tokenizer, act, folder.name, kv_cache_dtype=kv_cache_dtype)
        return _sourced(model, folder)
    config, params = load_params(folder, dtype=np.float32, allow_pickle=allow_pickle)
    if mesh is None:
        params = jax.tree.map(lambda a: jnp.asarray(a, jdtype), params)
        model = LanguageModel(config, params, tokenizer, jdtype, folder.name, kv_cache_dtype=kv_cache_dtype)
        return _sourced(model, folder)
    layout = Layout(mesh if isinstance(mesh, Mesh) else make_mesh(mesh))
    return _sourced(
        LanguageModel(config, params, tokenizer, jdtype, folder.name, layout, kv_cache_dtype), folder
    )


def _sourced(model: LanguageModel, folder: Path) -> LanguageModel:
    model.source = folder
    return model
