"""`booking.completed` means nothing more will be sent for the booking: when a booking told
complete gets reminders to send again (START puts back the SMS its STOP skipped, the clinic
moves it, a dead letter is replayed), the clinic is told again once those are done.

Real Redis, the real send path to a real HTTP SMS gateway (tests/test_send_races.py's rig),
and the clinic events delivered, signed, to a real webhook receiver.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.raw import set_reminder_fields
from tests.sinks import WebhookReceiver
from tests.test_send_races import PREFIX, PREP, STOP, Gate, Rig, write_config
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store
from worker.webhooks import Events, deliver_event, hooks_for, pump_events

SECRET = "whsec-completed-0123456789"
ENV = {"RC_WEBHOOK_SECRET": SECRET}
PHONE = "+34600111222"


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(SECRET).start()
    yield r
    r.stop()


@pytest.fixture
def rig(tmp_path, redis_client, gate, receiver) -> Rig:
    config = write_config(tmp_path / "config", gate.port)
    with (config / "clinics" / "rc.toml").open("a", encoding="utf-8") as f:
        f.write(f'[webhook]\nurl = "{receiver.url}"\nsecret = "${{RC_WEBHOOK_SECRET}}"\n')
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    assert catalog.clinics["rc"].webhook is not None
    store = Store(redis_client, PREFIX, hooks=hooks_for(catalog.clinics))
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


def delivered(rig: Rig, receiver: WebhookReceiver) -> list[dict[str, Any]]:
    """Deliver every clinic event waiting; return all the receiver got, in order."""
    events = Events(rig.store.redis, PREFIX)
    pump_events(events, lambda event_id, claim: deliver_event(
        events, event_id, claim, clinics=rig.catalog.clinics, renderer=rig.ctx.renderer,
        settings=rig.ctx.settings, env=ENV), batch=100, lease_seconds=30)
    assert events.pending() == []
    hooks = receiver.snapshot()
    assert all(h.valid for h in hooks)
    return [h.json() for h in hooks]


def completed(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in got if e["type"] == "booking.completed"]


def send(rig: Rig, ref: str) -> str:
    claim = rig.claim_now(ref)
    return send_claimed(rig.ctx, ref, claim.version, claim.claim)


def told_complete_after_stop(rig: Rig, receiver: WebhookReceiver) -> list[dict[str, Any]]:
    """STOP while the pause SMS is at the gateway skips the other SMS; the pause SMS then
    goes: nothing is left to send, and the clinic is told the booking is complete."""
    rig.book(rig.booking())
    thread, result = rig.park(STOP)
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP at test") == (1, ["R-1"])
    rig.gate.answer(200)
    thread.join(20)
    assert result["outcome"] == "sent"
    assert rig.state(PREP)["record"]["status"] == "skipped"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.skipped", "reminder.sent", "booking.completed"]
    return got


def test_start_bringing_sms_back_tells_the_booking_complete_again(rig, receiver):
    first = completed(told_complete_after_stop(rig, receiver))
    assert rig.store.opt_in("rc", "sms", PHONE, caps=rig.catalog.clinics["rc"].sms,
                            why="START at test")
    assert rig.state(PREP)["record"]["status"] == "scheduled"
    # Nothing more sent yet: no completion told while the resumed SMS waits.
    assert completed(delivered(rig, receiver)) == first
    assert send(rig, PREP) == "sent"
    assert len(rig.gate.bodies) == 2
    got = delivered(rig, receiver)
    assert [e["type"] for e in got[3:]] == ["reminder.sent", "booking.completed"]
    assert got[3]["reminder"] == "prep:sms"
    again = completed(got)
    assert len(again) == 2 and again[0]["id"] != again[1]["id"]
    assert again[1]["booking_id"] == "R-1" and again[1]["version"] == again[0]["version"]


def test_start_bringing_nothing_back_tells_nothing_again(rig, receiver):
    told_complete_after_stop(rig, receiver)
    past = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    set_reminder_fields(rig.store, PREP, planned_epoch=repr(past), due_epoch=repr(past))
    # Its time passed while opted out: START puts nothing back.
    assert rig.store.opt_in("rc", "sms", PHONE, caps=rig.catalog.clinics["rc"].sms,
                            why="START at test")
    assert rig.state(PREP)["record"]["status"] == "skipped"
    assert rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "completed_told") == "1"
    got = delivered(rig, receiver)
    assert len(completed(got)) == 1 and len(rig.gate.bodies) == 1


def test_a_move_of_a_completed_booking_tells_it_complete_again(rig, receiver):
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent" and send(rig, PREP) == "sent"
    assert len(completed(delivered(rig, receiver))) == 1
    # The same booking sent again (a daily sync): nothing to send, nothing told again.
    assert rig.book(doc)["version"] == 1
    assert rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "completed_told") == "1"
    doc["starts_at"] = (datetime.fromisoformat(doc["starts_at"]) + timedelta(days=7)).isoformat()
    timeline = rig.book(doc)
    pending = [f"rc/R-1/{r['id']}" for r in timeline["reminders"]
               if r["status"] in ("scheduled", "retrying")]
    assert pending, timeline  # the messages again for the new date
    assert len(completed(delivered(rig, receiver))) == 1  # not yet: more to send
    for ref in pending:
        assert send(rig, ref) == "sent", ref
    got = delivered(rig, receiver)
    assert got[-1]["type"] == "booking.completed" and len(completed(got)) == 2
    assert got[-1]["version"] == 2


def test_a_completed_booking_cancelled_and_booked_again_is_told_complete_again(rig, receiver):
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent" and send(rig, PREP) == "sent"
    rig.store.cancel("rc", "R-1", datetime.now(UTC))
    assert len(completed(delivered(rig, receiver))) == 1
    doc["starts_at"] = (datetime.fromisoformat(doc["starts_at"]) + timedelta(days=7)).isoformat()
    timeline = rig.book(doc)  # re-opened at a new date
    pending = [f"rc/R-1/{r['id']}" for r in timeline["reminders"]
               if r["status"] in ("scheduled", "retrying")]
    assert timeline["status"] == "scheduled" and pending, timeline
    for ref in pending:
        assert send(rig, ref) == "sent", ref
    got = delivered(rig, receiver)
    assert got[-1]["type"] == "booking.completed" and len(completed(got)) == 2


def test_a_replayed_dead_letter_tells_the_booking_complete_again(rig, receiver):
    rig.book(rig.booking())
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent"
    rig.gate.answer(400)
    assert send(rig, PREP) == "failed"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got][-2:] == ["reminder.failed", "booking.completed"]
    assert rig.store.replay([PREP], datetime.now(UTC)) == [PREP]
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got][-2:] == ["reminder.sent", "booking.completed"]
    assert len(completed(got)) == 2
