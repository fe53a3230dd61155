"""A training run's state on disk, to resume it: a checkpoint plus optimizer state, settings and step.

`out_dir` gets a Hugging Face-layout checkpoint plus STATE_FILE (optimizer state, step, data position,
settings); load_state restores them only for a run with the same model, settings (curve) and data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from gpt2jax.checkpoint import load_params
from gpt2jax.checkpoint_save import save_params
from gpt2jax.config import GPT2Config
from gpt2jax.train_step import NON_CURVE_FIELDS, Params, TrainConfig

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
    """A checkpoint (checkpoint_save.save_params) and then STATE_FILE: optimizer state, settings, `meta`.

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
