"""`python -m serving` over several processes: process 0 serves HTTP with engines that broadcast their
device calls (gpt2jax/engine/multihost.py); the other processes load the same models and follow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpt2jax.cluster import Cluster
from gpt2jax.engine.multihost import follow, lead
from gpt2jax.engine.wire import Channel

log = logging.getLogger("serving.multihost")


def run(
    settings: Any,
    registry: Any,
    serve_http: Callable[[Callable[..., Any]], int],
    startup_timeout: int = Cluster.startup_timeout,
) -> int:
    """Process 0: serve_http(build) with engines that broadcast their calls; the others: follow them."""
    from serving.loading import build_engine

    channel = Channel(startup_timeout=startup_timeout)
    if not channel.is_leader:
        return run_follower(settings, registry, channel)
    names = list(registry.models)

    def build(model: Any, settings: Any) -> Any:
        return lead(build_engine(model, settings), names.index(model.name), channel)

    log.info(
        "process 0 of %d: serving %s on http://%s:%d; the other processes follow",
        channel.processes,
        ", ".join(names),
        settings.host,
        settings.port,
    )
    channel.start_heartbeat()
    try:
        return serve_http(build)
    finally:
        channel.stop()


def run_follower(settings: Any, registry: Any, channel: Channel) -> int:
    """Loads and warms up the same models as process 0, then follows its calls until it stops."""
    import signal

    import gpt2jax
    from gpt2jax.sharding import serving_mesh
    from serving.loading import build_engine

    def note(signum: int, _frame: Any) -> None:  # process 0 decides when the SPMD program ends
        log.info("signal %d: leaving when process 0 stops", signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
    programs = []
    for m in registry.models.values():
        model = gpt2jax.load(
            m.path, settings.dtype, quantization=settings.quantization, mesh=serving_mesh(settings.mesh)
        )
        engine = build_engine(model, settings)
        engine.warmup()
        programs.append(engine.programs)
        log.info("%s is ready to follow process 0 (%s)", m.name, model)
    follow(programs, channel)
    return 0
