"""Loads GPT-2 weights: with checkpoint_save, the only modules that know disk formats.

Three layouts are read (names and shapes of the tensors: checkpoint_layout):

- Hugging Face: ``config.json`` + ``model.safetensors`` (or sharded, with ``model.safetensors.index.json``),
  or ``pytorch_model.bin`` when unpickling is allowed. This is also the layout ``save_params`` writes.
- OpenAI's original release: ``hparams.json`` + ``checkpoint`` + ``model.ckpt.index`` / ``.data-*``
  (a TensorFlow checkpoint, read without TensorFlow by ``tf_checkpoint``), written by ``save_openai``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2jax.checkpoint_layout import (
    HF_PICKLE,
    HF_SAFETENSORS,
    HF_SHARD_INDEX,
    OPENAI_PREFIX,
    CheckpointError,
    Params,
    Path,
    hf_name,
    openai_name,
    openai_shape,
    param_shapes,
)
from gpt2jax.config import GPT2Config
from gpt2jax.tf_checkpoint import TFCheckpointError, TFCheckpointReader, latest_checkpoint

# Above this many bytes of weights, loading shows a progress bar.
PROGRESS_MIN_BYTES = 100 << 20

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Non-parameter buffers that transformers versions have saved alongside GPT-2's weights.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass
class _Tensor:
    """One stored tensor: what is known before reading it, and how to read it."""

    file: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], np.ndarray]


def _safetensors_tensors(files: list[str], stack: contextlib.ExitStack) -> dict[str, _Tensor]:
    from safetensors import SafetensorError, safe_open

    kinds = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    tensors: dict[str, _Tensor] = {}
    for file in files:
        try:
            f = stack.enter_context(safe_open(file, framework="numpy"))  # memory-mapped
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                sl = f.get_slice(key)
                read = lambda f=f, key=key: f.get_tensor(key)
                tensors[key] = _Tensor(
                    file, tuple(sl.get_shape()), kinds.get(sl.get_dtype(), sl.get_dtype()), read
                )
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    return tensors


def _torch_tensors(file: str) -> dict[str, _Tensor]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load with torch.load (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")

    def read(t: torch.Tensor) -> np.ndarray:
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits as ml_dtypes'
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {
        k: _Tensor(file, tuple(t.shape), str(t.dtype).removeprefix("torch."), lambda t=t: read(t))
        for k, t in state.items()
    }


def _tf_tensors(prefix: str) -> dict[str, _Tensor]:
    try:
        reader = TFCheckpointReader(prefix)
    except TFCheckpointError as e:
        raise CheckpointError(str(e)) from e

    def read(name: str) -> np.ndarray:
        try:
            return reader.read(name)
        except TFCheckpointError as e:
            raise CheckpointError(str(e)) from e

    tensors = {}
    for name, entry in reader.entries.items():
        dt = entry.numpy_dtype
        dtype = "string" if entry.dtype == 7 else (str(dt) if dt is not None else f"TF dtype {entry.dtype}")
        file = reader.data_paths[entry.shard_id if 0 <= entry.shard_id < reader.num_shards else 0]
        tensors[name] = _Tensor(file, entry.shape, dtype, lambda name=name: read(name))
    return tensors


def _read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read JSON: {e}") from e


def _config_from(file: str, build: Callable[[Any], GPT2Config]) -> GPT2Config:
    try:
        return build(_read_json(file))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a usable GPT-2 config: {e!r}") from e


def _hf_weight_files(path: str, allow_pickle: bool) -> tuple[str, list[str]] | None:
    """("safetensors" | "pickle", files) for a Hugging Face folder, None if it has no weights file."""
    if os.path.isfile(os.path.join(path, HF_SAFETENSORS)):
        return "safetensors", [os.path.join(path, HF_SAFETENSORS)]
    index_file = os.path.join(path, HF_SHARD_INDEX)
    if os.path.isfile(index_file):
        index = _read_json(index_file)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file}: no weight_map")
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{index_file}: shard file(s) missing: {', '.join(missing)}")
        return "safetensors", [os.path.join(path, s) for s in shards]
    pickle_file = os.path.join(path, HF_PICKLE)
    if os.path.isfile(pickle_file):
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_file}: this is a pickle, and loading a pickle can run arbitrary code. If you trust "
                f"it, pass allow_pickle=True (it is then read with torch.load(weights_only=True)), "
                f"or convert it to {HF_SAFETENSORS}"
            )
        return "pickle", [pickle_file]
    return None


def _expected_files_message(path: str) -> str:
    return (
        f"{path}: no GPT-2 checkpoint found; expected config.json with {HF_SAFETENSORS} "
        f"(or {HF_SHARD_INDEX} and its shards, or {HF_PICKLE}), or OpenAI's hparams.json with checkpoint, "
        f"{OPENAI_PREFIX}.index and {OPENAI_PREFIX}.data-00000-of-00001"
    )


def _eos_from_encoder(path: str, config: GPT2Config) -> GPT2Config:
    # hparams.json has no eos id; OpenAI's encoder.json puts <|endoftext|> last, as do smaller vocabularies.
    eos = None
    encoder = os.path.join(path, "encoder.json")
    if os.path.isfile(encoder):
        vocab = _read_json(encoder)
        eos = vocab.get("<|endoftext|>") if isinstance(vocab, dict) else None
    if eos is None and config.eos_token_id >= config.n_vocab:
        eos = config.n_vocab - 1
    return config if eos is None else dataclasses.replace(config, eos_token_id=int(eos))


def _gather(
    tensors: dict[str, _Tensor],
    names: dict[Path, list[str]],
    disk_shapes: dict[Path, tuple[int, ...]],
    config: GPT2Config,
    config_file: str,
    dtype: np.dtype,
    show_progress: bool,
) -> Params:
    """Checks that every expected tensor is there with the right shape and dtype, then reads them all."""
    found: dict[Path, _Tensor] = {}
    for path, candidates in names.items():
        name = next((n for n in candidates if n in tensors), None)
        if name is None:
            where = ", ".join(sorted({t.file for t in tensors.values()})) or "the weights file"
            raise CheckpointError(f"{where}: missing tensor {' or '.join(map(repr, candidates))}")
        t = tensors[name]
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {name!r} has unsupported dtype {t.dtype}")
        if path == ("wte",) and len(t.shape) == 2 and t.shape[0] != config.n_vocab:
            raise CheckpointError(
                f"{t.file}: tensor {name!r} has {t.shape[0]} rows (tokens), "
                f"but {config_file} says n_vocab={config.n_vocab}"
            )
        if t.shape != disk_shapes[path]:
            raise CheckpointError(
                f"{t.file}: tensor {name!r} has shape {t.shape}, "
                f"expected {disk_shapes[path]} from {config_file}"
            )
        found[path] = t

    from tqdm import tqdm

    shapes = param_shapes(config)
    params: Params = {}
    for path, t in tqdm(found.items(), unit="tensor", desc="loading weights", disable=not show_progress):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(t.read()).astype(dtype, copy=False).reshape(shapes[path])
    return params


def _check_tied_head(tensors: dict[str, _Tensor], wte_names: list[str]) -> None:
    head_name = next((n for n in ("lm_head.weight", "transformer.lm_head.weight") if n in tensors), None)
    wte_name = next((n for n in wte_names if n in tensors), None)
    if head_name is None or wte_name is None:
        return
    head, wte = tensors[head_name], tensors[wte_name]
    if head.shape != wte.shape or not np.array_equal(head.read(), wte.read()):
        raise CheckpointError(
            f"{head.file}: {head_name} differs from {wte_name}: untied output heads are not supported "
            f"(GPT-2 ties the output projection to the token embedding)"
        )


def load_params(
    path: str | os.PathLike, *, dtype: Any = np.float32, allow_pickle: bool = False, progress: bool = True
) -> tuple[GPT2Config, Params]:
    """Loads a GPT-2 checkpoint folder (Hugging Face or OpenAI layout) as (config, params).

    dtype: of the returned arrays (float32 by default; bfloat16 via ml_dtypes or jnp.bfloat16 works).
    allow_pickle: permits ``pytorch_model.bin``, which torch unpickles.
    progress: a progress bar for checkpoints over 100 MB.
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    if dtype.name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}, not {dtype.name}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    hf_config = os.path.join(path, "config.json")
    hparams = os.path.join(path, "hparams.json")
    with contextlib.ExitStack() as stack:
        if os.path.isfile(hf_config):
            config_file = hf_config
            config = _config_from(hf_config, GPT2Config.from_hf_config)
            weights = _hf_weight_files(path, allow_pickle)
            if weights is None:
                raise CheckpointError(_expected_files_message(path))
            kind, files = weights
            tensors = (
                _safetensors_tensors(files, stack) if kind == "safetensors" else _torch_tensors(files[0])
            )
            disk_shapes = param_shapes(config)
            names = {p: [hf_name(p), "transformer." + hf_name(p)] for p in disk_shapes}
            _check_tied_head(tensors, names[("wte",)])
            heads = ("lm_head.weight", "transformer.lm_head.weight")
            ignored = lambda n: n.endswith(_HF_BUFFERS) or n in heads
        elif os.path.isfile(hparams):
            config_file = hparams
            config = _eos_from_encoder(path, _config_from(hparams, GPT2Config.from_hparams))
            prefix = os.path.join(path, OPENAI_PREFIX)
            if os.path.isfile(os.path.join(path, "checkpoint")):
                try:
                    prefix = latest_checkpoint(path)
                except TFCheckpointError as e:
                    raise CheckpointError(str(e)) from e
            if not os.path.isfile(prefix + ".index"):
                raise CheckpointError(_expected_files_message(path))
            tensors = _tf_tensors(prefix)
            disk_shapes = {p: openai_shape(p, s) for p, s in param_shapes(config).items()}
            names = {p: [openai_name(p)] for p in disk_shapes}
            # Fine-tuning scripts leave optimizer state (".../Adam", "beta1_power", "global_step") behind.
            ignored = lambda n: not n.startswith("model/") or "/Adam" in n
        else:
            raise CheckpointError(_expected_files_message(path))

        wanted = {n for candidates in names.values() for n in candidates}
        extra = sorted(n for n in tensors if n not in wanted and not ignored(n))
        if extra:
            where = ", ".join(sorted({tensors[n].file for n in extra}))
            more = " ..." if len(extra) > 5 else ""
            raise CheckpointError(
                f"{where}: unexpected tensor(s) {', '.join(extra[:5])}{more}; "
                f"does {config_file} (n_layer={config.n_layer}) belong to these weights?"
            )
        total = sum(os.path.getsize(f) for f in {t.file for t in tensors.values()})
        show = progress and total > PROGRESS_MIN_BYTES
        return config, _gather(tensors, names, disk_shapes, config, config_file, dtype, show)
