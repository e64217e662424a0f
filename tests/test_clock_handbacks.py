"""A warm shutdown's hand-backs are due on Redis's clock (found by review of e7fde86): the
claims a stopping sender hands back (waiting for a thread, or arriving in a batch while it
stops) are "due now" so that another worker sends them within seconds, but "now" was this
host's clock, while the pump claims what is due by Redis's. A sender host 30 s ahead (the
skew e7fde86 keeps sending through) put them 30 s into Redis's future: every reminder a
`docker stop` handed back waited the skew. Now they are due at this process's reading of
Redis's clock (`CLOCK`), as a claim not started in time already was.

Real Redis, the real senders, a real HTTP gateway; the skewed clock is the one edge patched:
the send path's `time` and `datetime`."""

from __future__ import annotations

import threading
import time as real_time
from datetime import datetime, timedelta

import pytest

from tests.test_clock_skew import SKEW, Skewed
from tests.test_send_batches import Rig, gateway, phone, prep  # noqa: F401  (gateway: fixture)
from worker import dispatch
from worker.clock import RedisClock, redis_time


class _Ahead(datetime):
    """The datetime class, its clock SKEW seconds ahead."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return datetime.now(tz) + timedelta(seconds=SKEW)


def test_a_warm_shutdown_on_a_host_ahead_hands_back_due_on_redis_clock(
        tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dispatch, "CLOCK", RedisClock(dispatch.CLOCK.local))
    monkeypatch.setattr(dispatch, "time", Skewed(SKEW))  # the sending host is 30 s ahead
    monkeypatch.setattr(dispatch, "datetime", _Ahead)
    rig = Rig(tmp_path, redis_client, gateway, send_threads=1)
    for n in (1, 2, 3):
        rig.book(rig.doc(n))
    gateway.hold = {phone(1)}
    rig.hand(rig.claim(prep(1), prep(2)), redis_time(redis_client))
    gateway.wait_held()  # prep(1) at the gateway; prep(2) waits for the one thread
    closing = threading.Thread(target=rig.drain)
    closing.start()
    try:
        deadline = real_time.monotonic() + 10
        while rig.state(prep(2))["record"]["status"] != "scheduled":
            assert real_time.monotonic() < deadline, rig.state(prep(2))
            real_time.sleep(0.05)
        # A batch arriving while the senders stop goes straight back too (with prep(2), if
        # due again already).
        rig.store.redis.zadd(rig.store.due_key, {prep(3): 0})
        claims = rig.store.claim_due(100, rig.settings.lease_seconds)
        assert prep(3) in [c.ref for c in claims], claims
        assert rig.hand(claims, redis_time(redis_client)).endswith("the rest handed back")
        now = redis_time(redis_client)
        for ref in (prep(2), prep(3)):
            s = rig.state(ref)
            assert s["record"]["status"] == "scheduled" and s["due"] is not None, s
            # Due now on Redis's clock (the pump takes it at its next run), not SKEW later.
            assert s["due"] <= now + 1.0, (ref, s["due"] - now)
    finally:
        gateway.release(200)
        closing.join(10)
    assert rig.state(prep(1))["record"]["status"] == "sent"


def test_an_attempt_stopped_before_sending_on_a_host_ahead_is_due_on_redis_clock(
        tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    """The attempt past its last fence when the worker stops hands its reminder back
    (STOPPED_BEFORE_SENDING, an abandon) due at its own 'now': this host's clock, SKEW
    ahead of the pump's. Parked at the fence while the senders stop, released."""
    monkeypatch.setattr(dispatch, "CLOCK", RedisClock(dispatch.CLOCK.local))
    monkeypatch.setattr(dispatch, "time", Skewed(SKEW))  # the sending host is 30 s ahead
    monkeypatch.setattr(dispatch, "datetime", _Ahead)
    rig = Rig(tmp_path, redis_client, gateway, send_threads=1)
    rig.book(rig.doc(1))
    at_fence, go = threading.Event(), threading.Event()
    real = rig.store.still_owned

    def parked(*args, **kwargs):  # type: ignore[no-untyped-def]
        at_fence.set()
        assert go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(rig.store, "still_owned", parked)
    rig.hand(rig.claim(prep(1)), redis_time(redis_client))
    assert at_fence.wait(10)
    closing = threading.Thread(target=rig.drain)
    closing.start()
    try:
        deadline = real_time.monotonic() + 10
        while not rig.lanes.stopping():
            assert real_time.monotonic() < deadline
            real_time.sleep(0.02)
    finally:
        go.set()
        closing.join(10)
    s = rig.state(prep(1))
    assert s["record"]["status"] == "scheduled" and s["due"] is not None, s
    assert gateway.bodies == []  # nothing handed over
    # Due now on Redis's clock (the pump takes it at its next run), not SKEW later.
    assert s["due"] <= redis_time(redis_client) + 1.0, s["due"] - redis_time(redis_client)


@pytest.mark.parametrize("site", ["overtaken", "in flight"])
def test_an_attempt_handing_back_on_a_host_ahead_is_due_on_redis_clock(
        site, tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    """The other hand-backs of an attempt are due on Redis's clock too: one overtaken before
    sending (`still_owned` answers no: the abandon) and one finding another attempt in
    flight (its ledger held: requeued just after the ledger's TTL, a Redis TTL). Both were
    dated on this host's clock, SKEW ahead of the pump's."""
    monkeypatch.setattr(dispatch, "CLOCK", RedisClock(dispatch.CLOCK.local))
    monkeypatch.setattr(dispatch, "time", Skewed(SKEW))  # the sending host is 30 s ahead
    monkeypatch.setattr(dispatch, "datetime", _Ahead)
    rig = Rig(tmp_path, redis_client, gateway, send_threads=1)
    rig.book(rig.doc(1))
    claims = rig.claim(prep(1))
    wait = 0.0
    if site == "overtaken":
        # The one edge patched: the last check finds the reminder overtaken.
        monkeypatch.setattr(rig.store, "still_owned", lambda *a, **k: False)
    else:
        wait = 2.0  # an earlier attempt's ledger, held for 2 s more
        redis_client.set(rig.store.ledger_key(prep(1)), "earlier", px=int(wait * 1000))
    try:
        rig.hand(claims, redis_time(redis_client))
        deadline = real_time.monotonic() + 10
        while rig.state(prep(1))["record"]["status"] != "scheduled":
            assert real_time.monotonic() < deadline, rig.state(prep(1))
            real_time.sleep(0.05)
    finally:
        rig.drain()
    s = rig.state(prep(1))
    assert s["due"] is not None and gateway.bodies == [], s  # nothing handed over
    now = redis_time(redis_client)
    # Due on Redis's clock (after the ledger's TTL for "in flight"), not SKEW later.
    assert s["due"] <= now + wait + dispatch.IN_FLIGHT_MARGIN + 1.0, (site, s["due"] - now)
