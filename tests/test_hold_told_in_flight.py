"""A booking moved and held while its first message is at the gateway, that message then not
delivered, names in its hold message the date it has when that message goes (review of
8903979; real Redis, real Apprise, a real HTTP SMS gateway parked mid-request; the rig of
tests/test_notices_sms.py, the shipped microneedling protocol).

8903979 keeps `held_from` (the date told before the hold) once something went out, or may
have: a message being sent counts (it may deliver). When that message is then refused (or
never handed over), nothing was told after all, yet `held_from` stayed: the hold message
("we will call you before your <date> visit") named the first date, which the patient never
heard, and the release told a move from it. The attempt's end (its finish; or its begin,
finding the booking held) now drops `held_from` when nothing of the booking went out."""

from __future__ import annotations

import threading

import pytest

from tests import test_notices_sms as ns
from tests.test_told_date import _held, _release, _send_one

gate = ns.gate  # fixtures
rig = ns.rig

CONFIRMATION = "sk/M-1/booking-confirmation:sms"


@pytest.mark.parametrize("answer", [503, 400])
def test_moved_and_held_while_the_first_sms_is_refused_names_the_new_date(rig, answer):
    """Booked 10 days out; its confirmation SMS is at the gateway when the clinic moves the
    visit to 17 days and it is held; the gateway refuses that SMS (for now, or for good):
    the hold message names 17 days, and the release has no move to tell."""
    first, moved = rig.doc(10), _held(rig.doc(17))
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(CONFIRMATION)
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", ns.send_claimed(
        rig.ctx, CONFIRMATION, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10)
    assert rig.book(moved)["status"] == "held"
    rig.gate.answer(answer)
    thread.join(20)
    assert out["r"] != "sent", out
    rig.gate.reset()
    rig.gate.answer(200)
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, moved["starts_at"]), text
    assert not ns.names(text, first["starts_at"]), text
    _release(rig, moved)
    assert ns.notices(rig.reminders()) == {}, ns.notices(rig.reminders())


def test_control_moved_and_held_while_the_first_sms_is_delivered_names_the_date_told(rig):
    """The same, the gateway accepting it: the patient was told 10 days; the hold message
    names it, and the release tells the move (as before)."""
    first, moved = rig.doc(10), _held(rig.doc(17))
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(CONFIRMATION)
    thread = threading.Thread(target=lambda: ns.send_claimed(
        rig.ctx, CONFIRMATION, claim.version, claim.claim))
    thread.start()
    assert rig.gate.arrived.wait(10)
    assert rig.book(moved)["status"] == "held"
    rig.gate.answer(200)
    thread.join(20)
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, first["starts_at"]), text
    _release(rig, moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms"}


def test_the_hold_message_waits_for_the_sms_at_the_gateway_and_names_what_was_told(rig):
    """The same race, the hold message due while the confirmation SMS is still at the gateway:
    it named the first date at once (that SMS may still deliver), and the SMS was then
    refused: the patient heard of a visit on a date never told. The hold message waits for
    that SMS's outcome, as a change notice does (`TOLD_IN_FLIGHT`); refused, it names the
    new date."""
    first, moved = rig.doc(10), _held(rig.doc(17))
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(CONFIRMATION)
    thread = threading.Thread(target=lambda: ns.send_claimed(
        rig.ctx, CONFIRMATION, claim.version, claim.claim))
    thread.start()
    assert rig.gate.arrived.wait(10)
    assert rig.book(moved)["status"] == "held"
    assert rig.send("sk/M-1/hold-notice:sms") == "deferred"
    assert len(rig.gate.bodies) == 1  # only the confirmation, still at the gateway
    rig.gate.answer(503)
    thread.join(20)
    rig.gate.reset()
    rig.gate.answer(200)
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, moved["starts_at"]), text
    assert not ns.names(text, first["starts_at"]), text


def test_the_hold_message_deferred_for_a_moved_sms_at_the_gateway_then_delivered_names_it(rig):
    """The day-before SMS (naming the first date) is at the gateway when the clinic moves
    the visit a week on and it is held: the move reschedules that SMS (its attempt goes on),
    the hold message waits for it (deferred), and the gateway then accepts it. The patient
    was told the first date: the hold message names it, and the release tells the move, as
    when the hold message comes after the delivery (the control above). The hold message's
    deferral ended nothing, yet it dropped `held_from`: the rescheduled SMS, no longer
    `sending`, did not count as maybe gone out although its attempt was at the gateway; the
    hold message named the new date and the release told no move."""
    first, moved = rig.doc(10), _held(rig.doc(17))
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(ns.DAY_BEFORE)
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", ns.send_claimed(
        rig.ctx, ns.DAY_BEFORE, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10)
    assert rig.book(moved)["status"] == "held"
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"  # moved, still at work
    assert rig.send("sk/M-1/hold-notice:sms") == "deferred"
    assert len(rig.gate.bodies) == 1  # only the day-before, still at the gateway
    rig.gate.answer(200)
    thread.join(20)
    assert out["r"] == "sent", out
    (told,) = rig.texts()
    assert ns.names(told, first["starts_at"]), told
    rig.gate.reset()
    rig.gate.answer(200)
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, first["starts_at"]), text
    assert not ns.names(text, moved["starts_at"]), text
    _release(rig, moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms"}
