"""POST /tokenize and /detokenize (vLLM's shapes): the model's own tokenizer over HTTP."""

from __future__ import annotations

from quart import Blueprint, Response

from serving.fanout import check_token_ids
from serving.fields import Field, parse_fields, string, token_ids
from serving.json_io import json_body, json_response
from serving.limits import check_prompt_text
from serving.state import state

blueprint = Blueprint("tokenize", __name__)

_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}}

TOKENIZE_FIELDS = (
    string("model", None, "A served model id or alias; default: the first served model."),
    string("prompt", None, "The text to tokenize.", required=True),
)
DETOKENIZE_FIELDS = (
    string("model", None, "A served model id or alias; default: the first served model."),
    Field("tokens", _IDS_SCHEMA, token_ids, None, "Token ids to turn back into text.", required=True),
)


def _engine(name: str | None):
    registry = state().registry
    return registry.engine(name or registry.first().name)


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    v = parse_fields(await json_body(), TOKENIZE_FIELDS)
    model, engine = _engine(v["model"])
    check_prompt_text(v["prompt"], engine, "prompt", code="prompt_too_long")
    ids = engine.tokenizer.encode(v["prompt"])
    return json_response(
        {
            "model": model.name,
            "tokens": ids,
            "token_strs": [engine.tokenizer.token_str(i) for i in ids],
            "count": len(ids),
            "max_model_len": engine.n_ctx,
        }
    )


@blueprint.post("/detokenize")
async def detokenize() -> Response:
    v = parse_fields(await json_body(), DETOKENIZE_FIELDS)
    model, engine = _engine(v["model"])
    check_token_ids(engine, v["tokens"], "tokens")
    return json_response({"model": model.name, "prompt": engine.tokenizer.decode(v["tokens"])})
