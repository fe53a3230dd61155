"""CORS, as the original server enabled it: allowed origins from CORS_ORIGINS ("*" by default)."""

from __future__ import annotations

from collections.abc import Sequence

from quart import Quart, Response, request

ALLOWED_METHODS = "GET, POST, OPTIONS"
DEFAULT_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project"


def allowed_origin(origin: str, origins: Sequence[str]) -> str | None:
    """The Access-Control-Allow-Origin value for a request from `origin`, or None."""
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def install(app: Quart, origins: Sequence[str]) -> None:
    """Answers preflights (before any key check) and marks responses to allowed origins."""
    if not origins:
        return
    origins = tuple(origins)

    @app.before_request
    async def _preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response("", status=204)
        allow = allowed_origin(request.headers.get("Origin", ""), origins)
        if allow is not None:
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            requested = request.headers.get("Access-Control-Request-Headers")
            response.headers["Access-Control-Allow-Headers"] = requested or DEFAULT_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.after_request
    async def _mark(response: Response) -> Response:
        origin = request.headers.get("Origin")
        allow = allowed_origin(origin, origins) if origin else None
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            if allow != "*":
                response.headers.add("Vary", "Origin")
        return response
