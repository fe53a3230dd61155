"""gpt2jax: GPT-2 in JAX/Flax.

import gpt2jax
model = gpt2jax.load("checkpoints/117M")          # or any GPT-2 folder in the Hugging Face layout
model.generate("Hello, my name is", max_tokens=32, temperature=0.8, n=2)
model.score("The quick brown fox")               # per-token logprobs, first entry None
model.tokenizer.encode("text"), model.tokenizer.decode([464, 2068])
"""

from gpt2jax.config import PRESETS, GPT2Config, preset
from gpt2jax.lm import LanguageModel, load
from gpt2jax.tokenizer import GPT2Tokenizer

__all__ = ["PRESETS", "GPT2Config", "GPT2Tokenizer", "LanguageModel", "load", "preset"]
__version__ = "0.1.0"
