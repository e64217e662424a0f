"""The pump's hand-out and the send path under faults, forced (found by review): real Redis,
the real pump (worker/pump.py) and senders (worker/dispatch.py), the broker's publish
refusing as kombu does, a real Redis restarted under an attempt.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.exceptions import OperationalError

from tests.conftest import ROOT
from tests.raw import set_reminder_fields
from tests.test_send_batches import (  # noqa: F401  (gateway, shop: fixtures)
    ONE_STEP,
    PREFIX,
    Rig,
    capacity,
    due_now,
    gateway,
    shop,
    wait_for,
)
from tests.test_send_races import (
    PREP,
    gate,  # noqa: F401  (a fixture)
    write_config,
)
from tests.test_send_races import Rig as RaceRig
from worker.catalog import Catalog
from worker.connections import WORKER, from_url
from worker.dispatch import Context, send_claimed
from worker.embedded import RedisServer
from worker.pump import Keys, pump
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Claim, Store


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


def test_a_reminder_expiring_while_its_last_fence_waits_out_a_redis_restart_is_not_sent(
        tmp_path, gate):  # noqa: F811
    # The send-time rules are checked when the attempt begins; its last fence before the
    # hand-over (`still_owned`) is a Redis round trip, which the client retries through a
    # Redis restart (up to about half a minute). A pre-visit reminder whose expiry (the
    # visit's start) passes meanwhile went out after it all the same.
    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    restarted: list[threading.Thread] = []
    try:
        settings = Settings(config_dir=write_config(tmp_path / "config", gate.port),
                            templates_dir=ROOT / "templates", lease_seconds=30,
                            send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(client, "race")
        rig = RaceRig(store, Context(settings, store, catalog, Renderer(catalog.templates_dir)),
                      catalog, gate)
        rig.book(rig.booking())
        expires = time.time() + 1.5
        set_reminder_fields(store, PREP, expires_epoch=repr(expires))
        claim = rig.claim_now(PREP)
        real = store.still_owned

        def across_a_restart(*args: Any, **kwargs: Any) -> bool:
            server.stop()  # Redis goes down just as the last fence is read ...
            restart = threading.Timer(3.0, server.start)  # ... and is back after the expiry
            restarted.append(restart)
            restart.start()
            return real(*args, **kwargs)

        store.still_owned = across_a_restart  # type: ignore[method-assign]
        gate.answer(200)
        outcome = send_claimed(rig.ctx, PREP, claim.version, claim.claim)
        assert time.time() > expires
        assert gate.bodies == [], outcome  # nothing went after the visit began
        s = rig.state(PREP)
        assert (outcome, s["record"]["status"]) == ("skipped", "skipped"), s
        assert s["record"]["reason"] == (
            "not sent: it was meant for before the appointment, which has begun")
        assert (s["due"], s["lease"], s["ledger"]) == (None, None, None), s
    finally:
        for restart in restarted:
            restart.join(10)
        client.close()
        server.stop()
