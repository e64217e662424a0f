"""A Redis between masters (MASTERDOWN) during a send, as real parts: a real Redis put in
that state as a Sentinel failover leaves an old master for a moment (a replica with
`replica-serve-stale-data no` whose master link is down), the real senders, the real
local SMS gateway.

A replica whose master link is down refuses every command with MASTERDOWN, before it
runs: nothing is read or written, so trying again is safe, as for the refusals of writes
(OOM, MISCONF, READONLY, NOREPLICAS). The send path treated MASTERDOWN as a bug: the
attempt ended on the exception, and the reminder waited out its lease; a delivery the
provider had accepted was left unrecorded until then (review)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.test_send_batches import (  # noqa: F401 (fixtures)
    Rig,
    gateway,
    phone,
    prep,
    rig,
    sent_once_within_its_lease,
)
from worker.embedded import free_port


@contextmanager
def master_down(client, seconds: float) -> Iterator[None]:
    """Redis answers MASTERDOWN to everything for `seconds`, then is a master again with
    all its data (a replica whose master never answered has synced nothing)."""
    client.config_set("replica-serve-stale-data", "no")
    client.replicaof("127.0.0.1", free_port())  # a master that is not there
    try:
        yield
        time.sleep(seconds)
    finally:
        client.replicaof("NO", "ONE")
        client.config_set("replica-serve-stale-data", "yes")


def test_a_claim_begun_while_redis_is_between_masters_goes_out_on_time(rig, redis_client):  # noqa: F811
    rig.book(rig.doc(1))
    claims = rig.claim(prep(1))
    with master_down(redis_client, 1.2):  # the begin is refused at least once
        rig.hand(claims)
    sent_once_within_its_lease(rig)


def test_a_delivery_accepted_while_redis_is_between_masters_is_recorded_once(
        rig, redis_client, gateway):  # noqa: F811
    rig.book(rig.doc(1))
    gateway.hold = {phone(1)}
    rig.hand(rig.claim(prep(1)))
    gateway.wait_held()  # begun, at the provider
    with master_down(redis_client, 1.2):
        gateway.release(200)  # the provider accepts; its record is refused at least once
    sent_once_within_its_lease(rig)
    assert rig.store.claim_due(100, 60) == []
