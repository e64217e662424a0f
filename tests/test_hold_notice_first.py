"""A held booking's hold notice is the one message that goes while it is held: its own
messages held back (the confirmation, the day-before...) must not take the day's SMS cap
from it (real Redis, the real send path to a real HTTP SMS gateway; the rig of
tests/test_replan_caps.py: 1 SMS a day). Counted in due order, the confirmation (due at the
same opening, its key sorting first) took the day and the hold notice moved to the next
day: the patient learned a day late that the clinic would call. Once released, the
messages held are capped again counting the hold notice that went."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, time
from typing import Any

from tests.test_replan_caps import PHONE, TZ, Rig, day
from tests.test_replan_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_replan_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan


def _book(rig: Rig, booking_id: str, treatment: str, visit: int, now: datetime, *,
          email: bool = False, release: bool = False) -> None:
    """A patient whose last isotretinoin dose was 30 days before X (held)."""
    doc: dict[str, Any] = {
        "clinic": "rp", "booking_id": booking_id, "treatment": treatment,
        "starts_at": datetime.combine(day(rig, visit), time(14, 30), TZ).isoformat(),
        "patient": {"name": "Ana López", "phone": PHONE, "timezone": "Europe/Madrid",
                    "locale": "en", "channels": ["sms", "email"] if email else ["sms"]},
        "medications": {"tretinoin": False, "retinol": False,
                        "isotretinoin_last_dose": day(rig, -30).isoformat()}}
    if email:
        doc["patient"]["email"] = "ana@example.com"
    booking = parse_booking(doc, rig.catalog)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                   rig.catalog.clinics["rp"], now), now, release=release)


def _texts_at_booking(rig: Rig) -> None:
    """"held": a confirmation by SMS at booking, then the day-before; held for isotretinoin."""
    folder = rig.settings.config_dir / "protocols"
    (folder / "held.toml").write_text((folder / "eve2.toml").read_text(encoding="utf-8").replace(
        'name = "Two texts"', """name = "Held texts"
isotretinoin_washout_days = 182
[[steps]]
id = "booking-confirmation"
at = "booking"
channels = ["sms"]
template = "confirmation"
late = "send"
"""), encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)


def test_an_sms_only_patients_hold_notice_goes_at_its_time_then_the_release_is_capped(rig):
    """SMS only, microneedling (its confirmation by SMS), booked at X 22:00 and held: the hold
    notice goes at the next opening, X+1 09:00, not X+2. Released at X+1 12:00, after it
    went: the confirmation does not go on X+1 beside it; one SMS a day throughout."""
    now = rig.at(0, 22)
    _book(rig, "M-1", "microneedling", 10, now)
    shown = rig.store.timeline("rp", "M-1")
    assert shown["status"] == "held"
    hold = rig.reminders()["hold-notice:sms"]
    assert hold["status"] == "scheduled", hold
    assert rig.due("hold-notice:sms") == rig.at(1, 9), hold
    assert "limit" not in (hold["reason"] or ""), hold
    assert rig.send("M-1", "hold-notice:sms", rig.at(1, 9)) == "sent"
    assert len(rig.sms.snapshot()) == 1 and rig.sms.snapshot()[0].to == PHONE
    # The clinic releases it at noon the same day.
    _book(rig, "M-1", "microneedling", 10, rig.at(1, 12), release=True)
    shown = rig.reminders()
    assert rig.store.timeline("rp", "M-1")["status"] == "scheduled"
    assert shown["hold-notice:sms"]["status"] == "sent"
    confirmation = shown["booking-confirmation:sms"]
    assert confirmation["status"] == "scheduled", confirmation
    assert rig.due("booking-confirmation:sms").astimezone(TZ).date() > day(rig, 1), confirmation
    for key, r in sorted(shown.items(), key=lambda kv: kv[1]["due_at"]):
        if key.endswith(":sms") and r["status"] == "scheduled":
            assert rig.send("M-1", key, rig.due(key)) == "sent", (key, r)
    assert max(Counter(d for d, _ in rig.sent).values()) == 1, rig.sent
    assert rig.sent[0] == (day(rig, 1), "hold-notice:sms")


def test_the_hold_notice_keeps_its_sms_for_a_patient_with_email(rig):
    """SMS and email, a confirmation by SMS at booking (held): the confirmation SMS that will
    not go while held does not push the hold notice onto email; it stays an SMS at X+1
    09:00 and goes there."""
    _texts_at_booking(rig)
    _book(rig, "M-1", "held", 10, rig.at(0, 22), email=True)
    shown = rig.reminders()
    assert "hold-notice:email" not in shown, shown.get("hold-notice:email")
    assert shown["hold-notice:sms"]["status"] == "scheduled", shown["hold-notice:sms"]
    assert rig.due("hold-notice:sms") == rig.at(1, 9)
    assert rig.send("M-1", "hold-notice:sms", rig.at(1, 9)) == "sent"
    assert rig.sent == [(day(rig, 1), "hold-notice:sms")]


def test_other_bookings_still_count_and_held_messages_take_nothing_from_them(rig):
    """The patient's other bookings count toward the hold notice's day; the held booking's
    messages held back count for nothing. M-0 (not held) has its SMS on X+1 18:00: the
    hold notice of M-1, booked at X 22:00, finds X+1 taken and moves to X+2 09:00 (no email).
    M-2, booked after, with its SMS on X+3 18:00 keeps it: M-1's day-before and confirmation
    held back do not take it. Released on X+2 after its notice went, M-1's messages are
    capped around all of them: one SMS a day."""
    _texts_at_booking(rig)
    rig.book("M-0", 2, rig.at(0, 21), treatment="pre")  # X+1 18:00
    _book(rig, "M-1", "held", 4, rig.at(0, 22))  # confirmation; day-before X+3 10:00
    assert rig.due("hold-notice:sms") == rig.at(2, 9), rig.reminders()["hold-notice:sms"]
    rig.book("M-2", 4, rig.at(0, 22, 30), treatment="pre")  # X+3 18:00
    assert rig.reminders("M-2")["pre:sms"]["status"] == "scheduled"
    assert rig.due("pre:sms", "M-2") == rig.at(3, 18)
    assert rig.send("M-0", "pre:sms", rig.at(1, 18)) == "sent"
    assert rig.send("M-1", "hold-notice:sms", rig.at(2, 9)) == "sent"
    _book(rig, "M-1", "held", 4, rig.at(2, 12), release=True)
    assert rig.store.timeline("rp", "M-1")["status"] == "scheduled"
    confirmation = rig.reminders()["booking-confirmation:sms"]
    assert confirmation["status"] == "scheduled", confirmation
    assert rig.due("booking-confirmation:sms") == rig.at(4, 9), confirmation  # X+3: M-2's
    assert "limit" in confirmation["reason"], confirmation
    for key, r in rig.reminders().items():
        if key.endswith(":sms") and r["status"] == "scheduled":
            assert rig.send("M-1", key, rig.due(key)) == "sent", (key, r)
    assert rig.send("M-2", "pre:sms", rig.at(3, 18)) == "sent"
    assert max(Counter(d for d, _ in rig.sent).values()) == 1, rig.sent
