"""STOP then START keep what a plan's reminder carries: the day-before SMS that carries the
step for a new date after a move (its email went for the old date, `sent_elsewhere`) still
goes after the opt-out and the opt-in and a later re-submission without a move. Real Redis,
real Apprise, a real HTTP SMS gateway (the rig of tests/test_notices_sms.py)."""

from __future__ import annotations

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
