"""The clinic HTTP API (FastAPI): `uvicorn worker.api:app`, or `reminders run`.

Modules: factory (create_app), services (what routes use, Redis client with a short retry
budget), auth (API key -> clinic, rate limit), ratelimit (token bucket in Redis), body
(JSON bodies: size, type, hostile input), intake (validate and plan a booking for the
calling clinic), conditional (ETag / If-Match), bookings, dead_letters and ops (the
routes), errors (one error shape, no tracebacks), metrics (Prometheus), schemas (the
OpenAPI shapes).

`app` is built on first access, not at import: importing the package reads no settings
and no config. Built so (the server's process: `uvicorn worker.api:app`, as `reminders
run` and docker-compose start it), the process's garbage collection is made quieter
(`quiet_gc`).
"""

from __future__ import annotations

import gc
from typing import Any

from .factory import create_app

__all__ = ["create_app", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        built = create_app()
        globals()["app"] = built
        quiet_gc()
        return built
    raise AttributeError(name)


# Young collections every 100,000 allocations, not CPython's 700; the older ones in step.
API_GC = (100_000, 10, 10)


def quiet_gc() -> None:
    """Set aside what the start made (modules, the catalog, the app) and collect young
    garbage less often, in the API server's process (as worker/tasks.py `quiet_gc` does
    for a pool process, and worker/batch.py's for `reminders book`).

    A batch of 1,000 bookings (`POST /v1/bookings:batch`) keeps hundreds of thousands of
    objects alive while it is checked and stored (bookings, plans, timelines), and each
    collection walked those that survived the young ones: with CPython's thresholds,
    checking a booking took about 125 µs of CPU instead of 78, storing it 75-78 instead
    of 70-74 (medians of batches of 1,000 of benchmarks/intake.py's bookings in one
    process), and the API process about 270 µs a booking in `python -m
    benchmarks.api_intake` instead of 200. A request makes few cyclic objects and frees
    the rest as it goes, whatever the thresholds; a young collection walks at most what
    API_GC[0] allocations left alive (a few milliseconds). What the start made and later
    drops is freed as ever unless it is in a cycle, which then stays (a catalog replaced
    after a config edit, if any of it is cyclic)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*API_GC)
