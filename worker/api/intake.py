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
from .errors import REDIS_RETRY_AFTER_SECONDS, ApiError


def refused(errors: list[tuple[str, str]]) -> ApiError:
    return ApiError(422, "the booking was refused; nothing was stored", code="invalid_booking",
                    fields=errors)


def protocol_readable(doc: Any, catalog: Catalog) -> None:
    """Refuse (503, to send again) a booking whose treatment's protocol file is missing
    from config/ as read now but was there a moment ago (`Catalog.former_protocols`: a
    deploy rewriting config/): "no protocol for treatment" (422) would tell the clinic's
    system the booking is wrong and not to send it again."""
    treatment = doc.get("treatment") if isinstance(doc, dict) else None
    if isinstance(treatment, str) and treatment not in catalog.protocols \
            and treatment in catalog.former_protocols:
        raise ApiError(503, f"the protocol of treatment {treatment!r} is not readable right "
                            "now (its file is being rewritten in config/); nothing was "
                            "stored: send the booking again shortly",
                       headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)})


def intake(doc: Any, clinic: str, booking_id: str | None, catalog: Catalog,
           now: datetime) -> tuple[Booking, Plan]:
    """Return the booking and its plan, or raise ApiError(422) naming every bad field
    (503 while its protocol's file is missing a moment: `protocol_readable`)."""
    protocol_readable(doc, catalog)
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
