"""Clock skew between hosts never stops the sending: a claim's start-by deadline is an
instant on Redis's clock, the pump reads it from Redis and each sender compares it with its
own estimate of Redis's clock (worker/clock.py); a sender whose clock is off says so (a
WARNING and `reminders_clock_skew_seconds`). Real Redis, the real pump and senders, a real
HTTP gateway; the skewed clock is the one edge patched: the module's `time`."""

from __future__ import annotations

import logging
import threading
import time as real_time
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from tests.test_send_batches import (  # noqa: F401  (gateway, shop: fixtures)
    Rig,
    capacity,
    due_now,
    gateway,
    shop,
)
from worker import dispatch, metrics
from worker import pump as pump_module
from worker.clock import RedisClock, redis_time
from worker.dispatch import hand_over
from worker.pump import pump
from worker.store import Claim

SKEW = 30.0  # seconds: far beyond any start-by window (send_max_wait_seconds, the lease)


class Skewed:
    """The time module, with a wall clock `seconds` off."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time(self) -> float:
        return real_time.time() + self.seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


@pytest.fixture(autouse=True)
def fresh_clock(monkeypatch) -> None:
    """Each test is a sender process that has not read Redis's clock yet."""
    monkeypatch.setattr(dispatch, "CLOCK", RedisClock(dispatch.CLOCK.local))


def publisher(rig: Rig, handed: list[float]):
    def publish(channel: str, claims: Sequence[Claim], claimed_at: float) -> None:
        handed.append(claimed_at)
        hand_over(rig.ctx, rig.lanes, channel,  # type: ignore[arg-type]
                  [[c.ref, c.version, c.claim] for c in claims], claimed_at)
    return publish


def pump_until(rig: Rig, publish: Any, done: Any, seconds: float) -> None:
    deadline = real_time.monotonic() + seconds
    while not done() and real_time.monotonic() < deadline:
        pump(rig.store, publish, capacity=capacity(threads=4, batch_size=3), claim_round=50)
        real_time.sleep(0.2)


def test_a_sender_whose_clock_runs_ahead_still_sends_each_reminder_once(
        shop, monkeypatch, caplog):  # noqa: F811
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_histograms", metrics.Histograms(registry=registry))
    monkeypatch.setattr(dispatch, "time", Skewed(SKEW))  # the sending host is 30 s ahead
    caplog.set_level(logging.INFO)
    refs = due_now(shop, [("S", ch) for _ in range(3) for ch in ("email", "sms")])
    handed: list[float] = []
    try:
        pump_until(shop, publisher(shop, handed),
                   lambda: all(shop.store.record(r)["status"] == "sent" for r in refs), 8.0)
        statuses = {r: shop.store.record(r)["status"] for r in refs}
        assert set(statuses.values()) == {"sent"}, statuses
        assert len(shop.gateway.bodies) == len(refs)  # each once
        assert all(shop.store.record(r)["attempts"] == "1" for r in refs)
        assert "not started in time" not in caplog.text
    finally:
        shop.drain()
    # The skew is shown: a WARNING naming it, and the gauge.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "clock" in r.getMessage()]
    assert warnings and "30" in warnings[0], warnings
    exposed = generate_latest(registry).decode()
    line = next(x for x in exposed.splitlines()
                if x.startswith("reminders_clock_skew_seconds "))
    assert abs(float(line.split()[1]) - SKEW) < 1.0, line


def test_a_pump_whose_clock_runs_behind_claims_on_redis_clock(
        shop, monkeypatch):  # noqa: F811
    # The pump's host 30 s behind: what is due by Redis's clock is still claimed, and the
    # claims carry Redis's instant (the senders' deadlines count from it), not the host's.
    monkeypatch.setattr(pump_module, "time", Skewed(-SKEW))
    refs = due_now(shop, [("P", "sms"), ("P", "email")])
    shop.store.redis.zadd(shop.store.due_key, {r: real_time.time() - 1 for r in refs})
    handed: list[float] = []
    try:
        pump_until(shop, publisher(shop, handed),
                   lambda: all(shop.store.record(r)["status"] == "sent" for r in refs), 5.0)
        assert {shop.store.record(r)["status"] for r in refs} == {"sent"}
        assert handed and all(abs(at - real_time.time()) < 5 for at in handed), handed
    finally:
        shop.drain()


def test_a_sender_in_step_with_redis_says_nothing(shop, monkeypatch, caplog):  # noqa: F811
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_histograms", metrics.Histograms(registry=registry))
    caplog.set_level(logging.INFO)
    refs = due_now(shop, [("Q", "sms")])
    try:
        pump_until(shop, publisher(shop, []),
                   lambda: shop.store.record(refs[0])["status"] == "sent", 5.0)
        assert shop.store.record(refs[0])["status"] == "sent"
    finally:
        shop.drain()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "clock" in r.getMessage()]
    line = next(x for x in generate_latest(registry).decode().splitlines()
                if x.startswith("reminders_clock_skew_seconds "))
    assert abs(float(line.split()[1])) < 0.5, line


def test_a_wall_clock_stepped_after_the_reading_changes_nothing(redis_client) -> None:
    # NTP stepping the host's clock (or a VM resumed) between two readings: Redis's clock as
    # read here goes on with the monotonic clock, not with the wall clock.
    wall = {"offset": 0.0}
    clock = RedisClock(lambda: real_time.time() + wall["offset"])
    assert abs(clock.measure(redis_client)) < 0.5
    wall["offset"] = 3600.0
    assert abs(clock.now() - redis_time(redis_client)) < 0.5
    assert abs(clock.measure(redis_client) - 3600.0) < 0.5  # and the next reading tells


def test_a_reading_taken_across_a_redis_restart_is_not_off_by_the_wait(tmp_path) -> None:
    # Redis restarts (about 3 s) when a sender reads its clock: the client retries TIME
    # until it is back, and the reply is of the moment Redis answered, not of the middle of
    # the wait. Read as the middle, the sender's clock ran ahead by half the outage and
    # every claim with less start-by than that left was handed back "not started in time".
    from worker.connections import WORKER, from_url
    from worker.embedded import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    back: list[threading.Thread] = []
    try:
        clock = RedisClock(real_time.time)
        server.stop()
        back.append(threading.Thread(target=lambda: (real_time.sleep(3.0), server.start())))
        back[0].start()
        started = real_time.monotonic()
        clock.measure(client)  # retried through the restart
        assert real_time.monotonic() - started > 2.5
        assert abs(clock.now() - redis_time(client)) < 0.5
    finally:
        for thread in back:
            thread.join()
        client.close()
        server.stop()
