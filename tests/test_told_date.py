"""A patient told a date hears once, and of the right date, that the visit is off or moved
(real Redis, real Apprise, a real HTTP SMS gateway; the rig of tests/test_notices_sms.py, a
send window open all day). Found by review:

- a held booking cancelled told nothing: the cancel planned notices only for a scheduled
  booking, so a patient told "see you on <date>" before the hold was never told it was off;
  and cancelled, booked again (held again) and released, the release found no change (the
  hold kept the date of the cancelled document as told), so nobody told the patient the
  visit was back on, or on which date;
- only a move's notice counted as having told its date: the day-before SMS again for the
  new date went while the move's notice waited for its retry, and the next cancel told the
  patient "your <old date> visit is cancelled", a date they had since been told had moved;
- a message again for the new date went on one channel, then the clinic withdrew that
  channel: the plan's own reminder of the step, now on the other channel, went as well (its
  own copy had gone only for the old date), telling the new date twice.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests import test_notices_sms as ns
from worker.dispatch import send_claimed
from worker.models import parse_booking
from worker.planner import plan

gate = ns.gate  # fixtures
rig = ns.rig
DAY_BEFORE = ns.DAY_BEFORE


def _held(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with a recent isotretinoin dose: the booking is held for review."""
    doc["medications"]["isotretinoin_last_dose"] = (
        datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    return doc


def _release(rig, doc: dict[str, Any]) -> dict[str, Any]:
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(UTC)
    return rig.store.upsert(booking, plan(booking, rig.catalog.protocols["microneedling"],
                                          rig.catalog.clinics["sk"], now), now, release=True)


def _send_one(rig, ref: str) -> str:
    before = len(rig.texts())
    assert rig.send(ref) == "sent"
    (text,) = rig.texts()[before:]
    return text


@pytest.mark.parametrize("moved_while_held", [False, True])
def test_a_held_booking_cancelled_tells_the_date_told(rig, moved_while_held):
    first = rig.doc(5)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"  # "see you on <5 days> at 14:30"
    assert rig.book(_held(rig.doc(5)))["status"] == "held"
    if moved_while_held:
        assert rig.book(_held(rig.doc(12)))["status"] == "held"  # says nothing yet
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    told = ns.notices(rig.reminders())
    assert set(told) == {"cancelled#1:sms"}, told
    text = _send_one(rig, "sk/M-1/cancelled#1:sms")
    assert ns.names(text, first["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("moved_while_held,days", [(False, 5), (False, 12), (True, 12)])
def test_cancelled_while_held_then_booked_again_and_released_tells_the_date(
        rig, moved_while_held, days):
    """Told 5 days out, held (and moved to 12 while held), cancelled (the patient told so),
    booked again (held again) and released: the patient hears the visit is on, on its date."""
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    assert rig.book(_held(rig.doc(5)))["status"] == "held"
    if moved_while_held:
        assert rig.book(_held(rig.doc(12)))["status"] == "held"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    for key, r in ns.notices(rig.reminders()).items():
        assert rig.send(f"sk/M-1/{key}") == "sent", (key, r)
    again = _held(rig.doc(days))
    assert rig.book(again)["status"] == "held"
    told = set(ns.notices(rig.reminders()))
    _release(rig, again)
    shown = rig.reminders()
    new = {k: r for k, r in ns.notices(shown).items() if k not in told}
    assert [r["status"] for r in new.values()] == ["scheduled"], new
    (key,) = new
    assert key.startswith("rescheduled#") and key.endswith(":sms"), key
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, again["starts_at"]) and "14:30" in text, text
    # Released once: the same booking again adds nothing.
    _release(rig, again)
    assert {k for k in ns.notices(rig.reminders()) if k not in told} == {key}


def test_a_message_again_for_the_new_date_counts_as_telling_it(rig):
    """Told 5 days out; moved to 12: the move's notice waits for its retry (the gateway
    answered 503) while the day-before again for the new date goes ("see you on <12 days>").
    Then the clinic cancels: the patient is told the visit they last heard of is cancelled."""
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(moved)
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:sms") == "retrying"
    rig.gate.status = 200
    text = _send_one(rig, "sk/M-1/again-day-before#1:sms")
    assert ns.names(text, moved["starts_at"]), text
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    shown = rig.reminders()
    assert shown["rescheduled#1:sms"]["status"] == "cancelled"
    text = _send_one(rig, "sk/M-1/cancelled#2:sms")
    assert ns.names(text, moved["starts_at"]) and "cancelled" in text, text


def test_a_message_again_for_the_new_date_is_the_date_a_later_move_moves_from(rig):
    """As above, the patient taking email too (the confirmation's invite went): the next move
    says the visit "on <12 days> has moved", not the one on the date before it."""
    both = ("sms", "email")
    first, moved, latest = rig.doc(5, channels=both), rig.doc(12, channels=both), rig.doc(
        19, channels=both)
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email", "rescheduled#1:sms"}
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    assert rig.send("sk/M-1/rescheduled#1:sms") == "retrying"
    rig.gate.status = 200
    text = _send_one(rig, "sk/M-1/again-day-before#1:sms")
    assert ns.names(text, moved["starts_at"]), text
    rig.book(latest)
    text = _send_one(rig, "sk/M-1/rescheduled#2:email")
    told, old = (datetime.fromisoformat(d["starts_at"]).astimezone(ns.TZ).date()
                 for d in (moved, first))
    assert f"Skin Clinic on {told.day} {told:%B}, 14:30 has moved" in text, text
    assert f"{old.day} {old:%B}" not in text, text


def test_a_message_again_in_flight_at_the_cancel_counts_once_it_went(rig):
    """As above, but the day-before again is at the gateway when the cancel lands: the cancel
    notice waits for its outcome, and names the date it told once it went."""
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(moved)
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:sms") == "retrying"
    rig.gate.reset()
    out: list[str] = []
    claim = rig.claim("sk/M-1/again-day-before#1:sms")
    sender = threading.Thread(target=lambda: out.append(send_claimed(
        rig.ctx, "sk/M-1/again-day-before#1:sms", claim.version, claim.claim)))
    sender.start()
    assert rig.gate.arrived.wait(10), "the again SMS never reached the gateway"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    rig.gate.answer(200)
    sender.join(15)
    assert out and out[0].startswith("sent"), out
    assert ns.names(rig.texts()[-1], moved["starts_at"])
    text = _send_one(rig, "sk/M-1/cancelled#2:sms")
    assert ns.names(text, moved["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("first,then", [("email", "sms"), ("sms", "email")])
def test_the_date_told_again_on_a_channel_then_withdrawn_is_not_told_twice(rig, first, then):
    """The day-before went on `first` for the old date; moved: it went again on `first` for
    the new one. The clinic then gives the patient `then` only (the same date): the plan's
    day-before on `then` is already told, and does not go."""
    rig.book(rig.doc(5, channels=(first,)))
    assert rig.send(f"sk/M-1/day-before:{first}") == "sent"
    moved = rig.doc(12, channels=(first,))
    rig.book(moved)
    assert rig.send(f"sk/M-1/again-day-before#1:{first}") == "sent"
    rig.book(rig.doc(12, channels=(then,)))
    own = rig.reminders()[f"day-before:{then}"]
    assert own["status"] == "skipped", own
    assert own["reason"].startswith("not sent: already sent by "), own
    assert rig.store.redis.zscore(rig.store.due_key, f"sk/M-1/day-before:{then}") is None
    # Even made due by hand, it is not claimed: it does not go.
    rig.store.redis.zadd(rig.store.due_key, {f"sk/M-1/day-before:{then}": 0})
    assert f"sk/M-1/day-before:{then}" not in [
        c.ref for c in rig.store.claim_due(100, rig.ctx.settings.lease_seconds)]
    # A later move sends it again for the date after.
    rig.book(rig.doc(19, channels=(then,)))
    assert rig.reminders()[f"day-before:{then}"]["status"] == "scheduled"


def test_an_email_only_patient_held_at_booking_is_told_the_cancel(rig):
    """Held from the start, the patient had only the hold email ("Your appointment on <date>:
    we will call you"), no invite; the clinic cancels: it is told by email, naming the date."""
    first = _held(rig.doc(5, channels=("email",)))
    assert rig.book(first)["status"] == "held"
    assert rig.send("sk/M-1/hold-notice:email") == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    told = ns.notices(rig.reminders())
    assert set(told) == {"cancelled#1:email"}, told
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/cancelled#1:email") == "sent"
    (body,) = rig.gate.bodies[before:]
    day = datetime.fromisoformat(first["starts_at"]).astimezone(ns.TZ).date()
    assert f"on {day.day} {day:%b}" in body["title"] and "cancelled" in body["title"], body


@pytest.mark.parametrize("reopen_told", [False, True])
def test_cancelled_booked_again_and_cancelled_before_told_says_nothing_more(rig, reopen_told):
    """Told 5 days out, then that it is cancelled; booked again at 12 days and cancelled
    again before the patient heard of it: nothing more (they know it is cancelled), not "your
    <12 days> visit is cancelled" about a visit they never heard of. Once they had heard of
    it, they are told it is cancelled."""
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert rig.send("sk/M-1/cancelled#1:sms") == "sent"
    again = rig.doc(12)
    rig.book(again)
    if reopen_told:
        assert ns.names(_send_one(rig, "sk/M-1/rescheduled#2:sms"), again["starts_at"])
    sent = len(rig.texts())
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    shown = rig.reminders()
    if not reopen_told:
        assert shown["rescheduled#2:sms"]["status"] == "cancelled"
        assert "cancelled#3:sms" not in shown, shown.get("cancelled#3:sms")
        assert not [k for k in rig.store.redis.zrange(rig.store.due_key, 0, -1)
                    if k.startswith("sk/M-1/")]
        assert len(rig.texts()) == sent
    else:
        text = _send_one(rig, "sk/M-1/cancelled#3:sms")
        assert ns.names(text, again["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("moved_while_held", [False, True])
def test_held_cancelled_booked_again_held_and_cancelled_before_told_is_told_once(
        rig, moved_while_held):
    """Told 5 days out, held (and moved to 12 while held), cancelled: the cancel notice waits
    (the night, a retry); booked again (held again), which holds it back; cancelled again.
    The patient, who never heard of the first cancel, is told now, naming the date told."""
    first = rig.doc(5)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"
    assert rig.book(_held(rig.doc(5)))["status"] == "held"
    if moved_while_held:
        assert rig.book(_held(rig.doc(12)))["status"] == "held"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert rig.reminders()["cancelled#1:sms"]["status"] == "scheduled"
    assert rig.book(_held(rig.doc(12)))["status"] == "held"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    shown = ns.notices(rig.reminders())
    assert shown["cancelled#1:sms"]["status"] == "cancelled"
    (key,) = [k for k, r in shown.items() if r["status"] == "scheduled"]
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, first["starts_at"]) and "cancelled" in text, text


def test_a_reminder_of_the_new_date_counts_as_telling_it(rig):
    """Told 5 days out by the confirmation email; moved to 12: the move's email notice waits
    for its retry (the gateway answered 503) while the plan's own day-before SMS for the new
    date goes ("see you on <12 days>"). Then the clinic cancels: the patient is told the
    visit they last heard of is cancelled."""
    both = ("sms", "email")
    first, moved = rig.doc(5, channels=both), rig.doc(12, channels=both)
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    rig.gate.status = 200
    text = _send_one(rig, DAY_BEFORE)
    assert ns.names(text, moved["starts_at"]), text
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    text = _send_one(rig, "sk/M-1/cancelled#2:sms")
    assert ns.names(text, moved["starts_at"]) and "cancelled" in text, text


def test_a_later_move_supersedes_a_dead_lettered_notice(rig):
    """The move's notice failed for good (the gateway refused it: a dead letter); the clinic
    moves the visit again, and that notice goes. Replaying the dead letters after fixing the
    gateway sends nothing more: the first notice was superseded, as one still to go is."""
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12))
    rig.gate.status = 400
    assert rig.send("sk/M-1/rescheduled#1:sms") == "failed"
    rig.gate.status = 200
    latest = rig.doc(19)
    rig.book(latest)
    shown = rig.reminders()
    assert shown["rescheduled#1:sms"]["status"] == "cancelled", shown["rescheduled#1:sms"]
    assert rig.store.redis.zscore(rig.store.dead_key, "sk/M-1/rescheduled#1:sms") is None
    assert ns.names(_send_one(rig, "sk/M-1/rescheduled#2:sms"), latest["starts_at"])
    assert rig.store.replay(["sk/M-1/rescheduled#1:sms"], datetime.now(UTC)) == []


@pytest.mark.parametrize("together", [False, True])
def test_told_by_the_invite_email_then_sms_only_a_move_is_told_by_sms(rig, together):
    """Told the date by the confirmation email (its invite); the clinic then takes the
    patient to SMS only (first, or in the same re-submission) and moves the visit: nothing
    had gone by SMS, but the patient knows the old date, and is told of the move by SMS."""
    rig.book(rig.doc(5, channels=("sms", "email")))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    if not together:
        rig.book(rig.doc(5, channels=("sms",)))
    moved = rig.doc(12, channels=("sms",))
    rig.book(moved)
    told = ns.notices(rig.reminders())
    assert set(told) == {"rescheduled#1:sms"}, told
    text = _send_one(rig, "sk/M-1/rescheduled#1:sms")
    assert ns.names(text, moved["starts_at"]), text


def test_told_by_the_invite_email_then_sms_only_a_cancel_is_told_by_sms(rig):
    first = rig.doc(5, channels=("sms", "email"))
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    rig.book(rig.doc(5, channels=("sms",)))
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    told = ns.notices(rig.reminders())
    assert set(told) == {"cancelled#1:sms"}, told
    text = _send_one(rig, "sk/M-1/cancelled#1:sms")
    assert ns.names(text, first["starts_at"]) and "cancelled" in text, text


@pytest.mark.parametrize("when", ["before the move", "with the notice waiting"])
def test_unsubscribed_from_email_a_move_told_by_email_goes_by_sms(rig, when):
    """Told the date by the confirmation email only; the patient unsubscribes from email
    (they take SMS too). The move's notice, planned by email (the invite's), is not skipped
    as unsubscribed: it goes by SMS, as a care-critical email does."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"

    def unsubscribe() -> None:
        rig.store.opt_out("sk", "email", "ana@example.com", "unsubscribed",
                          critical=rig.catalog.critical_steps)

    if when == "before the move":
        unsubscribe()
    moved = rig.doc(12, channels=both)
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    if when != "before the move":
        unsubscribe()
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/rescheduled#1:email") == "sent", rig.reminders()[
        "rescheduled#1:email"]
    (body,) = rig.gate.bodies[before:]
    assert body["to"] == "+34600111222" and ns.names(body["message"], moved["starts_at"]), body


@pytest.mark.parametrize("change", ["cancel", "move"])
def test_an_email_only_patient_told_the_date_by_the_prep_email_hears_of_the_change(rig, change):
    """The confirmation (the invite) failed for good (the provider refused it: a dead
    letter), then the prep email went: "Your microneedling ... is in 3 days (<date>) at
    14:30", no invite. The clinic cancels or moves the visit: the patient, told the date by
    email only, is told of the change by email (before, only an email carrying the invite,
    the hold email or the pause message counted, and nobody told them: they came on the
    old day)."""
    first = rig.doc(5, channels=("email",))
    rig.book(first)
    rig.gate.status = 400
    assert rig.send("sk/M-1/booking-confirmation:email") == "failed"
    rig.gate.status = 200
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/prep:email") == "sent"
    (prep,) = rig.gate.bodies[before:]
    day = datetime.fromisoformat(first["starts_at"]).astimezone(ns.TZ).date()
    assert f"{day.day} {day:%b}" in prep["title"], prep
    moved = rig.doc(12, channels=("email",))
    if change == "cancel":
        rig.store.cancel("sk", "M-1", datetime.now(UTC))
        key, said = "cancelled#1:email", first["starts_at"]
    else:
        rig.book(moved)
        key, said = "rescheduled#1:email", moved["starts_at"]
    shown = rig.reminders()
    assert set(ns.notices(shown)) == {key}, shown
    before = len(rig.gate.bodies)
    assert rig.send(f"sk/M-1/{key}") == "sent"
    (body,) = rig.gate.bodies[before:]
    told = datetime.fromisoformat(said).astimezone(ns.TZ).date()
    assert f"{told.day} {told:%b}" in body["title"], body
    word = "cancelled" if change == "cancel" else "moved"
    assert word in body["title"] + body["message"], body
    shown = rig.reminders()
    assert shown[key]["status"] == "sent", shown[key]
    assert shown["prep:email"]["status"] == "sent"
    # the dead letter goes with the booking it was for: cancelled with it, or re-planned by
    # the move (a correction of the booking), never left to replay for the old date
    assert shown["booking-confirmation:email"]["status"] == (
        "cancelled" if change == "cancel" else "scheduled")
    assert rig.store.redis.zscore(
        rig.store.dead_key, "sk/M-1/booking-confirmation:email") is None
    # the refused confirmation, the prep email and the notice: nothing else reached the sink
    assert len(rig.gate.bodies) == 3, [b["title"] for b in rig.gate.bodies]
