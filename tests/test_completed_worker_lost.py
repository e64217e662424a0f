"""`booking.completed` still comes when the attempt a change overtook dies at the provider
and its task never comes again (review of 2584c78).

ab34a75 leaves a reminder at the gateway to its attempt's finish; 2584c78 tells the booking
complete at that task's begin again, should its worker die. But the pump hands claims to
`send_batch`, which is acknowledged once it has handed them to the senders: a worker lost
mid-send gives nothing back to the broker; only the lease brings a claim back. The change
took the reminder out of the lease set (and out of the plan), so nothing ever came back to
it: the clinic was never told the booking is complete. Now the lease of a reminder a change
took out of the plan while it was being sent stays; once it runs out, the pump's claim
looks at it: its attempt still at work (its ledger held, no finish logged) -> looked at
again once the ledger expires; else the booking is told complete, once.

Real Redis, the pump's claim script (`Store.claim_due`), the clinic events delivered, signed,
to a real webhook receiver (tests/test_completed_again.py's rig)."""

from __future__ import annotations

import time

from tests.test_completed_again import completed, delivered, send
from tests.test_completed_again import gate as gate  # noqa: F401  (the fixtures)
from tests.test_completed_again import receiver as receiver  # noqa: F401
from tests.test_completed_again import rig as rig  # noqa: F401
from tests.test_send_races import PREP, STOP


def test_the_attempt_lost_at_the_provider_after_the_change_tells_complete_once(rig, receiver):
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    store = rig.store
    store.redis.zadd(store.due_key, {STOP: 0})
    [claim] = [c for c in store.claim_due(100, 1) if c.ref == STOP]  # a 1 s lease
    # The lost worker's begin: the ledger taken (2.5 s), the message at the provider, then
    # nothing more: its process died, its batch task was acknowledged at the hand-over.
    assert store.begin_send(STOP, claim.version, claim.claim, "lost-worker", 2500) == "ok"
    rig.book(doc | {"medications": {"tretinoin": False}})  # the stop SMS leaves the plan
    assert rig.state(STOP)["record"]["status"] == "cancelled"
    assert completed(delivered(rig, receiver)) == []  # it may still go
    time.sleep(1.3)  # the lease ran out; the ledger did not: it may still be at work
    assert store.claim_due(100, 8) == []
    assert completed(delivered(rig, receiver)) == []
    time.sleep(2.5)  # the ledger expired (the watchdog ends a process before that)
    assert store.claim_due(100, 8) == []
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"]
    assert rig.state(STOP)["lease"] is None and rig.state(STOP)["due"] is None
    time.sleep(0.2)
    assert store.claim_due(100, 8) == []
    assert delivered(rig, receiver) == got  # once
    assert len(rig.gate.bodies) == 1
