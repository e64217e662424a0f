"""`reminders run` (`make run`) ended otherwise than by Ctrl-C or SIGTERM, for real.

Its children (the embedded Redis, worker, beat, API) run in their own sessions, so that it
stops them in order; a terminal's signals reach only `reminders run`. Before:
- closing the terminal (SIGHUP) ended `reminders run` at once, without its clean stop: the
  embedded Redis, the worker, beat and the API all kept running, orphaned, and
  `.reminders/redis.url` stayed;
- the next `reminders run` in that folder then started a second redis-server on the same
  data folder (the same AOF), loaded the same schedule into it, and a second worker sent
  from it: each reminder due went out from both workers (twice), and both servers appended
  to one AOF.
Now SIGHUP stops the service as SIGTERM does, and a `reminders run` that finds the embedded
Redis of an earlier one still serving its folder (after a SIGKILL) refuses to start,
naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def run_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({"REMINDERS_CONFIG_DIR": str(ROOT / "config"),
                "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
                "REMINDERS_DATA_DIR": str(home / "data"), "REMINDERS_API_PORT": "0"})
    return env


def _hangup_default() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_run(home: Path, name: str, nohup: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = home / f"{name}.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            [*(["nohup"] if nohup else []), str(BIN / "reminders"), "run"], cwd=home,
            env=run_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # A closed terminal's SIGHUP as by default even when the suite itself runs under
            # nohup (`run` keeps an ignored SIGHUP ignored: that is the nohup case's test).
            preexec_fn=None if nohup else _hangup_default)
    return run, log_path


def servers_of(data: Path) -> list[psutil.Process]:
    """The redis-server processes keeping their files in `data` (the embedded default's)."""
    found = []
    folder = str((data / "redis").resolve())
    for proc in psutil.process_iter(["name"]):
        try:  # redis-server rewrites its command line, but works in its --dir
            if "redis-server" in (proc.info["name"] or "") and proc.cwd() == folder:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_sighup_of_run_stops_everything_it_started(tmp_path: Path) -> None:
    run, log_path = start_run(tmp_path, "run")
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: b"press Ctrl-C" in log_path.read_bytes() or run.poll() is not None,
                   40)
        assert run.poll() is None, log_path.read_text()
        children = psutil.Process(run.pid).children(recursive=True)
        assert len(servers_of(tmp_path / "data")) == 1
        url = (tmp_path / "data" / "redis.url").read_text(encoding="utf-8").strip()

        run.send_signal(signal.SIGHUP)  # the terminal closed
        run.wait(timeout=45)
        assert "stopped" in log_path.read_text(), log_path.read_text()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
        assert servers_of(tmp_path / "data") == []
        assert not (tmp_path / "data" / "redis.url").exists()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    finally:
        kill_all([psutil.Process(run.pid)] if run.poll() is None else [])
        kill_all(children + servers_of(tmp_path / "data"))


def test_a_second_run_refuses_while_an_earlier_ones_redis_serves_the_folder(
        tmp_path: Path) -> None:
    first, first_log = start_run(tmp_path, "first")
    children: list[psutil.Process] = []
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: b"press Ctrl-C" in first_log.read_bytes() or first.poll() is not None,
                   40)
        assert first.poll() is None, first_log.read_text()
        children = psutil.Process(first.pid).children(recursive=True)
        first.kill()  # SIGKILL (the OOM killer): its children live on, in their own sessions
        first.wait()
        url = (tmp_path / "data" / "redis.url").read_text(encoding="utf-8").strip()

        second, second_log = start_run(tmp_path, "second")
        wait_until(lambda: b"press Ctrl-C" in second_log.read_bytes()
                   or second.poll() is not None, 40)
        assert len(servers_of(tmp_path / "data")) == 1, "a second Redis on the same AOF"
        assert second.wait(timeout=10) != 0, second_log.read_text()
        assert url in second_log.read_text(), second_log.read_text()
        # The earlier Redis is untouched, still named by the folder's URL file.
        assert (tmp_path / "data" / "redis.url").read_text(encoding="utf-8").strip() == url
    finally:
        if second is not None and second.poll() is None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=45)
            except subprocess.TimeoutExpired:
                second.kill()
        kill_all(children + servers_of(tmp_path / "data"))


def test_sighup_of_run_under_nohup_leaves_it_running(tmp_path: Path) -> None:
    """`nohup reminders run`: the hang-up is ignored, as nohup asks (and Ctrl-C still stops)."""
    run, log_path = start_run(tmp_path, "run", nohup=True)
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: b"press Ctrl-C" in log_path.read_bytes() or run.poll() is not None,
                   40)
        assert run.poll() is None, log_path.read_text()
        children = psutil.Process(run.pid).children(recursive=True)
        run.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            run.wait(timeout=2)
        assert len(servers_of(tmp_path / "data")) == 1
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=45) == 0, log_path.read_text()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        kill_all([psutil.Process(run.pid)] if run.poll() is None else [])
        kill_all(children + servers_of(tmp_path / "data"))
