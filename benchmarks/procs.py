"""Processes for the benchmark: start in their own process group, measure, always stop.

Every process is started with `start_new_session=True`, so its process group holds it
and every child it forks (a Celery worker's pool). `Processes.stop_all()` sends SIGTERM
to each group, waits, then SIGKILLs what is left; the harness calls it in `finally`.

`service_command(role, env)` is the command line `reminders run` starts the worker or
beat with (worker.service.celery_command), under the environment the child will get:
the benchmarks start the service the way ops do, whatever that becomes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STOP_TIMEOUT_SECONDS = 10.0


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Run the block with exactly `env` as os.environ; restore it after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_under(env: dict[str, str]) -> Any:
    """The project's Settings as a child started with `env` (and no .env file) reads them."""
    from worker.settings import Settings

    with environ(env):
        return Settings(_env_file=None)  # type: ignore[call-arg]


def service_command(role: str, env: dict[str, str]) -> list[str]:
    """The argv `reminders run` starts the Celery `role` ("worker", "beat") with, under `env`."""
    from worker.service import celery_command

    return list(celery_command(role, settings_under(env)))


def _live_pids(field: int, value: int) -> list[int]:
    """Return the pids of every live process whose /proc stat field `field` (counted after
    "(comm)": 0 state, 1 ppid, 2 pgrp) is `value`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        # Fields after "(comm)": state ppid pgrp ...; comm may contain spaces or parens.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[field]) == value and fields[0] != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def group_pids(pgid: int) -> list[int]:
    """Return the pids of every live process in process group `pgid` (from /proc)."""
    return _live_pids(2, pgid)


def child_pids(pid: int) -> list[int]:
    """Return the pids of the live children of `pid` (a Celery worker's main process: its
    pool processes), from /proc."""
    return _live_pids(1, pid)


def vm_rss_kib(pid: int) -> int:
    """Return VmRSS of `pid` in KiB (0 if it is gone or has none)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_bytes(pgid: int) -> int:
    """Return the sum of VmRSS over every process of group `pgid`, in bytes."""
    return sum(vm_rss_kib(pid) for pid in group_pids(pgid)) * 1024


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> object:
    """Return the first truthy predicate() within `timeout` seconds, else raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


class Processes:
    """The benchmark's child processes, each the leader of its own process group."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: Path,
              log: Path, stdin: Path | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in its own session, output to `log`, input from `stdin` (a file)."""
        with open(log, "ab") as out, open(stdin or os.devnull, "rb") as given:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=given,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM the process's group, wait up to `timeout`, then SIGKILL the group."""
        pgid = proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while pool children linger: kill whatever is left.
        deadline = time.monotonic() + timeout
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_pids(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process's group at once (nothing to wait for: a benchmark is over)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still running, last started first."""
        for proc in reversed(list(self.running)):
            self.stop(proc)


def close_probe(procs: Processes, servers: list[Any], sinks: Any, workdir: Path,
                keep: bool) -> None:
    """A probe's teardown (burst_probe, rss_probe): its processes, its redis-servers, its
    sinks; its work folder unless `keep` (then it is printed)."""
    procs.stop_all()
    for server in list(servers):
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
    sinks.stop()
    if keep:
        print(f"work folder: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
