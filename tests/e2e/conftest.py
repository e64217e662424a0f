"""End-to-end fixtures: real Redis, real Celery worker and beat processes, real sinks.

Each test gets an empty Redis database, its own config folder (a clinic whose channels
point at the sinks, all-day send window; a protocol whose steps are seconds apart) and
its own processes, stopped (and killed if need be) at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT
from tests.sinks import HttpSink, SmtpSink
from worker.service import WORKER_QUEUES

BIN = Path(sys.executable).parent
QUICK_PROTOCOL = """
name = "Quick test protocol"
[[steps]]
id = "confirm"
at = "booking"
channels = ["email"]
template = "confirmation"
late = "send"
[[steps]]
id = "prep"
offset = "-8s"
channels = ["sms", "email"]
template = "day-before"
late = "send"
[[steps]]
id = "aftercare"
offset = "2s"
channels = ["email"]
template = "microneedling-aftercare"
[[steps]]
id = "spf"
offset = "5s"
channels = ["sms"]
template = "spf-morning"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
sun_sensitive = true
no_tanning_before = true
clean_skin_on_the_day = true
ask_acne_eczema_rosacea = true
ask_cold_sore_or_infection = true
isotretinoin_months = 6
redness_hours = [24, 48]
redness_max_days = 7
gentle_care = true
no_actives_hours = 48
makeup_free_days = 3
warning_signs = true
fever_celsius = 38
"""
QUICK_MESSAGES = 5  # confirm:email, prep:sms, prep:email, aftercare:email, spf:sms


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Return the first truthy predicate() within `timeout` seconds, else fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class Service:
    """Starts and stops the project's processes for one test, as ops would run them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def configure(self, **env: str) -> Service:
        """Override settings (e.g. REMINDERS_MAX_ATTEMPTS="30") for processes started after this."""
        self.env.update(env)
        return self

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
        proc.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def worker(self, name: str = "w1", concurrency: int = 2,
               wait: bool = True) -> subprocess.Popen[bytes]:
        """Start `celery -A worker.celery_app worker` and wait until it is ready (`wait`)."""
        proc = self._spawn([str(BIN / "celery"), "-A", "worker.celery_app", "worker",
                            "--loglevel=INFO", f"--concurrency={concurrency}",
                            "-Q", WORKER_QUEUES, "-n", f"{name}@%h",
                            "--without-gossip", "--without-mingle"], name)
        proc.concurrency = concurrency  # type: ignore[attr-defined]
        if wait:
            self.ready(proc)
        return proc

    def ready(self, worker: subprocess.Popen[bytes]) -> None:
        """Wait until a worker started with `wait=False` is ready, its pool processes too.

        The worker says it is ready before its pool processes have warmed up (worker/
        tasks.py `_warm_up`: seconds on a loaded machine); each starts its sender threads
        as it ends, so a test's first send does not wait for it.
        """
        wait_until(lambda: b" ready." in worker.log_path.read_bytes()  # type: ignore[attr-defined]
                   or worker.poll() is not None, 30)
        assert worker.poll() is None, worker.log_path.read_text()  # type: ignore[attr-defined]

        def warm() -> bool:
            try:
                pool = psutil.Process(worker.pid).children()
                return len(pool) >= getattr(worker, "concurrency", 1) and all(
                    p.num_threads() > 1 for p in pool)
            except psutil.NoSuchProcess:
                return True  # a pool process replaced meanwhile, or the worker ended
        wait_until(warm, 30)
        assert worker.poll() is None, worker.log_path.read_text()  # type: ignore[attr-defined]

    def beat(self, name: str = "beat",
             worker: subprocess.Popen[bytes] | list[subprocess.Popen[bytes]] | None = None,
             ) -> subprocess.Popen[bytes]:
        """Start `celery -A worker.celery_app beat` (the pump's clock).

        With `worker` (one or a list), wait until a pump tick has run there: the service is up.
        """
        schedule = self.logs / f"{name}-schedule"
        proc = self._spawn([str(BIN / "celery"), "-A", "worker.celery_app", "beat",
                            "--loglevel=INFO", "-s", str(schedule)], name)
        if worker is not None:
            self.ticked(worker)
        return proc

    def ticked(self, worker: subprocess.Popen[bytes] | list[subprocess.Popen[bytes]]) -> None:
        """Wait until a pump tick has run at `worker` (any of a list: all consume the pump
        queue): run, not only received."""
        workers = worker if isinstance(worker, list) else [worker]
        ran = re.compile(rb"Task reminders\.pump\[[^\]]*\] succeeded")
        wait_until(lambda: any(ran.search(w.log_path.read_bytes())  # type: ignore[attr-defined]
                               for w in workers), 30)

    def start(self, name: str = "w1", concurrency: int = 2,
              ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        """Start one worker and beat side by side; return (worker, beat) once the worker is
        ready and a pump tick has run there."""
        worker = self.worker(name, concurrency, wait=False)
        beat = self.beat()
        self.ready(worker)
        self.ticked(worker)
        return worker, beat

    def up(self) -> subprocess.Popen[bytes]:
        """Start one worker and beat (`start`); return the worker."""
        return self.start()[0]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a process and its children (a worker's pool) at once."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the `reminders` console script."""
        return subprocess.run([str(BIN / "reminders"), *args], env=self.env, input=stdin,
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    def book(self, *docs: dict[str, Any]) -> list[dict[str, Any]]:
        result = self.cli("book", "--json", "-", stdin="\n".join(json.dumps(d) for d in docs))
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        return out if isinstance(out, list) else [out]

    def show(self, booking_id: str) -> dict[str, Any]:
        result = self.cli("show", "--json", "--clinic", "e2e", booking_id)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def discard(self) -> None:
        """After the test: SIGKILL whatever is still running, each with its children.

        A warm stop (`stop`) takes seconds a test no longer checks anything in: the next
        test flushes the database, and every process runs in a session of its own.
        """
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.processes:
            proc.wait()

    def stop(self) -> None:
        """SIGTERM every process (a warm stop, as ops would stop them); SIGKILL after 10 s."""
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def sms_sink() -> Iterator[HttpSink]:
    sink = HttpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def e2e_config(tmp_path: Path, smtp_sink: SmtpSink, sms_sink: HttpSink) -> Path:
    """A config folder: clinic `e2e` sending to the sinks, protocol `quick`."""
    config = tmp_path / "config"
    (config / "protocols").mkdir(parents=True)
    (config / "clinics").mkdir()
    (config / "protocols" / "quick.toml").write_text(QUICK_PROTOCOL, encoding="utf-8")
    (config / "clinics" / "e2e.toml").write_text(f"""
name = "E2E Skin Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[sms]  # several SMS minutes apart: not a test of the frequency cap
max_per_day = 10
max_per_week = 70
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp_sink.port}?from=clinic@e2e.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms_sink.port}/sms?:to={{to}}"
""", encoding="utf-8")
    return config


@pytest.fixture
def service(tmp_path: Path, redis_server, redis_client, e2e_config: Path) -> Iterator[Service]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({
        "REMINDERS_REDIS_URL": redis_server.url,
        "REMINDERS_CONFIG_DIR": str(e2e_config),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
        "REMINDERS_BACKOFF_BASE_SECONDS": "1",
        "REMINDERS_BACKOFF_CAP_SECONDS": "4",
        "REMINDERS_LEASE_SECONDS": "10",
        "REMINDERS_SEND_TIMEOUT_SECONDS": "4",
    })
    svc = Service(env, tmp_path)
    yield svc
    svc.discard()


@pytest.fixture
def make_booking() -> Callable[..., dict[str, Any]]:
    """Return a factory of bookings at clinic e2e, protocol quick, starting soon."""

    def make(booking_id: str = "B-1", starts_in: float = 12.0, **patient: Any) -> dict[str, Any]:
        starts = datetime.now(UTC) + timedelta(seconds=starts_in)
        return {
            "clinic": "e2e", "booking_id": booking_id, "treatment": "quick",
            "starts_at": starts.isoformat(timespec="milliseconds"),
            "patient": {"name": "Ana López", "email": f"{booking_id.lower()}@example.com",
                        "phone": "+34600111222", "timezone": "Europe/Madrid", "locale": "en",
                        "channels": ["sms", "email"], **patient},
        }

    return make
