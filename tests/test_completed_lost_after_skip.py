"""`booking.completed` still comes when the attempt two changes overtook dies at the provider
(review of 3de9b7b and c01c05b).

3de9b7b keeps the lease of a reminder being sent that a change takes out of the plan, so that
the pump's claim settles it (`_LEFT`) should its worker be lost at the provider. But a second
change that plans it again as skipped for another reason (a late step, `late = "skip"`: its
time has passed) rewrote it with a bumped version, and its stored status was no longer
`sending` (cancelled by the first): its lease was removed. Nothing came back to it, and the
clinic was never told the booking is complete. Now a key left without a pending status
keeps whatever lease it has.

Real Redis, the pump's claim script (`Store.claim_due`), the clinic events delivered, signed,
to a real webhook receiver (tests/test_completed_again.py's rig, its STOP step late = "skip").
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT
from tests.test_completed_again import completed, delivered, send
from tests.test_completed_again import gate as gate  # noqa: F401  (the fixtures)
from tests.test_completed_again import receiver as receiver  # noqa: F401
from tests.test_send_races import PREFIX, PREP, PROTOCOL, STOP, Rig, write_config
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store
from worker.webhooks import hooks_for


@pytest.fixture
def rig(tmp_path, redis_client, gate, receiver) -> Rig:  # noqa: F811
    config = write_config(tmp_path / "config", gate.port)
    stop_late_skip = PROTOCOL.replace('late = "send"', 'late = "skip"', 1)
    assert stop_late_skip.index('late = "skip"') < stop_late_skip.index('id = "prep"')
    (config / "protocols" / "race.toml").write_text(stop_late_skip, encoding="utf-8")
    with (config / "clinics" / "rc.toml").open("a", encoding="utf-8") as f:
        f.write(f'[webhook]\nurl = "{receiver.url}"\nsecret = "${{RC_WEBHOOK_SECRET}}"\n')
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX, hooks=hooks_for(catalog.clinics))
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


def book_at(rig: Rig, doc: dict, now: datetime) -> None:
    booking = parse_booking(doc, rig.catalog)
    planned = plan(booking, rig.catalog.protocols["race"], rig.catalog.clinics["rc"], now)
    rig.store.upsert(booking, planned, now)


def test_the_attempt_lost_after_a_cancel_then_a_late_skip_tells_complete_once(rig, receiver):
    # The visit in 2.5 h: the stop SMS (3 h before) was due half an hour ago. Booked an
    # hour ago it was still ahead (scheduled); booked now it is late, and skipped.
    doc = rig.booking(starts_in=timedelta(hours=2, minutes=30))
    book_at(rig, doc, datetime.now(UTC) - timedelta(hours=1))
    assert rig.state(STOP)["record"]["status"] == "scheduled"
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    store = rig.store
    store.redis.zadd(store.due_key, {STOP: 0})
    [claim] = [c for c in store.claim_due(100, 1) if c.ref == STOP]  # a 1 s lease
    # The lost worker's begin: the ledger taken (2.5 s), the message at the provider, then
    # nothing more: its process died, its batch task was acknowledged at the hand-over.
    assert store.begin_send(STOP, claim.version, claim.claim, "lost-worker", 2500) == "ok"
    rig.book(doc | {"medications": {"tretinoin": False}})  # change 1: out of the plan
    assert rig.state(STOP)["record"]["status"] == "cancelled"
    assert rig.state(STOP)["lease"] is not None  # kept for the lost attempt (3de9b7b)
    rig.book(doc)  # change 2: planned again, too late now: skipped (another reason)
    assert rig.state(STOP)["record"]["status"] == "skipped"
    assert completed(delivered(rig, receiver)) == []  # the attempt may still be at work
    assert rig.state(STOP)["lease"] is not None  # still looked at once it runs out
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
