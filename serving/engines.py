"""Builds the serving engine for a loaded model: the one place that names the engine class."""

from __future__ import annotations

import importlib

from gpt2jax.lm import LanguageModel
from serving.engine_api import Engine
from serving.settings import Settings


def build_engine(model: LanguageModel, settings: Settings) -> Engine:
    """The continuous-batching engine (serving/engine.py) for `model`, not yet started."""
    try:
        module = importlib.import_module("serving.engine")  # lazily: it pulls in the jitted programs
    except ModuleNotFoundError as e:
        if e.name != "serving.engine":
            raise
        raise NotImplementedError(
            "serving/engine.py (the batching engine) is not in this tree yet; "
            "the HTTP layer needs an Engine (serving/engine_api.py)"
        ) from e
    return module.BatchEngine.from_model(model)
