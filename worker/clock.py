"""Redis's clock, the one clock every host shares, as this process sees it.

An instant that one host sets and another compares (a claim's start-by deadline: set by
the pump, checked by a sender, worker/dispatch.py) is an instant on Redis's clock: the
claim script leases on it, the pump reads it (`redis_time`), and each sender process
keeps its own reading of it (`RedisClock`): Redis's TIME, taken when its senders start and
every CHECK_EVERY_SECONDS after, carried forward in between by `elapsed`: the time since
boot, counting the time the host or VM was suspended (Linux's CLOCK_BOOTTIME; elsewhere
the monotonic clock). Linux's monotonic clock stops during a suspend, so carried by it, a
sender resumed after an hour would read Redis's clock an hour late until its next reading
and could begin claims past their start-by. So a host whose wall clock is off (no NTP, a
VM resumed), or is stepped meanwhile, still begins its claims in time instead of handing
every one back as "not started in time".

The skew is shown as `reminders_clock_skew_seconds` (this host's clock minus Redis's,
worker/metrics.py), and a skew beyond SKEW_WARN_SECONDS is logged as a WARNING (again
every SKEW_WARN_EVERY_SECONDS while it lasts): the rest of the service (send windows,
timelines, webhook signatures) reads the host's clock, so hosts must still be NTP-synced. (A
reminder's and a clinic event's retry backoff count from Redis's clock; a reminder's retry
landing outside its send window waits for the opening as the host's clock reads it.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from .observe import set_clock_skew

log = logging.getLogger(__name__)
CHECK_EVERY_SECONDS = 5.0  # a sender reads Redis's clock again this often
SKEW_WARN_SECONDS = 1.0  # a host's clock further off Redis's than this is warned about
SKEW_WARN_EVERY_SECONDS = 300.0  # ... at most this often while it lasts
TRUSTED_ROUND_TRIP_SECONDS = 0.25  # a TIME round trip longer than this is read again


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# Seconds on a clock that never goes back and keeps counting through a suspend (Linux);
# the monotonic clock where there is no CLOCK_BOOTTIME (not Linux).
elapsed: Callable[[], float] = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic


def redis_time(client: redis.Redis) -> float:
    """Return Redis's clock now (epoch seconds), from its TIME reply."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


class RedisClock:
    """This process's reading of Redis's clock: the last TIME reply plus the `elapsed`
    time since, suspends included (this host's wall clock until a first reply)."""

    def __init__(self, local: Callable[[], float]) -> None:
        self.local = local  # the host's wall clock (time.time): its skew is measured
        # (Redis's clock, elapsed()) at the last measure
        self._reading: tuple[float, float] | None = None
        self._measured_at: float | None = None  # elapsed() of the last measure
        self._warned_at: float | None = None
        self._lock = threading.Lock()

    def now(self) -> float:
        """Return Redis's clock now, as read here (epoch seconds)."""
        reading = self._reading
        if reading is None:
            return self.local()
        server, at = reading
        return server + (elapsed() - at)

    def now_utc(self) -> datetime:
        """Return Redis's clock now, as read here, as an aware UTC datetime: the instant a
        hand-back is due "now" for the pump, which claims by Redis's clock."""
        return datetime.fromtimestamp(self.now(), UTC)

    def measure(self, client: redis.Redis) -> float:
        """Read Redis's clock in a quick TIME round trip; return the host's skew (its wall
        clock minus Redis's). Raises what the Redis client raises."""
        for _ in range(3):
            sent, before = elapsed(), self.local()
            server = redis_time(client)
            after, answered = self.local(), elapsed()
            # A slow reply (the client retried TIME through a Redis restart: the reply is
            # of its end, not of the middle) says little: read again, Redis is back.
            if answered - sent <= TRUSTED_ROUND_TRIP_SECONDS:
                break
        skew = (before + after) / 2 - server  # off by at most half the round trip
        with self._lock:
            self._reading = (server, (sent + answered) / 2)
            self._measured_at = answered
            warn = abs(skew) > SKEW_WARN_SECONDS and (
                self._warned_at is None
                or self._measured_at - self._warned_at >= SKEW_WARN_EVERY_SECONDS)
            if warn:
                self._warned_at = self._measured_at
            elif abs(skew) <= SKEW_WARN_SECONDS:
                self._warned_at = None
        set_clock_skew(skew)
        if warn:
            log.warning("clock: this host's clock is %+.1f s off Redis's; deadlines are kept "
                        "on Redis's clock, but send windows and timelines read this host's: "
                        "sync it with NTP", skew)
        return skew

    def refresh(self, client: redis.Redis) -> None:
        """Measure again if the last measure is CHECK_EVERY_SECONDS old (or none was made);
        Redis unreachable keeps the last reading."""
        with self._lock:
            due = (self._measured_at is None
                   or elapsed() - self._measured_at >= CHECK_EVERY_SECONDS)
        if due:
            try:
                self.measure(client)
            except redis.RedisError:
                pass  # the last reading holds; the next refresh tries again
