"""A booking document from the API, validated and planned for the calling clinic.

The clinic is the key's: a document naming another is refused on `clinic`, one without
it gets the key's. The booking id is the URL's (PUT) or the item's own (batch): a
document naming a different one is refused on `booking_id`. Validation is the CLI's
(`parse_booking`, which names fields with `field_errors`), so both name fields alike.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..catalog import Catalog
from ..errors import BookingRejected
from ..models import Booking, parse_booking
from ..planner import Plan, plan
from .errors import ApiError


def refused(errors: list[tuple[str, str]]) -> ApiError:
    return ApiError(422, "the booking was refused; nothing was stored", code="invalid_booking",
                    fields=errors)


def intake(doc: Any, clinic: str, booking_id: str | None, catalog: Catalog,
           now: datetime) -> tuple[Booking, Plan]:
    """Return the booking and its plan, or raise ApiError(422) naming every bad field."""
    errors: list[tuple[str, str]] = []
    if isinstance(doc, dict) and booking_id is not None:
        if "booking_id" not in doc:
            doc = {**doc, "booking_id": booking_id}
        elif (given := doc["booking_id"]) != booking_id:
            shown = repr(given) if isinstance(given, str) else json.dumps(given)
            errors.append(("booking_id", f"is {shown} but the URL names {booking_id!r}"))
    try:
        booking = parse_booking(doc, catalog, clinic=clinic)
    except BookingRejected as exc:
        raise refused(errors + [e for e in exc.errors if not (errors and e[0] == "booking_id")]
                      ) from None
    if errors:
        raise refused(errors)
    try:
        planned = plan(booking, catalog.protocols[booking.treatment],
                       catalog.clinics[booking.clinic], now)
    except BookingRejected as exc:
        raise refused(exc.errors) from None
    return booking, planned
