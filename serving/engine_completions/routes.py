"""The original openai-server's completions route: /v1/engines/{id}/completions (GET or POST); its
/v1/engines list is with /v1/models (serving/models/).

The same routes answer without the /v1 prefix, since the original README points the legacy `openai` CLI
at the bare host and that CLI then calls /engines/... . On these routes a prompt too long for the
context is cut to its last n_ctx - max_tokens tokens, as the original did, instead of a 400.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from serving.completions.routes import complete
from serving.completions.schema import COMPLETION_FIELDS
from serving.fields import coerce_query
from serving.json_io import check_text, json_body

blueprint = Blueprint("engines", __name__)


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
