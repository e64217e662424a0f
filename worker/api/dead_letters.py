"""The clinic's dead letters: list them, and replay them once the cause is fixed.

Only the calling clinic's dead letters are seen or replayed. A replay naming anything
that is not one of them (a ref or booking id that is missing, not dead-lettered, or
another clinic's) replays nothing and answers 404 naming each such item, the same for
all three cases.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..models import field_errors
from .auth import Authenticated
from .body import json_body
from .bookings import require_configured
from .errors import ApiError
from .params import no_unknown_query
from .schemas import DeadLetters, Replayed, ReplayRequest, error_responses
from .services import Svc

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["dead letters"],
                   dependencies=[Depends(no_unknown_query)])
REPLAY_MAX_BYTES = 262_144
UNKNOWN_FIELD = "unknown field (not part of a booking)"  # field_errors' words, for a booking


@router.get(
    "/dead-letters",
    summary="Reminders that failed for good, with the reason",
    response_model=None,
    responses={200: {"model": DeadLetters}, **error_responses(401, 429, 503)},
)
def list_dead_letters(
    caller: Authenticated,
    svc: Svc,
) -> JSONResponse:
    """Oldest first. Each `ref` can be replayed once the cause (a wrong address, a missing
    channel secret) is fixed."""
    dead = svc.store.dead_letters(caller.clinic)
    return JSONResponse({"dead_letters": [_public(d) for d in dead]})


def _public(dead: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dead.items() if k != "clinic"}


async def _replay_body(request: Request) -> Any:
    return await json_body(request, REPLAY_MAX_BYTES, max_depth=3)


@router.post(
    "/dead-letters/replay",
    summary="Send dead-lettered reminders again",
    response_model=None,
    responses={200: {"model": Replayed},
               **error_responses(401, 403, 404, 413, 415, 422, 429, 503)},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ReplayRequest"}}}}},
)
def replay_dead_letters(
    caller: Authenticated,
    doc: Annotated[Any, Depends(_replay_body)],
    svc: Svc,
) -> JSONResponse:
    """`{"refs": [ref or booking id, ...]}` or `{"all": true}`. The send-time rules still
    apply: a reminder past its expiry is skipped, one outside the send window waits.
    Refused (403, or 503 while its file is being rewritten) for a clinic config/ lacks:
    its dead letters would only fail "not configured" again."""
    require_configured(caller.clinic, svc)
    if not isinstance(doc, dict):
        raise ApiError(422, "the replay request has invalid fields", fields=[
            ("body", 'must be a JSON object: {"refs": [...]} or {"all": true}')])
    try:
        request = ReplayRequest.model_validate(doc)
    except ValidationError as exc:
        raise ApiError(422, "the replay request has invalid fields", fields=[
            (name, "unknown field (not part of a replay request)"
             if message == UNKNOWN_FIELD else message)
            for name, message in field_errors(exc)]) from None
    if bool(request.refs) == request.all:
        raise ApiError(422, "the replay request has invalid fields", fields=[
            ("refs", "name the dead letters to replay, or set all (not both)")])
    dead = svc.store.dead_letters(caller.clinic)
    if request.all:
        refs = [d["ref"] for d in dead]
    else:
        known = {d["ref"] for d in dead} | {d["booking_id"] for d in dead}
        missing = [(f"refs.{i}", "not a dead letter of this clinic")
                   for i, r in enumerate(request.refs) if r not in known]
        if missing:
            raise ApiError(404, "nothing was replayed: some items are not dead letters of "
                                "this clinic", fields=missing)
        wanted = set(request.refs)
        refs = [d["ref"] for d in dead if d["ref"] in wanted or d["booking_id"] in wanted]
    replayed = svc.store.replay(refs, datetime.now(UTC))
    log.info("replayed %d dead letter(s) of clinic %s", len(replayed), caller.clinic)
    return JSONResponse({"replayed": replayed})
