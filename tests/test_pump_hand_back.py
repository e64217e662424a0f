"""A pump run hands back what it held in one round trip to Redis, not one per claim: real
Redis, the real pump (worker/pump.py), the wire counted where the client sends.

In a mixed burst the two channels alternate in the line, and a run taking what the faster
channel's window allows passes the other's claims beyond its own, up to a claim round
(`pump_batch`, 200), and hands them back at the end of the run, with the run lock held.
One round trip each, from a pool process whose 32 sender threads hold the GIL in turn, cost
about 2.4 ms a claim: 0.17-1.4 s a run (`python -m benchmarks.burst_probe --burst 1000`,
the pump's own timestamps), while no run could hand out more and the SMS senders ran dry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from tests.test_send_batches import (  # noqa: F401  (gateway, shop: fixtures)
    PREFIX,
    capacity,
    due_now,
    gateway,
    shop,
)
from worker.pump import Keys, pump, sender_member

HELD = 40  # emails passed (their channel has no room) to reach the SMS behind them


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count what this thread sends to Redis: one send per command, or per pipeline."""
    count = [0]
    me = threading.get_ident()
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:
            count[0] += 1
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return count


def test_a_run_hands_back_what_it_held_in_one_round_trip(shop, redis_client,  # noqa: F811
                                                         round_trips):
    store = shop.store
    keys = Keys(PREFIX)
    refs = due_now(shop, [("E", "email")] * HELD + [("S", "sms")] * 5)
    # The email senders are busy: 10 threads at 0.5 s a send have 4 s of work.
    redis_client.zadd(keys.outstanding("email"), {f"x{i}": time.time() + 30 for i in range(80)})
    redis_client.zadd(keys.senders("email"), {sender_member("w:1", 10): time.time() + 10})
    redis_client.hset(keys.stats("email"), mapping={"latency": "0.5", "drained": "0",
                                                   "busy": "0"})
    store.claim_due(0, 60)  # its script loaded, as in a pump that has run before
    published: list[str] = []
    before = round_trips[0]
    assert pump(store, lambda ch, claims, at: published.extend(c.ref for c in claims),
                capacity=capacity(), claim_round=HELD + 5) == 5
    trips = round_trips[0] - before
    assert sorted(published) == sorted(refs[HELD:])
    # Every email it passed is back in the schedule, in order, at the email senders' pace.
    assert set(redis_client.zrange(store.lease_key, 0, -1)) == set(refs[HELD:])
    dues = [redis_client.zscore(store.due_key, ref) for ref in refs[:HELD]]
    assert dues == sorted(dues) and dues[0] > time.time() + 0.1
    assert dues[-1] - dues[0] == pytest.approx((HELD - 1) * 0.5 / 10, abs=0.01)
    for ref in refs[:HELD]:
        assert store.record(ref)["status"] == "scheduled", store.record(ref)
    # The run's own reads and writes (the lock, the budgets, the look, the claim, the two
    # publishes' counts) are a dozen or so; the hand-back adds one, not one per claim.
    assert trips < HELD // 2, f"{trips} round trips for a run that held {HELD}"
