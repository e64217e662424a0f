"""A notice held back for a message of its booking still at its provider (`TOLD_IN_FLIGHT`)
is due on Redis's clock: it waits that message's ledger (a TTL in Redis) from the pump's
'now', not this host's. On a host 30 s ahead it waited 30 s more than the ledger (review of
the clock's hand-backs, e0d7366 / 68d3209). Real Redis, a real HTTP SMS gateway parked
mid-request (the rig of tests/test_hold_told_in_flight.py); the skewed clock is the one edge
patched: the send path's `time` and `datetime`."""

from __future__ import annotations

import threading

from tests import test_notices_sms as ns
from tests.test_clock_handbacks import _Ahead
from tests.test_clock_skew import SKEW, Skewed
from tests.test_hold_told_in_flight import CONFIRMATION
from tests.test_told_date import _held
from worker import dispatch
from worker.clock import RedisClock, redis_time

gate = ns.gate  # fixtures
rig = ns.rig


def test_a_notice_held_back_for_a_message_in_flight_on_a_host_ahead_is_due_on_redis_clock(
        rig, monkeypatch):
    first, moved = rig.doc(10), _held(rig.doc(17))
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(CONFIRMATION)
    thread = threading.Thread(target=lambda: ns.send_claimed(
        rig.ctx, CONFIRMATION, claim.version, claim.claim))
    thread.start()
    try:
        assert rig.gate.arrived.wait(10)  # the confirmation at the gateway: its ledger held
        assert rig.book(moved)["status"] == "held"
        redis = rig.store.redis
        clock = RedisClock(dispatch.CLOCK.local)
        monkeypatch.setattr(dispatch, "CLOCK", clock)
        monkeypatch.setattr(dispatch, "time", Skewed(SKEW))  # this host is 30 s ahead
        monkeypatch.setattr(dispatch, "datetime", _Ahead)
        clock.measure(redis)
        assert rig.send("sk/M-1/hold-notice:sms") == "deferred"
        now = redis_time(redis)
        left = max(0, int(redis.pttl(rig.store.ledger_key(CONFIRMATION)))) / 1000
        due = redis.zscore(rig.store.due_key, "sk/M-1/hold-notice:sms")
        assert due is not None and left > 0
        # Due just after the confirmation's ledger on Redis's clock, not SKEW later.
        assert due <= now + left + dispatch.IN_FLIGHT_MARGIN + 1.0, due - now - left
    finally:
        rig.gate.answer(200)
        thread.join(20)
