"""Request bodies: JSON only, size-bounded before anything is parsed, hostile input refused.

The size is checked twice: a declared `Content-Length` over the limit is refused before a
byte is read, and the bytes actually received are counted as they arrive, so a chunked
body (no length declared) or one that lies about its length is cut off at the limit too.
Nothing past the limit is ever buffered.

Parsing refuses, naming the field `body`: bytes that are not UTF-8, text that is not
JSON, NaN and Infinity, duplicate keys (which would otherwise silently keep the last
one), and nesting deeper than the limit (a booking is three levels deep; the decoder's
own recursion guard stops a 100,000-deep document long before the stack ends).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from .errors import ApiError

BOOKING_MAX_BYTES = 65_536  # one booking: about 600 bytes in practice
MAX_DEPTH = 32
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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Return how deeply `value` nests (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest


def parse_json(raw: bytes) -> Any:
    """Return the parsed body; raise ApiError(422) naming `body` for anything not plain JSON."""

    def refuse(message: str) -> ApiError:
        return ApiError(422, "the body is not acceptable JSON", code="invalid_json",
                        fields=[("body", message)])

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise refuse("is empty")
    deep = f"is nested deeper than {MAX_DEPTH} levels"
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise refuse(f"has the key {str(exc)!r} twice in one object") from None
    except json.JSONDecodeError as exc:
        raise refuse(f"is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # NaN, Infinity
        raise refuse(str(exc)) from None
    except RecursionError:  # the decoder's own guard, far below the stack's end
        raise refuse(deep) from None
    if _depth(value) > MAX_DEPTH:
        raise refuse(deep)
    return value


async def json_body(request: Request, limit: int) -> Any:
    """415 unless JSON, 413 over `limit`, 422 unless valid JSON; else the parsed body."""
    require_json(request)
    return parse_json(await read_limited(request, limit))
