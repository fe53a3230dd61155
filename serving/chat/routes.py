"""POST /v1/chat/completions: see serving/chat/template.py for how a conversation becomes GPT-2 text."""

from __future__ import annotations

from functools import partial

from quart import Blueprint, Response

from serving.chat.response import ChatShaper, prepare
from serving.chat.schema import parse_chat
from serving.fanout import start_all
from serving.json_io import json_body, json_response
from serving.sse import sse_response
from serving.state import state

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
@blueprint.post("/chat/completions")
async def chat_completions() -> Response:
    st = state()
    req = parse_chat(await json_body(), st.settings)
    model, engine = st.registry.engine(req.model)
    request = prepare(req, model, engine, st.settings)
    count = partial(st.metrics.count_tokens, model.name)
    shaper = ChatShaper(req, model.name, engine.tokenizer, len(request.prompt), on_usage=count)
    primed = await start_all(engine, [request])
    if req.sampling.stream:
        return sse_response(shaper.chunks(primed))
    return json_response(await shaper.body(primed))
