"""How a pump run hands out its batches (worker/pump.py `_pump`, `_hand_out`): real Redis,
the real pump; the broker's seam recorded.

A batch's `claimed_at` is what the senders count each of its claims' start-by deadline
from (worker/dispatch.py "When a claim may begin"): it must be no later than the claim of
any claim in it. A channel's claims wait in the run until a batch is full, across claim
rounds: a batch filled in a later round holds claims of an earlier one.
"""

from __future__ import annotations

import time
from typing import Any

from tests.test_send_batches import (  # noqa: F401  (gateway, shop: fixtures)
    PREFIX,
    capacity,
    due_now,
    gateway,
    shop,
)
from worker.pump import Keys, pump, sender_member
from worker.store import Claim, Store

LEASE = 60  # capacity()'s lease_seconds


def test_a_batch_filled_over_two_claim_rounds_counts_from_its_first_claim(
        shop, redis_client):  # noqa: F811
    # Four emails due (email has room for six: batch of four); the SMS senders are busy.
    # Between the run's look and its claim three SMS fall due ahead of the emails (a booking
    # written meanwhile): the claim takes them (held: no room) and one email, whose batch
    # waits; the next round claims the other three emails, and the batch is full.
    store = shop.store
    keys = Keys(PREFIX)
    emails = due_now(shop, [("E", "email")] * 4)
    sms = due_now(shop, [("S", "sms")] * 3)
    redis_client.zrem(store.due_key, *sms)
    redis_client.zadd(keys.outstanding("sms"), {f"x{i}": time.time() + 30 for i in range(80)})
    redis_client.zadd(keys.senders("sms"), {sender_member("w:1", 10): time.time() + 10})
    redis_client.hset(keys.stats("sms"), mapping={"latency": "0.5", "drained": "0",
                                                 "busy": "0"})
    real = Store.claim_due
    rounds: list[list[str]] = []

    def raced(self: Store, *args: Any, **kwargs: Any) -> list[Claim]:
        if not rounds:
            redis_client.zadd(store.due_key, {ref: time.time() - 200 for ref in sms})
        claims = real(self, *args, **kwargs)
        rounds.append([c.ref for c in claims])
        return claims

    store.claim_due = raced.__get__(store)  # type: ignore[method-assign]
    published: list[tuple[str, list[Claim], float]] = []
    try:
        assert pump(store, lambda ch, claims, at: published.append((ch, list(claims), at)),
                    capacity=capacity(), claim_round=100) == 4
    finally:
        del store.claim_due
    assert len(rounds) == 2 and rounds[0][-1] == emails[0], rounds  # the batch spans both
    ((channel, claims, at),) = published
    assert channel == "email" and sorted(c.ref for c in claims) == sorted(emails)
    for claim in claims:
        leased_from = redis_client.zscore(store.lease_key, claim.ref) - LEASE
        assert at <= leased_from, (claim.ref, at, leased_from)
