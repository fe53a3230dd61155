"""GET /health (503 until every model is loaded and warm, and again while draining) and GET /metrics."""

from __future__ import annotations

from quart import Blueprint, Response

from serving.json_io import json_response
from serving.registry import READY
from serving.state import state

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    """ok: every model ready; degraded: the others are ready but some failed to load (200 too, since
    the good ones serve); loading, failed (none could be loaded) and draining: 503."""
    st = state()
    registry = st.registry
    models = registry.status()
    if st.draining:
        status = "draining"
    elif registry.all_ready:
        status = "ok"
    elif not registry.all_settled:
        status = "loading"
    elif any(m.status == READY for m in registry.models.values()):
        status = "degraded"
    else:
        status = "failed"
    return json_response({"status": status, "models": models}, 200 if status in ("ok", "degraded") else 503)


@blueprint.get("/metrics")
async def metrics() -> Response:
    st = state()
    for model in st.registry.models.values():
        st.metrics.ready.labels(model.name).set(1 if model.status == READY else 0)
    return Response(st.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
