"""Which date a change notice names when a message before the visit went around a change
(real Redis, real Apprise, a real HTTP gateway for SMS and email; the rig of
tests/test_notices_sms.py). Found by review of `_told_by` (worker/store.py) and the send's
`went` (worker/dispatch.py):

- a plan's own reminder counted as telling the new date by its record's version, not by
  the version its words went for: an attempt rendered for the old date, parked at the
  provider while the clinic moved the visit, then delivered, was recorded as sent under
  the move's version and counted as telling the new date;
- a plan's own reminder in flight at a change was stored in `untold` by its step alone, so
  the send read its copy on the other channel, sent for the earlier date, as "went";
- a booking cancelled (held or not) and booked again before its cancel notice went, then
  cancelled again before the re-open's notice went, named the re-open's date, which the
  patient never heard: the re-open now moves "from" the date told, as a move does;
- a plan's own message in flight at a change whose record held the delivery of an earlier
  date (recorded beside the new plan) counted as sent for certain, so `untold` was not
  stored and the next notice named the new date though this attempt then failed;
- the hold message of a booking moved as it was held named the new date, while the cancel
  named (and the release's notice moved from) the date told before the hold;
- booked again after a cancel the patient was told of, and held: the hold message named the
  new date, and a cancel while so held said nothing (taking the first cancel as told).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from tests import test_notices_sms as ns
from tests.test_told_date import _held, _release, _send_one
from worker.dispatch import send_claimed

gate = ns.gate  # fixtures
rig = ns.rig


def _park(rig, ref: str) -> tuple[threading.Thread, list[str]]:
    """Send `ref` in a thread, parked at the gateway until `rig.gate.answer`."""
    rig.gate.reset()
    claim = rig.claim(ref)
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(send_claimed(
        rig.ctx, ref, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), f"{ref} never reached the gateway"
    return thread, out


def _said(body: dict[str, Any]) -> str:
    return f"{body.get('title', '')} {body['message']}"


def test_a_stale_delivery_for_the_old_date_does_not_tell_the_new_one(rig):
    """The day-before SMS for 5 days out ("see you on <5 days>") is at the gateway when the
    clinic moves the visit to 12 days and takes the patient to email only (the SMS step no
    longer planned); it is delivered. The move's email notice waits for its retry; the
    clinic cancels: the patient, told only the first date, hears that one is cancelled."""
    first, moved = rig.doc(5), rig.doc(12, channels=("email",))
    rig.book(first)
    thread, out = _park(rig, ns.DAY_BEFORE)
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.gate.answer(200)
    thread.join(15)
    assert out and out[0] == "sent", out
    assert ns.names(rig.texts()[-1], first["starts_at"])  # the old date went
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    rig.gate.status = 200
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    (key,) = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    before = len(rig.gate.bodies)
    assert rig.send(f"sk/M-1/{key}") == "sent"
    (body,) = rig.gate.bodies[before:]
    assert ns.names(_said(body), first["starts_at"]), body
    assert not ns.names(_said(body), moved["starts_at"]), body


def test_the_other_channels_copy_for_the_old_date_is_not_the_new_date_told(rig):
    """Told 5 days out by email (confirmation, day-before email); moved to 12 days and given
    SMS too: the email notice waits for its retry, and the day-before SMS for the new date is
    at the gateway when the clinic cancels; the gateway refuses it. The patient never heard
    of 12 days: the cancel names 5 days, not because the day-before went by email (for 5)."""
    both = ("sms", "email")
    first, moved = rig.doc(5, channels=("email",)), rig.doc(12, channels=both)
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    assert rig.send("sk/M-1/day-before:email") == "sent"
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    thread, out = _park(rig, ns.DAY_BEFORE)
    assert ns.names(rig.texts()[-1], moved["starts_at"])
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    rig.gate.answer(400)
    thread.join(15)
    assert out and out[0] == "failed", out
    rig.gate.answer(200)
    scheduled = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    assert scheduled, rig.reminders()
    for key in scheduled:
        before = len(rig.gate.bodies)
        assert rig.send(f"sk/M-1/{key}") == "sent", key
        (body,) = rig.gate.bodies[before:]
        assert ns.names(_said(body), first["starts_at"]), (key, body)
        assert not ns.names(_said(body), moved["starts_at"]), (key, body)


@pytest.mark.parametrize("held", [False, True])
def test_a_reopen_whose_cancel_was_never_told_names_the_date_told(rig, held):
    """Told 5 days out; (held, then) cancelled: the cancel notice waits for its retry; the
    clinic books the visit again at 12 days (held, then released): the cancel notice is
    superseded, the patient never heard it. Cancelled again before the re-open's notice
    went: the patient, who knows only the first date, is told that one is cancelled."""
    first = rig.doc(5)
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    if held:
        assert rig.book(_held(rig.doc(5)))["status"] == "held"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    rig.gate.status = 503
    assert rig.send("sk/M-1/cancelled#1:sms") == "retrying"
    rig.gate.status = 200
    again = rig.doc(12)
    if held:
        assert rig.book(_held(rig.doc(12)))["status"] == "held"
        _release(rig, _held(again))
    else:
        rig.book(again)
    shown = ns.notices(rig.reminders())
    assert shown["cancelled#1:sms"]["status"] == "cancelled", shown
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    (key,) = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, first["starts_at"]) and "cancelled" in text, text


def test_held_cancel_reopen_release_move_cancel_tells_each_change_once(rig):
    """The whole round: told 5 days out, held, cancelled (told, naming 5 days), booked again
    at 12 days (held), released (told it is on 12 days), moved to 19 (told 19), cancelled (told 19).
    Each change adds exactly one notice, naming the date the patient was last told of or
    the new one; the same booking again adds nothing."""
    first, again, moved = rig.doc(5), rig.doc(12), rig.doc(19)
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    seen: set[str] = set()

    def one_new(start: str, word: str) -> None:
        new = [k for k in ns.notices(rig.reminders()) if k not in seen]
        assert len(new) == 1, new
        seen.update(new)
        text = _send_one(rig, f"sk/M-1/{new[0]}")
        assert ns.names(text, start) and word in text, (new, text)

    assert rig.book(_held(rig.doc(5)))["status"] == "held"
    assert not ns.notices(rig.reminders())
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    one_new(first["starts_at"], "cancelled")
    assert rig.book(_held(rig.doc(12)))["status"] == "held"
    assert set(ns.notices(rig.reminders())) == seen
    _release(rig, _held(again))
    one_new(again["starts_at"], "is on")  # told cancelled: no date it moves from
    _release(rig, _held(again))
    assert set(ns.notices(rig.reminders())) == seen
    moved = _held(moved)
    _release(rig, moved)
    one_new(moved["starts_at"], "moved")
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    one_new(moved["starts_at"], "cancelled")
    assert not [k for k in rig.store.redis.zrange(rig.store.due_key, 0, -1)
                if k.startswith("sk/M-1/") and k.split("/")[-1].startswith(
                    ("rescheduled#", "cancelled#"))]


def _unsubscribe(rig) -> None:
    rig.store.opt_out("sk", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)


def test_a_notice_by_sms_for_an_unsubscribed_patient_respects_stop(rig):
    """Told by the confirmation email; unsubscribed from email and opted out of SMS (STOP):
    the move's email notice goes nowhere (skipped), nothing reaches the gateway."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    _unsubscribe(rig)
    rig.store.opt_out("sk", "sms", "+34600111222", "STOP")
    rig.book(rig.doc(12, channels=both))
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/rescheduled#1:email").startswith("dropped")
    assert len(rig.gate.bodies) == before
    assert rig.reminders()["rescheduled#1:email"]["status"] == "skipped"


def test_a_notice_gone_by_sms_is_not_sent_again_once_resubscribed(rig):
    """The move's email notice went by SMS (unsubscribed from email); the patient subscribes
    again and the clinic sends the same booking again: nothing more goes."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    _unsubscribe(rig)
    moved = rig.doc(12, channels=both)
    rig.book(moved)
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/rescheduled#1:email") == "sent"
    (body,) = rig.gate.bodies[before:]
    assert body["to"] == "+34600111222", body
    rig.store.opt_in("sk", "email", "ana@example.com")
    rig.book(moved)
    shown = ns.notices(rig.reminders())
    assert {k: r["status"] for k, r in shown.items()} == {"rescheduled#1:email": "sent"}
    assert not [k for k in rig.store.redis.zrange(rig.store.due_key, 0, -1)
                if "rescheduled#" in k]


def test_an_earlier_dates_delivery_of_a_message_in_flight_is_not_its_new_one(rig):
    """The day-before SMS for 5 days out is at the gateway when the visit moves to 12 days:
    delivered, recorded beside the new plan (its record now the new date's). The move's
    notice waits for its retry; the day-before for 12 days is at the gateway when the clinic
    cancels, and is refused. The patient heard only of 5 days: the cancel names it."""
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    thread, out = _park(rig, ns.DAY_BEFORE)
    rig.book(moved)
    rig.gate.answer(200)
    thread.join(15)
    assert out and out[0] == "sent", out
    assert rig.store.record(ns.DAY_BEFORE)["sent_at"]  # the old date's delivery, recorded
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:sms") == "retrying"
    thread, out = _park(rig, ns.DAY_BEFORE)
    assert ns.names(rig.texts()[-1], moved["starts_at"])
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    rig.gate.answer(400)
    thread.join(15)
    assert out and out[0] == "failed", out
    rig.gate.answer(200)
    (key,) = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, first["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("then", ["cancel", "release"])
def test_the_hold_message_of_a_booking_moved_as_held_names_the_date_told(rig, then):
    """Told 5 days out; the clinic moves the visit to 12 days and it is held at once: the
    hold SMS ("we will call you before your <date> visit") names 5 days, the date the
    patient knows (the move is told at the release); so the cancel naming 5 days, or the
    release's notice of the move to 12, follows what the patient was told."""
    first, moved = rig.doc(5), _held(rig.doc(12))
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    assert rig.book(moved)["status"] == "held"
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, first["starts_at"]), text
    assert not ns.names(text, moved["starts_at"]), text
    if then == "cancel":
        rig.store.cancel("sk", "M-1", datetime.now(UTC))
        text = _send_one(rig, "sk/M-1/cancelled#1:sms")
        assert ns.names(text, first["starts_at"]) and "cancelled" in text, text
    else:
        _release(rig, moved)
        text = _send_one(rig, "sk/M-1/rescheduled#1:sms")
        assert ns.names(text, moved["starts_at"]) and "moved" in text, text


def test_booked_again_held_and_told_by_the_hold_message_then_cancelled_is_told(rig):
    """Told 5 days out, then that it is cancelled; booked again at 12 days and held: the hold
    SMS says "we will call you before your <12 days> visit". Cancelled again while held: the
    patient heard of that visit, and is told it is cancelled."""
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert rig.send("sk/M-1/cancelled#1:sms") == "sent"
    again = _held(rig.doc(12))
    assert rig.book(again)["status"] == "held"
    assert ns.names(_send_one(rig, "sk/M-1/hold-notice:sms"), again["starts_at"])
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    new = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    assert len(new) == 1, ns.notices(rig.reminders())
    text = _send_one(rig, f"sk/M-1/{new[0]}")
    assert ns.names(text, again["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("cancel_heard", [False, True])
def test_a_reopen_with_no_date_to_move_from_does_not_say_moved(rig, cancel_heard):
    """Told "see you on <5 days>"; cancelled; booked again. Its cancel notice never went
    (503, superseded) and the visit is booked again at the same date: the patient knows
    that date and nothing else, yet read "your visit moved to <the same date>". Its cancel
    notice went: the patient read "cancelled", then "your visit moved to <12 days>", a
    move from nothing they were told. The notice now says the visit is on that date."""
    first = rig.doc(5)
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    if cancel_heard:
        assert "cancel" in _send_one(rig, "sk/M-1/cancelled#1:sms")
        again = rig.doc(12)
    else:
        rig.gate.status = 503
        assert rig.send("sk/M-1/cancelled#1:sms") == "retrying"
        rig.gate.status = 200
        again = first
    rig.book(again)
    (key,) = [k for k, r in ns.notices(rig.reminders()).items()
              if k.startswith("rescheduled#") and r["status"] == "scheduled"]
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, again["starts_at"]), text
    assert "moved" not in text and "your visit is on" in text, text
