"""The OpenAPI 3.1 description of every route, built from the same field tables the validation uses.

`python -m serving.openapi [FILE]` writes it as static JSON (docs/openapi.json is made this way);
the server answers it at GET /openapi.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from quart import Blueprint, Response

import gpt2jax
from serving.chat.schema import CHAT_FIELDS
from serving.completions.schema import COMPLETION_FIELDS
from serving.fields import Field
from serving.tokenization.routes import DETOKENIZE_FIELDS, TOKENIZE_FIELDS

blueprint = Blueprint("openapi", __name__)

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_LOGPROBS = {
    "type": ["object", "null"],
    "description": "Legacy shape; with echo the prompt tokens come first, the first one's logprob null.",
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
        "top_logprobs": {"type": "array", "items": {"type": ["object", "null"]}},
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}
_USAGE = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


_HEAD = {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"}}
_HEAD["model"] = {"type": "string"}
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", None]}
COMPONENTS = {
    "Error": _ERROR,
    "Usage": _USAGE,
    "Completion": _obj(
        **_HEAD,
        choices={
            "type": "array",
            "items": _obj(
                text={"type": "string"}, index={"type": "integer"}, logprobs=_LOGPROBS, finish_reason=_FINISH
            ),
        },
        usage={"$ref": "#/components/schemas/Usage"},
    ),
    "ChatCompletion": _obj(
        **_HEAD,
        choices={
            "type": "array",
            "items": _obj(
                index={"type": "integer"},
                message=_obj(role={"type": "string"}, content={"type": "string"}),
                delta=_obj(role={"type": "string"}, content={"type": "string"}),
                logprobs={
                    "type": ["object", "null"],
                    "description": "{content: [{token, logprob, bytes, top_logprobs}]}",
                },
                finish_reason=_FINISH,
            ),
            "description": "`message` in chat.completion, `delta` in chat.completion.chunk (streaming).",
        },
        usage={"$ref": "#/components/schemas/Usage"},
    ),
    "Model": _obj(
        id={"type": "string"},
        object={"const": "model"},
        created={"type": "integer"},
        owned_by={"type": "string"},
        context_length={"type": ["integer", "null"]},
        max_model_len={"type": ["integer", "null"]},
        status={"type": "string", "enum": ["loading", "warming", "ready", "failed"]},
    ),
    "Engine": _obj(
        id={"type": "string"},
        object={"const": "engine"},
        owner={"type": "string"},
        ready={"type": "boolean"},
        created={"type": "integer"},
    ),
    "Health": _obj(
        status={"type": "string", "enum": ["ok", "degraded", "loading", "failed", "draining"]}, models=_obj()
    ),
}
for _name in ("Model", "Engine"):
    COMPONENTS[_name + "List"] = _obj(
        object={"const": "list"}, data={"type": "array", "items": {"$ref": f"#/components/schemas/{_name}"}}
    )


def body_schema(fields: Sequence[Field]) -> dict[str, Any]:
    """A request body's JSON schema; every field may also be null, meaning "not set"."""
    props = {}
    for f in fields:
        schema = dict(f.schema)
        # null means "not set", which a required field cannot be
        options = [schema] if f.required else [schema, {"type": "null"}]
        props[f.name] = {"anyOf": options, "description": f.doc}
        if f.schema.get("type") in ("integer", "number", "boolean", "string") and f.default is not None:
            props[f.name]["default"] = f.default
    required = [f.name for f in fields if f.required]
    return {"type": "object", "properties": props, "required": required}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERROR_STATUSES = {
    "400": "Invalid JSON, type or value",
    "401": "Missing or wrong API key",
    "404": "Unknown model or route",
    "413": "Body larger than MAX_BODY_BYTES",
    "429": "The engine is overloaded",
    "503": "The model is still loading",
}
ERROR_RESPONSES = {
    code: {"description": why, "content": {"application/json": {"schema": _ref("Error")}}}
    for code, why in _ERROR_STATUSES.items()
}


def _responses(ok: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ok}}
    if stream:
        # OpenAPI 3.1 has no item schema for streams: `schema` describes one event, as tools read it.
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string"}},
                "description": "One server-sent event: `data: {chunk}` (a JSON chunk, or an error envelope "
                "after the stream started), the last one `data: [DONE]`",
            }
        }
    out: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    out |= {code: {"$ref": f"#/components/responses/{code}"} for code in _ERROR_STATUSES}
    return out


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body=None,
    query=(),
    stream=False,
    path_param=None,
    body_required=True,
):
    """One operation; body names a request schema in components, query lists fields taken from the URL."""
    op: dict[str, Any] = {"summary": summary, "responses": _responses(ok, stream)}
    params = []
    if path_param:
        params.append({"name": path_param, "in": "path", "required": True, "schema": {"type": "string"}})
    params += [{"name": f.name, "in": "query", "schema": f.schema, "description": f.doc} for f in query]
    if body:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if params:
        op["parameters"] = params
    return op


REQUEST_BODIES = {
    "CompletionRequest": COMPLETION_FIELDS,
    "LegacyCompletionRequest": tuple(f for f in COMPLETION_FIELDS if f.name != "model"),
    "ChatCompletionRequest": CHAT_FIELDS,
    "TokenizeRequest": TOKENIZE_FIELDS,
    "DetokenizeRequest": DETOKENIZE_FIELDS,
}


def build_spec() -> dict[str, Any]:
    legacy_fields = REQUEST_BODIES["LegacyCompletionRequest"]
    eng = "engine_id"
    paths: dict[str, dict[str, Any]] = {
        "/v1/completions": {
            "post": _op("Create a completion", _ref("Completion"), body="CompletionRequest", stream=True)
        },
        "/v1/chat/completions": {
            "post": _op(
                "Create a chat completion (transcript template)",
                _ref("ChatCompletion"),
                body="ChatCompletionRequest",
                stream=True,
            )
        },
        "/v1/models": {"get": _op("List the served models", _ref("ModelList"))},
        "/v1/models/{model_id}": {
            "get": _op("A served model (by id or alias)", _ref("Model"), path_param="model_id")
        },
        "/v1/engines": {"get": _op("List the served models as legacy engines", _ref("EngineList"))},
        "/v1/engines/{engine_id}": {"get": _op("A legacy engine", _ref("Engine"), path_param=eng)},
        "/v1/engines/{engine_id}/completions": {
            "get": _op(
                "Legacy completion, parameters in the query string",
                _ref("Completion"),
                query=legacy_fields,
                stream=True,
                path_param=eng,
            ),
            "post": _op(
                "Legacy completion; over-long prompts keep their last n_ctx - max_tokens tokens",
                _ref("Completion"),
                body="LegacyCompletionRequest",
                stream=True,
                path_param=eng,
                body_required=False,  # as the original: an empty POST is a completion with the defaults
            ),
        },
    }
    for path in list(paths):  # every /v1 route also answers without the prefix (the legacy CLI's base URL)
        paths[path[3:]] = {
            m: op | {"summary": op["summary"] + f" (same as {path})"} for m, op in paths[path].items()
        }
    paths["/tokenize"] = {
        "post": _op(
            "Tokenize text", _obj(tokens={"type": "array"}, count={"type": "integer"}), body="TokenizeRequest"
        )
    }
    paths["/detokenize"] = {
        "post": _op("Token ids to text", _obj(prompt={"type": "string"}), body="DetokenizeRequest")
    }
    paths["/health"] = {
        "get": {
            "summary": "200 when every model is loaded and warm (ok), or the others are while some failed to load "
            "(degraded), else 503 (no API key needed)",
            "responses": {
                "200": {
                    "description": "ok or degraded",
                    "content": {"application/json": {"schema": _ref("Health")}},
                },
                "503": {
                    "description": "loading, failed or draining",
                    "content": {"application/json": {"schema": _ref("Health")}},
                },
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (text format)",
            "responses": {"200": {"description": "OK", "content": {"text/plain": {}}}},
        }
    }
    paths["/"] = {
        "get": {
            "summary": "The playground page (no API key needed)",
            "responses": {"200": {"description": "HTML"}},
        }
    }
    paths["/static/{filename}"] = {
        "get": {
            "summary": "The playground's assets",
            "parameters": [
                {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "CSS or JavaScript"},
                "404": {"$ref": "#/components/responses/404"},
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpt2jax",
            "version": gpt2jax.__version__,
            "description": "GPT-2 behind OpenAI's completions, chat and legacy engines API. When API keys are "
            "set, every route but /health, / and /static/ needs `Authorization: Bearer KEY`. Fields set to null "
            "count as unset.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": COMPONENTS | {name: body_schema(fields) for name, fields in REQUEST_BODIES.items()},
            "responses": ERROR_RESPONSES,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    return Response(json.dumps(build_spec(), indent=2), content_type="application/json")


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(build_spec(), indent=2) + "\n"
    if argv:
        with open(argv[0], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
