"""STOP then START keep what a plan's reminder carries: the day-before SMS that carries the
step for a new date after a move (its email went for the old date, `sent_elsewhere`) still
goes after the opt-out and the opt-in and a later re-submission without a move. Real Redis,
real Apprise, a real HTTP SMS gateway (the rig of tests/test_notices_sms.py)."""

from __future__ import annotations

import pytest

from tests import test_elsewhere_unmoved as eu
from tests import test_notices_sms as ns

gate = ns.gate  # fixtures
rig = ns.rig
PHONE = "+34600111222"


def test_moved_and_switched_to_sms_then_stop_and_start_the_day_before_still_goes(rig):
    """The day-before went by email for the old date; the clinic moves the visit and switches
    the patient to SMS: the plan's own day-before SMS carries the step for the new date. The
    patient replies STOP, then START (the SMS is back in the schedule), then the clinic
    corrects the patient's name (no move). The SMS for the new date must still go: the
    opt-out and opt-in rewrote its reason, which was what marked it as the move's carrier,
    and the re-submission then took it for a copy of the step already sent by email."""
    rig.book(rig.doc(5, channels=("email",)))
    assert rig.send("sk/M-1/day-before:email") == "sent"
    moved = rig.doc(12, channels=("sms",))
    rig.book(moved)
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test")[1] == ["M-1"]
    assert rig.reminders()["day-before:sms"]["status"] == "skipped"
    caps = rig.catalog.clinics["sk"].sms
    assert rig.store.opt_in("sk", "sms", PHONE, caps=caps, why="START at test").resumed >= 1
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"
    moved["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(moved)
    sms = rig.reminders()["day-before:sms"]
    assert sms["status"] == "scheduled", (sms["reason"], sms)
    before = len(rig.gate.bodies)
    assert rig.send(eu.DAY_BEFORE_SMS) == "sent"
    (text,) = eu._sms_bodies(rig, before)
    assert "see you" in text and ns.names(text, moved["starts_at"]), text


def test_moved_and_switched_to_sms_a_retried_day_before_still_goes_after_a_sync(rig):
    """As above, but the carrier's first attempt meets a transient gateway failure (503):
    its retry's reason replaces the one that marked it. The clinic then corrects the name
    (no move): the retry must still go, not be skipped as "already sent by email"."""
    rig.book(rig.doc(5, channels=("email",)))
    assert rig.send("sk/M-1/day-before:email") == "sent"
    moved = rig.doc(12, channels=("sms",))
    rig.book(moved)
    rig.gate.status = 503
    assert rig.send(eu.DAY_BEFORE_SMS) == "retrying"
    rig.gate.status = 200
    moved["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(moved)
    sms = rig.reminders()["day-before:sms"]
    assert sms["status"] == "retrying", (sms["reason"], sms)
    before = len(rig.gate.bodies)
    assert rig.send(eu.DAY_BEFORE_SMS) == "sent"
    (text,) = eu._sms_bodies(rig, before)
    assert "see you" in text and ns.names(text, moved["starts_at"]), text


def test_moved_and_switched_to_sms_a_sync_while_opted_out_then_start_the_day_before_goes(
        rig):
    """As the first, but the clinic corrects the name while the number is opted out (the
    carrier skipped by the opt-out, its reason the opt-out's), and the patient replies START
    afterwards: the day-before for the new date goes back into the schedule and goes."""
    rig.book(rig.doc(5, channels=("email",)))
    assert rig.send("sk/M-1/day-before:email") == "sent"
    moved = rig.doc(12, channels=("sms",))
    rig.book(moved)
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test")[1] == ["M-1"]
    moved["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(moved)
    caps = rig.catalog.clinics["sk"].sms
    rig.store.opt_in("sk", "sms", PHONE, caps=caps, why="START at test")
    sms = rig.reminders()["day-before:sms"]
    assert sms["status"] == "scheduled", (sms["reason"], sms)
    before = len(rig.gate.bodies)
    assert rig.send(eu.DAY_BEFORE_SMS) == "sent"
    (text,) = eu._sms_bodies(rig, before)
    assert "see you" in text and ns.names(text, moved["starts_at"]), text


@pytest.mark.parametrize("step", ["day-before", "pause"])
def test_a_message_again_for_the_new_date_skipped_by_stop_goes_after_start(rig, step):
    """SMS only. The day-before SMS (or "stop tretinoin tonight") went for the old date;
    the clinic moved the visit: the message goes again for the new date
    (again-day-before#1:sms, repause#1:sms), still days ahead. The patient replies STOP,
    then START: it goes back into the schedule and goes (it was left skipped: the patient,
    opted in again, never heard "see you tomorrow", or to stop tretinoin, for the new
    date)."""
    doc = rig.doc(5 if step == "day-before" else 10)
    moved = rig.doc(12 if step == "day-before" else 17)
    if step == "pause":
        doc["medications"] = moved["medications"] = {"tretinoin": True, "retinol": False}
    rig.book(doc)
    first = "day-before:sms" if step == "day-before" else "stop-retinoids:sms"
    assert rig.send(f"sk/M-1/{first}") == "sent"
    rig.book(moved)
    again = "again-day-before#1:sms" if step == "day-before" else "repause#1:sms"
    assert rig.reminders()[again]["status"] == "scheduled"
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test")[1] == ["M-1"]
    assert rig.reminders()[again]["status"] == "skipped"
    rig.store.opt_in("sk", "sms", PHONE, caps=rig.catalog.clinics["sk"].sms,
                     why="START at test", critical=rig.catalog.critical_steps)
    shown = rig.reminders()[again]
    assert shown["status"] == "scheduled", shown
    assert rig.store.redis.zscore(rig.store.due_key, f"sk/M-1/{again}") is not None
    before = len(rig.gate.bodies)
    assert rig.send(f"sk/M-1/{again}") == "sent"
    (text,) = eu._sms_bodies(rig, before)
    assert ns.names(text, moved["starts_at"]), text
