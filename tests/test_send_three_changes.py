"""Three changes while one attempt is parked at the SMS gateway (a move, a cancel, the same
booking id booked again; or two moves), forced: what the patient receives, once the
attempt ends and every message due since has gone, and the final records.

Reuses tests/test_send_batches.py's gateway and `Rig` (real Redis, real Apprise, a real
HTTP gateway holding the parked request until the test answers it).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests import test_send_batches as batches
from tests.test_send_batches import LEASE, NOTICED, Rig, phone, prep, settled, wait_for
from worker.dispatch import Lanes, Watchdog, hand_over
from worker.pump import channel_of

gateway = batches.gateway  # the rig's fixture


def send_due(rig: Rig, within: float = 25.0) -> None:
    """Send what falls due within `within` seconds, as the pump and the senders would, each
    at its time (a notice waiting for a message at its provider falls due a lease later)."""
    rig.gateway.hold = set()
    end = time.time() + within
    while time.time() < end:
        claims = rig.store.claim_due(100, LEASE)
        if not claims:
            nxt = rig.store.next_due_in()
            if nxt is None or time.time() + nxt > end:
                return
            time.sleep(max(0.05, min(nxt, 0.5)))
            continue
        rig.lanes = Lanes(rig.ctx, watchdog=Watchdog(kill=lambda: None))
        for channel in ("sms", "email"):
            mine = [[c.ref, c.version, c.claim] for c in claims if channel_of(c.ref) == channel]
            if mine:
                hand_over(rig.ctx, rig.lanes, channel, mine, time.time())
        refs = [c.ref for c in claims]
        wait_for(lambda refs=refs: all(settled(rig, ref) for ref in refs))
        rig.drain()


def texts(rig: Rig) -> list[str]:
    return [b["message"] for b in rig.gateway.to(phone(1))]


def shown(rig: Rig) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rig.store.timeline("rc", "R-1")["reminders"]}


def day(delta: timedelta) -> str:
    """The date as the English SMS writes it ("Nov 28")."""
    at = datetime.now(UTC) + delta
    return f"{at:%b} {at.day}"


@pytest.mark.parametrize("answer", [200, 503])
def test_a_move_a_cancel_and_booked_again_while_parked_tells_the_new_date(
        tmp_path, redis_client, gateway, answer):
    """The day-before SMS ("see you on <A>") is at the gateway; the visit moves to B, is
    cancelled, then booked again (same id) for C, before the attempt ends. The move's and
    the cancel's notices were superseded unsent: the patient knows A from that SMS (it was
    being sent: it counts as gone out, README), so the re-open is told ("moved to <C>"), as
    it is after a cancel alone or two moves. It was not: the SMS at the gateway had been
    rescheduled by the move, and the re-open judged it "planned after the visit" by the
    date told (A) instead of by its own plan's (B), so the patient went to the visit on A."""
    rig = Rig(tmp_path, redis_client, gateway, protocol=NOTICED)
    ref = prep(1)
    rig.park(ref)
    rig.book(rig.doc(1, starts_in=timedelta(days=3)))
    rig.store.cancel("rc", "R-1", datetime.now(UTC))
    again = rig.book(rig.doc(1, starts_in=timedelta(days=4)))
    new_due = {r["id"]: r for r in again["reminders"]}["prep:sms"]["due_at"]
    rig.settle(ref, answer)
    s = rig.state(ref)
    assert s["lease"] is None and s["ledger"] is None, s
    assert s["record"]["status"] == "scheduled", s
    assert s["due"] == datetime.fromisoformat(new_due).timestamp(), s
    if answer == 200:  # went out for A: history beside the plan, which sends it for C
        assert s["record"]["sent_version"] == "1", s
        assert s["log"][-1]["result"] == "stale: delivery recorded beside the new plan", s
    else:
        assert "sent_at" not in s["record"] and s["log"][-1]["result"] == "stale", s
    send_due(rig)
    timeline = shown(rig)
    assert timeline["rescheduled#1:sms"]["status"] == "cancelled", timeline
    assert timeline["cancelled#2:sms"]["status"] == "cancelled", timeline
    assert timeline.get("rescheduled#3:sms", {}).get("status") == "sent", timeline
    got = texts(rig)
    assert len(got) == 2, got  # the day-before SMS at the gateway, then the re-open's notice
    assert day(timedelta(days=2)) in got[0], got
    assert "moved to" in got[1] and day(timedelta(days=4)) in got[1], got
    assert rig.store.redis.zscore(rig.store.due_key, ref) == s["due"]  # for C, at its time
    assert rig.store.claim_due(100, LEASE) == []


@pytest.mark.parametrize("answer", [200, 503])
@pytest.mark.parametrize("between", ["move", "cancel"])
def test_moved_on_then_to_a_time_passed_while_parked_it_goes_once(
        tmp_path, redis_client, gateway, between, answer):
    """The day-before SMS ("see you on <A>") is at the gateway; the visit moves to B days
    ahead (the SMS would go again for B), then (or after a cancel) to C within the hour:
    its time for C has passed, so a move would not send it again had it gone a moment
    before (README "Races with the clinic's changes": however many changes landed while it
    was at its provider). Delivered, it is recorded as the reminder's send and the move is
    told by the notice; it was recorded beside the plan for C, which sent it again: a second
    day-before SMS. Refused, it goes once, for C."""
    rig = Rig(tmp_path, redis_client, gateway, protocol=NOTICED)
    ref = prep(1)
    rig.park(ref)
    rig.book(rig.doc(1, starts_in=timedelta(days=3)))
    if between == "cancel":
        rig.store.cancel("rc", "R-1", datetime.now(UTC))
    # C: within the hour, on today's date (the patient is in UTC): "see you today".
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    rig.book(rig.doc(1, starts_in=min(timedelta(hours=1), (midnight - now) / 2)))
    rig.settle(ref, answer)
    s = rig.state(ref)
    if answer == 200:
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
        assert s["log"][-1]["result"] == "stale: recorded as sent", s
        assert s["record"]["sent_version"] == "1" and s["due"] is None, s
    else:
        assert s["record"]["status"] == "scheduled" and s["ledger"] is None, s
        assert s["log"][-1]["result"] == "stale", s
    send_due(rig)
    got = texts(rig)
    day_before = [t for t in got if "see you" in t]
    assert len(day_before) == 2 if answer == 503 else 1, got  # (503: refused, then for C)
    assert "see you today" in day_before[-1] if answer == 503 else True, got
    assert len([t for t in got if "moved to" in t]) == 1, got
    assert len(got) == len(day_before) + 2, got  # and the stop message, late for C
    s = rig.state(ref)
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"]) == (None, None), s
    timeline = shown(rig)
    assert timeline["prep:sms"]["status"] == "sent", timeline
    assert not [k for k in timeline if k.startswith("again-")], timeline
    assert rig.store.claim_due(100, LEASE) == []
    if answer == 200:
        rig.assert_sent_stale(ref, s)  # never claimed again, even were it made due now
    else:
        rig.store.redis.zadd(rig.store.due_key, {ref: 0})
        assert rig.store.claim_due(100, LEASE) == []


@pytest.mark.parametrize("answer", [200, 503])
@pytest.mark.parametrize("cancel", [False, True], ids=["moved", "cancelled"])
def test_a_reclaim_finding_it_in_flight_then_a_move_to_a_time_passed_sends_it_once(
        tmp_path, redis_client, gateway, cancel, answer):
    """The day-before SMS is at the gateway past its lease (a slow send): the pump claims it
    again, and the second attempt, finding the first at work (its ledger), puts it back in
    the schedule for after that ledger. The visit then moves to within the hour (or is
    cancelled and booked again for then; its time passed: a move would not send it again
    had it gone a moment before). The first attempt
    is still at its provider: it counts as being sent. Delivered, it is the reminder's send
    (it was recorded beside the plan, which sent a second day-before SMS); refused, it goes
    once, for the new time."""
    rig = Rig(tmp_path, redis_client, gateway, protocol=NOTICED)
    ref = prep(1)
    rig.park(ref)
    rig.store.redis.zadd(rig.store.lease_key, {ref: 0})  # its lease ran out
    (again,) = rig.store.claim_due(100, LEASE)
    other = Lanes(rig.ctx, watchdog=Watchdog(kill=lambda: None))  # another worker's senders
    hand_over(rig.ctx, other, "sms", [[again.ref, again.version, again.claim]], time.time())
    wait_for(lambda: rig.store.record(ref).get("reason") == "another attempt is in flight")
    other.close()
    s = rig.state(ref)
    assert s["record"]["status"] == "scheduled" and s["ledger"] not in (None, "sent"), s
    if cancel:
        rig.store.cancel("rc", "R-1", datetime.now(UTC))
    # C: within the hour, on today's date (the patient is in UTC): "see you today".
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    rig.book(rig.doc(1, starts_in=min(timedelta(hours=1), (midnight - now) / 2)))
    rig.settle(ref, answer)
    s = rig.state(ref)
    if answer == 200:
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
        assert s["log"][-1]["result"] == "stale: recorded as sent", s
        assert s["due"] is None, s
    else:
        assert s["record"]["status"] == "scheduled" and s["ledger"] is None, s
    send_due(rig)
    got = texts(rig)
    day_before = [t for t in got if "see you" in t]
    assert len(day_before) == (2 if answer == 503 else 1), got  # (503: refused, then for C)
    assert len([t for t in got if "moved to" in t]) == 1, got
    assert len(got) == len(day_before) + 2, got  # and the stop message, late for C
    s = rig.state(ref)
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"]) == (None, None), s
    assert shown(rig)["prep:sms"]["status"] == "sent"
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})  # even were it made due now
    assert rig.store.claim_due(100, LEASE) == []
