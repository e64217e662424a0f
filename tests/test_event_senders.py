"""Clinic events delivered by the event senders' threads (worker/event_senders.py): the
pump's claims bounded by what they take (and a thread's own claims by its process's free
threads), a stuck delivery bounded inside its lease, a claim
with too little lease left handed back, and a warm shutdown with an event in flight.
Real Redis, a real webhook receiver (parked at will) and a real endpoint that never answers.
"""

from __future__ import annotations

import contextlib
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
from worker.webhooks import Events, deliver_event, pump_events


@pytest.fixture
def events(redis_client) -> Events:
    return Events(redis_client, "t", retention_days=1)


@pytest.fixture
def receiver():
    r = WebhookReceiver(SECRET).start()
    yield r
    r.gate.set()
    r.stop()


def delivering(events: Events, clinic: Clinic, tmp_path: Path, **overrides: object):
    """The delivery the event senders call: the real one, to `clinic`'s webhook."""
    def deliver(event_id: str, claim: str, wait_at_most: float) -> str:
        return deliver_event(events, event_id, claim, clinics={clinic.id: clinic},
                             renderer=Renderer(ROOT / "templates"),
                             settings=settings(tmp_path, **overrides), env=ENV,
                             timeout=wait_at_most)

    return deliver


def senders(events: Events, clinic: Clinic, tmp_path: Path, threads: int,
            kills: list[str]) -> EventSenders:
    return EventSenders(events, delivering(events, clinic, tmp_path, webhook_timeout_seconds=10),
                        threads=threads, dog=Watchdog(kill=lambda: kills.append("kill")))


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


class MeetingEvents(Events):
    """Real events whose first `parties` claims wait (at most 5 s) for one another before
    claiming: two event threads finishing together are both past their count of free
    threads before either queues what it claims (the race forced, not hoped for). Once
    they meet, `met` is set, after `action`."""

    def __init__(self, client, parties: int, action) -> None:
        super().__init__(client, "t", retention_days=1)
        self.met = threading.Event()
        self._meeting = threading.Barrier(parties, action=lambda: (action(), self.met.set()),
                                          timeout=5)
        self._to_meet = parties
        self._count = threading.Lock()

    def claim(self, limit, lease_seconds, capacity=0, **extra):
        with self._count:
            meets = self._to_meet > 0
            self._to_meet -= 1
        if meets:
            with contextlib.suppress(threading.BrokenBarrierError):
                self._meeting.wait()
        return super().claim(limit, lease_seconds, capacity, **extra)


def test_threads_finishing_together_claim_no_more_than_their_process_has_free(
        redis_client, receiver, tmp_path):
    """Two processes' event senders, two threads each (the pump's capacity: four). Both of
    A's threads finish at once and each claims the next due events for A's free threads:
    together no more than A has (two). Claiming one more leaves it waiting in A's queue
    behind the two under way, counted against the capacity, while B's threads idle and the
    pump can claim nothing for them: with a slow clinic endpoint, it arrives a delivery
    later than it could."""
    events = MeetingEvents(redis_client, 2, action=receiver.gate.clear)
    clinic = hooked(receiver)
    kills: list[str] = []

    deliver = delivering(events, clinic, tmp_path)
    a = EventSenders(events, deliver, threads=2, lease_seconds=30,
                     dog=Watchdog(kill=lambda: kills.append("kill")))
    b = EventSenders(events, deliver, threads=2, lease_seconds=30,
                     dog=Watchdog(kill=lambda: kills.append("kill")))
    try:
        ids = emit(events, 8)
        receiver.gate.clear()  # A's first two deliveries park at the endpoint
        for event_id, claim in Events.claim(events, 2, 30, capacity=2):  # as the pump
            a.submit(event_id, claim)
        wait_until(lambda: len(receiver.snapshot()) == 2, 10)
        receiver.gate.set()  # both answered at once; what they claim next parks again
        assert events.met.wait(10)  # both at their claim: the endpoint parks from here on
        wait_until(lambda: len(receiver.snapshot()) >= 3, 10)
        time.sleep(0.3)  # A's refills queued
        # The pump's run: what the capacity leaves, for B's threads.
        pump_events(events, b.submit, batch=200, lease_seconds=30, capacity=2)
        # Every event claimed is under way at the endpoint: none waits in a queue while a
        # registered thread idles.
        try:
            wait_until(lambda: len(receiver.snapshot()) == 2 + 4, 5)
        except AssertionError:
            raise AssertionError(
                f"{len(receiver.snapshot()) - 2} of the 4 events claimed next reached the "
                f"endpoint; {events.redis.zcard(events.out_key)} claimed, "
                f"{events.redis.scard(events.held_key(a.node))} of them by A (2 threads)"
            ) from None
        receiver.gate.set()
        wait_until(lambda: len(receiver.snapshot()) == 8, 10)
        wait_until(lambda: events.pending() == [], 10)
    finally:
        receiver.gate.set()
        a.close(5)
        b.close(5)
    got = [h.headers["Reminders-Event-Id"] for h in receiver.snapshot()]
    assert sorted(got, key=int) == sorted(ids, key=int)  # each once
    assert all(h.valid for h in receiver.snapshot())
    assert events.redis.zcard(events.out_key) == 0 and events.dead() == [] and kills == []


class Killed(BaseException):
    """The process ends right here, without a word (SIGKILL): nothing after runs."""


class KilledAfterClaim(Events):
    """Real events; the `kill_at`-th claim is made in Redis, then its process is killed."""

    def __init__(self, client, kill_at: int) -> None:
        super().__init__(client, "t", retention_days=1)
        self.calls = 0
        self.kill_at = kill_at
        self.killed = threading.Event()

    def claim(self, limit, lease_seconds, capacity=0, **extra):
        self.calls += 1
        claimed = super().claim(limit, lease_seconds, capacity, **extra)
        if self.calls == self.kill_at:
            self.killed.set()
            raise Killed
        return claimed


def test_a_process_killed_right_after_its_thread_claimed_the_next_events_keeps_no_capacity(
        redis_client, receiver, tmp_path):
    """A's thread, done with a delivery, claims the next due event for its free thread;
    the process is SIGKILLed the moment that claim is made, before it could note it as held
    here. Once A's registration lapses, the pump stops counting what A held (its other
    live senders, B, get the capacity back within seconds), as for a claim handed over by
    a task; the one A claimed stays due at its lease's end, as ever (it may be at the
    endpoint). Not noted as held, it counted until its lease ended (300 s by default)
    while B's threads idled."""
    events = KilledAfterClaim(redis_client, kill_at=2)  # the first: the pump's
    clinic = hooked(receiver)
    kills: list[str] = []

    deliver = delivering(events, clinic, tmp_path)
    a = EventSenders(events, deliver, threads=1, lease_seconds=30,
                     dog=Watchdog(kill=lambda: kills.append("kill")))
    b = None
    try:
        first, second, *rest = emit(events, 4)
        (event_id, claim), = events.claim(1, 30, capacity=1)  # the pump's, for A
        assert event_id == first
        a.submit(event_id, claim)
        assert events.killed.wait(10)  # delivered; its refill claimed the second: A is gone
        a._stop.set()  # no more registrations from A (its process is dead)
        now = float(events.redis.time()[0])
        events.redis.zadd(events.senders_key, {a.node: now - 1})  # A's registration lapsed
        assert events.redis.hget(events.event_key(second), "claim") == "1"  # A's claim
        b = EventSenders(events, deliver, threads=1,
                         dog=Watchdog(kill=lambda: kills.append("kill")))
        # The pump's next run, for B's one thread: A's claim of the second no longer counts.
        claimed = Events.claim(events, 10, 30, capacity=1)
        assert [e for e, _ in claimed] == [rest[0]], (
            claimed, events.redis.zrange(events.out_key, 0, -1, withscores=True))
        assert events.redis.zscore(events.due_key, second) > now + 20  # due at its lease's end
        for event_id, claim in claimed:
            b.submit(event_id, claim)
        wait_until(lambda: len(receiver.snapshot()) == 2, 10)
    finally:
        a._closing = True  # a dead process does nothing more
        a._pool.shutdown(wait=False)
        if b is not None:
            b.close(5)
    assert [h.headers["Reminders-Event-Id"] for h in receiver.snapshot()] == [first, rest[0]]
    assert kills == []
