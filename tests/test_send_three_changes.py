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


def send_due(rig: Rig, within: float = 12.0) -> None:
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
