"""Calendar invites: the `.ics` attached to the confirmation, day-before and change emails.

One event per booking, built with the icalendar library:
  UID       stable per booking: clinic and booking id (no patient data), so a calendar
            updates the same event when the appointment moves and removes it on a cancel
  SEQUENCE  the revision of the event (RFC 5546: a calendar applies a REQUEST or CANCEL only
            if its SEQUENCE is above the one it has; equal is the same revision, ignored).
            Built at the booking's change sequence (`Store` field `seq`: 0 when booked,
            one more on every move and on a cancel), then raised as the send path records
            it (`Store.invite_sequence`, before the hand-over): an invite whose event differs
            in anything but DTSTAMP and SEQUENCE (`content_key`: a new treatment's title
            or visit length, an edited address or invite wording, a cancel) from the last
            one made for the booking goes one above that one's; the same event again (the
            day-before email after the confirmation, a retry) at the same SEQUENCE
  METHOD    REQUEST (an invite or its update), CANCEL (the event is cancelled)
  DTSTART   the appointment instant in the clinic's timezone (TZID), with the VTIMEZONE
            of that zone, so it imports at the right time in any calendar; DTEND after the
            protocol's `visit_minutes`. The VTIMEZONE is written here (`vtimezone`), not by
            icalendar's `add_missing_timezones`: that one searches for changes in steps of
            64 days and missed a change and its return within them (Morocco's hour back for
            Ramadan: a visit then was an hour off in the patient's calendar), and wrote each
            spring change's onset in the new offset's local time, an hour late by RFC 5545
  LOCATION  the clinic's name and `address`
ORGANIZER is the clinic (its email, else a no-reply address of the clinic's id) and the
patient is the one ATTENDEE: calendar programs want both for REQUEST and CANCEL.

The icalendar library is imported at the first invite a process makes (about 25 ms, once),
not with this module: the send path imports this module, and a worker's pool process that
sends no invite would hold the library's 80 modules (about 2.5 MB) for nothing. Sender
threads making their first invites at once are safe: Python's import lock makes a thread
that finds the import under way in another wait for it to finish
(tests/test_invite_import.py).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from .clinics import Clinic
from .models import Booking
from .notices import Method
from .protocols import Protocol

if TYPE_CHECKING:
    from icalendar import Timezone

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
    # Imported at the process's first invite (see the module's docstring).
    from icalendar import Calendar, Event, vCalAddress, vText

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
    tzid = event["DTSTART"].params.get("TZID")  # none for UTC: "Z" times need no VTIMEZONE
    if tzid:
        # The VTIMEZONE of the clinic's zone, its rules from the start of the year before
        # the visit's to the end of the year after it (compact; the whole history would be
        # a few kilobytes of past transitions; whole years: worked out once a zone and year).
        cal.add_component(vtimezone(str(tzid), date(start.year - 1, 1, 1),
                                    date(start.year + 2, 1, 1)))
    cal.add_component(event)
    return Attachment(
        name=FILE_NAME,
        mimetype=f"text/calendar; method={method}; charset=UTF-8",
        data=cal.to_ical(),
    )


# The lines of an unfolded .ics that change with every invite made, not with its event.
_STAMPS = re.compile(rb"^(?:DTSTAMP|SEQUENCE)[;:][^\r\n]*\r\n", re.MULTILINE)
_SEQUENCE = re.compile(rb"^SEQUENCE:([0-9]+)\r\n", re.MULTILINE)


def content_key(data: bytes) -> str:
    """Return a digest of what a calendar shows of an invite (`build_invite`'s `data`): the
    whole calendar but for DTSTAMP and SEQUENCE (the method, title, description, start, end,
    time zone, location, status, organizer and attendee). Equal digests: the same event."""
    unfolded = data.replace(b"\r\n ", b"").replace(b"\r\n\t", b"")
    return hashlib.sha256(_STAMPS.sub(b"", unfolded)).hexdigest()[:20]


def sequence_of(invite: Attachment) -> int:
    """Return the SEQUENCE `invite` (`build_invite`'s) was built with."""
    found = _SEQUENCE.search(invite.data)
    if found is None:
        raise ValueError("the invite has no SEQUENCE")
    return int(found.group(1))


def with_sequence(invite: Attachment, sequence: int) -> Attachment:
    """Return `invite` (`build_invite`'s) with its event's SEQUENCE set to `sequence`."""
    data, found = _SEQUENCE.subn(f"SEQUENCE:{sequence}\r\n".encode(), invite.data, count=1)
    if not found:
        raise ValueError("the invite has no SEQUENCE")
    return replace(invite, data=data)


# The state of a zone at an instant: its UTC offset, daylight saving part and name.
_State = tuple[timedelta, timedelta, str]


def _state(tz: ZoneInfo, instant: datetime) -> _State:
    local = instant.astimezone(tz)
    return local.utcoffset() or timedelta(), local.dst() or timedelta(), local.tzname() or ""


@functools.lru_cache(maxsize=64)
def _transitions(tzid: str, first: date, last: date) -> tuple[_State, tuple[
        tuple[datetime, _State, _State], ...]]:
    """The zone's state at `first` (midnight UTC) and each change until `last`: (instant
    in UTC, state before, state after). Sampled daily (no zone changes twice within a
    day), each change then found to the second."""
    tz = ZoneInfo(tzid)
    at = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC)
    step = timedelta(days=1)
    initial = before = _state(tz, at)
    changes = []
    while at < end:
        after = _state(tz, at + step)
        if after != before:
            lo, hi = at, at + step  # before at lo, after at hi
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                if _state(tz, mid) == before:
                    lo = mid
                else:
                    hi = mid
            changes.append((hi.replace(microsecond=0), before, after))
            before = after
        at += step
    return initial, tuple(changes)


def vtimezone(tzid: str, first: date, last: date) -> Timezone:
    """Return the VTIMEZONE of `tzid` from `first` to `last` (RFC 5545 3.6.5): an
    observance from `first` with the zone's state then, and the zone's changes, each onset
    the local time before it (in its TZOFFSETFROM), as the RFC's examples have it (02:00 for
    the US spring change, not the 03:00 the clocks then show). Changes alike (the same
    offsets and name) are one observance, its first onset DTSTART and the others RDATEs,
    in the shape icalendar writes."""
    from icalendar import Timezone, TimezoneDaylight, TimezoneStandard

    initial, changes = _transitions(tzid, first, last)
    onsets: dict[tuple[timedelta, timedelta, bool, str], list[datetime]] = {}
    for onset, before, after in [
            (datetime(first.year, first.month, first.day) + initial[0], initial, initial),
            *(((instant + before[0]).replace(tzinfo=None), before, after)
              for instant, before, after in changes)]:
        onsets.setdefault((before[0], after[0], bool(after[1]), after[2]), []).append(onset)
    tz = Timezone()
    tz.add("tzid", tzid)
    for (offset_from, offset_to, daylight, name), when in onsets.items():
        observance = TimezoneDaylight() if daylight else TimezoneStandard()
        observance.add("dtstart", when[0])
        if len(when) > 1:
            observance.add("rdate", when[1:])
        observance.add("tzoffsetfrom", offset_from)
        observance.add("tzoffsetto", offset_to)
        if name:
            observance.add("tzname", name)
        tz.add_component(observance)
    return tz
