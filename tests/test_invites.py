"""Calendar invites on real emails (a real aiosmtpd server), dates the locale's way, and
the language fallback patient -> clinic -> English."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import icalendar
import pytest

from tests.sinks import SmtpSink
from worker.catalog import Catalog
from worker.delivery import Envelope, deliver, send_apprise
from worker.invites import invite_uid
from worker.models import Booking
from worker.notices import Invite, Notice, notice_and_invite
from worker.rendering import Renderer

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def renderer(catalog: Catalog) -> Renderer:
    return Renderer(catalog.templates_dir)


def booking(catalog: Catalog, doc: dict[str, Any], **patient: Any) -> Booking:
    doc["patient"].update(patient)
    return Booking.model_validate(doc, context={"catalog": catalog})


def render(renderer: Renderer, catalog: Catalog, b: Booking, template: str = "confirmation",
           channel: str = "email", clinic: str = "glow", **extra: Any):
    return renderer.render(template=template, channel=channel, booking=b,  # type: ignore[arg-type]
                           clinic=catalog.clinics[clinic],
                           protocol=catalog.protocols[b.treatment], occurrence=1, due_at=NOW,
                           now=NOW, **extra)


def calendar_part(raw: email.message.EmailMessage) -> tuple[email.message.EmailMessage, Any]:
    parts = [p for p in raw.walk() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, [p.get_content_type() for p in raw.walk()]
    return parts[0], icalendar.Calendar.from_ical(parts[0].get_payload(decode=True))


def test_the_confirmation_email_carries_the_invite_to_a_real_smtp_server(
        renderer, catalog, booking_doc):
    b = booking(catalog, booking_doc)
    message = render(renderer, catalog, b, invite=Invite(0, "REQUEST"))
    sink = SmtpSink().start()
    try:
        url = f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example&to=ana@example.com&mode=insecure"
        assert send_apprise(url, message, 5) == "sent through Apprise"
        (received,) = sink.snapshot()
    finally:
        sink.stop()
    assert received.subject == message.subject and "Ana" in received.text
    part, cal = calendar_part(received.raw)
    assert part.get_filename() == "appointment.ics"
    assert part.get_param("method") == "REQUEST"  # what calendar programs look for
    assert cal["METHOD"] == "REQUEST"
    (event,) = cal.walk("VEVENT")
    assert event.decoded("DTSTART") == b.starts_at  # the same instant ...
    assert str(event["DTSTART"].params["TZID"]) == "Europe/Madrid"  # ... in the clinic's zone
    assert [tz["TZID"] for tz in cal.walk("VTIMEZONE")] == ["Europe/Madrid"]
    assert (event.decoded("DTEND") - event.decoded("DTSTART")).total_seconds() == 3600
    assert str(event["UID"]) == invite_uid("glow", "A-1042") == (
        "A-1042.glow@aftercare-reminders.invalid")  # no patient data in the UID
    assert event["SEQUENCE"] == 0
    assert str(event["LOCATION"]) == "Glow Skin Clinic, Calle de Serrano 41, 28001 Madrid"
    assert str(event["SUMMARY"]) == "Microneedling en Glow Skin Clinic"
    assert str(event["ORGANIZER"]) == "mailto:hola@glow.example"


def test_discreet_clinics_name_no_treatment_in_the_invite(renderer, catalog, booking_doc):
    b = booking(catalog, booking_doc)
    glow = catalog.clinics["glow"].model_copy(update={"discreet": True})
    message = renderer.render(template="confirmation", channel="email", booking=b, clinic=glow,
                              protocol=catalog.protocols["microneedling"], occurrence=1,
                              due_at=NOW, now=NOW, invite=Invite(0, "REQUEST"))
    cal = icalendar.Calendar.from_ical(message.attachments[0].data)
    text = cal.to_ical().decode().lower()
    assert "microneedling" not in text and str(cal.walk("VEVENT")[0]["SUMMARY"]) == (
        "Cita en Glow Skin Clinic")


def test_which_emails_carry_which_invite(catalog, booking_doc):
    b = booking(catalog, booking_doc)
    mn = catalog.protocols["microneedling"]
    stored = {"seq": "2", "moved_from": str(int(NOW.timestamp())), "paused": "1"}

    def extras(step: str, channel: str, occurrence: str = "1") -> dict[str, Any]:
        record = {"step": step, "channel": channel, "occurrence": occurrence}
        return dict(notice_and_invite(record, channel, b, mn, stored, NOW))

    # An invite step's email: the booking's current sequence (a day-before after moves).
    assert extras("booking-confirmation", "email") == {"invite": Invite(2, "REQUEST")}
    assert extras("day-before", "email") == {"invite": Invite(2, "REQUEST")}
    assert extras("day-before", "sms") == {}
    assert extras("prep", "email") == {}
    # A notice: its own sequence; a cancel's email cancels the event.
    moved = extras("rescheduled", "email", "2")
    assert moved["invite"] == Invite(2, "REQUEST")
    assert moved["notice"].previous_start == NOW and moved["notice"].paused
    # The pause for 5 December begins again on 28 November at 18:00 Madrid time.
    assert moved["notice"].pause_from == datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
    assert extras("cancelled", "email", "3")["invite"] == Invite(3, "CANCEL")
    assert "invite" not in extras("cancelled", "sms", "3")


def test_the_outbox_keeps_the_invite(renderer, catalog, booking_doc, tmp_path: Path):
    b = booking(catalog, booking_doc)
    message = render(renderer, catalog, b, template="cancelled", invite=Invite(3, "CANCEL"),
                     notice=Notice(paused=True))
    envelope = Envelope(ref="glow/A-1042/cancelled#3:email", clinic="glow", channel="email",
                        to="ana@example.com")
    deliver(None, envelope, message, outbox=tmp_path, timeout=5, now=NOW)
    (path,) = tmp_path.glob("*.eml")
    raw = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    part, cal = calendar_part(raw)  # type: ignore[arg-type]
    assert part.get_param("method") == "CANCEL"
    assert cal["METHOD"] == "CANCEL"
    (event,) = cal.walk("VEVENT")
    assert event["SEQUENCE"] == 3 and event["STATUS"] == "CANCELLED"
    assert "puedes retomarlos como antes" in message.text


@pytest.mark.parametrize(("locale", "when"), [
    ("es", "5 de diciembre, 14:30"),
    ("en-US", "December 5, 2:30\u202fPM"),
    ("en-GB", "5 December, 14:30"),
])
def test_dates_and_times_the_locales_way(renderer, catalog, booking_doc, locale, when):
    b = booking(catalog, booking_doc, locale=locale)
    context = renderer.context(booking=b, clinic=catalog.clinics["glow"],
                               protocol=catalog.protocols["microneedling"], occurrence=1,
                               due_at=NOW)
    assert context["appointment_when"] == when
    subject = render(renderer, catalog, b, template="rescheduled").subject
    assert subject is not None and when.replace("\u202f", " ") in subject.replace("\u202f", " ")


@pytest.mark.parametrize(("patient", "clinic", "language"), [
    ("fr", "glow", "es"),  # no French templates: the clinic's language
    ("fr", "demo", "en"),
    ("es-MX", "demo", "es"),  # a region of a language there are templates for
    ("en-GB", "glow", "en"),
])
def test_the_language_falls_back_patient_clinic_english(renderer, catalog, booking_doc,
                                                         patient, clinic, language):
    b = booking(catalog, booking_doc, locale=patient)  # accepted: Babel knows the locale
    message = render(renderer, catalog, b, clinic=clinic)
    greeting = {"es": "Hola, Ana:", "en": "Hi Ana,"}[language]
    assert message.text.startswith(greeting), message.text[:40]


def test_english_is_the_last_fallback(renderer, catalog, booking_doc, tmp_path):
    glow = catalog.clinics["glow"].model_copy(update={"locale": "de"})
    assert renderer.fallback("fr", glow) == "en"
    assert renderer.fallback("es-AR", glow) == "es-AR"


def client_offset(vtimezone: Any, instant: datetime) -> Any:
    """The UTC offset a calendar program reads from `vtimezone` at `instant` (RFC 5545
    3.6.5: each observance begins at its DTSTART and RDATEs, local times in its
    TZOFFSETFROM; the one begun last is in force)."""
    onsets = []
    for observance in vtimezone.subcomponents:
        assert "RRULE" not in observance  # (none written: every onset is listed)
        rdates = observance.get("RDATE", [])
        local = [observance.decoded("DTSTART")] + [
            p.dt for r in (rdates if isinstance(rdates, list) else [rdates]) for p in r.dts]
        offset_from = observance.decoded("TZOFFSETFROM")
        onsets += [(t.replace(tzinfo=None) - offset_from, observance.decoded("TZOFFSETTO"))
                   for t in local]
    begun = [o for o in sorted(onsets, key=lambda o: o[0])
             if o[0] <= instant.astimezone(UTC).replace(tzinfo=None)]
    assert begun, "the VTIMEZONE does not cover the visit"
    return begun[-1][1]


@pytest.mark.parametrize(("zone", "starts_at"), [
    ("Europe/Madrid", "2027-04-02T10:30:00+02:00"),  # after the spring change
    ("Europe/Madrid", "2027-03-28T03:30:00+02:00"),  # the first hour of summer time
    ("America/New_York", "2027-03-14T03:15:00-04:00"),
    ("Africa/Casablanca", "2027-02-17T11:00:00+00:00"),  # Ramadan: an hour back, 5 weeks
    ("Africa/Casablanca", "2027-04-02T11:00:00+01:00"),
])
def test_a_calendar_reads_the_visit_at_its_instant_from_the_invites_own_vtimezone(
        renderer, catalog, booking_doc, zone, starts_at):
    """A calendar program places the event by the VTIMEZONE the invite carries, not by its
    own idea of the TZID's rules: those must give the visit's instant."""
    booking_doc["starts_at"] = starts_at
    b = booking(catalog, booking_doc)
    clinic = catalog.clinics["glow"].model_copy(update={"timezone": zone})
    message = renderer.render(template="confirmation", channel="email", booking=b,
                              clinic=clinic, protocol=catalog.protocols["microneedling"],
                              occurrence=1, due_at=NOW, now=NOW, invite=Invite(0, "REQUEST"))
    cal = icalendar.Calendar.from_ical(message.attachments[0].data)
    (vtimezone,) = cal.walk("VTIMEZONE")
    (event,) = cal.walk("VEVENT")
    assert str(vtimezone["TZID"]) == str(event["DTSTART"].params["TZID"]) == zone
    for name in ("DTSTART", "DTEND"):
        wall = event.decoded(name).replace(tzinfo=None)  # as written: the zone's wall clock
        instant = b.starts_at + (event.decoded(name) - event.decoded("DTSTART"))
        assert wall - client_offset(vtimezone, instant) == instant.astimezone(UTC).replace(
            tzinfo=None), (name, wall, client_offset(vtimezone, instant))
