"""The pump's hand-out under faults, forced (found by review): real Redis, the real pump
(worker/pump.py), the publish seam parked or failing as a broker would.
"""

from __future__ import annotations

import time
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
