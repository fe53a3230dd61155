"""The Quart app factory: `create_app(settings, engines)` wires routes, errors, keys, CORS, metrics, logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from quart import Quart, g, request
from quart.wrappers import Response

from gpt2jax.engine.api import Engine
from serving import auth, cors, openapi
from serving.chat import routes as chat
from serving.completions import routes as completions
from serving.engine_completions import routes as engine_completions
from serving.errors import register_error_handlers
from serving.health import routes as health
from serving.health.metrics import Metrics
from serving.models import routes as models
from serving.playground import register_playground
from serving.registry import ModelRegistry
from serving.settings import Settings
from serving.state import EXTENSION, ServerState
from serving.tokenization import routes as tokenization

access_log = logging.getLogger("serving.access")
BODY_TIMEOUT = 30  # seconds a request body may take to arrive (a client that stalls mid-body gets 408)

BLUEPRINTS = (engine_completions, completions, chat, models, tokenization, health, openapi)


def create_app(settings: Settings, engines: ModelRegistry | Mapping[str, Engine]) -> Quart:
    """An app serving `engines`: a ModelRegistry (models may still be loading) or name -> ready Engine."""
    registry = (
        engines
        if isinstance(engines, ModelRegistry)
        else ModelRegistry.from_engines(engines, settings.model_aliases)
    )
    app = Quart("gpt2jax", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    # Non-streaming generations can take a while; streams turn the timeout off themselves.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    metrics = Metrics()
    app.extensions[EXTENSION] = ServerState(settings, registry, metrics)

    metrics.install(app)  # first, so that its timer starts before any other check
    _install_access_log(app)
    cors.install(app, settings.cors_origins)
    auth.install(app, settings.api_keys)
    register_error_handlers(app)
    for module in BLUEPRINTS:
        app.register_blueprint(module.blueprint)
    register_playground(app)  # GET / and its /static/ assets
    return app


def _install_access_log(app: Quart) -> None:
    """One line per request: method, path (no query string: it may hold a prompt), status, time.

    Headers are never logged, so neither are API keys.
    """

    @app.before_request
    async def _start() -> None:
        g.access_start = time.perf_counter()

    @app.after_request
    async def _log(response: Response) -> Response:
        ms = (time.perf_counter() - g.get("access_start", time.perf_counter())) * 1000
        access_log.info(
            "%s %s %s %d %.1fms", request.remote_addr, request.method, request.path, response.status_code, ms
        )
        return response
