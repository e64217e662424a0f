"""Clinic events delivered by the event senders' threads (worker/event_senders.py): the
pump's claims bounded by what they take, a stuck delivery bounded inside its lease, a claim
with too little lease left handed back, and a warm shutdown with an event in flight.
Real Redis, a real webhook receiver (parked at will) and a real endpoint that never answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.sinks import DeadEndpoint, WebhookReceiver
from tests.test_webhooks import ENV, ROOT, SECRET, glow, hooked, settings
from worker.clinics import Clinic
from worker.dispatch import Watchdog
from worker.event_senders import LEASE_NEARLY_OVER, EventSenders
from worker.rendering import Renderer
from worker.webhooks import Events, deliver_event


@pytest.fixture
def events(redis_client) -> Events:
    return Events(redis_client, "t", retention_days=1)


@pytest.fixture
def receiver():
    r = WebhookReceiver(SECRET).start()
    yield r
    r.gate.set()
    r.stop()


def senders(events: Events, clinic: Clinic, tmp_path: Path, threads: int,
            kills: list[str]) -> EventSenders:
    def deliver(event_id: str, claim: str, wait_at_most: float) -> str:
        return deliver_event(events, event_id, claim, clinics={clinic.id: clinic},
                             renderer=Renderer(ROOT / "templates"),
                             settings=settings(tmp_path, webhook_timeout_seconds=10), env=ENV,
                             timeout=wait_at_most)

    return EventSenders(events, deliver, threads=threads,
                        dog=Watchdog(kill=lambda: kills.append("kill")))


def emit(events: Events, count: int) -> list[str]:
    return [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
            for n in range(count)]


def attempts(events: Events, event_id: str) -> int:
    return int(events.redis.hget(events.event_key(event_id), "attempts") or 0)


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_pump_claims_no_more_events_than_the_event_senders_take(events):
    emit(events, 10)
    # None registered yet: the default (one process's threads) is the bound.
    first = events.claim(10, 30, capacity=4)
    assert len(first) == 4
    assert events.claim(10, 30, capacity=4) == []  # all four still out
    # Two processes' senders registered (3 threads each): six at once in all.
    now = float(events.redis.time()[0])
    events.redis.zadd(events.senders_key, {"h:1|3": now + 10, "h:2|3": now + 10,
                                           "h:3|50": now - 1})  # the last one expired
    assert len(events.claim(10, 30, capacity=4)) == 2
    # One finished (delivered) and one retried later make room for two more.
    (done_id, done_claim), (retry_id, retry_claim) = first[:2]
    assert events.done(done_id, done_claim) == "done"
    assert events.retry(retry_id, retry_claim, 60, "HTTP 503") == "retry"
    assert len(events.claim(10, 30, capacity=4)) == 2
    assert events.claim(10, 30, capacity=4) == []
    # Without a capacity (tools, tests) every due event is claimed, as before: the two
    # never claimed (the one retried is not due yet).
    assert len(events.claim(10, 30)) == 2


def test_a_stuck_delivery_ends_as_a_retry_inside_its_lease(events, tmp_path):
    endpoint = DeadEndpoint().start()
    kills: list[str] = []
    lanes = senders(events, glow(webhook={"url": endpoint.url,
                                          "secret": "${GLOW_WEBHOOK_SECRET}"}),
                    tmp_path, 1, kills)
    try:
        (event_id,) = emit(events, 1)
        ((_, claim),) = events.claim(10, lease_seconds=10)
        began = time.monotonic()
        outcome = lanes.attempt(event_id, claim)
        took = time.monotonic() - began
    finally:
        lanes.close(0)
        endpoint.stop()
    # The webhook timeout is 10 s, the lease 10 s: the wait is cut to (10 - 2) / 2 s, so the
    # attempt is counted and retried with backoff before its lease ends (never claimed again
    # while it still waits), and the process is left alone.
    assert endpoint.connections() == 1
    assert outcome == "retrying: webhook unreachable (ReadTimeout)", outcome
    assert 3 < took < 8, took
    assert attempts(events, event_id) == 1 and kills == []
    assert events.redis.zscore(events.out_key, event_id) is None
    assert float(events.redis.zscore(events.due_key, event_id)) > time.time() + 10  # backoff


def test_a_claim_whose_lease_is_nearly_over_goes_back_unbegun(events, receiver, tmp_path):
    kills: list[str] = []
    lanes = senders(events, hooked(receiver), tmp_path, 1, kills)
    try:
        (event_id,) = emit(events, 1)
        ((_, claim),) = events.claim(10, lease_seconds=3)
        assert lanes.attempt(event_id, claim) == LEASE_NEARLY_OVER
    finally:
        lanes.close(0)
    assert receiver.snapshot() == [] and attempts(events, event_id) == 0
    assert float(events.redis.zscore(events.due_key, event_id)) <= time.time() + 0.5  # due now
    assert events.redis.zscore(events.out_key, event_id) is None
    ((again, _),) = events.claim(10, 30)
    assert again == event_id


def test_a_warm_shutdown_hands_back_events_not_begun_and_finishes_the_one_under_way(
        events, receiver, tmp_path):
    kills: list[str] = []
    lanes = senders(events, hooked(receiver), tmp_path, 1, kills)
    in_flight, waiting = emit(events, 2)
    claims = dict(events.claim(10, 30))
    receiver.gate.clear()  # the endpoint parks the first POST
    assert lanes.submit(in_flight, claims[in_flight]) == "handed to the event senders"
    wait_until(lambda: len(receiver.snapshot()) == 1, 10)
    assert lanes.submit(waiting, claims[waiting]) == "handed to the event senders"
    assert events.redis.hget(events.event_key(waiting), "claim") == claims[waiting]

    lanes.stop()  # SIGTERM: the one waiting for the thread goes back at once
    assert float(events.redis.zscore(events.due_key, waiting)) <= time.time() + 0.5
    assert events.redis.zscore(events.out_key, waiting) is None
    assert attempts(events, waiting) == 0
    # Handed to senders already stopping: back at once, not begun.
    assert lanes.submit(waiting, claims[waiting]).startswith("handed back")
    # The one under way gets the grace period: its endpoint answers meanwhile.
    threading.Timer(0.5, receiver.gate.set).start()
    began = time.monotonic()
    lanes.wait(10)
    assert time.monotonic() - began < 5
    assert not events.redis.exists(events.event_key(in_flight))  # delivered, once
    assert [e.id for e in events.pending()] == [waiting]
    (hook,) = receiver.snapshot()
    assert hook.valid and hook.headers["Reminders-Event-Id"] == in_flight
    assert events.redis.zrange(events.senders_key, 0, -1) == []  # left the pump's count

    # Another worker's senders deliver the one handed back, at once (not a lease later).
    other = senders(events, hooked(receiver), tmp_path, 1, kills)
    try:
        ((again, claim),) = events.claim(10, 30, capacity=1)
        assert again == waiting
        assert other.attempt(again, claim) == "delivered"
    finally:
        other.close(5)
    assert [h.headers["Reminders-Event-Id"] for h in receiver.snapshot()] == [in_flight, waiting]
    assert events.pending() == [] and events.dead() == [] and kills == []
