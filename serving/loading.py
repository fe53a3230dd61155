"""Finding the model folders to serve, building each one's engine, then loading, starting and warming them
in turn."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpt2jax
from gpt2jax.config import GPT2Config
from gpt2jax.engine.api import Engine
from gpt2jax.lm import LanguageModel, resolve_checkpoint
from gpt2jax.sharding import serving_mesh
from serving.chat.template import load_template
from serving.registry import FAILED, READY, WARMING, ModelRegistry, ServedModel
from serving.settings import Settings

log = logging.getLogger("serving")

EngineBuilder = Callable[[LanguageModel, Settings], Engine]

# The repository's own checkpoints/ folder, where a small model ships with the code.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "checkpoints"


class NoModelError(RuntimeError):
    """No model to serve; the message says how to get one."""


class NoModelLoaded(RuntimeError):
    """Every model failed to load: nothing to serve."""


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "hparams.json").is_file())


def discover_models(settings: Settings) -> list[Path]:
    """The folders named by MODELS (names under MODELS_DIR, or paths), else every model under MODELS_DIR,
    else the model(s) shipped in the repository's checkpoints/ folder."""
    if settings.models:
        try:
            return [resolve_checkpoint(name, settings.models_dir) for name in settings.models]
        except FileNotFoundError as e:
            raise NoModelError(str(e)) from None
    root = Path(settings.models_dir)
    found = _models_in(root)
    if not found and SHIPPED_DIR.resolve() != root.resolve():
        found = _models_in(SHIPPED_DIR)  # e.g. gpt2jax-serve started outside the repo
    if not found:
        raise NoModelError(
            f"no model found under {root}/ (MODELS_DIR). Get one with: python3 download_model.py 117M "
            "(or point MODELS at a GPT-2 folder)"
        )
    return found


def _models_in(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if is_model_dir(p)) if root.is_dir() else []


def registry_for(folders: list[Path], settings: Settings) -> ModelRegistry:
    """Served models named after their folders, sized from their configs (for the legacy aliases).

    A folder whose config or chat template cannot be read is kept as a failed model (the others are
    served; /health names it), not an error that stops the server.
    """
    models = []
    for folder in folders:
        try:
            n_params = GPT2Config.from_dir(folder).num_params()
            template = load_template(folder, settings.chat_template)
        except Exception as e:
            log.error("model %s (%s) cannot be served: %s: %s", folder.name, folder, type(e).__name__, e)
            models.append(
                ServedModel(folder.name, path=str(folder), status=FAILED, error=public_error(e, folder))
            )
            continue
        models.append(ServedModel(folder.name, n_params=n_params, path=str(folder), chat_template=template))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise NoModelError(f"two model folders share a name: {names}")
    return ModelRegistry(models, settings.model_aliases)


_ABSOLUTE_PATH = re.compile(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)")


def public_error(error: BaseException, folder: str | Path | None = None) -> str:
    """A load error as /health shows it (no key needed there): type and message, with the model folder
    reduced to its name and any other absolute path to its last part, so no filesystem layout leaks."""
    text = f"{type(error).__name__}: {error}"
    if folder is not None:
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form, Path(folder).name)
    return _ABSOLUTE_PATH.sub(r"\1", text)


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
        kv_cache_dtype=settings.kv_cache_dtype,
    )


async def _call(fn: Callable[..., Any], *args: Any, thread: bool = False, **kwargs: Any) -> Any:
    """Calls a sync or async engine method; slow sync ones go to a thread to keep /health answering."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs) if thread else fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


async def load_all(registry: ModelRegistry, settings: Settings, build: EngineBuilder) -> None:
    """Loads each model, builds and starts its engine, warms it up.

    A model that fails is logged with its traceback, marked failed and left out (the others are served);
    NoModelLoaded if none is ready in the end.
    """
    for m in registry.models.values():
        if m.status in (READY, FAILED):  # given ready (tests, embedding), or its config was unreadable
            continue
        try:
            log.info("loading %s from %s", m.name, m.path)
            model = await asyncio.to_thread(
                gpt2jax.load,
                m.path,
                settings.dtype,
                quantization=settings.quantization,
                mesh=serving_mesh(settings.mesh),
            )
            engine = build(model, settings)
            m.engine, m.status = engine, WARMING
            log.info("warming up %s", m.name)
            # Both in a thread, so that /health keeps answering: warm-up compiles, start allocates the
            # KV cache and starts the engine's worker thread. WARMUP=background: the engine compiles
            # the rest of its programs after /health turns 200 (gpt2jax/engine/warmup.py).
            await _call(engine.warmup, thread=True, **_warmup_options(engine, settings))
            await _call(engine.start, thread=True)
            m.status = READY
            log.info("%s is ready (%s)", m.name, model)
        except Exception as e:
            log.exception("model %s failed to load from %s and is not served", m.name, m.path)
            await _stop_engine(m)
            registry.mark_failed(m.name, public_error(e, m.path))
    if not any(m.status == READY for m in registry.models.values()):
        raise NoModelLoaded(
            "no model could be loaded: " + "; ".join(f"{n}: {m.error}" for n, m in registry.models.items())
        )


def _warmup_options(engine: Engine, settings: Settings) -> dict[str, Any]:
    """background=True for an engine whose warmup takes it (BatchEngine's) when WARMUP=background."""
    takes = "background" in inspect.signature(engine.warmup).parameters
    return {"background": True} if settings.warmup == "background" and takes else {}


async def _stop_engine(m: ServedModel) -> None:
    """Stops (without draining) the engine of a model that failed after its engine was built."""
    stop = getattr(m.engine, "stop", None)
    m.engine = None
    if stop is not None:
        try:
            await _call(stop, drain=False, thread=True)
        except Exception:
            log.exception("stopping the engine of %s", m.name)


async def stop_all(registry: ModelRegistry, drain: bool = True, timeout: float | None = None) -> None:
    """Stops every started engine (after the server has finished its in-flight requests).

    timeout bounds the wait for each engine's worker (a daemon thread: one that hangs is left behind).
    """
    for m in registry.models.values():
        stop = getattr(m.engine, "stop", None)
        if stop is not None:
            try:  # it may block until its worker ends
                await asyncio.wait_for(_call(stop, drain=drain, thread=True), timeout)
            except asyncio.TimeoutError:  # noqa: UP041 (TimeoutError only from Python 3.11)
                log.error("the engine of %s did not stop within %ss; leaving it", m.name, timeout)
            except Exception:
                log.exception("stopping the engine of %s", m.name)
