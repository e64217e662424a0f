"""The host's clock stepping back (an NTP step, a VM restored, a clock set by hand) must not
stop the pump's ticks.

Celery beat schedules an interval entry by wall clock: it is due once `last_run_at +
interval` has passed. After the host's clock steps back by N seconds, `last_run_at` lies N
seconds in the future, so beat published no pump tick for N seconds, and a reminder that
fell due meanwhile (with no booking nudging the pump) waited those N seconds: a step back
of ten minutes, ten minutes late. So would a beat restarted with a schedule file written
while the clock was ahead.

Real Redis, worker and beat processes, a real SMTP server and HTTP gateway. The one edge
patched is the host's wall clock as Celery reads it (`Celery.now`; a task's expiry as the
worker checks it), in every process: a `sitecustomize` on their PYTHONPATH adds the offset
written in a file, so the clock steps back while they run, as the host's would.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, wait_until
from tests.sinks import HttpSink, SmtpSink

pytestmark = pytest.mark.integration

STEP_BACK = 600.0  # seconds
# The host clock as Celery reads it, `offset` seconds off (the file, read at every call).
SITECUSTOMIZE = '''
import os
from datetime import datetime, timedelta

_FILE = os.environ.get("TEST_CLOCK_OFFSET_FILE")


def _offset():
    try:
        with open(_FILE, encoding="utf-8") as f:
            return timedelta(seconds=float(f.read().strip() or 0))
    except (OSError, ValueError):
        return timedelta(0)


if _FILE:
    import celery.app.base
    import celery.worker.request

    _now = celery.app.base.Celery.now
    celery.app.base.Celery.now = lambda self: _now(self) + _offset()

    class _Stepped(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + _offset()

    celery.worker.request.datetime = _Stepped  # a task's expiry, as the worker checks it
'''


def stepped_clock(service: Service, tmp_path: Path) -> Path:
    """Give the processes started after this a wall clock moved by the returned file."""
    folder = tmp_path / "clock"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    offset = folder / "offset"
    offset.write_text("0", encoding="utf-8")
    path = os.pathsep.join(p for p in [str(folder), service.env.get("PYTHONPATH", "")] if p)
    service.configure(PYTHONPATH=path, TEST_CLOCK_OFFSET_FILE=str(offset))
    return offset


def test_reminder_due_after_the_clock_stepped_back_goes_on_time(
        service: Service, smtp_sink: SmtpSink, sms_sink: HttpSink, make_booking,
        tmp_path: Path) -> None:
    offset = stepped_clock(service, tmp_path)
    worker, beat = service.start()
    doc = make_booking("B-JUMP", starts_in=24.0)
    starts = time.time() + 24.0
    service.book(doc)
    email = doc["patient"]["email"]
    wait_until(lambda: any(m.to == email for m in smtp_sink.snapshot()), 15)  # confirmation
    ticks = beat.log_path.read_bytes().count(b"Sending due task pump")  # type: ignore[attr-defined]
    assert ticks > 0
    offset.write_text(f"{-STEP_BACK}", encoding="utf-8")  # the host's clock steps back
    # The prep step (8 s before the visit: an SMS and an email) falls due with nothing
    # nudging the pump: only the ticks claim it. It goes at its time, once.
    prep_due = starts - 8.0
    phone = doc["patient"]["phone"]
    wait_until(lambda: any(p.to == phone for p in sms_sink.snapshot()), prep_due - time.time() + 8)
    (sms,) = [p for p in sms_sink.snapshot() if p.to == phone]
    assert sms.at - prep_due < 5.0, sms.at - prep_due
    wait_until(lambda: sum(m.to == email for m in smtp_sink.snapshot()) >= 2, 10)
    emails = sorted(m.at for m in smtp_sink.snapshot() if m.to == email)
    assert emails[1] - prep_due < 5.0, emails[1] - prep_due
    time.sleep(1.0)
    # Beat went on ticking (every second), not STEP_BACK seconds later.
    after = beat.log_path.read_bytes().count(b"Sending due task pump")  # type: ignore[attr-defined]
    assert after >= ticks + 10, (ticks, after)
    assert Counter(p.to for p in sms_sink.snapshot()) == Counter({phone: 1})
    # `reminders health --role beat` sees beat's ticks go on.
    health = service.cli("health", "--role", "beat")
    assert health.returncode == 0, health.stdout + health.stderr


def test_beat_started_after_the_clock_was_set_back_ticks_at_once(
        service: Service, tmp_path: Path, redis_client) -> None:
    """Beat ran while the host's clock was ahead (its schedule file says it ticked then);
    the clock is corrected while beat is down (a restart, a redeploy): the new beat ticks at
    once, not once the clock has caught up with the file."""
    offset = stepped_clock(service, tmp_path)
    offset.write_text(f"{STEP_BACK}", encoding="utf-8")  # ahead
    beat = service.beat()
    log = beat.log_path  # type: ignore[attr-defined]
    wait_until(lambda: log.read_bytes().count(b"Sending due task pump") >= 3, 20)
    beat.terminate()  # beat writes its schedule file as it stops
    beat.wait(timeout=20)
    offset.write_text("0", encoding="utf-8")  # corrected while beat was down
    # No worker runs here: the first beat's ticks wait unrun, and beat adds none while
    # TICKS_WAITING_MAX do (ac1a85b). A worker would have run them: take them away.
    redis_client.delete("reminders:celery:reminders.pump")  # the pump queue's list
    before = log.read_bytes().count(b"Sending due task pump")
    service.beat()  # the same schedule file, the same log
    wait_until(lambda: log.read_bytes().count(b"Sending due task pump") >= before + 3, 10)
