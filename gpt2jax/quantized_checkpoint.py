"""Saves and loads int8-quantised params (gpt2jax.packed), so a quantised model loads without re-quantising.

A quantised folder holds ``config.json`` (Hugging Face's, with ``quantization_config``), the tokenizer
files, and ``model.int8.safetensors``: each packed weight as its int8 [K, N] matrix under its param path
(``h0.attn.c_attn.w``; the tied embedding as ``wte.T`` [E, V]) beside ``<name>.scale`` [N] f32, and the
other params (biases, LayerNorms, wpe) in f32.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gpt2jax import packed
from gpt2jax.checkpoint_layout import CheckpointError, iter_leaves, param_shapes
from gpt2jax.checkpoint_save import _copy_tokenizer, _replace_atomically, _write_json
from gpt2jax.config import GPT2Config

QUANTIZED_FILE = "model.int8.safetensors"
FORMAT = "gpt2jax-int8"


def _name(path: tuple[str, ...]) -> str:
    return ".".join(path) + (".T" if path == ("wte",) else "")


def save_quantized(
    path: str | os.PathLike,
    config: GPT2Config,
    params: Any,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Writes int8-packed params (`packed.pack_params(..., "int8")`) as a quantised model folder.

    Files are written under temporary names and renamed, config.json last. Raises ValueError if the
    params are not int8-packed.
    """
    from safetensors.numpy import save_file

    if not packed.is_packed(params) or params["wte"].data.dtype != np.int8:
        raise ValueError("save_quantized wants int8-packed params (gpt2jax.load(..., quantization='int8'))")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for p, leaf in iter_leaves(params):
        if isinstance(leaf, packed.PackedWeight):
            tensors[_name(p)], tensors[_name(p) + ".scale"] = packed.to_quantized(leaf)
        else:
            tensors[_name(p)] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    meta = {"format": FORMAT}
    _replace_atomically(
        os.path.join(path, QUANTIZED_FILE), lambda tmp: save_file(tensors, tmp, metadata=meta)
    )
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, path, openai=False)
    hf_config = config.to_hf_config()
    hf_config["quantization_config"] = {"quant_method": FORMAT, "bits": 8, "group": "output channel"}
    _write_json(os.path.join(path, "config.json"), hf_config)


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `save_quantized`."""
    return os.path.isfile(os.path.join(path, QUANTIZED_FILE))


def load_quantized(path: str | os.PathLike) -> tuple[GPT2Config, Any]:
    """(config, int8-packed params) from a folder written by `save_quantized`.

    Raises CheckpointError when a tensor is missing, unexpected or of the wrong shape or dtype.
    """
    from safetensors import safe_open

    from gpt2jax.checkpoint import _config_from

    path = os.fspath(path)
    config = _config_from(os.path.join(path, "config.json"), GPT2Config.from_hf_config)
    file = os.path.join(path, QUANTIZED_FILE)
    with safe_open(file, "numpy") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise CheckpointError(f"{file}: not a {FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    params: dict[str, Any] = {}
    used = set()
    for p, shape in param_shapes(config).items():
        name = _name(p)
        quantized = p == ("wte",) or (p[-1] == "w" and len(p) > 1 and p[-2] in packed.PACKED_LAYERS)
        want = shape[::-1] if p == ("wte",) else shape
        arr = tensors.get(name)
        if arr is None or tuple(arr.shape) != tuple(want):
            got = "missing" if arr is None else f"shape {tuple(arr.shape)}"
            raise CheckpointError(f"{file}: {name} {got}, expected {tuple(want)}")
        if quantized:
            scale = tensors.get(name + ".scale")
            if arr.dtype != np.int8 or scale is None or scale.shape != (want[1],):
                raise CheckpointError(f"{file}: {name} must be int8 with a [{want[1]}] {name}.scale")
            leaf: Any = packed.from_quantized(arr, scale)
            used.add(name + ".scale")
        else:
            leaf = np.asarray(arr, np.float32)
        used.add(name)
        node = params
        for key in p[:-1]:
            node = node.setdefault(key, {})
        node[p[-1]] = leaf
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor(s) {', '.join(extra[:5])}")
    return config, params
