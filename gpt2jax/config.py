"""GPT-2 hyperparameters, named as in OpenAI's hparams.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model. Frozen and hashable, so it can be a static jit argument."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> GPT2Config:
        """From OpenAI's hparams.json contents."""
        return cls(
            n_vocab=int(hparams["n_vocab"]),
            n_ctx=int(hparams["n_ctx"]),
            n_embd=int(hparams["n_embd"]),
            n_head=int(hparams["n_head"]),
            n_layer=int(hparams["n_layer"]),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> GPT2Config:
        """From a Hugging Face config.json (GPT2Config) dict."""
        model_type = cfg.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json has model_type={model_type!r}; only 'gpt2' is supported")
        eos = cfg.get("eos_token_id", 50256)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            n_vocab=int(cfg["vocab_size"]),
            n_ctx=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
            n_embd=int(cfg["n_embd"]),
            n_head=int(cfg["n_head"]),
            n_layer=int(cfg["n_layer"]),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            eos_token_id=int(eos if eos is not None else 50256),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' GPT2LMHeadModel loads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
        }

    def to_hparams(self) -> dict[str, int]:
        return {
            "n_vocab": self.n_vocab,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
        }

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> GPT2Config:
        """Reads config.json (Hugging Face) or hparams.json (OpenAI) from a checkpoint folder."""
        for name, parse in (("config.json", cls.from_hf_config), ("hparams.json", cls.from_hparams)):
            file = os.path.join(path, name)
            if os.path.exists(file):
                with open(file) as f:
                    try:
                        values = json.load(f)
                    except ValueError as e:  # name the file, as every checkpoint error does
                        raise ValueError(f"{file}: not valid JSON ({e})") from None
                return parse(values)
        raise FileNotFoundError(f"{path}: no config.json or hparams.json")

    def num_params(self) -> int:
        """Parameter count with the output projection tied to wte (as GPT-2 has it)."""
        e, v, c, n = self.n_embd, self.n_vocab, self.n_ctx, self.n_layer
        per_layer = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
        return v * e + c * e + n * per_layer + 2 * e


# The four sizes OpenAI released. Parameter counts: 124M, 355M, 774M, 1558M
# (OpenAI's folder names 117M and 345M are the first two, as originally miscounted).
PRESETS: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
PRESET_ALIASES: dict[str, str] = {
    "117M": "124M",
    "345M": "355M",
    "gpt2": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}


def preset(name: str) -> GPT2Config:
    """The config of an official size, by OpenAI folder name (117M...) or Hugging Face name (gpt2...)."""
    key = PRESET_ALIASES.get(name, name)
    key = PRESET_ALIASES.get(key.split("/")[-1], key)
    if key not in PRESETS:
        known = sorted(PRESETS) + sorted(PRESET_ALIASES)
        raise KeyError(f"unknown GPT-2 size {name!r}; known: {', '.join(known)}")
    return PRESETS[key]
