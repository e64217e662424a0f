"""A sender's reading of Redis's clock (worker/clock.py `RedisClock`) goes on through a
suspend of the host or VM: it is carried by CLOCK_BOOTTIME, which counts the sleep, not by
Linux's monotonic clock, which stops during it (a sender resumed after an hour read Redis's
clock an hour late until its next reading, and could begin claims past their start-by).
Real Redis; the suspend is simulated at the outermost edge, `time.clock_gettime`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import pytest

from worker import clock as clock_module
from worker.clock import RedisClock, redis_time

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="CLOCK_BOOTTIME is Linux's")


def suspended(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Patch time.clock_gettime so that CLOCK_BOOTTIME runs `slept` seconds ahead of the
    real one (the monotonic clock, which stops during a suspend, is left alone)."""
    real: Callable[[int], float] = time.clock_gettime
    state = {"slept": 0.0}

    def clock_gettime(clk_id: int) -> float:
        return real(clk_id) + (state["slept"] if clk_id == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    return state


@linux_only
def test_redis_time_read_here_goes_on_through_a_suspend(redis_client, monkeypatch) -> None:
    state = suspended(monkeypatch)
    clock = RedisClock(time.time)
    clock.measure(redis_client)
    before = clock.now()
    assert abs(before - redis_time(redis_client)) < 0.5
    state["slept"] = 3600.0  # the VM sleeps an hour: monotonic does not move, boottime does
    after = clock.now()  # Redis's clock ran on through the hour: so must the reading here
    assert 3599.5 < after - before < 3600.5, after - before
    # and the reading is due again at once, not 5 monotonic seconds later
    calls: list[int] = []
    real_measure = clock.measure
    monkeypatch.setattr(clock, "measure", lambda c: calls.append(1) or real_measure(c))
    clock.refresh(redis_client)
    assert calls == [1]


@linux_only
def test_the_real_boottime_clock_is_used_on_linux(redis_client, monkeypatch) -> None:
    real = time.clock_gettime
    asked: list[int] = []

    def spy(clk_id: int) -> float:
        asked.append(clk_id)
        return real(clk_id)

    monkeypatch.setattr(time, "clock_gettime", spy)
    clock = RedisClock(time.time)
    clock.measure(redis_client)
    reading = clock.now()
    assert asked and set(asked) == {time.CLOCK_BOOTTIME}, asked
    assert abs(clock_module.elapsed() - real(time.CLOCK_BOOTTIME)) < 0.1
    assert abs(reading - redis_time(redis_client)) < 0.5
