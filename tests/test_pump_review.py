"""The pump's hand-out under faults, forced (found by review): real Redis, the real pump
(worker/pump.py), the publish seam parked or failing as a broker would.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.exceptions import OperationalError

from tests.test_send_batches import PREFIX, capacity, due_now, gateway, shop  # noqa: F401
from worker.pump import Keys, pump
from worker.store import Claim


def test_a_broker_refusal_mid_round_hands_every_claim_of_the_round_back_at_once(
        shop, redis_client):  # noqa: F811
    # The broker refuses the first batch (a connection the broker's client gave up on while
    # the store's rode it out): what the run claimed in that round and had not handed out
    # yet must go back to the schedule now, not sit leased with no task until the lease.
    store = shop.store
    refs = due_now(shop, [("F", ch) for _ in range(6) for ch in ("email", "sms")])
    published: list[Claim] = []

    def refusing(channel: str, claims: Any, at: float) -> None:
        if not published:
            published.append(claims[0])
            raise OperationalError("Error 111 connecting to the broker")
        published.extend(claims)

    try:
        pump(store, refusing, capacity=capacity(batch_size=2), claim_round=100)
    except OperationalError:
        pass
    else:
        raise AssertionError("the refusal did not reach the caller")
    # Nothing is leased without a task: every reminder is back in the schedule, due now.
    assert redis_client.zcard(store.lease_key) == 0, redis_client.zrange(store.lease_key, 0, -1)
    for ref in refs:
        assert store.record(ref)["status"] == "scheduled", (ref, store.record(ref))
        assert redis_client.zscore(store.due_key, ref) <= time.time() + 1
    for channel in ("email", "sms"):  # and none counts as outstanding
        assert redis_client.zcard(Keys(PREFIX).outstanding(channel)) == 0


def test_stale_tasks_drained_after_an_outage_do_not_shrink_the_window(
        tmp_path, redis_client, gateway):  # noqa: F811
    # A worker back after an outage longer than the lease finds its send queue still holding
    # the batches handed out before it: their claims are past their start, and the pump has
    # claimed those reminders again meanwhile. Each is dropped in a round trip without
    # being begun: that says nothing of how long a send takes. Counted as sends, they made
    # the measured latency a millisecond and the window thousands: the next run claimed the
    # whole backlog at once, most of it only to be handed back as not started in time.
    from tests.test_send_batches import ONE_STEP, Rig, wait_for

    rig = Rig(tmp_path, redis_client, gateway, protocol='name = "One step"\n' + ONE_STEP)
    store, keys = rig.store, Keys(PREFIX)
    try:
        refs = due_now(rig, [("W", "sms")] * 60)
        # Measured before the outage: an SMS takes 0.5 s; 4 threads (the rig's) registered.
        redis_client.hset(keys.stats("sms"), mapping={"latency": "0.5", "drained": "0",
                                                      "busy": "0"})
        old = store.claim_due(30, 60)  # handed out before the outage ...
        redis_client.zadd(store.lease_key, {c.ref: 0 for c in old})  # ... leases ran out
        again = store.claim_due(30, 60)  # claimed again by a pump meanwhile
        assert sorted(c.ref for c in again) == sorted(c.ref for c in old)
        for claim in again:  # ... and settled (sent) since
            store.requeue(claim.ref, datetime.now(UTC) + timedelta(days=1), "test",
                          claim=claim.claim)
        # The restarted worker drains the stale batches through its real senders.
        rig.hand(old, claimed_at=time.time() - 600)
        wait_for(lambda: not rig.lanes._futures)  # every stale claim settled
        rig.lanes.flush()
        assert gateway.bodies == []  # nothing was sent by them
        published: list[Claim] = []
        pump(store, lambda ch, claims, at: published.extend(claims),
             capacity=capacity(threads=4, batch_size=50), claim_round=500)
        # 4 threads at 0.5 s finish 16 in the 2 s backlog: one window (and no spare: no other
        # channel wants any), not the whole backlog.
        assert len(published) == 16, len(published)
        assert float(redis_client.hget(keys.stats("sms"), "latency")) == 0.5
        assert len(refs) == 60
    finally:
        gateway.release()
        rig.drain()
