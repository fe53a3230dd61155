"""POST /v1/completions, and the handler the legacy engines routes share with it."""

from __future__ import annotations

from functools import partial
from typing import Any

from quart import Blueprint, Response

from serving.completions.response import CompletionShaper, start, tokenize_prompts
from serving.completions.schema import parse_completion
from serving.json_io import json_body, json_response
from serving.sse import sse_response
from serving.state import state

blueprint = Blueprint("completions", __name__)


async def complete(body: dict[str, Any], *, truncate: bool) -> Response:
    """Validates, runs and answers a completions request; `body["model"]` names the model.

    truncate: cut over-long prompts to their last n_ctx - max_tokens tokens (the legacy routes) rather
    than answering 400.
    """
    st = state()
    req = parse_completion(body, st.settings)
    model, engine = st.registry.engine(req.model)
    jobs = tokenize_prompts(req, engine, truncate=truncate)
    count = partial(st.metrics.count_tokens, model.name)
    shaper = CompletionShaper(req, model.name, engine.tokenizer, jobs, on_usage=count)
    primed = await start(engine, req, jobs)
    if req.sampling.stream:
        return sse_response(shaper.chunks(primed))
    return json_response(await shaper.body(primed))


@blueprint.post("/v1/completions")
@blueprint.post("/completions")
async def completions() -> Response:
    return await complete(await json_body(), truncate=False)
