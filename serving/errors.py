"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure, never HTML."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from gpt2jax.engine.api import EngineError, EngineOverloaded

log = logging.getLogger("serving")

# OpenAI's error `type` for each status we answer with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "server_overloaded",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to send to the client as it is: status, message, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    """A 400 about one request field."""
    return APIError(400, message, param=param, code=code)


def from_engine_error(error: Exception) -> APIError:
    """Maps the engine's exceptions to HTTP errors: overloaded is 429, a refused request 400."""
    if isinstance(error, EngineOverloaded):
        message = str(error) or "The server is overloaded; please retry later."
        return APIError(429, message, code="overloaded", headers={"Retry-After": "1"})
    if isinstance(error, EngineError):
        return APIError(400, str(error) or "The request cannot be served.", code="invalid_request")
    return internal_error()


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


def error_response(error: APIError) -> Response:
    response = Response(
        json.dumps(error.body(), indent=2), status=error.status, content_type="application/json"
    )
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _http_messages(e: HTTPException) -> APIError:
    status = e.code or 500
    if status == 404:
        return APIError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    if status == 405:
        allowed = getattr(e, "valid_methods", None) or []
        headers = {"Allow": ", ".join(allowed)} if allowed else None
        return APIError(
            405,
            f"Method {request.method} is not allowed on {request.path}",
            code="method_not_allowed",
            headers=headers,
        )
    if status == 413:
        limit = request.max_content_length
        return APIError(413, f"Request body too large (limit: {limit} bytes)", code="request_too_large")
    if status >= 500:
        return internal_error()
    return APIError(status, e.description or e.name, code=e.name.lower().replace(" ", "_"))


def register_error_handlers(app: Quart) -> None:
    """Every error becomes the envelope; unexpected exceptions are logged with traceback, not sent."""

    @app.errorhandler(APIError)
    async def _api_error(e: APIError) -> Response:
        return error_response(e)

    @app.errorhandler(EngineOverloaded)
    @app.errorhandler(EngineError)
    async def _engine_error(e: Exception) -> Response:
        return error_response(from_engine_error(e))

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException) -> Response:
        return error_response(_http_messages(e))

    @app.errorhandler(Exception)
    async def _unexpected(e: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(internal_error())
