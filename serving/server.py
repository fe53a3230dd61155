"""Running the app under Hypercorn until a shutdown trigger fires, then draining in-flight requests."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from serving.send_timeout import SendTimeout
from serving.settings import Settings


def hypercorn_config(settings: Settings, sock: socket.socket | None = None) -> Config:
    """Binds HOST:PORT, or takes over an already bound socket (tests bind port 0 and read the port back).

    A socket given is handed over to Hypercorn (detached): closing it is then Hypercorn's business, so
    that on shutdown the port stops accepting connections at once.
    """
    config = Config()
    bare = settings.host.strip("[]")
    host = f"[{bare}]" if ":" in bare else bare
    config.bind = [f"fd://{sock.detach()}"] if sock is not None else [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.graceful_timeout  # in-flight requests get this long after SIGTERM
    config.accesslog = None  # the app logs requests itself, without query strings or headers
    config.errorlog = "-"
    # A connection that sends nothing, or headers that never end, is closed after this (slowloris).
    config.keep_alive_timeout = 5
    return config


async def run_server(
    app: Quart,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[None]],
    sock: socket.socket | None = None,
) -> None:
    """Serves until `shutdown_trigger` returns; then stops accepting and waits for in-flight requests."""
    # Each write to a client is bounded (Hypercorn has no write timeout): see serving/send_timeout.py.
    await serve(SendTimeout(app), hypercorn_config(settings, sock), shutdown_trigger=shutdown_trigger)
