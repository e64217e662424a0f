"""The clinic's bookings: PUT (create or update), GET, DELETE (cancel), release, list, batch.

Every route acts on the calling clinic's bookings only (the clinic is the key's). A
booking id this clinic does not have — missing, or another clinic's — answers the same
404, body and headers alike.

Batch (`POST /v1/bookings:batch`) answers each booking on its own: every valid one is
stored even when others are refused. Why not all-or-nothing like `reminders book`: the
caller is a clinic's booking software syncing its day, where one bad phone number must
not hold back the other 999 patients' reminders; each item's answer says what happened
to it, and sending the same batch again after a fix is safe (PUT semantics: an unchanged
booking keeps its version). Each item is validated and planned before it is stored, so a
refusal is found without a write. The accepted ones are stored STORE_PART at a time, in
request order (`Store.upsert_many`: a few round trips per 200 bookings), and the next
items are checked while Redis applies the part before (`_BatchCheck.step`, its `idle`):
the answer and what is stored are those of checking every item, then storing all the
accepted ones in one call (`upsert_many` gives the result of upserting them one by one,
in order; tests/api/test_batch_exact.py). A Redis failure midway answers 503, and the
bookings stored before it stay stored (resending the batch completes it), as does an
unexpected error (500) while a later part is checked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from ..catalog import Catalog
from ..errors import BookingRejected, NotFound
from ..models import (
    BOOKING_ID_PATTERN,
    MAX_BOOKING_BYTES,
    MAX_BOOKING_DEPTH,
    Booking,
    json_field,
    parse_booking,
)
from ..nudge import due_soon
from ..planner import Plan, plan
from ..status import Status
from ..store import APPLY_CHUNK, Store
from .auth import Authenticated
from .body import json_body
from .conditional import (
    PreconditionFailed,
    cancel,
    check_version,
    etag,
    parse_if_match,
    parse_if_none_match,
    upsert,
)
from .errors import REDIS_RETRY_AFTER_SECONDS, ApiError, error_body, not_found
from .intake import intake, protocol_readable, refused
from .params import no_unknown_query
from .schemas import BatchResult, BookingPage, ErrorBody, Timeline, error_responses
from .services import Services, Svc

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["bookings"],
                   dependencies=[Depends(no_unknown_query)])
MAX_BATCH = 1000
# A batch is stored STORE_PART accepted bookings at a time (`Store.upsert_many`: two apply
# chunks); while Redis applies a chunk, the next CHECK_SLICE items are checked
# (`_BatchCheck.step`), about as long as Redis takes.
STORE_PART = 2 * APPLY_CHUNK
CHECK_SLICE = APPLY_CHUNK
PAGE_SCAN = 1000  # bookings read per page at most; a sparse filter may return a short page
_BOOKING_ID = re.compile(BOOKING_ID_PATTERN)
# An RFC 3339 instant with its offset (JSON Schema's date-time), nothing looser.
INSTANT = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"


# If-Match as RFC 9110 13.1.1 writes it: "*", or a list of entity tags (`"3"`, `W/"3"`;
# empty elements allowed) with optional spaces around the commas. Tag characters: printable
# ASCII but the quote (RFC 9110's obs-text left out: no version is written with it).
_TAG = r'(W/)?"[!#-~]*"'
IF_MATCH = re.compile(rf"\*|({_TAG})?([ \t]*,[ \t]*({_TAG})?)*")  # after its outer spaces
_IF_MATCH_HEADER = Header(
    alias="If-Match",
    description='refuse (412) unless the booking is at this version, e.g. "3"; * = it must '
                'exist. Not "*" nor a list of quoted tags: 400 naming the header',
    json_schema_extra=lambda schema: _if_match_schema(schema))
_IF_NONE_MATCH_HEADER = Header(
    alias="If-None-Match",
    description='* = refuse (412) if the booking exists (create only); a tag such as "3" = '
                'refuse the write while it is at that version',
    json_schema_extra=lambda schema: _if_match_schema(schema))
_BAD_IF_MATCH: dict[int | str, dict[str, Any]] = {400: {
    "model": ErrorBody,
    "description": "If-Match or If-None-Match is not * nor a list of entity tags (the "
                   "header is named)"}}


def _if_match_schema(schema: dict[str, Any]) -> None:
    """The header's OpenAPI schema: a string of that grammar (left out, it is no header;
    there is no null header for a client to send)."""
    schema.pop("anyOf", None)
    schema.update(type="string", pattern=f"^({IF_MATCH.pattern})$")


def _header_tags(request: Request, name: str) -> str | None:
    """The header's lines as one list (None: not sent), once it is well-formed: a
    malformed one (`1` unquoted, garbage) is the client's syntax error, 400 naming the
    header (RFC 9110 15.5.1). Sent on several lines, it is their comma-joined list (RFC
    9110 5.3)."""
    lines = request.headers.getlist(name)
    header = ", ".join(line.strip(" \t") for line in lines) if lines else None
    if header is not None and not IF_MATCH.fullmatch(header.strip(" \t")):
        message = (f'{name} must be * or a list of quoted entity tags such as "3" '
                   '(the ETag a GET answered)')
        raise ApiError(400, f"malformed {name} header: {message}", fields=[(name, message)])
    return header


def _if_none_match(request: Request) -> str | frozenset[int] | None:
    """The versions If-None-Match names (`parse_if_none_match`); 400 if malformed."""
    return parse_if_none_match(_header_tags(request, "If-None-Match"))


def _if_match(request: Request) -> str | frozenset[int] | None:
    """The versions If-Match names (`parse_if_match`), once it is well-formed: a malformed
    one is the 400 naming the header (`_header_tags`), not the 412 of a well-formed tag
    naming another version: re-reading the booking would never fix it. (The framework's
    header parameter reads the first line only: a malformed later line was ignored, the
    current version on one was a false 412.)"""
    return parse_if_match(_header_tags(request, "If-Match"))


_TIMELINE_HEADERS = {"ETag": {"description": 'the booking\'s version, e.g. "3"',
                              "schema": {"type": "string"}}}


def _request_body(schema: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


def require_configured(clinic: str, svc: Services) -> None:
    """Refuse (503, to send again) a write for a clinic whose file is missing from config/
    as read now but was there a moment ago (`Catalog.former`: a deploy rewriting config/):
    the key says the clinic is real, and "unknown clinic" (422) would tell its system the
    booking is wrong and not to send it again. Nothing is planned without its config. A
    clinic this process never had in config/ (removed, its keys not revoked) is refused
    403, logged at WARNING for ops."""
    if clinic in svc.catalog.clinics:
        return
    if clinic in svc.catalog.former:
        raise ApiError(503, f"clinic {clinic!r}'s configuration is not readable right now "
                            "(its file is being rewritten in config/); nothing was stored: "
                            "send the request again shortly",
                       headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)})
    # Not configured since this process started (a clinic removed; its keys not revoked):
    # not the booking's fault, so no 422 blaming a `clinic` field the key supplied.
    log.warning("a key of clinic %r, which config/ does not have, asked to write; revoke "
                "its keys (reminders keys revoke) or restore its file", clinic)
    raise ApiError(403, f"clinic {clinic!r} is not configured on this service; nothing was "
                        "stored: ask the service's operators")


def _timeline_response(timeline: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(timeline, status_code=status, headers={"ETag": etag(timeline["version"])})


def _known(booking_id: str) -> str:
    """Return the id if it could name a booking; else the same 404 as a missing one."""
    if not _BOOKING_ID.fullmatch(booking_id):
        raise not_found(booking_id)
    return booking_id


async def _booking_body(request: Request, svc: Svc) -> Any:
    return await json_body(request, min(MAX_BOOKING_BYTES, svc.settings.api_max_body_bytes),
                           MAX_BOOKING_DEPTH, field=json_field)


async def _batch_body(request: Request, svc: Svc) -> Any:
    # {"bookings": [booking, ...]}: two levels above each booking.
    return await json_body(request, svc.settings.api_max_body_bytes, MAX_BOOKING_DEPTH + 2)


@router.put(
    "/bookings/{booking_id}",
    summary="Create or update a booking",
    response_model=None,
    responses={200: {"model": Timeline, "description": "updated (or unchanged)",
                     "headers": _TIMELINE_HEADERS},
               201: {"model": Timeline, "description": "created", "headers": {
                   **_TIMELINE_HEADERS, "Location": {"description": "the booking's URL",
                                                     "schema": {"type": "string"}}}},
               **_BAD_IF_MATCH, **error_responses(401, 403, 412, 413, 415, 422, 429, 503)},
    openapi_extra=_request_body("BookingIn"),
)
def put_booking(
    request: Request,
    booking_id: str,
    caller: Authenticated,
    doc: Annotated[Any, Depends(_booking_body)],
    svc: Svc,
    if_match: Annotated[str | None, _IF_MATCH_HEADER] = None,
    if_none_match: Annotated[str | None, _IF_NONE_MATCH_HEADER] = None,
) -> JSONResponse:
    """Store the booking and return its timeline. The same body again changes nothing
    (same version); a changed one is reconciled and gets a new version (the `ETag`)."""
    del if_match, if_none_match  # documented; read with their every line (`_header_tags`)
    expected, unexpected = _if_match(request), _if_none_match(request)
    require_configured(caller.clinic, svc)
    now = datetime.now(UTC)
    booking, planned = intake(doc, caller.clinic, booking_id, svc.catalog, now)
    before: list[str | None] = [None]
    timeline, created = upsert(svc.store, booking, planned, now, expected,
                               unexpected=unexpected, previous=before)
    log.info("booking %s/%s stored: version %s, %s", caller.clinic, booking_id,
             timeline["version"], timeline["status"])
    if str(timeline["version"]) != before[0]:  # an unchanged booking wrote nothing new
        _nudge(svc, [timeline], now)
    response = _timeline_response(timeline, 201 if created else 200)
    if created:
        response.headers["Location"] = f"/v1/bookings/{booking_id}"
    return response


@router.get(
    "/bookings/{booking_id}",
    summary="A booking's timeline",
    response_model=None,
    responses={200: {"model": Timeline, "headers": _TIMELINE_HEADERS},
               **error_responses(401, 404, 429, 503)},
)
def get_booking(
    booking_id: str,
    caller: Authenticated,
    svc: Svc,
) -> JSONResponse:
    """Every reminder of the booking: when it is due, whether it was sent, and why not.
    (No 304 for an If-None-Match of the version: the version is the clinic's booking's,
    and the timeline changes under it as its reminders go out.)"""
    try:
        return _timeline_response(svc.store.timeline(caller.clinic, _known(booking_id)))
    except NotFound:
        raise not_found(booking_id) from None


@router.delete(
    "/bookings/{booking_id}",
    summary="Cancel a booking",
    response_model=None,
    responses={200: {"model": Timeline, "headers": _TIMELINE_HEADERS},
               **_BAD_IF_MATCH, **error_responses(401, 404, 412, 429, 503)},
)
def cancel_booking(
    request: Request,
    booking_id: str,
    caller: Authenticated,
    svc: Svc,
    if_match: Annotated[str | None, _IF_MATCH_HEADER] = None,
    if_none_match: Annotated[str | None, _IF_NONE_MATCH_HEADER] = None,
) -> JSONResponse:
    """Nothing still pending is sent; what was sent stays as history. A PUT of the same id
    opens it again."""
    del if_match, if_none_match  # documented; read with their every line (`_header_tags`)
    expected, unexpected = _if_match(request), _if_none_match(request)
    try:
        timeline = cancel(svc.store, caller.clinic, _known(booking_id), datetime.now(UTC),
                          expected, unexpected)
    except NotFound:
        raise not_found(booking_id) from None
    log.info("booking %s/%s cancelled", caller.clinic, booking_id)
    _nudge(svc, [timeline], datetime.now(UTC))  # its notices are due at once
    return _timeline_response(timeline)


@router.post(
    "/bookings/{booking_id}/release",
    summary="Release a held booking after the clinic's review",
    response_model=None,
    responses={200: {"model": Timeline, "headers": _TIMELINE_HEADERS},
               **_BAD_IF_MATCH, **error_responses(401, 403, 404, 409, 412, 422, 429, 503)},
)
def release_booking(
    request: Request,
    booking_id: str,
    caller: Authenticated,
    svc: Svc,
    if_match: Annotated[str | None, _IF_MATCH_HEADER] = None,
    if_none_match: Annotated[str | None, _IF_NONE_MATCH_HEADER] = None,
) -> JSONResponse:
    """A `held` booking's reminders are planned from now and scheduled. Any other status
    answers 409: only a held booking can be released; so does a booking changed (cancelled,
    corrected) while the release was under way. `If-Match` with the version reviewed
    refuses (412) to release a version the clinic has not seen (a correction since)."""
    del if_match, if_none_match  # documented; read with their every line (`_header_tags`)
    expected, unexpected = _if_match(request), _if_none_match(request)
    clinic, store = caller.clinic, svc.store
    require_configured(clinic, svc)
    try:
        current = store.timeline(clinic, _known(booking_id))
        doc = store.booking_doc(clinic, booking_id)
    except NotFound:
        raise not_found(booking_id) from None
    # Before the method (RFC 9110 13.2.2); the write below is fenced by this same version.
    check_version(expected, int(current["version"]), unexpected)
    if current["status"] != Status.HELD:
        raise ApiError(409, f"booking {booking_id!r} is {current['status']}, not held: "
                            "only a held booking can be released", code="not_held")
    now = datetime.now(UTC)
    protocol_readable(doc, svc.catalog)
    try:
        booking = parse_booking(doc, svc.catalog)
        planned = plan(booking, svc.catalog.protocols[booking.treatment],
                       svc.catalog.clinics[clinic], now)
    except BookingRejected as exc:  # the configuration changed under a stored booking
        raise refused(exc.errors) from None
    try:
        # Fenced by the version checked above: a cancel or a correction landing since is
        # never undone by writing back the document read before it.
        timeline, _ = upsert(store, booking, planned, now,
                             frozenset({int(current["version"])}), release=True)
    except PreconditionFailed:
        raise ApiError(409, f"booking {booking_id!r} changed while it was being released; "
                            "read it again", code="changed") from None
    log.info("booking %s/%s released: version %s", clinic, booking_id, timeline["version"])
    _nudge(svc, [timeline], now)
    return _timeline_response(timeline)


@router.get(
    "/bookings",
    summary="The clinic's bookings, by status and start time, a page at a time",
    response_model=None,
    responses={200: {"model": BookingPage}, **error_responses(401, 422, 429, 503)},
)
def list_bookings(
    caller: Authenticated,
    svc: Svc,
    status: Annotated[Literal["scheduled", "held", "cancelled", "completed"] | None,
                      Query(description="only bookings in this status")] = None,
    starts_from: Annotated[str | None, Query(
        alias="from", pattern=INSTANT, json_schema_extra={"format": "date-time"},
        description="only bookings starting at or after this instant (RFC 3339, with "
                    "its offset)")] = None,
    starts_to: Annotated[str | None, Query(
        alias="to", pattern=INSTANT, json_schema_extra={"format": "date-time"},
        description="only bookings starting before this instant (RFC 3339)")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="at most this many")] = 100,
    cursor: Annotated[str | None, Query(
        max_length=200, description="`next_cursor` of the previous page (bookings after "
                                    "it in id order)")] = None,
) -> JSONResponse:
    """Bookings in id order, without patient data (GET one for its timeline). A page may
    hold fewer than `limit` when a filter is sparse: follow `next_cursor` until null."""
    start, end = _instant("from", starts_from), _instant("to", starts_to)
    after = cursor or ""  # the last id of the previous page: any string is a position
    store, clinic = svc.store, caller.clinic
    ids = [b for b in store.booking_ids(clinic) if b > after]
    now = datetime.now(UTC)
    found: list[dict[str, Any]] = []
    scanned = 0
    next_cursor = None
    for offset in range(0, len(ids), 100):
        chunk = ids[offset:offset + 100]
        for booking_id, summary in zip(chunk, store.booking_summaries(clinic, chunk),
                                       strict=True):
            scanned += 1
            if summary is not None and _matches(summary, status, start, end, now, store,
                                                clinic):
                found.append(summary)
            at_end = booking_id == ids[-1]
            if not at_end and (len(found) >= limit or scanned >= PAGE_SCAN):
                next_cursor = booking_id
                break
        if next_cursor:
            break
    return JSONResponse({"bookings": found, "next_cursor": next_cursor})


def _instant(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "the request has invalid parameters",
                       fields=[(name, "is not an instant, e.g. 2026-12-01T00:00:00Z")]) from None


def _matches(summary: dict[str, Any], status: str | None, starts_from: datetime | None,
             starts_to: datetime | None, now: datetime, store: Store, clinic: str) -> bool:
    starts = datetime.fromisoformat(summary["starts_at"]) if summary.get("starts_at") else None
    if starts_from and (starts is None or starts < starts_from):
        return False
    if starts_to and (starts is None or starts >= starts_to):
        return False
    if summary["status"] == Status.SCHEDULED and starts is not None and starts <= now:
        # Only a booking whose visit has begun can be completed: the timeline decides.
        try:
            summary["status"] = store.timeline(clinic, summary["booking_id"])["status"]
        except NotFound:
            return False
    return status is None or summary["status"] == status


@router.post(
    "/bookings:batch",
    summary="Create or update up to 1,000 bookings, each answered on its own",
    response_model=None,
    responses={200: {"model": BatchResult},
               **error_responses(401, 403, 413, 415, 422, 429, 503)},
    openapi_extra=_request_body("BatchIn"),
)
def batch_bookings(
    caller: Authenticated,
    doc: Annotated[Any, Depends(_batch_body)],
    svc: Svc,
) -> Response:
    """`{"bookings": [...]}`: each booking is stored or refused on its own (see `results`,
    in request order); valid ones are stored even if others are refused."""
    items = _batch_items(doc)
    require_configured(caller.clinic, svc)
    now = datetime.now(UTC)
    batch = _BatchCheck(items, caller.clinic, svc.catalog, now)
    batch.check(STORE_PART)
    stored = 0
    changed: list[dict[str, Any]] = []  # the timelines of what the writes changed
    while batch.pending:
        part, batch.pending = batch.pending, []
        # Which existed (200) or not (201): read by the same step that writes each. The
        # next part is checked while Redis applies this one (`_BatchCheck.step`).
        existed: list[str | None] = [None] * len(part)
        timelines = svc.store.upsert_many([(b, p) for _, b, p in part], now,
                                          previous=existed, idle=batch.step)
        for (index, _, _), timeline, old in zip(part, timelines, existed, strict=True):
            batch.results[index].update({"status": 200 if old is not None else 201,
                                         "timeline": timeline})
            if str(timeline["version"]) != old:
                changed.append(timeline)
        stored += len(part)
        batch.check(STORE_PART)
    # One ask for the whole batch, for what it changed (worker/nudge.py coalesces asks).
    _nudge(svc, changed, now)
    results = batch.results
    refused_count = len(items) - stored
    log.info("batch for clinic %s: %d stored, %d refused", caller.clinic, stored,
             refused_count)
    # orjson: the JSON JSONResponse would send (compact, UTF-8), in a tenth of the time for
    # a thousand timelines.
    return Response(orjson.dumps({"stored": stored, "refused": refused_count,
                                  "results": results}), media_type="application/json")


class _BatchCheck:
    """A batch's items checked in request order (`intake`), a few at a time: each item's
    result (`results`: index and booking id; a refusal's status and error too) and the
    accepted ones not yet stored (`pending`: index, booking, plan). An item is refused on
    its own fields, and on a booking id given by an earlier item accepted in the batch."""

    def __init__(self, items: list[Any], clinic: str, catalog: Catalog, now: datetime) -> None:
        self.items, self.clinic, self.catalog, self.now = items, clinic, catalog, now
        self.results: list[dict[str, Any]] = []
        self.pending: list[tuple[int, Booking, Plan]] = []
        self.seen: dict[str, int] = {}

    def check(self, until: int) -> None:
        """Check items until `until` accepted ones are pending, or none is left."""
        while len(self.pending) < until and len(self.results) < len(self.items):
            self._one()

    def step(self) -> None:
        """`Store.upsert_many`'s `idle`: called while Redis applies a chunk of the part
        being stored, check up to CHECK_SLICE more items, while fewer than STORE_PART
        accepted ones wait (the next part). Touches no Redis."""
        for _ in range(CHECK_SLICE):
            if len(self.pending) >= STORE_PART or len(self.results) >= len(self.items):
                return
            self._one()

    def _one(self) -> None:
        index = len(self.results)
        item = self.items[index]
        given = item.get("booking_id") if isinstance(item, dict) else None
        shown = given if isinstance(given, str) else None
        try:
            if isinstance(item, dict) and given is None:
                raise refused([("booking_id", "Field required")])
            if isinstance(given, str) and given in self.seen:
                raise refused([("booking_id", f"appears earlier in this batch (index "
                                              f"{self.seen[given]})")])
            booking, planned = intake(item, self.clinic, None, self.catalog, self.now)
        except ApiError as exc:
            self.results.append({"index": index, "booking_id": shown, "status": exc.status,
                                 **error_body(exc.code, exc.message, exc.fields)})
            return
        self.seen[booking.booking_id] = index
        self.results.append({"index": index, "booking_id": booking.booking_id})
        self.pending.append((index, booking, planned))


def _nudge(svc: Services, timelines: Iterable[dict[str, Any]], now: datetime) -> None:
    """After a write: if it stored a reminder due before the pump's next tick, ask for a pump
    run now (worker/nudge.py: returns at once, never fails the request), as `reminders
    book` does; else the reminder would wait for the tick, or for the follow-up run the
    pump planned before this write."""
    if due_soon(timelines, now, svc.settings.pump_interval_seconds):
        svc.nudge.ask()


def _batch_items(doc: Any) -> list[Any]:
    if not isinstance(doc, dict):
        raise ApiError(422, "the batch was refused; nothing was stored",
                       fields=[("body", 'must be a JSON object: {"bookings": [...]}')])
    extra = sorted(set(doc) - {"bookings"})
    errors = [(name, "unknown field (not part of a batch)") for name in extra]
    items = doc.get("bookings")
    if not isinstance(items, list):
        errors.append(("bookings", "must be a JSON array of bookings"))
    elif not 1 <= len(items) <= MAX_BATCH:
        errors.append(("bookings", f"must hold 1 to {MAX_BATCH} bookings, not {len(items)}"))
    if errors:
        raise ApiError(422, "the batch was refused; nothing was stored", fields=errors)
    assert isinstance(items, list)
    return items
