"""One pool process SIGKILLed (as the senders' watchdog ends its own process, or the OOM
killer picks it) while it hands emails to a real SMTP server, the worker's main process
(started as `reminders run` starts it, through worker.celery_main) living on: it replaces
the process; nothing is lost (what the dead process held comes back after its lease) and
nothing is sent twice (its begun attempts' ledgers keep a second attempt off until they
expire; the server never acknowledged what it was handing over).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Service, wait_until
from tests.ops import test_sigterm
from tests.ops.test_sigterm import PREFIX, booking, final_state
from tests.sinks import SmtpSink
from worker.service import celery_command
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.integration
service, gateway, smtp_sink = test_sigterm.service, test_sigterm.gateway, test_sigterm.smtp_sink
LEASE = 10


def test_a_pool_process_killed_mid_send_loses_and_doubles_nothing(
        service: Service, smtp_sink: SmtpSink, redis_client, tmp_path: Path) -> None:
    service.configure(REMINDERS_LEASE_SECONDS=str(LEASE), REMINDERS_SEND_TIMEOUT_SECONDS="4",
                      REMINDERS_SEND_MAX_WAIT_SECONDS="5")
    smtp_sink.delay = 2.5  # each message waits this long for the server's 250
    argv = celery_command("worker", Settings(_env_file=None, log_level="INFO"))  # type: ignore[call-arg]
    worker = service._spawn([*argv, "-n", "pool@%h"], "worker")
    log_path: Path = worker.log_path  # type: ignore[attr-defined]
    wait_until(lambda: b" ready." in log_path.read_bytes() or worker.poll() is not None, 30)
    assert worker.poll() is None, log_path.read_text()
    service.beat(worker=worker)
    docs = [booking(n, "oneemail") for n in range(1, 7)]
    service.book(*docs)
    wait_until(lambda: smtp_sink.data_started >= 1, 20)

    def talking_to_smtp() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(worker.pid).children():
            try:
                if any(c.raddr and c.raddr.port == smtp_sink.port
                       for c in child.net_connections("tcp")):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    victim = wait_until(lambda: talking_to_smtp()[:1], 5)[0]
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)  # the pool process only, as its watchdog would
    # The main process replaces it and lives on.
    wait_until(lambda: len(psutil.Process(worker.pid).children()) == 2
               and victim.pid not in [c.pid for c in psutil.Process(worker.pid).children()], 10)
    assert worker.poll() is None

    addresses = {d["patient"]["email"] for d in docs}
    wait_until(lambda: {m.to for m in smtp_sink.snapshot()} == addresses, LEASE + 15)
    time.sleep(1.0)  # room for a stray second copy
    assert Counter(m.to for m in smtp_sink.snapshot()) == Counter(addresses)
    assert smtp_sink.data_abandoned >= 1  # what the dead process was handing over

    store = Store(redis_client, PREFIX)
    refs = [f"ops/{d['booking_id']}/confirm:email" for d in docs]
    wait_until(lambda: final_state(store, refs)["outstanding"] == 0, LEASE + 35)
    state = final_state(store, refs)
    assert state == {"due": 0, "lease": 0, "dead": 0, "outstanding": 0,
                     "ledgers": dict.fromkeys(refs, "sent")}, state
    again = []
    for ref in refs:
        outcomes = [line["outcome"] for line in store.attempts(ref)]
        # An attempt the kill cut short left no line; the next one sent it.
        assert outcomes == ["sent"], (ref, outcomes)
        (reminder,) = store.timeline("ops", ref.split("/")[1])["reminders"]
        assert reminder["status"] == "sent"
        if reminder["attempts"] > 1:
            again.append(ref)
    assert again, "the killed process's attempt was sent again by another"
    last = max(m.at for m in smtp_sink.snapshot())
    print(f"killed a pool process; {len(again)} reminder(s) sent again, the last "
          f"{last - killed_at:.1f}s after the kill (lease {LEASE}s)")
