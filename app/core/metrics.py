"""Prometheus metrics: request latency by route template (middleware), and collectors that read jobs,
queue depth and images generated from shared state at scrape time (right across API processes).

Each app gets its own ``CollectorRegistry`` so several apps (tests) never clash on metric names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cxrsynth.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The registry of one app and its request-latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            "cxrsynth_http_request_duration_seconds", "HTTP request latency by route template.",
            ("method", "route", "status"), buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one request."""
        self.request_latency.labels(method, route, str(status)).observe(seconds)


class StateCollector(Collector):
    """Reads job counts, queue depths and images generated through the given callables at scrape time.

    A failing source is logged and skipped, so ``/metrics`` keeps answering when e.g. Redis is down.
    """

    def __init__(
        self,
        job_counts: Callable[[], Mapping[tuple[str, str], int]],
        queue_depths: Callable[[], Mapping[str, int]],
        images_generated: Callable[[], int],
    ) -> None:
        self._job_counts = job_counts
        self._queue_depths = queue_depths
        self._images_generated = images_generated

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: never called at registration time

    def collect(self) -> Iterator[Metric]:
        try:
            jobs = GaugeMetricFamily("cxrsynth_jobs", "Jobs by kind and status.", labels=("kind", "status"))
            for (kind, status), n in sorted(self._job_counts().items()):
                jobs.add_metric((kind, status), n)
            yield jobs
        except Exception:
            log.exception("metrics: job counts unavailable")
        try:
            depth = GaugeMetricFamily("cxrsynth_queue_depth", "Messages waiting per Celery queue.",
                                      labels=("queue",))
            for queue, n in sorted(self._queue_depths().items()):
                depth.add_metric((queue,), n)
            yield depth
        except Exception:
            log.exception("metrics: queue depth unavailable")
        try:
            images = CounterMetricFamily("cxrsynth_images_generated",
                                         "Images made by succeeded generation jobs.")
            images.add_metric((), self._images_generated())
            yield images
        except Exception:
            log.exception("metrics: images generated unavailable")


class RequestMetricsMiddleware:
    """Pure ASGI middleware timing each HTTP request, labelled by the matched route template
    (``/v1/jobs/{job_id}``, never the raw path). Server-Sent Event streams are not timed."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        streaming = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not streaming:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.metrics.observe_request(scope.get("method", "GET"), template, status,
                                             time.perf_counter() - start)
