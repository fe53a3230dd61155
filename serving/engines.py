"""Builds the serving engine for a loaded model: the one place that names the engine class."""

from __future__ import annotations

from gpt2jax.engine.api import Engine
from gpt2jax.lm import LanguageModel
from serving.settings import Settings


def build_engine(model: LanguageModel, settings: Settings) -> Engine:
    """gpt2jax.engine.engine's continuous-batching engine for `model`, not yet warmed up or started.

    Imported here, not at the top: it pulls in the engine's jitted programs, which tests of the HTTP
    layer (over fake engines) never need. JAX's persistent compilation cache is turned on, so that a
    restarted server loads its compiled programs from disk ($JAX_CACHE_DIR, else ~/.cache/gpt2jax/jax).
    """
    from gpt2jax.engine.engine import BatchEngine, enable_compilation_cache

    enable_compilation_cache()
    return BatchEngine.from_model(
        model,
        slots=settings.slots,
        chunk_size=settings.chunk_size,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        batch_invariant=settings.batch_invariant,
    )
