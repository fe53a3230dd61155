"""`python -m serving` / `gpt2jax-serve`: load the models, warm them up, serve the API under Hypercorn.

The server listens at once (/health answers 503 until every model is warm). SIGTERM or SIGINT: stop
accepting, finish the in-flight requests (up to GRACEFUL_TIMEOUT seconds), stop the engines, exit 0.
Settings come from the environment (see serving/settings.py and README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from gpt2jax.cluster import Cluster, ClusterError, initialize
from gpt2jax.engine.heap import limit_heap_arenas
from serving import multihost
from serving.app import create_app
from serving.loading import (
    EngineBuilder,
    NoModelError,
    build_engine,
    discover_models,
    load_all,
    registry_for,
    stop_all,
)
from serving.registry import ModelRegistry
from serving.server import run_server
from serving.settings import Settings, SettingsError
from serving.state import EXTENSION

log = logging.getLogger("serving")


async def serve(
    settings: Settings,
    registry: ModelRegistry,
    build: EngineBuilder = build_engine,
    *,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Serves until `stop` is set (or SIGTERM/SIGINT); returns the exit status (1 if a model failed)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    app = create_app(settings, registry)
    failed = False

    async def load() -> None:
        nonlocal failed
        try:
            await load_all(registry, settings, build)
        except Exception:
            log.exception("could not load the models; shutting down")
            failed = True
            stop.set()

    async def shutdown_trigger() -> None:
        await stop.wait()
        app.extensions[EXTENSION].draining = True
        log.info("shutting down: finishing in-flight requests (up to %ss)", settings.graceful_timeout)

    loader = asyncio.create_task(load())
    try:
        await run_server(app, settings, shutdown_trigger, sock)
    finally:
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await stop_all(registry, drain=True, timeout=settings.graceful_timeout + 10)
    return 1 if failed else 0


def exposure_warning(settings: Settings) -> str | None:
    """A warning when the API is open to the network: every interface bound and no API key set."""
    if settings.binds_all_interfaces and not settings.api_keys:
        return f"HOST={settings.host} serves every network interface with no API key: set API_KEYS"
    return None


def parse_args(argv: Sequence[str] | None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="gpt2jax-serve",
        description="Serve GPT-2 behind the OpenAI API. Settings come from the environment (MODELS, "
        "MODELS_DIR, HOST, PORT, MAX_TOKENS, MAX_N, API_KEYS, API_KEYS_FILE, CORS_ORIGINS, MODEL_ALIASES, "
        "CHAT_TEMPLATE, ...; see README.md); these options override them.",
    )
    parser.add_argument("--models", help="comma list of model names or folders (MODELS)")
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="port (PORT, default 9000)")
    args = parser.parse_args(argv)
    return {k.upper(): v for k, v in vars(args).items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    limit_heap_arenas()  # before JAX starts its threads
    env = dict(os.environ) | parse_args(argv)
    try:
        settings = Settings.from_env(env)
        cluster = Cluster.from_env(env)
    except (SettingsError, ClusterError) as e:
        print(f"gpt2jax-serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cluster.enabled:  # several processes, one SPMD program: join before anything touches a device
        initialize(cluster)
    try:
        registry = registry_for(discover_models(settings), settings)
    except (NoModelError, ValueError) as e:
        print(f"gpt2jax-serve: {e}", file=sys.stderr)
        return 1
    warning = exposure_warning(settings)
    if warning:
        log.warning(warning)
    if cluster.enabled:  # process 0 serves HTTP and drives the others (gpt2jax/engine/multihost.py)
        # Every program compiled before the first collective (see multihost's docstring).
        settings = dataclasses.replace(settings, warmup="all")
        serve_http = lambda build: asyncio.run(serve(settings, registry, build))
        return multihost.run(settings, registry, serve_http, cluster.startup_timeout)
    log.info("serving %s on http://%s:%d", ", ".join(registry.models), settings.host, settings.port)
    return asyncio.run(serve(settings, registry))


if __name__ == "__main__":
    sys.exit(main())
