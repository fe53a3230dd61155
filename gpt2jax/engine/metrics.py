"""What an engine counts, for `/metrics`: plain attributes, plus a prometheus-client collector over engines.

The engine updates an `EngineMetrics` from its worker thread (single writer: plain ints and floats are
enough). The HTTP layer registers one `EngineCollector(engines)`, which reads every engine's metrics at
scrape time under a `model` label, so several engines never clash over metric names. A started engine
also `publish`es itself in one process-wide collector in prometheus-client's default registry (the HTTP
layer's `/metrics` renders that registry too).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# Seconds. Time to first token spans a cached short prompt to a long wait in the queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds per decode device call (one chunk of steps for all slots).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations at or below each bucket bound (not cumulative until `cumulative`)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= bound) pairs ending with ("+Inf", count): Prometheus' layout."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class EngineMetrics:
    """One engine's counters and histograms; the gauges are read live from the engine."""

    def __init__(self, queue_length: Callable[[], int], busy_slots: Callable[[], int], slots: int) -> None:
        self._queue_length = queue_length
        self._busy_slots = busy_slots
        self.slots = slots
        self.tokens_generated = 0  # counter: tokens sampled for clients (end-of-text included)
        self.requests_finished = 0  # counter
        self.requests_refused = 0  # counter: queue full or waited too long
        self.requests_failed = 0  # counter: failed by an error in the engine
        self.ttft = Histogram(TTFT_BUCKETS)  # seconds from submission to the first token on the host
        self.step_time = Histogram(STEP_BUCKETS)  # seconds of device time per decode call

    @property
    def queue_length(self) -> int:
        return self._queue_length()

    @property
    def busy_slots(self) -> int:
        return self._busy_slots()


class EngineCollector:
    """A prometheus-client collector for a set of engines: `registry.register(EngineCollector(engines))`.

    `engines` is anything with `.name` and `.metrics` (an EngineMetrics).
    """

    def __init__(self, engines: Iterable[Any] = (), prefix: str = "gpt2jax_engine") -> None:
        self.engines = list(engines)
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p, labels = self.prefix, ["model"]
        gauges = {
            "queue_length": ("Requests waiting for a decode slot.", lambda m: m.queue_length),
            "busy_slots": ("Decode slots in use.", lambda m: m.busy_slots),
            "slots": ("Decode slots in all.", lambda m: m.slots),
        }
        for key, (doc, read) in gauges.items():
            family = GaugeMetricFamily(f"{p}_{key}", doc, labels=labels)
            for e in self.engines:
                family.add_metric([e.name], read(e.metrics))
            yield family
        counters = {
            "tokens_generated": "Tokens sampled.",
            "requests_finished": "Requests completed.",
            "requests_refused": "Requests refused as overloaded (queue full or waited too long).",
            "requests_failed": "Requests failed by an engine error.",
        }
        for key, doc in counters.items():
            family = CounterMetricFamily(f"{p}_{key}", doc, labels=labels)
            for e in self.engines:
                family.add_metric([e.name], getattr(e.metrics, key))
            yield family
        histograms = {
            "time_to_first_token_seconds": ("Submission to first token.", "ttft"),
            "step_seconds": ("Device time of one decode call (a chunk of steps).", "step_time"),
        }
        for key, (doc, attr) in histograms.items():
            family = HistogramMetricFamily(f"{p}_{key}", doc, labels=labels)
            for e in self.engines:
                h: Histogram = getattr(e.metrics, attr)
                family.add_metric([e.name], h.cumulative(), h.sum)
            yield family


_published: EngineCollector | None = (
    None  # in prometheus-client's default registry once anything is published
)


def publish(engine: Any) -> None:
    """Shows `engine`'s metrics in prometheus-client's default registry (until `unpublish`)."""
    global _published
    if _published is None:
        from prometheus_client import REGISTRY

        _published = EngineCollector()
        REGISTRY.register(_published)
    if engine not in _published.engines:
        _published.engines.append(engine)


def unpublish(engine: Any) -> None:
    if _published is not None and engine in _published.engines:
        _published.engines.remove(engine)
