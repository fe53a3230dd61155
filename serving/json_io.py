"""The JSON in and out of every route: the request body as a JSON object, the pretty-printed response."""

from __future__ import annotations

import json
import re
from typing import Any

from quart import Response, request

from serving.errors import APIError

# A JSON escape of a UTF-16 surrogate: valid in pairs (emoji), not text alone.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


async def json_body() -> dict[str, Any]:
    """The request body as a JSON object (whatever the Content-Type: old clients send none)."""
    raw = await request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: werkzeug's 413
    if not raw.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The API expects a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then the (slower) full check
        check_text(body)
    return body


def check_text(values: Any) -> None:
    """400 if any string in `values` holds a lone UTF-16 surrogate (JSON's "\\ud800"): not text, and
    the tokenizer cannot take it (it was a 500)."""
    try:
        json.dumps(values, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400,
            "The request has a string with a lone UTF-16 surrogate (e.g. \\ud800), which is not text.",
            code="invalid_json",
        ) from None


def json_response(payload: Any, status: int = 200) -> Response:
    """Pretty-printed JSON, as the original server sent (its URLs were meant to be opened in a browser)."""
    return Response(json.dumps(payload, indent=2) + "\n", status=status, content_type="application/json")
