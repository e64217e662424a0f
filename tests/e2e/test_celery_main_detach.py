"""`python -m worker.celery_main worker --detach`, for real: the worker started in the
background is this project's (its app, its Redis broker, its queues), as with `celery -A
worker.celery_app worker --detach`; not Celery's default app on amqp://localhost, which
never serves (Celery re-runs a detached worker as `python -m celery` + the command line).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration


def test_a_detached_worker_serves_this_projects_app(tmp_path: Path, redis_server,
                                                     redis_client) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({
        "REMINDERS_REDIS_URL": redis_server.url,
        # Absolute: a detached worker runs in / unless given --workdir, as Celery's does.
        "REMINDERS_CONFIG_DIR": str(ROOT / "config"),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
    })
    log, pidfile = tmp_path / "worker.log", tmp_path / "worker.pid"
    started = subprocess.run(
        [sys.executable, "-m", "worker.celery_main", "worker", "--detach", "--loglevel=INFO",
         "--concurrency=1", "-Q", "reminders.pump", "-n", "detached@%h",
         f"--logfile={log}", f"--pidfile={pidfile}", "--without-gossip", "--without-mingle"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    pid = 0
    try:
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20))
        process = psutil.Process(pid)
        assert process.cmdline()[1:4] == ["-m", "worker.celery_main", "worker"], \
            process.cmdline()
        # It serves this project's app on its Redis broker: a pump task published there
        # runs (the pump's heartbeat is stamped). (Its log lines go to the project's
        # handler, not to --logfile.)
        from celery import Celery

        publisher = Celery(broker=redis_server.url, set_as_current=False)
        publisher.conf.broker_transport_options = {"global_keyprefix": "reminders:celery:"}
        try:
            publisher.send_task("reminders.pump", queue="reminders.pump")
            wait_until(lambda: redis_client.exists("reminders:health:pump"), 30)
        finally:
            publisher.close()
        assert process.is_running()
        os.kill(pid, signal.SIGTERM)
        process.wait(timeout=20)
        pid = 0
    finally:
        if pid:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
