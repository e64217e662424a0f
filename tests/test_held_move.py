"""A booking moved while held tells the patient of the move at its release (real Redis, real
Apprise, a real HTTP SMS gateway; the rig of tests/test_notices_sms.py).

A held booking says nothing, and its document takes the new date at once: the release then
found the document unchanged, no move. The patient told "see you on <date>" by SMS before the
hold, whose booking the clinic moved while reviewing it, got no notice of the move and no
day-before for the new date (the old one's is history), and came on the old day. The store
now keeps, while held, the start the patient was told before the hold (`held_from`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests import test_notices_sms as ns
from worker.models import parse_booking
from worker.planner import plan

gate = ns.gate  # fixtures
rig = ns.rig


def test_moved_while_held_the_release_tells_the_patient(rig):
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"  # "see you on <date> at 14:30"
    dose = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    held = rig.doc(5)
    held["medications"]["isotretinoin_last_dose"] = dose
    assert rig.book(held)["status"] == "held"
    moved = rig.doc(12)
    moved["medications"]["isotretinoin_last_dose"] = dose
    assert rig.book(moved)["status"] == "held"
    assert ns.notices(rig.reminders()) == {}  # held: nothing said yet
    booking = parse_booking(moved, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["microneedling"],
                                   rig.catalog.clinics["sk"], now), now, release=True)
    shown = rig.reminders()
    assert set(ns.notices(shown)) == {"rescheduled#1:sms"}
    assert shown["again-day-before#1:sms"]["status"] == "scheduled"
    before = len(rig.texts())
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert ns.names(text, moved["starts_at"]), text
    assert rig.send("sk/M-1/again-day-before#1:sms") == "sent"
    assert ns.names(rig.texts()[-1], moved["starts_at"]), rig.texts()[-1]
    # The same booking again changes nothing more.
    version = rig.store.timeline("sk", "M-1")["version"]
    rig.book(moved)
    assert rig.store.timeline("sk", "M-1")["version"] == version


def test_held_without_a_move_the_release_says_nothing(rig):
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    held = rig.doc(5)
    held["medications"]["isotretinoin_last_dose"] = (
        datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    rig.book(held)
    booking = parse_booking(held, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["microneedling"],
                                   rig.catalog.clinics["sk"], now), now, release=True)
    assert ns.notices(rig.reminders()) == {}
    assert not any(k.startswith("again-") for k in rig.reminders())
