"""The shapes the OpenAPI document shows: request bodies and every answer.

Routes build their JSON themselves (the store's timeline is already the DESIGN.md
shape); these models only document it, so the schema the clinic reads at `/docs` and the
one the schemathesis test checks every answer against are the same.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..models import Booking

# DESIGN.md's booking (examples/booking.json; a test keeps the two equal). Written out
# here because the Docker image ships worker/, not examples/.
EXAMPLE_BOOKING: dict[str, Any] = {
    "clinic": "glow",
    "booking_id": "A-1042",
    "treatment": "microneedling",
    "starts_at": "2026-12-05T14:30:00+01:00",
    "patient": {
        "name": "Ana López",
        "email": "ana@example.com",
        "phone": "+34600111222",
        "timezone": "Europe/Madrid",
        "locale": "es",
        "channels": ["sms", "email"],
    },
    "medications": {"tretinoin": True, "retinol": False, "isotretinoin_last_dose": None},
}


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the field to blame, e.g. patient.phone")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable: not_found, invalid_booking, ...")
    message: str
    fields: list[FieldError] | None = None


class ErrorBody(BaseModel):
    """Every refusal, whatever its status."""

    error: ErrorDetail


class Reminder(BaseModel):
    id: str = Field(description="step:channel")
    step: str | None
    channel: str | None
    due_at: str | None = Field(description="UTC instant, e.g. 2026-11-28T17:00:00Z")
    status: str = Field(description="scheduled, sending, sent, retrying, failed, skipped or "
                                    "cancelled")
    attempts: int = Field(description="every attempt made at it; a move or a replay gives a "
                          "fresh budget of REMINDERS_MAX_ATTEMPTS but keeps the count")
    sent_at: str | None
    reason: str | None
    expires_at: str | None = None
    sent_version: int | None = None
    next_try_at: str | None = Field(None, description="handed back to the schedule unbegun: "
                                    "when it is tried next (its due_at stays, past)")
    via: str | None = Field(None, description='"sms": an email step that went (or, pending, '
                            "goes) by SMS: the patient unsubscribed from email and the step "
                            "is care-critical; its reason says so")


class Timeline(BaseModel):
    """A booking and each of its reminders (DESIGN.md); `version` is also the ETag."""

    clinic: str
    booking_id: str
    status: str = Field(description="scheduled, held, cancelled or completed")
    version: int
    hold_reason: str | None = None
    late_pause: bool = Field(False, description="booked too late for the protocol's minimum "
                             "retinoid pause: the patient is asked to call the clinic")
    confirmed_at: str | None = Field(
        None, description="when the patient confirmed this visit by SMS (reply C); absent "
                          "until then, and again once the visit moves or is booked again")
    call_requested_at: str | None = Field(
        None, description="when the patient asked by SMS to be called (reply R); absent "
                          "until then")
    reminders: list[Reminder]


class BatchItem(BaseModel):
    index: int = Field(description="0-based position in the request's `bookings`")
    booking_id: str | None
    status: int = Field(description="200 updated, 201 created, 422 refused, 503 not "
                                    "stored for now (its protocol's file is being "
                                    "rewritten): send it again")
    timeline: Timeline | None = None
    error: ErrorDetail | None = None


class BatchResult(BaseModel):
    stored: int
    refused: int
    results: list[BatchItem]


class BookingSummary(BaseModel):
    booking_id: str
    status: str
    version: int
    treatment: str | None
    starts_at: str | None
    hold_reason: str | None = None
    updated_at: str | None = None


class BookingPage(BaseModel):
    bookings: list[BookingSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null "
                                                "at the end")


class DeadLetter(BaseModel):
    ref: str = Field(description="clinic/booking_id/reminder id")
    booking_id: str
    id: str
    channel: str | None
    attempts: int
    failed_at: str | None
    reason: str | None
    via: str | None = Field(None, description='"sms": an email step that went by SMS (the '
                            "patient unsubscribed from email; a care-critical step): the "
                            "reason is the SMS provider's")


class DeadLetters(BaseModel):
    dead_letters: list[DeadLetter]


class ReplayRequest(BaseModel):
    """Which dead letters to replay: `refs` (at least one) or `all: true`, not both."""

    # strict: `"all": "yes"` or `1` is refused, not taken as true (which replays everything).
    model_config = ConfigDict(extra="forbid", strict=True)

    refs: list[str] = Field(
        default_factory=list, max_length=1000,
        description="dead letters to send again: each a ref (clinic/booking/reminder) or a "
                    "booking id (all of its dead letters)")
    all: bool = Field(False, description="replay every dead letter of the clinic")


class Replayed(BaseModel):
    replayed: list[str]


class RedisSettingWarning(BaseModel):
    setting: str = Field(description="appendonly, appendfsync, maxmemory-policy or role")
    value: str | None = Field(description="as Redis has it; null: could not be read")
    problem: str = Field(description="what it can cost the schedule, and the fix")


class Health(BaseModel):
    status: str = Field(description="ok, or what is wrong")
    redis: str = Field(description="ok, unreachable, refuses writes (OOM, MISCONF, READONLY, "
                       "NOREPLICAS, MASTERDOWN) or error (another error reply: NOPERM...)")
    pump: str | None = Field(None, description="ok, never (no pump run recorded), stale (no "
                             "recent pump run) or behind (a due reminder waits too long)")
    pump_heartbeat_age_seconds: float | None = Field(
        None, description="seconds since the last pump run ended (Redis's clock)")
    oldest_due_overdue_seconds: float | None = None
    redis_settings: list[RedisSettingWarning] | None = Field(
        None, description="Redis settings that can lose or evict the schedule (AOF off, "
        "appendfsync no, a maxmemory-policy other than noeviction, a replica), or could not "
        "be read: warnings only, never a 503")


ERROR_DESCRIPTIONS = {
    401: "no API key, or not a valid one (WWW-Authenticate says so)",
    403: "the key's clinic is not configured on this service (nothing stored)",
    404: "no such booking (or dead letter) for this clinic",
    409: "the booking is not in a state that allows this",
    412: "If-Match does not name the current version",
    413: "the body is too large",
    415: "the body is not application/json",
    422: "invalid request: every bad field is named",
    429: "this key's request rate is spent; see Retry-After",
    503: "the schedule store (Redis) is unreachable; see Retry-After",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these refusals, all in the ErrorBody shape."""
    return {s: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def replay_schema() -> dict[str, Any]:
    """ReplayRequest as the API takes it: `refs` (at least one) or `all: true`, not both."""
    schema = ReplayRequest.model_json_schema()
    schema["oneOf"] = [
        {"required": ["refs"], "properties": {"refs": {"minItems": 1}}},
        {"required": ["all"], "properties": {"all": {"const": True}}},
    ]
    return schema


def booking_schemas(max_batch: int) -> dict[str, Any]:
    """Return the request-body schemas: BookingIn (one booking) and BatchIn, plus their parts.

    The booking's own model, with `clinic` (taken from the key) and `booking_id` (taken
    from the URL) optional, and the DESIGN.md booking as its example.
    """
    schema = Booking.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    booking = copy.deepcopy(schema)
    booking["title"] = "BookingIn"
    booking["required"] = [f for f in booking["required"] if f not in ("clinic", "booking_id")]
    booking["description"] = (
        "A booking (DESIGN.md). `clinic` comes from the API key: leave it out, or give the "
        "key's own. `booking_id` comes from the URL: leave it out, or give the same.")
    booking["examples"] = [EXAMPLE_BOOKING]
    # parse_booking takes a null clinic as a missing one (the key's clinic is used).
    booking["properties"]["clinic"] = {
        "anyOf": [booking["properties"]["clinic"], {"type": "null"}],
        "description": "the key's clinic; left out (or null) it is taken from the key"}
    batch = {
        "title": "BatchIn",
        "type": "object",
        "additionalProperties": False,
        "required": ["bookings"],
        "properties": {
            "bookings": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "items": {"$ref": "#/components/schemas/BatchBookingIn"},
            }
        },
    }
    batch_booking = copy.deepcopy(booking)
    batch_booking["title"] = "BatchBookingIn"
    batch_booking["required"] = [*batch_booking["required"], "booking_id"]
    return {**defs, "BookingIn": booking, "BatchBookingIn": batch_booking, "BatchIn": batch}
