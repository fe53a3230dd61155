"""Server-sent events: `data: {json}` blocks, `data: [DONE]` at the end, errors as a last data event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from quart import Response

from gpt2jax.engine.api import EngineError, EngineOverloaded
from serving.errors import APIError, from_engine_error, internal_error

log = logging.getLogger("serving")

DONE = b"data: [DONE]\n\n"


def encode(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield encode(chunk)
    except APIError as e:
        # The status line is long gone: the error travels in the stream, which clients raise on.
        yield encode(e.body())
    except (EngineError, EngineOverloaded) as e:
        yield encode(from_engine_error(e).body())
    except Exception:
        log.exception("error while streaming")
        yield encode(internal_error().body())
    finally:
        # Also on a client that went away: closing the chunks closes the engine streams behind them.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield DONE


def sse_response(chunks: AsyncIterator[dict[str, Any]]) -> Response:
    """A streaming response of `chunks`; no timeout, since a long generation is not a hung client."""
    response = Response(
        _events(chunks),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None
    return response
