"""What a patient is told when the clinic moves or cancels a booking: real Redis, a real
Celery worker and beat, a real SMTP server (aiosmtpd) and a real SMS gateway.

The .ics of each email is parsed back with icalendar from what the SMTP server received."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
from babel.dates import format_skeleton

from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration

# Confirmation (with the invite) at booking; "stop tretinoin" a few seconds later.
CHANGES_PROTOCOL = """
name = "Change notices test protocol"
visit_minutes = 45
[[steps]]
id = "confirm"
at = "booking"
channels = ["email"]
template = "confirmation"
late = "send"
invite = true
[[steps]]
id = "stop-retinoids"
offset = "-{stop}s"
channels = ["sms"]
template = "stop-retinoids"
only_if_any = ["tretinoin"]
late = "send"
pause = true
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
no_tanning_before = true
clean_skin_on_the_day = true
ask_acne_eczema_rosacea = true
ask_cold_sore_or_infection = true
isotretinoin_months = 6
retinoids_sensitise = true
no_retinoid_on_the_day = true
retinoid_pause_min_days = 5
gentle_care = true
"""


@pytest.fixture
def changes(e2e_config, service):
    """The protocol `changes`: the stop message 2 s after booking a visit 30 s away."""
    (e2e_config / "protocols" / "changes.toml").write_text(
        CHANGES_PROTOCOL.replace("{stop}", "28"), encoding="utf-8")
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_text(clinic.read_text().replace(
        'timezone = "UTC"', 'timezone = "UTC"\naddress = "Calle Mayor 1, 28013 Madrid"'))
    service.up()
    return service


def doc(booking_id: str, starts_at: datetime, phone: str, **patient: Any) -> dict[str, Any]:
    return {
        "clinic": "e2e", "booking_id": booking_id, "treatment": "changes",
        "starts_at": starts_at.isoformat(timespec="seconds"),
        "patient": {"name": "Ana López", "email": f"{booking_id.lower()}@example.com",
                    "phone": phone, "timezone": "Europe/Madrid", "locale": "en",
                    "channels": ["sms", "email"], **patient},
        "medications": {"tretinoin": True},
    }


def emails_to(smtp_sink, address: str) -> list[Any]:
    return [m for m in smtp_sink.snapshot() if m.to == address]


def texts_to(sms_sink, phone: str) -> list[Any]:
    return [m for m in sms_sink.snapshot() if m.to == phone]


def invite(message) -> tuple[Any, Any]:
    """The calendar and its one event from a received email's .ics part."""
    parts = [p for p in message.raw.walk() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, message.subject
    cal = icalendar.Calendar.from_ical(parts[0].get_payload(decode=True))
    (event,) = cal.walk("VEVENT")
    return cal, event


def test_move_then_cancel_after_the_pause_went_out(changes, smtp_sink, sms_sink):
    start = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)
    phone, address = "+34600111301", "c-1@example.com"
    changes.book(doc("C-1", start, phone))
    wait_until(lambda: emails_to(smtp_sink, address) and texts_to(sms_sink, phone), 20)
    (confirmation,) = emails_to(smtp_sink, address)
    cal, event = invite(confirmation)
    assert cal["METHOD"] == "REQUEST" and event["SEQUENCE"] == 0
    assert event.decoded("DTSTART") == start
    assert (event.decoded("DTEND") - start) == timedelta(minutes=45)
    uid = str(event["UID"])
    assert uid == "C-1.e2e@aftercare-reminders.invalid"
    assert str(event["LOCATION"]) == "E2E Skin Clinic, Calle Mayor 1, 28013 Madrid"
    (stop,) = texts_to(sms_sink, phone)
    assert "stop tretinoin" in stop.text

    # The clinic moves the visit two days on: the invite update and the correction.
    moved = start + timedelta(days=2)
    timeline = changes.book(doc("C-1", moved, phone))[0]
    assert {r["id"] for r in timeline["reminders"]} >= {"rescheduled#1:email",
                                                        "rescheduled#1:sms"}
    # ... and the stop message again, for the new date.
    (repause,) = [r for r in timeline["reminders"] if r["id"] == "repause#1:sms"]
    assert repause["due_at"] == (moved - timedelta(seconds=28)).isoformat().replace(
        "+00:00", "Z")
    wait_until(lambda: len(emails_to(smtp_sink, address)) >= 2
               and len(texts_to(sms_sink, phone)) >= 2, 20)
    update = emails_to(smtp_sink, address)[1]
    cal, event = invite(update)
    assert cal["METHOD"] == "REQUEST"
    assert str(event["UID"]) == uid and event["SEQUENCE"] == 1
    assert event.decoded("DTSTART") == moved
    correction = texts_to(sms_sink, phone)[1].text
    madrid = ZoneInfo("Europe/Madrid")
    new_day = format_skeleton("MMMd", moved.astimezone(madrid), locale="en")
    pause_day = format_skeleton("MMMd", (moved - timedelta(seconds=28)).astimezone(madrid),
                                locale="en")
    assert f"your visit moved to {new_day}" in correction, correction
    assert f"You may use tretinoin/retinol until {pause_day}, then stop again" in correction
    assert correction.endswith("Reply STOP to opt out")

    # Then cancels it: the event is cancelled, and the patient may resume.
    assert changes.cli("cancel", "--clinic", "e2e", "C-1").returncode == 0
    wait_until(lambda: len(emails_to(smtp_sink, address)) >= 3
               and len(texts_to(sms_sink, phone)) >= 3, 20)
    cancel = emails_to(smtp_sink, address)[2]
    cal, event = invite(cancel)
    assert cal["METHOD"] == "CANCEL" and str(event["STATUS"]) == "CANCELLED"
    assert str(event["UID"]) == uid and event["SEQUENCE"] == 2
    assert "you may resume them as before" in cancel.text
    assert "You may resume tretinoin/retinol as before" in texts_to(sms_sink, phone)[2].text
    shown = changes.show("C-1")
    assert shown["status"] == "cancelled"
    assert [r["status"] for r in shown["reminders"] if r["id"] == "repause#1:sms"] == [
        "cancelled"]
    assert {r["id"]: r["status"] for r in shown["reminders"]
            if r["id"].startswith(("rescheduled", "cancelled"))} == {
        "rescheduled#1:email": "sent", "rescheduled#1:sms": "sent",
        "cancelled#2:email": "sent", "cancelled#2:sms": "sent"}


def test_cancel_before_the_pause_tells_nothing_about_it(changes, smtp_sink, sms_sink):
    # The stop message is 28 s before a visit 60 s away: still 32 s off at the cancel.
    start = (datetime.now(UTC) + timedelta(seconds=60)).replace(microsecond=0)
    phone, address = "+34600111302", "c-2@example.com"
    sms_only = "+34600111303"
    changes.book(doc("C-2", start, phone), doc("C-3", start, sms_only, channels=["sms"]))
    # C-2's confirmation (with its invite) by email; C-3's by SMS (no invite).
    wait_until(lambda: emails_to(smtp_sink, address) and texts_to(sms_sink, sms_only), 20)
    for booking_id in ("C-2", "C-3"):
        assert changes.cli("cancel", "--clinic", "e2e", booking_id).returncode == 0
    # The calendar event is cancelled; not a word about the product, no SMS.
    wait_until(lambda: len(emails_to(smtp_sink, address)) >= 2, 20)
    cancel = emails_to(smtp_sink, address)[1]
    cal, _ = invite(cancel)
    assert cal["METHOD"] == "CANCEL"
    assert "resume" not in cancel.text and "tretinoin" not in cancel.text
    # C-3 was told the date by SMS (its confirmation): the cancel by SMS too, and not a word
    # about the product (worker/notices.py).
    assert sorted(r["id"] for r in changes.show("C-3")["reminders"]) == [
        "cancelled#1:sms", "confirm:sms", "stop-retinoids:sms"]
    wait_until(lambda: len(texts_to(sms_sink, sms_only)) >= 2, 20)
    told = texts_to(sms_sink, sms_only)[1].text
    assert "cancelled" in told and "resume" not in told and "tretinoin" not in told, told
    time.sleep(2.5)  # a couple of pump rounds: nothing else is sent
    assert texts_to(sms_sink, phone) == []
    assert len(texts_to(sms_sink, sms_only)) == 2
    assert len(emails_to(smtp_sink, address)) == 2


# Two treatments the clinic may switch a booking between: the same steps (the confirmation
# and a day-before email, both carrying the invite), another name and visit length.
INVITE_PROTOCOL = """
name = "{name}"
visit_minutes = {minutes}
[[steps]]
id = "confirm"
at = "booking"
channels = ["email"]
template = "confirmation"
late = "send"
invite = true
[[steps]]
id = "day-before"
offset = "-12s"
channels = ["email"]
template = "day-before"
late = "send"
invite = true
[advice]
spf = 30
no_tanning_before = true
clean_skin_on_the_day = true
ask_acne_eczema_rosacea = true
ask_cold_sore_or_infection = true
isotretinoin_months = 6
"""


def test_a_changed_treatment_raises_the_invites_sequence_an_unchanged_resend_does_not(
        e2e_config, service, smtp_sink):
    """RFC 5546: an attendee's calendar applies a REQUEST only if its SEQUENCE is above the
    event's it has (equal: the same revision, ignored). The clinic switches a booking from a
    45-minute treatment to a 90-minute one after its confirmation went: the day-before
    email's invite has another title and end, so it must carry a higher SEQUENCE, or the
    patient's calendar keeps the old title and end. A booking left as it was carries its
    invite again at the same SEQUENCE (not a new revision)."""
    for treatment, name, minutes in (("short", "Short session", 45),
                                     ("long", "Long session", 90)):
        (e2e_config / "protocols" / f"{treatment}.toml").write_text(
            INVITE_PROTOCOL.format(name=name, minutes=minutes), encoding="utf-8")
    service.up()
    start = (datetime.now(UTC) + timedelta(seconds=20)).replace(microsecond=0)
    changed, kept = (dict(doc(b, start, "+34600111304", channels=["email"]), treatment="short")
                     for b in ("C-4", "C-5"))
    service.book(changed, kept)
    wait_until(lambda: emails_to(smtp_sink, "c-4@example.com")
               and emails_to(smtp_sink, "c-5@example.com"), 20)
    (confirmation,) = emails_to(smtp_sink, "c-4@example.com")
    _, before = invite(confirmation)
    assert before["SEQUENCE"] == 0 and str(before["SUMMARY"]) == "Short session at E2E Skin Clinic"
    assert before.decoded("DTEND") - before.decoded("DTSTART") == timedelta(minutes=45)

    service.book(dict(changed, treatment="long"))
    wait_until(lambda: len(emails_to(smtp_sink, "c-4@example.com")) >= 2
               and len(emails_to(smtp_sink, "c-5@example.com")) >= 2, 25)
    _, after = invite(emails_to(smtp_sink, "c-4@example.com")[1])
    assert str(after["UID"]) == str(before["UID"])
    assert str(after["SUMMARY"]) == "Long session at E2E Skin Clinic"
    assert after.decoded("DTEND") - after.decoded("DTSTART") == timedelta(minutes=90)
    assert after["SEQUENCE"] > before["SEQUENCE"], (before["SEQUENCE"], after["SEQUENCE"])
    # The booking left alone: its invite again, the same revision.
    sequences = [invite(m)[1]["SEQUENCE"] for m in emails_to(smtp_sink, "c-5@example.com")]
    assert sequences == [0, 0]
