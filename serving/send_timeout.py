"""A time limit on each write to a client: a reader that accepts nothing for that long is cut off.

Hypercorn waits on a full socket buffer without limit, so a client that opens a stream (or asks for a
large answer) and then never reads would hold its connection and request task forever. This ASGI
wrapper bounds each `send` of a response: past the limit the request fails and Hypercorn closes the
connection. A slow reader that keeps reading is not affected (each send completes as soon as the
socket takes the bytes), nor is a long generation (the time between sends is not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("serving")

SEND_TIMEOUT = 60.0  # seconds one write to a client may wait for it to read


class ClientStalled(Exception):
    """The client accepted none of a response's bytes for SEND_TIMEOUT seconds."""


class SendTimeout:
    """Wraps an ASGI app so that every HTTP `send` must finish within `timeout` seconds."""

    def __init__(self, app: Any, timeout: float | None = None) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = SEND_TIMEOUT if self.timeout is None else self.timeout  # read at call time (tests lower it)

        async def bounded_send(message: dict) -> None:
            try:
                await asyncio.wait_for(send(message), limit)
            except asyncio.TimeoutError:  # noqa: UP041 (TimeoutError only from Python 3.11)
                log.warning(
                    "%s %s: the client read nothing for %ss; closing", scope["method"], scope["path"], limit
                )
                raise ClientStalled(f"no write accepted in {limit} s") from None

        # Left unfinished, the response ends with Hypercorn closing the connection (and no traceback logged).
        with contextlib.suppress(ClientStalled):
            await self.app(scope, receive, bounded_send)
