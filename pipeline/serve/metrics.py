"""Prometheus series of one ingress replica, served at its /metrics.

Why not `ray.serve.metrics` / `ray.util.metrics`: those are exported by each node's Ray metrics agent on its own
port, not by the application, so a client of the QA API could not read them at /metrics, and a cluster without
Prometheus scraping the Ray nodes would have none. Behind several ingress replicas, each scrape answers for the
replica that served it: scrape the replicas (or the Ray metrics agents) and sum.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qa_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "qa_request_seconds",
            "request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.stage = Histogram(
            "qa_stage_seconds",
            "latency per stage",
            ["stage"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.version = Gauge("qa_index_version_info", "index version answering", ["version"], registry=self.registry)
        self.in_flight = Gauge(
            "qa_requests_in_flight", "requests being answered now", ["route"], registry=self.registry
        )
        # Requests waiting for the next retrieval batch (set to read the ingress's batcher where there is one).
        self.queued = Gauge("qa_batch_queue_depth", "requests waiting for the next batch", registry=self.registry)
        self._served: str | None = None

    def serving(self, version: str) -> None:
        """One `qa_index_version_info` series: the version the last answer came from."""
        if version != self._served:
            if self._served:
                self.version.remove(self._served)
            self._served = version
            self.version.labels(version).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
