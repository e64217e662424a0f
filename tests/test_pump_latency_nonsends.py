"""Only attempts that reached the provider count as sends in the pump's window arithmetic
(found by review; add7e98 left out only claims already past their start): an attempt that
ends in a round trip or two (skipped as expired, deferred by the send window, dropped, a
requeue) says nothing of how long a send takes. Real Redis, the real senders
(worker/dispatch.py `Lanes`) and pump (worker/pump.py), a real local HTTP gateway."""

from __future__ import annotations

import time

from tests.raw import set_reminder_fields
from tests.test_send_batches import (  # noqa: F401  (gateway: a fixture)
    ONE_STEP,
    PREFIX,
    Rig,
    capacity,
    due_now,
    gateway,
    wait_for,
)
from worker.pump import Keys, pump
from worker.store import Claim


def test_expired_reminders_drained_after_an_outage_do_not_shrink_the_window(
        tmp_path, redis_client, gateway):  # noqa: F811
    # After an outage the queue holds a backlog of reminders whose expiry passed meanwhile
    # (freshly claimed: within their start). Each begins, finds itself expired and is
    # skipped in a few round trips: counted as sends, they made the measured latency
    # milliseconds and the next run claimed the whole backlog instead of one window.
    rig = Rig(tmp_path, redis_client, gateway, protocol='name = "One step"\n' + ONE_STEP)
    store, keys = rig.store, Keys(PREFIX)
    try:
        refs = due_now(rig, [("X", "sms")] * 60)
        for ref in refs[:30]:
            set_reminder_fields(store, ref, expires_epoch=repr(time.time() - 60))
        # Measured before the outage: an SMS takes 0.5 s; 4 threads (the rig's) registered.
        redis_client.hset(keys.stats("sms"), mapping={"latency": "0.5", "drained": "0",
                                                      "busy": "0"})
        expired = store.claim_due(30, 60)
        assert sorted(c.ref for c in expired) == sorted(refs[:30])
        rig.hand(expired)  # within their start: each is begun
        wait_for(lambda: not rig.lanes._futures)
        rig.lanes.flush()
        assert gateway.bodies == []  # nothing reached the provider
        assert all(store.record(ref)["status"] == "skipped" for ref in refs[:30])
        published: list[Claim] = []
        pump(store, lambda ch, claims, at: published.extend(claims),
             capacity=capacity(threads=4, batch_size=50), claim_round=500)
        # 4 threads at 0.5 s finish 16 in the 2 s backlog: one window, not the backlog.
        assert len(published) == 16, len(published)
        assert float(redis_client.hget(keys.stats("sms"), "latency")) == 0.5
    finally:
        gateway.release()
        rig.drain()
