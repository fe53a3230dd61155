"""Schemathesis hooks for fuzzing the API (loaded by `benchmarks/fuzz_api.py` through SCHEMATHESIS_HOOKS).

- the check `openai_error_envelope`: every error response (4xx/5xx) is JSON of exactly OpenAI's shape,
  `{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`, and carries no
  traceback or HTML;
- a tally of the statuses answered, written as JSON to $FUZZ_STATS_FILE when the run ends.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
from typing import Any

import schemathesis

STATUSES: collections.Counter[int] = collections.Counter()


def envelope_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why an error response is not OpenAI's envelope, or None if it is (pure: also used by tests)."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"{status} with Content-Type {content_type!r}"
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(error, dict):
        return f"{status}: not {{'error': {{...}}}}: {payload!r:.300}"
    if set(error) != {"message", "type", "param", "code"}:
        return f"{status}: error keys {sorted(error)}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"{status}: message/type not non-empty strings: {error!r:.300}"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"{status}: param/code neither string nor null: {error!r:.300}"
    if b"Traceback" in body or b"<html" in body.lower():
        return f"{status}: a traceback or HTML in the body"
    return None


@schemathesis.check
def openai_error_envelope(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
):
    STATUSES[response.status_code] += 1
    problem = envelope_problem(
        response.status_code, response.headers.get("content-type", [""])[0], response.content
    )
    if problem:
        raise AssertionError(f"response outside the OpenAI error envelope: {problem}")
    return None


def _write_stats() -> None:
    path = os.environ.get("FUZZ_STATS_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({str(k): v for k, v in sorted(STATUSES.items())}, f)


atexit.register(_write_stats)
