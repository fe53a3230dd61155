"""Per-app state: the settings, the served models and the metrics, kept in the app's extensions."""

from __future__ import annotations

import dataclasses

from quart import current_app

from serving.health.metrics import Metrics
from serving.registry import ModelRegistry
from serving.settings import Settings

EXTENSION = "gpt2jax"


@dataclasses.dataclass
class ServerState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    draining: bool = False  # set on SIGTERM: /health then answers 503


def state() -> ServerState:
    return current_app.extensions[EXTENSION]
