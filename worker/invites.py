"""Calendar invites: the `.ics` attached to the confirmation, day-before and change emails.

One event per booking, built with the icalendar library:
  UID       stable per booking: clinic and booking id (no patient data), so a calendar
            updates the same event when the appointment moves and removes it on a cancel
  SEQUENCE  the booking's invite sequence, kept in the store: 0 when booked, one more on
            every move and on a cancel (`Store` field `seq`)
  METHOD    REQUEST (an invite or its update), CANCEL (the event is cancelled)
  DTSTART   the appointment instant in the clinic's timezone (TZID), with the VTIMEZONE
            of that zone, so it imports at the right time in any calendar; DTEND after the
            protocol's `visit_minutes`
  LOCATION  the clinic's name and `address`
ORGANIZER is the clinic (its email, else a no-reply address of the clinic's id) and the
patient is the one ATTENDEE: calendar programs want both for REQUEST and CANCEL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from icalendar import Calendar, Event, vCalAddress, vText

from .clinics import Clinic
from .models import Booking
from .notices import Method
from .protocols import Protocol

PRODID = "-//Aftercare reminders//Calendar invite//EN"
UID_DOMAIN = "aftercare-reminders.invalid"
FILE_NAME = "appointment.ics"


@dataclass(frozen=True)
class Attachment:
    """A file attached to an email."""

    name: str
    mimetype: str  # the whole Content-Type value, parameters included
    data: bytes


def invite_uid(clinic: str, booking_id: str) -> str:
    """Return the event's UID: the same for every invite of one booking."""
    return f"{booking_id}.{clinic}@{UID_DOMAIN}"


def build_invite(
    *,
    booking: Booking,
    clinic: Clinic,
    protocol: Protocol,
    summary: str,
    description: str,
    sequence: int,
    method: Method,
    now: datetime,
) -> Attachment:
    """Return the `.ics` attachment of one booking's appointment."""
    tz = ZoneInfo(clinic.timezone)
    start = booking.starts_at.astimezone(tz)
    cal = Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("calscale", "GREGORIAN")
    cal.add("method", method)
    event = Event()
    event.add("uid", invite_uid(clinic.id, booking.booking_id))
    event.add("sequence", sequence)
    event.add("dtstamp", now.astimezone(UTC))
    event.add("dtstart", start)
    event.add("dtend", start + timedelta(minutes=protocol.visit_minutes))
    event.add("summary", summary)
    event.add("description", description)
    event.add("location", ", ".join(p for p in (clinic.name, clinic.address) if p))
    event.add("status", "CANCELLED" if method == "CANCEL" else "CONFIRMED")
    event.add("transp", "OPAQUE")
    organizer = vCalAddress(f"mailto:{clinic.email or f'no-reply@{clinic.id}.{UID_DOMAIN}'}")
    organizer.params["cn"] = vText(clinic.name)
    event.add("organizer", organizer)
    if booking.patient.email:
        attendee = vCalAddress(f"mailto:{booking.patient.email}")
        attendee.params["cn"] = vText(booking.patient.first_name)
        attendee.params["role"] = vText("REQ-PARTICIPANT")
        attendee.params["rsvp"] = vText("FALSE")
        event.add("attendee", attendee)
    cal.add_component(event)
    # The VTIMEZONE of the clinic's zone, its rules for a year either side of the visit
    # (compact; the whole history would be a few kilobytes of past transitions).
    cal.add_missing_timezones(first_date=start.date() - timedelta(days=366),
                              last_date=start.date() + timedelta(days=366))
    return Attachment(
        name=FILE_NAME,
        mimetype=f"text/calendar; method={method}; charset=UTF-8",
        data=cal.to_ical(),
    )
