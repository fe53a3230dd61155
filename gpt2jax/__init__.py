"""gpt2jax: GPT-2 in JAX/Flax.

import gpt2jax
model = gpt2jax.load("checkpoints/117M")          # or any GPT-2 folder in the Hugging Face layout
model.generate("Hello, my name is", max_tokens=32, temperature=0.8, n=2)
model.generate(["a", "b"], max_tokens=[4, 64], sampling_params=gpt2jax.SamplingParams(min_p=0.1))
model.score("The quick brown fox")               # per-token logprobs, first entry None
model.tokenizer.encode("text"), model.tokenizer.decode([464, 2068])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2jax.config import PRESETS, GPT2Config, preset
    from gpt2jax.engine.offline import Completion
    from gpt2jax.lm import LanguageModel, load
    from gpt2jax.sampling_params import SamplingParams
    from gpt2jax.tokenizer import GPT2Tokenizer

__all__ = [
    "PRESETS",
    "Completion",
    "GPT2Config",
    "GPT2Tokenizer",
    "LanguageModel",
    "SamplingParams",
    "load",
    "preset",
]
__version__ = "0.1.0"

# Imported on first use, so that gpt2jax.download (download_model.py) runs with only Python's standard
# library installed: the quickstart downloads a model before `pip install` has brought JAX.
_HOME = {
    "PRESETS": "config",
    "GPT2Config": "config",
    "preset": "config",
    "LanguageModel": "lm",
    "load": "lm",
    "GPT2Tokenizer": "tokenizer",
    "SamplingParams": "sampling_params",
    "Completion": "engine.offline",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    else:  # a submodule not imported yet (`gpt2jax.sharding`), as the eager imports used to provide
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
