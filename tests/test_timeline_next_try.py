"""A reminder handed back to the schedule unbegun keeps its due (commit 89573f9: the SMS
cap counts it on that day, and the send path finds it late by it); the timeline says when it
is tried next (`next_try_at`, and in its reason), read from the due set (real Redis, the
real send path to a real HTTP gateway; the rig of tests/test_notices_sms.py). Before, the
timeline showed only the old due, as if it were to go then (already past)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests import test_notices_sms as ns
from worker.dispatch import attempt, send_claimed
from worker.store import IN_FLIGHT_MARGIN

gate = ns.gate  # fixtures
rig = ns.rig
REF = "sk/M-1/booking-confirmation:email"  # due when the booking arrives


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def test_a_claim_handed_back_unbegun_shows_its_next_try(rig):
    rig.book(rig.doc(5, channels=("email",)))
    due = rig.reminders()["booking-confirmation:email"]["due_at"]
    claim = rig.claim(REF)
    assert attempt(rig.ctx, REF, claim.version, claim.claim, start_by=0) == "handed back"
    retry = rig.store.redis.zscore(rig.store.due_key, REF)
    shown = rig.reminders()["booking-confirmation:email"]
    assert shown["status"] == "scheduled" and shown["due_at"] == due, shown  # the cap's day
    assert abs(_at(shown["next_try_at"]).timestamp() - retry) < 0.001, shown
    # The reason says it to the second (the field keeps its precision): "next try at
    # 2026-11-24T02:36:59Z", not "...T02:36:59.689449Z" (a clinic reads it).
    said = shown["reason"].rpartition("; next try at ")[2]
    assert "." not in said and said.endswith("Z"), shown
    assert _at(said) == _at(shown["next_try_at"]).replace(microsecond=0), shown
    assert rig.send(REF) == "sent"
    shown = rig.reminders()["booking-confirmation:email"]
    assert shown["status"] == "sent" and "next_try_at" not in shown, shown


def test_a_claim_meeting_an_attempt_in_flight_shows_when_it_is_tried_again(rig):
    """The confirmation email is parked at the gateway (handed over, no answer) when its
    lease runs out (forced: its lease score set to the past) and the pump claims it again:
    that attempt finds the first in flight and hands the claim back for just after its
    ledger expires; the timeline says so, then the first attempt's answer lands."""
    import threading

    rig.book(rig.doc(5, channels=("email",)))
    due = rig.reminders()["booking-confirmation:email"]["due_at"]
    rig.gate.reset()
    first = rig.claim(REF)
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(
        send_claimed(rig.ctx, REF, first.version, first.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), "never reached the gateway"
    rig.store.redis.zadd(rig.store.lease_key, {REF: 0})  # its lease ran out
    (again,) = [c for c in rig.store.claim_due(100, 60) if c.ref == REF]
    assert send_claimed(rig.ctx, REF, again.version, again.claim) == "requeued"
    ledger = rig.store.ledger_ttl(REF)
    shown = rig.reminders()["booking-confirmation:email"]
    assert shown["due_at"] == due, shown
    expected = datetime.now(UTC) + timedelta(seconds=ledger + IN_FLIGHT_MARGIN)
    assert abs(_at(shown["next_try_at"]) - expected) < timedelta(seconds=2), shown
    rig.gate.answer(200)
    thread.join(15)
    assert out == ["sent"], out
    shown = rig.reminders()["booking-confirmation:email"]
    assert shown["status"] == "sent" and "next_try_at" not in shown, shown
