"""Request bodies: JSON only, size-bounded before anything is parsed, hostile input refused.

The size is checked twice: a declared `Content-Length` over the limit is refused before a
byte is read, and the bytes actually received are counted as they arrive, so a chunked
body (no length declared) or one that lies about its length is cut off at the limit too.
Nothing past the limit is ever buffered.

Parsing is the CLI's (`worker.jsonsafe.load_json`): bytes that are not UTF-8, text that
is not JSON, NaN and Infinity, overflowing numbers, duplicate keys and nesting deeper than
the route allows are refused (422) naming the field where the problem is — a booking's
field as the CLI names it (`patient.name`, or `booking` for the whole document), or the
path in a batch (`bookings.3.patient.name`) — never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from ..jsonsafe import JSONRefused, dotted, load_json
from ..jsonsafe import Path as JSONPath
from .errors import ApiError

JSON_TYPES = ("application/json",)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_json(request: Request) -> None:
    """Refuse (415) a body that is not declared as JSON."""
    media = _media_type(request)
    if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith(
            "+json")):
        shown = media or "none"
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not {shown}")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes",
                    headers={"Connection": "close"})


async def read_limited(request: Request, limit: int) -> bytes:
    """Return the raw body, refusing (413) one over `limit` bytes without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def body_field(path: JSONPath) -> str:
    """Name a problem in a batch or replay body: `bookings.3.patient.name`, or `body`."""
    return dotted(path) or "body"


def parse_json(raw: bytes, *, max_depth: int,
               field: Callable[[JSONPath], str] = body_field) -> Any:
    """Return the parsed body; raise ApiError(422) naming the field for anything hostile."""
    try:
        return load_json(raw, max_bytes=max(len(raw), 1), max_depth=max_depth)
    except JSONRefused as exc:
        raise ApiError(422, "the body is not acceptable JSON", code="invalid_json",
                       fields=[(field(exc.path), exc.problem)]) from None


async def json_body(request: Request, limit: int, max_depth: int,
                    field: Callable[[JSONPath], str] = body_field) -> Any:
    """415 unless JSON, 413 over `limit`, 422 unless plain JSON; else the parsed body."""
    require_json(request)
    return parse_json(await read_limited(request, limit), max_depth=max_depth, field=field)
