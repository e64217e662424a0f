"""The clinic HTTP API (FastAPI): `uvicorn worker.api:app`, or `reminders run`.

Modules: factory (create_app), services (what routes use, Redis client with a short retry
budget), auth (API key -> clinic, rate limit), ratelimit (token bucket in Redis), body
(JSON bodies: size, type, hostile input), intake (validate and plan a booking for the
calling clinic), conditional (ETag / If-Match), bookings, dead_letters and ops (the
routes), errors (one error shape, no tracebacks), metrics (Prometheus), schemas (the
OpenAPI shapes).

`app` is built on first access, not at import: importing the package reads no settings
and no config.
"""

from __future__ import annotations

from typing import Any

from .factory import create_app

__all__ = ["create_app", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)
