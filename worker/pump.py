"""The pump: move reminders that are due now from the schedule into Celery, no ETA.

Run by Celery beat every `pump_interval_seconds`. Claiming is one Lua script on
Redis's own clock, so any number of pumps may run at once without double claims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from .store import Claim, Store

log = logging.getLogger(__name__)
MAX_ROUNDS = 20  # bound one pump run; the next beat tick picks up the rest


def pump(store: Store, publish: Callable[[Claim], None], *, batch: int, lease_seconds: int) -> int:
    """Claim due reminders and publish one send task each; return how many were published."""
    published = 0
    for _ in range(MAX_ROUNDS):
        claims = store.claim_due(batch, lease_seconds)
        for index, claim in enumerate(claims):
            try:
                publish(claim)
            except Exception:
                # The broker refused: hand the rest back now rather than after the lease.
                now = datetime.now(UTC)
                for rest in claims[index:]:
                    store.requeue(rest.ref, now, "the broker refused the task", claim=rest.claim)
                raise
            published += 1
        if len(claims) < batch:
            break
    if published:
        log.info("pump: published %d send task(s)", published)
    return published
