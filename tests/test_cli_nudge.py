"""`reminders book`, `cancel` and `release` nudge the pump when what they stored (the
timelines written, notices included) holds a reminder due before the next tick, through
worker/nudge.py as the API does: real `reminders` processes on a real Redis, no worker, so
the nudges published stay in the pump queue's Redis list, where they are counted (as
tests/api/test_pump_nudge.py counts the API's)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.api.conftest import PUMP_LIST, awake_timezone, held_booking, nudges
from tests.conftest import ROOT
from tests.sinks import DeadEndpoint
from tests.test_cli_store import BIN, VISIT, future
from worker.embedded import free_port
from worker.settings import Settings
from worker.store import Attempt, Store

MOVED = (VISIT + timedelta(days=7)).isoformat()


@pytest.fixture
def reminders(redis_server, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / "reminders"), *args], input=stdin, env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr)
        return done

    return run



@pytest.fixture
def booking_doc(booking_doc):
    """DESIGN.md's booking for a patient where it is afternoon now: its confirmation is due
    at once whatever the time of day the test runs at (`awake_timezone`)."""
    booking_doc["patient"]["timezone"] = awake_timezone()
    return booking_doc

def deliver(redis_client, *keys: str) -> None:
    """Claim these reminders of glow/A-1042 now and record them sent (the rest wait)."""
    store = Store(redis_client, "reminders")
    refs = [f"glow/A-1042/{k}" for k in keys]
    for ref in refs:
        redis_client.zadd(store.due_key, {ref: 0})
    claimed = store.claim_due(100, 60)
    later = datetime.now(UTC) + timedelta(days=30)
    for c in claimed:
        if c.ref not in refs:
            assert store.requeue(c.ref, later, "not in this test", c.claim)
    claims = [c for c in claimed if c.ref in refs]
    assert sorted(c.ref for c in claims) == sorted(refs)
    for c in claims:
        token = f"tok-{c.claim}"
        assert store.begin_send(c.ref, c.version, c.claim, token, 60_000) == "ok"
        assert store.finish_sent(c.ref, Attempt(c.version, c.claim, token),
                                 datetime.now(UTC)) == "ok"


def due_now(timeline: dict) -> list[str]:
    soon = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S")
    return sorted(r["id"] for r in timeline["reminders"]
                  if r["status"] == "scheduled" and r["due_at"][:19] <= soon)


def test_a_new_booking_nudges_once(reminders, redis_client, booking_doc):
    reminders("book", "-", stdin=json.dumps(future(booking_doc)))
    assert nudges(redis_client) == 1  # its confirmation is due at once
    message = json.loads(redis_client.lindex(PUMP_LIST, 0))
    assert message["headers"]["task"] == "reminders.pump"


def test_a_cancel_with_a_notice_nudges_once(reminders, redis_client, booking_doc):
    reminders("book", "-", stdin=json.dumps(future(booking_doc)))
    deliver(redis_client, "booking-confirmation:email", "stop-retinoids:sms")
    redis_client.delete(PUMP_LIST)
    cancelled = json.loads(reminders("cancel", "--clinic", "glow", "--json", "A-1042").stdout)
    assert due_now(cancelled) == ["cancelled#1:email", "cancelled#1:sms"]
    assert nudges(redis_client) == 1


def test_a_release_nudges(reminders, redis_client):
    doc = held_booking("A-1042")  # 20 days ahead, a month after an isotretinoin dose
    reminders("book", "-", stdin=json.dumps(doc))
    redis_client.delete(PUMP_LIST)
    released = json.loads(reminders("release", "--clinic", "glow", "--json", "A-1042").stdout)
    assert released["status"] == "scheduled" and due_now(released)
    assert nudges(redis_client) == 1


def test_a_move_whose_only_due_item_is_its_notice_nudges(reminders, redis_client,
                                                         booking_doc):
    reminders("book", "-", stdin=json.dumps(future(booking_doc)))
    deliver(redis_client, "booking-confirmation:email")
    redis_client.delete(PUMP_LIST)
    moved = json.loads(reminders("book", "--json", "-",
                                 stdin=json.dumps(future(booking_doc, MOVED))).stdout)
    assert due_now(moved) == ["rescheduled#1:email"]
    assert nudges(redis_client) == 1


def test_a_change_with_nothing_due_soon_does_not_nudge(reminders, redis_client, booking_doc):
    reminders("book", "-", stdin=json.dumps(future(booking_doc)))
    deliver(redis_client, "booking-confirmation:email")
    redis_client.delete(PUMP_LIST)
    doc = future(booking_doc)
    doc["patient"]["name"] = "Ana Other"  # a change that moves nothing and tells nothing
    changed = json.loads(reminders("book", "--json", "-", stdin=json.dumps(doc)).stdout)
    assert changed["version"] == 2 and due_now(changed) == []
    assert nudges(redis_client) == 0


@pytest.mark.parametrize("broker", ["refusing", "hung"])
def test_with_the_broker_dead_the_nudge_is_bounded_and_said_in_one_line(broker, capsys):
    from worker.cli import nudge_if_due

    hung = DeadEndpoint().start() if broker == "hung" else None
    port = hung.port if hung is not None else free_port()
    timeline = {"reminders": [{"id": "x", "status": "scheduled",
                               "due_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}]}
    try:
        began = time.monotonic()
        nudge_if_due(Settings(), [timeline], datetime.now(UTC),
                     url=f"redis://127.0.0.1:{port}/0")
        took = time.monotonic() - began
    finally:
        if hung is not None:
            hung.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not nudge the pump" in err[0], err
    assert "next tick" in err[0]
    assert took < 20, took  # two tries of PUBLISH_TIMEOUT_SECONDS, with room for the load
    print(f"{broker} broker: the nudge gave up after {took:.2f}s")
