"""Prometheus metrics of the API: requests by route and status, and their duration.

Labels carry the route's template (`/v1/bookings/{booking_id}`), never a booking id, so
their number stays small. Each app has its own registry (tests build several apps in one
process). `/metrics` also shows the schedule's figures kept in Redis (outcome counters,
depths, queue lengths: worker/metrics.py `ScheduleCollector`), so the API alone tells
what was sent, failed and retried; the worker's per-process histograms are on the
worker's own port (REMINDERS_METRICS_PORT).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    def __init__(self, schedule: Collector | None = None, *more: Collector) -> None:
        self.registry = CollectorRegistry()
        for collector in (schedule, *more):
            if collector is not None:
                self.registry.register(collector)
        self.requests = Counter(
            "reminders_api_requests", "HTTP API requests answered, by route and status",
            ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram(
            "reminders_api_request_duration_seconds", "HTTP API request duration",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# The methods counted by name; any other (uvicorn passes any token through) is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class MetricsMiddleware:
    """ASGI middleware counting every answered request (refusals and 500s included)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            if method not in METHODS:  # any token the client sent: a label of its choosing
                method = "other"
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.duration.labels(method, template, str(status)).observe(
                time.perf_counter() - started)
