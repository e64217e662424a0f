"""Ctrl-C of `reminders run` during a burst, for real: the worker (started as `reminders run`
starts it, `python -m worker.celery_main worker`) gets its whole shutdown grace period
(REMINDERS_SHUTDOWN_GRACE_SECONDS) to finish the sends talking to their provider and record
them, before the supervisor ends it.

A send the provider answers within that grace must be recorded as sent by this worker: not
left 'sending' until its lease runs out and then sent a second time by the next worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until
from tests.e2e.test_run import _kill_all
from tests.ops.test_sigterm import PREFIX, Gateway, booking, make_config
from tests.sinks import SmtpSink
from worker.store import Store

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
# The supervisor's own allowance used to be a fixed 15 s: a send answered after it (and
# within the worker's 20 s grace, the default) was cut short by its SIGKILL.
ANSWER_AFTER = 16.5


def test_ctrl_c_of_run_gives_the_sends_under_way_the_workers_whole_grace(
        tmp_path: Path, redis_server, redis_client) -> None:
    gateway = Gateway(park=2)
    smtp = SmtpSink().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({
        "REMINDERS_REDIS_URL": redis_server.url,
        "REMINDERS_CONFIG_DIR": str(make_config(tmp_path, gateway, smtp)),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
        "REMINDERS_API_PORT": "0",
        "REMINDERS_SEND_THREADS": "2",
        # The parked sends must not time out on their own before the provider answers.
        "REMINDERS_LEASE_SECONDS": "60",
        "REMINDERS_SEND_TIMEOUT_SECONDS": "25",
        "REMINDERS_SHUTDOWN_GRACE_SECONDS": "20",  # the default, said out loud
    })
    log_path = tmp_path / "run.log"
    log = log_path.open("wb")
    run = subprocess.Popen([str(BIN / "reminders"), "run"], cwd=tmp_path, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"press Ctrl-C" in log_path.read_bytes() or run.poll() is not None,
                   30)
        assert run.poll() is None, log_path.read_text()
        docs = [booking(n, "onesms") for n in range(1, 5)]
        booked = subprocess.run([str(BIN / "reminders"), "book", "-"],
                                input="\n".join(json.dumps(d) for d in docs), env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert booked.returncode == 0, booked.stderr
        assert gateway.parked.acquire(timeout=20) and gateway.parked.acquire(timeout=20), \
            log_path.read_text()
        parked = {to for _, to in gateway.snapshot()}

        run.send_signal(signal.SIGINT)  # Ctrl-C
        stopped_at = time.time()
        timer = threading.Timer(ANSWER_AFTER, gateway.release)  # the provider answers
        timer.start()
        assert run.wait(timeout=45) == 0, log_path.read_text()
        exited_at = time.time()
        timer.cancel()
        arrived = gateway.snapshot()
        time.sleep(1.0)
        assert gateway.snapshot() == arrived, "a send after `reminders run` stopped"

        store = Store(redis_client, PREFIX)
        text = log_path.read_text(errors="replace")
        sent, back = [], []
        for doc in docs:
            ref = f"ops/{doc['booking_id']}/confirm:sms"
            log_lines = [line["outcome"] for line in store.attempts(ref)]
            timeline = store.timeline("ops", doc["booking_id"])
            (reminder,) = timeline["reminders"]
            if doc["patient"]["phone"] in parked or log_lines:
                # Answered within the worker's grace: recorded by it, once.
                assert (reminder["status"], log_lines) == ("sent", ["sent"]), \
                    (ref, reminder, log_lines, text[-3000:])
                assert store.redis.get(store.ledger_key(ref)) == "sent"
                sent.append(ref)
            else:
                # Never begun: back on the schedule, due now, free for the next worker.
                assert reminder["status"] == "scheduled", (ref, reminder, text[-3000:])
                due = store.redis.zscore(store.due_key, ref)
                assert due is not None and due <= exited_at, (ref, due)
                assert store.redis.get(store.ledger_key(ref)) is None
                back.append(ref)
        assert store.redis.zcard(store.lease_key) == 0  # nothing left 'sending'
        assert len(sent) >= 2
        counts = Counter(to for _, to in arrived)
        assert all(n == 1 for n in counts.values()), counts
        assert exited_at - stopped_at >= ANSWER_AFTER
        print(f"Ctrl-C -> stopped {exited_at - stopped_at:.1f}s later (provider answered "
              f"after {ANSWER_AFTER}s); sent {len(sent)}, handed back {len(back)}")
    finally:
        if run.poll() is None:
            _kill_all(run, [])
        log.close()
        gateway.close()
        smtp.stop()
