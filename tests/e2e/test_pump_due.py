"""The pump runs when a reminder falls due, not at beat's next tick: a real worker and beat
(a long pump interval), real Redis, the SMS gateway on 127.0.0.1.

After each run the pump looks when the next reminder falls due and, if that comes before
the next tick, waits for it in its thread and runs again (worker/tasks.py `_pump_run`).
Here the interval is far longer than the wait, so a reminder arriving near its due instant
can only have been pumped by that wait, not by a tick. The wait must not let a cancelled
reminder go, nor hold a warm shutdown.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Service, wait_until
from tests.sinks import HttpSink
from worker.health import pump_key
from worker.store import Store

pytestmark = pytest.mark.integration

PREFIX = "reminders"  # the service's default key prefix
LEAD = 5  # seconds: the step goes this long before the appointment
SOON_PROTOCOL = f"""
name = "One SMS soon"
[[steps]]
id = "soon"
offset = "-{LEAD}s"
channels = ["sms"]
template = "day-before"
late = "send"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
sun_sensitive = true
clean_skin_on_the_day = true
ask_cold_sore_or_infection = true
"""


def booking(booking_id: str, due: float, phone: str) -> dict[str, Any]:
    """A booking at clinic e2e whose one SMS falls due at `due` (epoch seconds)."""
    starts = datetime.fromtimestamp(due, UTC) + timedelta(seconds=LEAD)
    return {
        "clinic": "e2e", "booking_id": booking_id, "treatment": "soon",
        "starts_at": starts.isoformat(timespec="milliseconds"),
        "patient": {"name": "Ana López", "phone": phone, "timezone": "Europe/Madrid",
                    "locale": "en", "channels": ["sms"]},
    }


def start(service: Service, e2e_config: Path, interval: float) -> float:
    """One worker and beat with a long pump interval; return the instant before beat began:
    its first tick comes `interval` after its start (Celery beat's first run of an entry),
    so no tick runs the pump before then."""
    (e2e_config / "protocols" / "soon.toml").write_text(SOON_PROTOCOL, encoding="utf-8")
    service.configure(REMINDERS_PUMP_INTERVAL_SECONDS=str(interval))
    service.worker()
    began = time.time()
    service.beat()
    return began


def arrivals(sms_sink: HttpSink, phone: str) -> list[float]:
    return [post.at for post in sms_sink.snapshot() if post.to == phone]


def pump_runs_since(redis_client: Any, since: float) -> bool:
    """Whether a pump run ended after `since` (epoch seconds; worker/health.py's stamp)."""
    at = redis_client.hget(pump_key(PREFIX), "at")
    return at is not None and float(at) > since


def test_a_reminder_due_before_the_next_tick_goes_at_its_due_instant_once(
        service: Service, e2e_config: Path, sms_sink: HttpSink, redis_client) -> None:
    interval = 60.0
    no_tick_before = start(service, e2e_config, interval) + interval
    due = time.time() + 8.0  # the booking (a process start) takes a second or two
    service.book(booking("P-1", due, "+34600000001"))
    assert time.time() < due - 0.5, "booked too late: the booking's own nudge would send it"
    # The booking's nudge ran the pump: nothing due yet, so it waits for the due instant.
    # (Before, the reminder waited for beat's first tick, a minute after its start.)
    wait_until(lambda: arrivals(sms_sink, "+34600000001"), no_tick_before - time.time())
    first = arrivals(sms_sink, "+34600000001")[0]
    assert due - 0.05 <= first < due + 3.0, f"arrived {first - due:+.2f}s after its due instant"
    time.sleep(1.5)  # room for a stray second copy
    assert arrivals(sms_sink, "+34600000001") == [first]
    store = Store(redis_client, PREFIX)
    ref = "e2e/P-1/soon:sms"
    assert store.record(ref)["status"] == "sent", store.record(ref)
    assert redis_client.zcard(store.due_key) == 0 and redis_client.zcard(store.lease_key) == 0


def test_a_reminder_cancelled_while_the_pump_waits_for_it_is_never_sent(
        service: Service, e2e_config: Path, sms_sink: HttpSink, redis_client) -> None:
    interval = 60.0
    no_tick_before = start(service, e2e_config, interval) + interval
    booked = time.time()
    due = booked + 10.0  # the booking and the cancel take a few seconds at most
    service.book(booking("K-1", due, "+34600000011"), booking("C-1", due, "+34600000012"))
    wait_until(lambda: pump_runs_since(redis_client, booked), 10)  # the nudge's run: it waits
    # The store's cancel, as `reminders cancel` runs it, from here: a CLI process took seconds
    # to start on a loaded machine, and came after the due instant.
    cancelled = Store(redis_client, PREFIX).cancel("e2e", "C-1", datetime.now(UTC))
    assert {r["status"] for r in cancelled["reminders"]} == {"cancelled"}, cancelled
    assert time.time() < due - 0.5, "cancelled too late to be a cancel during the wait"
    # The pump ran at the due instant (the other booking's SMS went then, long before the
    # next tick) and found nothing of the cancelled booking to claim.
    wait_until(lambda: arrivals(sms_sink, "+34600000011"), no_tick_before - time.time())
    first = arrivals(sms_sink, "+34600000011")[0]
    assert first < due + 3.0, f"arrived {first - due:+.2f}s after its due instant"
    time.sleep(2.0)  # room for a late or second copy of either
    assert Counter(post.to for post in sms_sink.snapshot()) == Counter({"+34600000011": 1})
    store = Store(redis_client, PREFIX)
    assert store.record("e2e/C-1/soon:sms")["status"] == "cancelled"
    assert store.record("e2e/K-1/soon:sms")["status"] == "sent"
    assert redis_client.zcard(store.due_key) == 0 and redis_client.zcard(store.lease_key) == 0


def test_a_warm_shutdown_while_the_pump_waits_ends_promptly_and_loses_nothing(
        service: Service, e2e_config: Path, sms_sink: HttpSink, redis_client) -> None:
    # No beat: the booking's nudge runs the pump, which then waits for the due instant.
    (e2e_config / "protocols" / "soon.toml").write_text(SOON_PROTOCOL, encoding="utf-8")
    service.configure(REMINDERS_PUMP_INTERVAL_SECONDS="60")
    worker = service.worker()
    booked = time.time()
    due = booked + 25.0
    service.book(booking("S-1", due, "+34600000021"))
    wait_until(lambda: pump_runs_since(redis_client, booked), 10)  # the nudge's run
    time.sleep(0.5)
    stopped = time.time()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=20)
    took = time.time() - stopped
    # A wait holding the pump-run lock would hold the shutdown PUMP_RUN_WAIT_SECONDS (10 s),
    # or until the due instant.
    assert took < 7.0, f"the warm shutdown took {took:.1f}s"
    print(f"warm shutdown while the pump waited: {took:.1f}s")
    assert worker.returncode == 0, worker.log_path.read_text()  # type: ignore[attr-defined]
    assert time.time() < due and not sms_sink.snapshot()
    store = Store(redis_client, PREFIX)
    ref = "e2e/S-1/soon:sms"
    assert store.record(ref)["status"] == "scheduled", store.record(ref)
    assert redis_client.zscore(store.due_key, ref) == pytest.approx(due, abs=0.01)
