"""The FastAPI app: settings, catalog and Redis wired once; routes, errors, metrics.

`create_app()` reads the settings and config/ (refusing to start on a broken config, as
`reminders run` does) and touches no Redis until the first request: the API starts while
Redis is still coming up and answers 503 until it is there.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Receive, Scope, Send

from ..catalog import Catalog
from ..logs import configure
from ..settings import Settings, get_settings
from . import bookings, dead_letters, errors, inbound, ops, services, unsubscribe
from .bookings import MAX_BATCH
from .metrics import MetricsMiddleware
from .schemas import booking_schemas, replay_schema

DESCRIPTION = """
The clinic's door to Aftercare reminders: store bookings, read their timelines, cancel,
release held ones, replay dead letters. Two routes are the patients', without a key:
the SMS provider's inbound webhook (STOP, START, HELP, confirm and reschedule replies;
signature checked) and the email unsubscribe link.

Authenticate with `Authorization: Bearer <key>` (a key from
`reminders keys issue --clinic <clinic>`). The key decides the clinic: a clinic sees and
changes only its own bookings, and another clinic's booking id answers 404 like a
missing one. Every refusal has one shape:
`{"error": {"code", "message", "fields": [{"field", "message"}]}}`.
"""


def create_app(settings: Settings | None = None, url: str | None = None) -> FastAPI:
    """Return the API app for `settings` (default: the environment) and Redis `url`."""
    settings = settings or get_settings()
    if not logging.getLogger().handlers:  # a server process (tests log their own way)
        # REMINDERS_LOG_FORMAT for our lines and uvicorn's alike (worker/logs.py).
        configure(settings.log_format, settings.log_level,
                  loggers=("uvicorn", "uvicorn.error", "uvicorn.access"))
    catalog = Catalog.load(settings)
    app = FastAPI(
        title="Aftercare reminders API",
        version="1",
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
        # A trailing slash is an unknown route (404 in the error shape), not Starlette's
        # 307 to the path without it: an empty body, and a PUT's body re-sent elsewhere.
        redirect_slashes=False,
    )
    app.state.services = services.build(settings, catalog, url)
    errors.install(app)
    app.include_router(bookings.router)
    app.include_router(dead_letters.router)
    app.include_router(ops.router)
    app.include_router(inbound.router)
    app.include_router(unsubscribe.router)
    # Added last = outermost: metrics see every answer, including the catch-all's 500.
    app.add_middleware(HeadAsGet)
    app.add_middleware(errors.CatchAll)
    app.add_middleware(MetricsMiddleware, metrics=app.state.services.metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(booking_schemas(MAX_BATCH))
            components["ReplayRequest"] = replay_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
    return app


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET, wherever GET is (RFC 9110 9.1), with the
    same status and headers; uvicorn sends no body for a HEAD. FastAPI's routes answer only
    the methods they declare, so HEAD was a 405 on every route: an uptime monitor asking
    /healthz with HEAD read the service as down. Where GET is not served either, a HEAD
    is a 405 as before, its `Allow` naming the methods that are (errors.py).

    The app sees a copy of the request's scope saying GET (uvicorn reads its own, HEAD, to
    leave the body out); the route it matched is handed back for the metrics' label."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]
