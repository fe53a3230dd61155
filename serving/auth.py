"""API keys: when any are configured, every route but the open ones needs `Authorization: Bearer KEY`."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from quart import Quart, request

from serving.errors import APIError

# Health checks and the playground page (which asks for a key itself) need no key.
OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/static/",)


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would time which one matched)."""
    given_b = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_b, key.encode())
    return found


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="gpt2jax"'})


def install(app: Quart, keys: Sequence[str]) -> None:
    """Checks the key before every request (CORS preflights are answered earlier, without one)."""
    if not keys:
        return
    keys = tuple(keys)

    @app.before_request
    async def _check_key() -> None:
        path = request.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or request.method == "OPTIONS":
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized(
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY).",
                "missing_api_key",
            )
        if not key_matches(given.strip(), keys):
            raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
