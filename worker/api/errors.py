"""One error shape for every refusal of the HTTP API, and the handlers that produce it.

    {"error": {"code": "invalid_booking", "message": "...",
               "fields": [{"field": "patient.phone", "message": "..."}]}}

`fields` is present only where a field is to blame (422, and the 404 of a replay naming
what is not a dead letter); field names are the CLI's (worker/models.py `field_errors`).
Nothing unexpected ever answers with a traceback: `CatchAll` turns it into a 500 in the
same shape and logs where it happened (file, line, function: no values, which could hold
a patient's contact details).

Redis unreachable (connection refused or lost, timeout) answers 503 with Retry-After, and
so does a Redis that is up but refuses writes: out of memory under `maxmemory` with
`noeviction` (OOM), unable to persist (MISCONF: a failed RDB save or AOF write), a
read-only replica (READONLY), a master short of the replicas `min-replicas-to-write`
asks for (NOREPLICAS), or a replica between masters that serves no stale data
(MASTERDOWN: a failover's old master, which refuses reads too, before they run). A Lua
script or MULTI refused so is refused at its first write and changes nothing, and the
routes' writes are idempotent (PUT, DELETE, release, batch, STOP): the request may be
sent again as it is. Redis's ACL denying its user a command or a key a route runs
(NOPERM) is the deployment's to fix: 503 with Retry-After too, logged at ERROR naming the
route and the command denied (never the user or the message); the request may be sent
again as it is once ops have granted it. BUSY (a Lua script running past
`busy-reply-threshold`: nothing else runs until it ends) is a 503 with Retry-After too.
Any other error reply from Redis is a bug, a 500.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..health import acl_denied, busy, error_detail, refused_write

log = logging.getLogger(__name__)
REDIS_RETRY_AFTER_SECONDS = 5
WWW_AUTHENTICATE = 'Bearer realm="reminders"'

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """A refusal: HTTP status, stable code, message, fields to blame, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        fields: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.fields = fields
        self.headers = dict(headers or {})


def error_body(code: str, message: str, fields: list[tuple[str, str]] | None = None) -> Any:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        body["fields"] = [{"field": f, "message": m} for f, m in fields]
    return {"error": body}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.code, exc.message, exc.fields), status_code=exc.status, headers=exc.headers
    )


def not_found(booking_id: str) -> ApiError:
    """The one answer for a booking this clinic cannot see: missing or another clinic's."""
    return ApiError(404, f"no booking {booking_id!r}")


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("query", "limit") -> "limit"; ("header", "if-match") -> "If-Match".
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "body"):
        parts = parts[1:]
    elif parts and parts[0] == "header":
        parts = ["-".join(w.capitalize() for w in p.split("-")) for p in parts[1:]]
    return ".".join(parts) or "request"


def _message_of(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = [(_field_of(e.get("loc", ())), _message_of(e)) for e in exc.errors()]
    return error_response(ApiError(422, "the request has invalid parameters", fields=fields))


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (FastAPI 0.165 keeps an included router
    as one route of the app's, whose methods are its own routes')."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def allowed_methods(request: Request) -> str:
    """Every method some route serves on this path (Starlette's 405 names only the first),
    HEAD wherever GET is."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        match, _ = route.matches({**request.scope, "method": "\0"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:  # answered as GET (factory.py `HeadAsGet`)
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = {404: "no such route", 405: "method not allowed on this route"}.get(
        exc.status_code, str(exc.detail)
    )
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return error_response(ApiError(exc.status_code, message, headers=headers))


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unreachable: %s", type(exc).__name__)
    return error_response(
        ApiError(
            503,
            "the schedule store (Redis) is unreachable; try again shortly",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
        )
    )


async def _redis_refuses(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, redis.ResponseError)
    why = refused_write(exc)
    if why is None and acl_denied(exc):
        return _acl_denied(request, exc)
    if why is None and busy(exc):
        log.warning("Redis is busy running a script (BUSY)")
        return error_response(ApiError(
            503, "the schedule store (Redis) is busy running a script; send the request again "
                 "shortly", headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)}))
    if why is None:
        raise exc  # any other error reply: a bug, the catch-all's 500
    # Never the message: a pipeline's names the command and its arguments.
    log.warning("Redis refuses writes (%s)", why)
    return error_response(
        ApiError(
            503,
            "the schedule store (Redis) refuses writes (out of memory, it cannot "
            "persist, or a failover is under way); send the request again shortly",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
        )
    )


def _acl_denied(request: Request, exc: redis.ResponseError) -> JSONResponse:
    """Redis's ACL user lacks a permission a route needs (NOPERM): the deployment's to fix,
    not the request's nor a bug of ours. 503 with Retry-After (send it again once ops have
    granted it), and one ERROR line naming the route and what is denied: never the message,
    which names the user, and a pipeline's the command's arguments."""
    log.error("%s %s: Redis denies a command this service needs (%s): grant it to the ACL "
              "user of REMINDERS_REDIS_URL", request.method, request.url.path,
              error_detail(exc))
    return error_response(
        ApiError(
            503,
            "the schedule store (Redis) denies a command this service needs (a permission "
            "its ACL user lacks); ops are told: send the request again later",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
        )
    )


def install(app: FastAPI) -> None:
    """Register the handlers: every refusal leaves in the one shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind in (redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(kind, _redis_down)
    app.add_exception_handler(redis.ResponseError, _redis_refuses)


def where(exc: BaseException) -> str:
    """Return the innermost frames of a traceback as `file:line in function` (no values)."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} in {f.name}"
                       for f in reversed(frames))


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a 500 in the error shape.

    The exception's message is logged only at DEBUG (it may quote a request's data); at
    ERROR the log names its type, the route and where it was raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the last line of defence: never a traceback to a client
            incident = uuid.uuid4().hex[:12]
            log.error("unhandled %s on %s %s (incident %s) at %s", type(exc).__name__,
                      scope.get("method"), scope.get("path"), incident, where(exc))
            log.debug("incident %s: %r", incident, exc)
            if started:
                return  # the response is under way; the connection just ends
            response = JSONResponse(
                error_body("internal", f"internal error (incident {incident})"),
                status_code=500,
            )
            await response(scope, receive, send)
