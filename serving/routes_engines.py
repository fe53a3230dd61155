"""The original openai-server's routes: /v1/engines and /v1/engines/{id}/completions (GET or POST).

The same routes answer without the /v1 prefix, since the original README points the legacy `openai` CLI
at the bare host and that CLI then calls /engines/... . On these routes a prompt too long for the
context is cut to its last n_ctx - max_tokens tokens, as the original did, instead of a 400.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from serving.context import check_text, json_body, json_response, state
from serving.fields import coerce_query
from serving.registry import READY, ServedModel
from serving.routes_completions import complete
from serving.schemas import COMPLETION_FIELDS

blueprint = Blueprint("engines", __name__)


def engine_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "engine",
        "owner": model.owner,  # as /v1/models' owned_by
        "ready": model.status == READY,
        "created": model.created,
    }


@blueprint.get("/v1/engines")
@blueprint.get("/engines")
async def list_engines() -> Response:
    models = state().registry.served()  # a model that failed to load is not listed
    return json_response({"object": "list", "data": [engine_object(m) for m in models]})


@blueprint.get("/v1/engines/<engine_id>")
@blueprint.get("/engines/<engine_id>")
async def get_engine(engine_id: str) -> Response:
    return json_response(engine_object(state().registry.resolve(engine_id, param=None)))


@blueprint.route("/v1/engines/<engine_id>/completions", methods=["GET", "POST"])
@blueprint.route("/engines/<engine_id>/completions", methods=["GET", "POST"])
async def engine_completions(engine_id: str) -> Response:
    """GET takes the parameters from the query string (so the URL can be opened in a browser)."""
    if request.method == "POST" and (await request.get_data(cache=True)).strip():
        body = await json_body()
    else:
        body = coerce_query(request.args.to_dict(flat=False), COMPLETION_FIELDS)
        check_text(body)  # JSON text in the query may hold lone surrogates
    body["model"] = engine_id  # the engine in the path wins over a model in the body
    return await complete(body, truncate=True)
