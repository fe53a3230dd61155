"""Saves GPT-2 weights in Hugging Face's layout (safetensors) or OpenAI's (a TensorFlow checkpoint).

Both check that the params are exactly the tree the config implies, write every file under a temporary
name and rename it, and write the config file last, so a folder with one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2jax.checkpoint_layout import (
    HF_SAFETENSORS,
    OPENAI_PREFIX,
    CheckpointError,
    Params,
    Path,
    hf_name,
    iter_leaves,
    openai_name,
    openai_shape,
    param_shapes,
)
from gpt2jax.config import GPT2Config
from gpt2jax.tf_checkpoint import write_tf_checkpoint

# Tokenizer files: our (Hugging Face) name, then OpenAI's name for the same file.
_TOKENIZER_FILES = (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe"))
_TOKENIZER_OPTIONAL = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _checked_leaves(config: GPT2Config, params: Params) -> dict[Path, np.ndarray]:
    """The params as numpy arrays by path, after checking they are exactly the tree the config implies."""
    leaves = dict(iter_leaves(params))
    shapes = param_shapes(config)
    missing = [p for p in shapes if p not in leaves]
    extra = [p for p in leaves if p not in shapes]
    if missing or extra:
        raise CheckpointError(
            f"params do not match the config: missing {['/'.join(p) for p in missing[:5]]}, "
            f"unexpected {['/'.join(p) for p in extra[:5]]}"
        )
    out = {}
    for path, shape in shapes.items():
        arr = np.asarray(leaves[path])  # also brings jax arrays to the host
        if arr.shape != shape:
            raise CheckpointError(
                f"params: {'/'.join(path)} has shape {arr.shape}, the config implies {shape}"
            )
        if arr.dtype.name not in ("float16", "bfloat16", "float32"):
            arr = arr.astype(np.float32)
        out[path] = np.ascontiguousarray(arr)
    return out


def _replace_atomically(dst: str, write: Callable[[str], None]) -> None:
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(dst: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _replace_atomically(dst, write)


def _copy_tokenizer(src: str | os.PathLike, dst: str, openai: bool) -> None:
    src = os.fspath(src)
    for names in _TOKENIZER_FILES:
        found = next((os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))), None)
        if found is None:
            raise CheckpointError(f"{src}: no tokenizer file {' or '.join(names)}")
        _replace_atomically(
            os.path.join(dst, names[openai]), lambda tmp, found=found: shutil.copyfile(found, tmp)
        )
    if not openai:
        for name in _TOKENIZER_OPTIONAL:
            if os.path.isfile(os.path.join(src, name)):
                copy = lambda tmp, name=name: shutil.copyfile(os.path.join(src, name), tmp)
                _replace_atomically(os.path.join(dst, name), copy)


def save_params(
    path: str | os.PathLike,
    config: GPT2Config,
    params: Params,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Saves in the Hugging Face layout, which transformers' ``GPT2LMHeadModel.from_pretrained`` loads.

    Writes ``model.safetensors`` (float16/bfloat16/float32 as given, other dtypes as float32), the
    tokenizer files from ``tokenizer_dir`` (OpenAI's encoder.json/vocab.bpe are renamed), and
    ``config.json`` last, so a folder with a config.json is complete. Every file is written under a
    temporary name and renamed.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    leaves = _checked_leaves(config, params)
    os.makedirs(path, exist_ok=True)
    # Like transformers' own save_pretrained: no lm_head.weight, since it is tied to wte.
    tensors = {"transformer." + hf_name(p): arr for p, arr in leaves.items()}
    _replace_atomically(
        os.path.join(path, HF_SAFETENSORS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, path, openai=False)
    hf_config = config.to_hf_config()
    hf_config["dtype"] = leaves[("wte",)].dtype.name
    _write_json(os.path.join(path, "config.json"), hf_config)


def save_openai(
    path: str | os.PathLike,
    config: GPT2Config,
    params: Params,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Saves in OpenAI's original layout: hparams.json, checkpoint, model.ckpt.index/.data-00000-of-00001,
    and encoder.json + vocab.bpe from ``tokenizer_dir``.

    Weights are stored as float32 under OpenAI's names (``model/h0/attn/c_attn/w``, dense weights as
    [1, in, out]), which OpenAI's TensorFlow code restores. No ``.meta`` graph is written. hparams.json
    comes last, so a folder that has it is complete.
    """
    path = os.fspath(path)
    leaves = _checked_leaves(config, params)
    os.makedirs(path, exist_ok=True)
    tensors = {
        openai_name(p): arr.astype(np.float32).reshape(openai_shape(p, arr.shape))
        for p, arr in leaves.items()
    }
    write_tf_checkpoint(os.path.join(path, OPENAI_PREFIX), tensors)
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, path, openai=True)
    _write_json(os.path.join(path, "hparams.json"), config.to_hparams())
