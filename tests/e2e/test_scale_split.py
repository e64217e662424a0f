"""README "Scale": the split topology it names, run as written. A dedicated pump worker
(`python -m worker.celery_main worker -Q reminders.pump,reminders.events --concurrency=1`)
next to send-only workers, one per channel (`-Q reminders.send.sms`, and one for email),
with beat: every message of a booking is delivered once, and each channel's sends are
done by that channel's worker alone."""

from __future__ import annotations

import re
import shlex
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import QUICK_MESSAGES, Service, wait_until

pytestmark = pytest.mark.integration
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_pump_worker() -> list[str]:
    scale = re.search(r"## Scale\n(.*?)\n## ", README, flags=re.S)[1]
    found = re.search(r"\*\*dedicated pump worker\*\*: `([^`]+)`", scale, flags=re.S)
    assert found, "README's Scale names the dedicated pump worker's command"
    argv = shlex.split(" ".join(found[1].split()))
    assert argv[:4] == ["python", "-m", "worker.celery_main", "worker"], argv
    assert "-Q reminders.send.sms" in " ".join(scale.split())  # one channel's worker
    return [sys.executable, *argv[1:]]


def spawn(service: Service, argv: list[str], name: str):
    proc = service._spawn([*argv, "-n", f"{name}@%h", "--without-gossip", "--without-mingle"],
                          name)
    wait_until(lambda: b" ready." in proc.log_path.read_bytes()  # type: ignore[attr-defined]
               or proc.poll() is not None, 30)
    assert proc.poll() is None, proc.log_path.read_text()  # type: ignore[attr-defined]
    return proc


def test_a_dedicated_pump_worker_and_one_worker_per_channel_deliver_each_once(
        service, smtp_sink, sms_sink, make_booking) -> None:
    base = [sys.executable, "-m", "worker.celery_main", "worker", "--concurrency=1"]
    pump = spawn(service, readme_pump_worker(), "pump")
    sms = spawn(service, [*base, "-Q", "reminders.send.sms"], "sms")
    email = spawn(service, [*base, "-Q", "reminders.send.email"], "email")
    service.beat(worker=pump)
    (timeline,) = service.book(make_booking("SPLIT-1", starts_in=12))
    assert len(timeline["reminders"]) == QUICK_MESSAGES
    wait_until(lambda: all(r["status"] == "sent"
                           for r in service.show("SPLIT-1")["reminders"]), 60)
    time.sleep(2)  # nothing more arrives: no message twice
    emails, texts = smtp_sink.snapshot(), sms_sink.snapshot()
    by_channel = {"email": 0, "sms": 0}
    for r in timeline["reminders"]:
        by_channel[r["channel"]] += 1
    assert len(emails) == by_channel["email"] and len(texts) == by_channel["sms"]
    logs = {p: p.log_path.read_text() for p in (pump, sms, email)}  # type: ignore[attr-defined]
    assert "reminders.send_batch" in logs[sms] and "reminders.send_batch" in logs[email]
    assert "Task reminders.send_batch[" not in logs[pump]
    assert "Task reminders.pump[" in logs[pump]


def senders_gauge(redis_client) -> dict[str, float]:
    """`reminders_senders{channel}` as a scrape reads it now (worker/metrics.py)."""
    from worker.metrics import ScheduleCollector

    found = [m for m in ScheduleCollector(redis_client, "reminders").collect()
             if m.name == "reminders_senders"]
    assert found, "the scrape has a reminders_senders gauge"
    return {s.labels["channel"]: s.value for s in found[0].samples}


def test_sms_with_no_worker_taking_its_queue_wait_unclaimed_and_go_once_one_comes(
        service, redis_client, smtp_sink, sms_sink, make_booking) -> None:
    """Ops started the workers with `-Q ...,reminders.send.email` only (or every SMS worker
    crashed): the pump claims no SMS into a queue nobody reads (each lease again, out of
    every metric's sight: not overdue, leased); they stay due, the scrape says no process
    sends SMS, and the SMS worker started later sends each once, at once, its rules kept."""
    base = [sys.executable, "-m", "worker.celery_main", "worker", "--concurrency=1"]
    email = spawn(service, [*base, "-Q", "reminders.pump,reminders.events,reminders.send.email"],
                  "email")
    service.beat(worker=email)
    booked = time.monotonic()
    (timeline,) = service.book(make_booking("NOSMS-1", starts_in=3))
    texts = [r for r in timeline["reminders"] if r["channel"] == "sms"]
    assert len(texts) == 2  # prep (due at once: late "send") and spf (in ~8 s)
    wait_until(lambda: all(r["status"] == "sent" for r in service.show("NOSMS-1")["reminders"]
                           if r["channel"] == "email"), 20)
    time.sleep(max(0.0, booked + 9.5 - time.monotonic()))  # spf:sms due 1.5 s ago, too
    shown = [r for r in service.show("NOSMS-1")["reminders"] if r["channel"] == "sms"]
    assert [r["status"] for r in shown] == ["scheduled", "scheduled"], shown
    assert redis_client.llen("reminders:celery:reminders.send.sms") == 0  # nothing published
    assert redis_client.zcard("reminders:lease") == 0
    gauge = senders_gauge(redis_client)
    assert gauge["sms"] == 0 and gauge["email"] > 0, gauge
    assert sms_sink.snapshot() == []
    sms = spawn(service, [*base, "-Q", "reminders.send.sms"], "sms")
    wait_until(lambda: all(r["status"] not in ("scheduled", "sending")
                           for r in service.show("NOSMS-1")["reminders"]),
               8)  # well within a lease (10 s here): handed out at once
    time.sleep(1.5)
    shown = {r["id"]: r for r in service.show("NOSMS-1")["reminders"]}
    # Their rules checked as they go: the prep SMS is for before the visit, which has begun.
    assert shown["prep:sms"]["status"] == "skipped", shown["prep:sms"]
    assert shown["spf:sms"]["status"] == "sent", shown["spf:sms"]
    assert [p.to for p in sms_sink.snapshot()] == ["+34600111222"]  # once
    assert senders_gauge(redis_client)["sms"] > 0
    assert "reminders.send_batch" in sms.log_path.read_text()  # type: ignore[attr-defined]
