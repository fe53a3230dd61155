"""GET /v1/models and /v1/models/{id}: the served models, with their context length."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from serving.context import json_response, state
from serving.registry import ServedModel

blueprint = Blueprint("models", __name__)


def model_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": model.owner,  # "openai" for OpenAI's GPT-2 only (registry.owner_of)
        "context_length": model.n_ctx,  # None until the model is loaded
        "max_model_len": model.n_ctx,  # the name vLLM uses, which some clients read
        "status": model.status,
    }


@blueprint.get("/v1/models")
@blueprint.get("/models")
async def list_models() -> Response:
    models = state().registry.served()  # a model that failed to load is not listed
    return json_response({"object": "list", "data": [model_object(m) for m in models]})


@blueprint.get("/v1/models/<model_id>")
@blueprint.get("/models/<model_id>")
async def get_model(model_id: str) -> Response:
    return json_response(model_object(state().registry.resolve(model_id, param=None)))
