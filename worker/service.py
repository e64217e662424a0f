"""`reminders run`: the whole service in one command, stopped cleanly by Ctrl-C.

Starts the embedded Redis (unless REMINDERS_REDIS_URL is set), then a Celery worker
and Celery beat (the pump) as child processes. On Ctrl-C or SIGTERM every child is
stopped (SIGTERM, then SIGKILL after a grace period) and nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .embedded import URL_FILE, RedisServer
from .settings import Settings

log = logging.getLogger(__name__)
GRACE_SECONDS = 15.0


def celery_command(role: str, settings: Settings) -> list[str]:
    """Return the argv of the Celery worker or beat, as docker-compose runs them."""
    base = [sys.executable, "-m", "celery", "-A", "worker.celery_app", role,
            f"--loglevel={settings.log_level}"]
    if role == "worker":
        return base + ["--concurrency=2", "-Q", "reminders.send,reminders.pump"]
    return base


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_all(settings: Settings) -> int:
    """Run Redis (if embedded), worker and beat until interrupted; return the exit code."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    server: RedisServer | None = None
    url_file = settings.data_dir / URL_FILE
    if settings.redis_url is None:
        server = RedisServer(settings.data_dir / "redis").start()
        url_file.write_text(server.url + "\n", encoding="utf-8")
        env["REMINDERS_REDIS_URL"] = server.url
        print(f"embedded Redis on {server.url} (data in {server.data_dir})", flush=True)
    env.setdefault("REMINDERS_DATA_DIR", str(settings.data_dir.resolve()))
    outbox = Path(env.get("REMINDERS_OUTBOX_DIR") or settings.outbox).resolve()
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for role in ("worker", "beat"):
            # Own process group: the terminal's Ctrl-C reaches us, and we stop them in order.
            children.append(subprocess.Popen(celery_command(role, settings), env=env,
                                             start_new_session=True))
        print(f"worker and pump running; messages without a configured channel go to {outbox}",
              flush=True)
        print("press Ctrl-C to stop", flush=True)
        while not stopping:
            if any(child.poll() is not None for child in children):
                print("a child process exited; stopping", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(children)
        if server is not None:
            server.stop()
            url_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", flush=True)
