"""Prometheus metrics of the HTTP layer, in a registry per app (tests build many apps in one process).

`/metrics` shows this registry followed by prometheus_client's default one, where the process
collectors (and any engine that registers there) live.
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from quart import Quart, g, request
from quart.wrappers import Response


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gpt2jax_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gpt2jax_http_request_seconds",
            "Seconds from request to response headers (a stream's body is not included), by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.02, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter(
            "gpt2jax_tokens",
            "Tokens processed, by model and kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "gpt2jax_model_ready", "1 when the model is loaded and warm.", ["model"], registry=self.registry
        )

    def count_tokens(self, model: str, usage: dict[str, int]) -> None:
        self.tokens.labels(model, "prompt").inc(usage.get("prompt_tokens", 0))
        self.tokens.labels(model, "completion").inc(usage.get("completion_tokens", 0))

    def install(self, app: Quart) -> None:
        """Times and counts every request."""

        @app.before_request
        async def _start_timer() -> None:
            g.metrics_start = time.perf_counter()

        @app.after_request
        async def _count(response: Response) -> Response:
            route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
            self.requests.labels(route, request.method, str(response.status_code)).inc()
            start = g.get("metrics_start")
            if start is not None:
                self.latency.labels(route).observe(time.perf_counter() - start)
            return response

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)
