"""The param tree of GPT-2 and its names on disk: the layout that loading and saving share.

In memory, params are a plain nested dict of numpy arrays named as in OpenAI's checkpoint:
``{"wte", "wpe", "h0": {"ln_1": {"g", "b"}, "attn": {"c_attn": {"w", "b"}, ...}, ...}, "ln_f"}``,
with dense weights ``w`` laid out [in, out] (as Hugging Face's Conv1D already stores them). On disk a leaf
is named ``h.0.attn.c_attn.weight`` (Hugging Face) or ``model/h0/attn/c_attn/w`` (OpenAI, whose dense
weights are [1, in, out]).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gpt2jax.config import GPT2Config


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or does not match its config."""


Params = dict[str, Any]
Path = tuple[str, ...]  # a leaf's keys in the param tree, e.g. ("h0", "attn", "c_attn", "w")

HF_SAFETENSORS = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_PICKLE = "pytorch_model.bin"
OPENAI_PREFIX = "model.ckpt"

_HF_LEAF = {"w": "weight", "g": "weight", "b": "bias"}


def param_shapes(config: GPT2Config) -> dict[Path, tuple[int, ...]]:
    """Every leaf of the param tree with its shape."""
    e, v, c = config.n_embd, config.n_vocab, config.n_ctx
    shapes: dict[Path, tuple[int, ...]] = {("wte",): (v, e), ("wpe",): (c, e)}
    for i in range(config.n_layer):
        h = f"h{i}"
        for ln in ("ln_1", "ln_2"):
            shapes[(h, ln, "g")] = shapes[(h, ln, "b")] = (e,)
        for sub, layer, n_in, n_out in (
            ("attn", "c_attn", e, 3 * e),
            ("attn", "c_proj", e, e),
            ("mlp", "c_fc", e, 4 * e),
            ("mlp", "c_proj", 4 * e, e),
        ):
            shapes[(h, sub, layer, "w")] = (n_in, n_out)
            shapes[(h, sub, layer, "b")] = (n_out,)
    shapes[("ln_f", "g")] = shapes[("ln_f", "b")] = (e,)
    return shapes


def hf_name(path: Path) -> str:
    """("h3", "attn", "c_attn", "w") -> "h.3.attn.c_attn.weight" (without the "transformer." prefix)."""
    if len(path) == 1:  # wte, wpe
        return f"{path[0]}.weight"
    head = f"h.{path[0][1:]}" if path[0] != "ln_f" else "ln_f"
    return ".".join((head, *path[1:-1], _HF_LEAF[path[-1]]))


def openai_name(path: Path) -> str:
    return "model/" + "/".join(path)


def openai_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    # OpenAI's conv1d weights are [1, in, out]: a width-1 convolution.
    return (1, *shape) if path[-1] == "w" else shape


def iter_leaves(tree: Params, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf of a nested dict, in insertion order."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from iter_leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value
