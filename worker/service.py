"""`reminders run`: the whole service in one command, supervised, stopped cleanly by Ctrl-C.

Starts the embedded Redis (unless REMINDERS_REDIS_URL is set), then a Celery worker,
Celery beat (the pump) and the HTTP API (uvicorn, on REMINDERS_API_HOST and
REMINDERS_API_PORT; port 0 picks a free one) as child processes, and keeps them up: a
child that exits (a crash, SIGKILL, the OOM killer) is started again after a backoff
that doubles from 1 s to 30 s and resets once the child has stayed up for a minute. The
embedded Redis is restarted the same way, on the same port and data folder (AOF on), so
the worker, beat and the other `reminders` commands find it again at the same URL with
its data.

Only Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops the service: every child is
stopped (SIGTERM, then SIGKILL once the worker's whole shutdown grace and a margin have
passed: `stop_grace`), the embedded Redis last, and nothing is left behind. A `reminders
run` that finds the embedded Redis of an earlier one still serving its folder (that one
was SIGKILLed: its children outlive it) refuses to start a second on the same data.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from .embedded import URL_FILE, RedisServer, free_port
from .errors import ConfigError
from .logs import configure
from .settings import Settings

log = logging.getLogger(__name__)
GRACE_SECONDS = 15.0
# Beyond the worker's own grace for its sends (REMINDERS_SHUTDOWN_GRACE_SECONDS): a pump run
# finishing first, the cut sends recording their outcome, Celery closing its pool (the
# compose file's stop_grace_period leaves the same 10 s).
STOP_MARGIN_SECONDS = 10.0
RESTART_FIRST_DELAY_SECONDS = 1.0
RESTART_MAX_DELAY_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0  # a child up this long is healthy again: its backoff resets
POLL_SECONDS = 0.2
API_START_TIMEOUT_SECONDS = 20.0
# worker/celery_app.py's WORKER_QUEUES, written out: importing the Celery app needs Redis.
WORKER_QUEUES = "reminders.send.email,reminders.send.sms,reminders.pump,reminders.events"


def restart_delay(restart: int, first: float = RESTART_FIRST_DELAY_SECONDS,
                  cap: float = RESTART_MAX_DELAY_SECONDS) -> float:
    """Return the wait before the `restart`-th restart in a row (1-based): doubling, capped."""
    return min(cap, first * 2.0 ** min(max(restart, 1) - 1, 32))


def describe_exit(returncode: int) -> str:
    """Return "exited with code 3" or "exited with signal SIGKILL" for a Popen returncode."""
    if returncode < 0:
        try:
            return f"exited with signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"exited with signal {-returncode}"
    return f"exited with code {returncode}"


def celery_command(role: str, settings: Settings) -> list[str]:
    """Return the argv of the Celery worker or beat: Celery's own `worker` and `beat`
    commands on worker.celery_app, through worker/celery_main.py as docker-compose runs them
    too (`python -m worker.celery_main worker|beat`), which leaves out Celery's other
    sub-commands (their imports would weigh on the worker's main process and every pool
    process)."""
    base = [sys.executable, "-m", "worker.celery_main", role, f"--loglevel={settings.log_level}"]
    if role == "worker":
        # No gossip, no mingle: the service uses neither, and restarting the gossip consumer
        # after Redis went away fails in kombu's channel close (celery/kombu#582; seen here as
        # "Error on restarting Gossip: AttributeError"), leaving that channel open.
        # Every queue (worker/celery_app.py WORKER_QUEUES): the pump's, one per channel, and
        # the clinic events'.
        return base + ["--concurrency=2", "-Q", WORKER_QUEUES,
                       "--without-gossip", "--without-mingle"]
    return base


def api_command(settings: Settings, port: int) -> list[str]:
    """Return the argv of the HTTP API, as docker-compose runs it (there on 0.0.0.0:8000)."""
    return [sys.executable, "-m", "uvicorn", "worker.api:app", "--host", settings.api_host,
            "--port", str(port), "--log-level", settings.log_level.lower()]


def port_is_free(host: str, port: int) -> bool:
    """Return True if nothing listens on host:port (binding as uvicorn does would work)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_for_port(host: str, port: int, child: Child, timeout: float,
                   stopping: Callable[[], bool]) -> bool:
    """Wait until something accepts connections on host:port; False if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if child.process is not None and child.process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _kill_group(pid: int) -> None:
    """SIGKILL whatever is left of a child's process group (a dead worker's pool processes)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """One supervised process: started by `spawn`, restarted with backoff when it exits."""

    def __init__(self, role: str, spawn: Callable[[], subprocess.Popen[bytes]],
                 own_group: bool = True) -> None:
        self.role = role
        self.spawn = spawn
        self.own_group = own_group  # started in its own session: its group is ours to kill
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0  # restarts in a row, each one after a short life
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = self.spawn()
        self.started_at = time.monotonic()
        self.restart_at = None

    def supervise(self, now: float) -> None:
        """Notice an exit and schedule the restart; start again once the delay is over."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                try:
                    self.start()
                except ConfigError as exc:  # the embedded Redis did not come up
                    self._schedule(now, f"failed to start ({exc})")
            return
        if self.process is None or self.process.poll() is None:
            return
        if self.own_group:
            _kill_group(self.process.pid)
        if now - self.started_at >= STABLE_AFTER_SECONDS:
            self.restarts = 0
        self._schedule(now, describe_exit(self.process.returncode))

    def _schedule(self, now: float, why: str) -> None:
        self.restarts += 1
        delay = restart_delay(self.restarts)
        self.restart_at = now + delay
        print(f"{self.role} {why}; restarting in {delay:g}s (restart {self.restarts})",
              file=sys.stderr, flush=True)

    def stop(self, deadline: float) -> None:
        """SIGTERM, wait until `deadline`, then SIGKILL the process group."""
        proc = self.process
        if proc is None:
            return
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self.own_group:
            _kill_group(proc.pid)


def _celery_spawner(role: str, settings: Settings,
                    env: dict[str, str]) -> Callable[[], subprocess.Popen[bytes]]:
    def spawn() -> subprocess.Popen[bytes]:
        # Own process group: the terminal's Ctrl-C reaches us, and we stop them in order.
        return subprocess.Popen(celery_command(role, settings), env=env, start_new_session=True)

    return spawn


def stop_grace(settings: Settings) -> float:
    """Return how long a stop waits for the children before SIGKILL: the worker's whole
    shutdown grace and a margin (a send answered within it is recorded, not cut short)."""
    return max(GRACE_SECONDS, settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS)


def _stop(children: list[Child], grace: float = GRACE_SECONDS) -> None:
    for child in children:
        if child.process is not None and child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.stop(deadline)


def serving_embedded(redis_dir: Path, url_file: Path) -> str | None:
    """Return the URL of an embedded Redis still serving `redis_dir` (named by `url_file`,
    left by a `reminders run` that did not stop cleanly: a SIGKILL ends it alone), else None."""
    try:
        url = url_file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    from .connections import PROBE, from_url

    client = from_url(url, PROBE)
    try:
        served = client.config_get("dir").get("dir")
    except (redis.RedisError, ValueError):
        return None
    finally:
        client.close()
    return url if served and Path(str(served)) == redis_dir.resolve() else None


def run_all(settings: Settings) -> int:
    """Run Redis (if embedded), worker, beat and the API until interrupted; return the code."""
    configure(settings.log_format, settings.log_level)  # worker/logs.py
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    server: RedisServer | None = None
    redis_child: Child | None = None
    url_file = settings.data_dir / URL_FILE
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # SIGHUP too: the terminal closed. Its default would end this process alone, leaving the
    # children (own sessions) running, orphaned, the embedded Redis among them. Unless it
    # is ignored (`nohup reminders run`): then the service outlives the terminal, as asked.
    stops = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stops.append(signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in stops}
    celery_children = [Child(role, _celery_spawner(role, settings, env))
                       for role in ("worker", "beat")]
    api_port = settings.api_port or free_port()  # chosen once: a restart keeps the URL
    api_child = Child("api", lambda: subprocess.Popen(api_command(settings, api_port), env=env,
                                                      start_new_session=True))
    children = [*celery_children, api_child]
    try:
        if settings.redis_url is None and not settings.redis_sentinels:
            running = serving_embedded(settings.data_dir / "redis", url_file)
            if running:
                raise ConfigError(url_file, f"the embedded Redis of an earlier `reminders run` "
                                  f"still serves this folder at {running} (with its worker, "
                                  "beat and API, if they outlived it): stop them first; a "
                                  "second Redis on the same data would send every reminder "
                                  "twice")
            server = RedisServer(settings.data_dir / "redis")
            embedded = server

            def spawn_redis() -> subprocess.Popen[bytes]:
                process = embedded.start().process
                assert process is not None
                return process

            redis_child = Child("redis", spawn_redis, own_group=False)
            redis_child.start()
            url_file.write_text(server.url + "\n", encoding="utf-8")
            env["REMINDERS_REDIS_URL"] = server.url
            print(f"embedded Redis on {server.url} (data in {server.data_dir})", flush=True)
        env.setdefault("REMINDERS_DATA_DIR", str(settings.data_dir.resolve()))
        outbox = Path(env.get("REMINDERS_OUTBOX_DIR") or settings.outbox).resolve()
        shown_host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "") else settings.api_host
        api_url = f"http://{shown_host}:{api_port}"
        port_free = port_is_free(settings.api_host, api_port)  # before our API takes it
        for child in children:
            child.start()
        print(f"worker and pump running; messages without a configured channel go to {outbox}",
              flush=True)
        if port_free and _wait_for_port(shown_host, api_port, api_child,
                                        API_START_TIMEOUT_SECONDS, lambda: stopping):
            print(f"HTTP API on {api_url} (OpenAPI at {api_url}/docs)", flush=True)
        else:
            print(f"HTTP API did not come up on {api_url} (is the port taken? set "
                  "REMINDERS_API_PORT); it is restarted with backoff", file=sys.stderr, flush=True)
        print("press Ctrl-C to stop", flush=True)
        supervised = children + ([redis_child] if redis_child else [])
        while not stopping:
            now = time.monotonic()
            for child in supervised:
                child.supervise(now)
            time.sleep(POLL_SECONDS)
        return 0
    finally:
        _stop(children, stop_grace(settings))
        if server is not None:
            server.stop()  # last: the worker and beat needed it to shut down cleanly
            url_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", flush=True)
