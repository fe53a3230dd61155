"""GET /v1/models and /v1/models/{id}: the served models, with their context length; and the original
openai-server's GET /v1/engines and /v1/engines/{id}, the same list in its older shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Blueprint, Response

from serving.json_io import json_response
from serving.registry import READY, ServedModel
from serving.state import state

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


def engine_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "engine",
        "owner": model.owner,  # as /v1/models' owned_by
        "ready": model.status == READY,
        "created": model.created,
    }


def listing(shape: Callable[[ServedModel], dict[str, Any]]) -> Response:
    models = state().registry.served()  # a model that failed to load is not listed
    return json_response({"object": "list", "data": [shape(m) for m in models]})


def one(shape: Callable[[ServedModel], dict[str, Any]], name: str) -> Response:
    return json_response(shape(state().registry.resolve(name, param=None)))


@blueprint.get("/v1/models")
@blueprint.get("/models")
async def list_models() -> Response:
    return listing(model_object)


@blueprint.get("/v1/models/<model_id>")
@blueprint.get("/models/<model_id>")
async def get_model(model_id: str) -> Response:
    return one(model_object, model_id)


@blueprint.get("/v1/engines")
@blueprint.get("/engines")
async def list_engines() -> Response:
    return listing(engine_object)


@blueprint.get("/v1/engines/<engine_id>")
@blueprint.get("/engines/<engine_id>")
async def get_engine(engine_id: str) -> Response:
    return one(engine_object, engine_id)
