"""REMINDERS_LOG_LEVEL as ops set it in `.env`: checked, named when wrong, and obeyed by the
compose worker, beat and API commands (run for real, as tests/test_docker.py runs them).

Before: the compose worker and beat commands said `--loglevel=INFO`, which Celery hands to
our logging setup, so `.env`'s REMINDERS_LOG_LEVEL (passed through to them) changed
nothing; and a lower-case level ("debug", which Celery and uvicorn take) stopped the API at
import with "ValueError: Unknown level: 'debug'" (the setting not named) and made the
worker log a traceback at start.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tests.test_docker import (
    COMPOSE_FILE,
    Process,
    argv_of,
    container_env,
    db_url,
    free_port,
    resolve,
)
from worker.settings import Settings


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]


def test_log_level_any_case_and_a_wrong_one_named() -> None:
    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"  # type: ignore[call-arg]
    assert Settings(_env_file=None, log_level=" Warning ").log_level == "WARNING"  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, log_level="verbose")  # type: ignore[call-arg]
    assert "log_level" in str(caught.value) and "'verbose' is not a log level" in str(caught.value)


@pytest.mark.integration
@pytest.mark.parametrize("role", ["worker", "beat"])
def test_compose_worker_and_beat_log_at_the_dot_env_level(
        role: str, services, redis_server, tmp_path: Path) -> None:
    env = container_env(services[role], db_url(redis_server.url, 7 if role == "worker" else 8),
                        tmp_path / "data") | {"REMINDERS_LOG_LEVEL": "debug"}
    process = Process(role, resolve(argv_of(services[role]["command"])), env, tmp_path).start()
    try:
        # Celery's own DEBUG lines, logged once its logging is set up (beat sets ours up at
        # REMINDERS_LOG_LEVEL first, so an earlier DEBUG line proves nothing).
        process.wait_for(r'"level": "DEBUG", "logger": "celery\.(beat|bootsteps)"', timeout=15)
        # Up (its signal handlers in place) before the SIGTERM.
        process.wait_for(r"celery@\S+ ready\." if role == "worker" else r"beat: Starting")
    finally:
        status = process.stop()
    assert status == 0, process.output()[-3000:]
    assert "Unknown level" not in process.output()


@pytest.mark.integration
def test_compose_api_serves_with_a_lower_case_log_level(services, redis_server,
                                                         tmp_path: Path) -> None:
    api = services["api"]
    port = str(free_port())
    argv = resolve(argv_of(api["command"]))
    argv[argv.index("--port") + 1] = port
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = container_env(api, db_url(redis_server.url, 9), tmp_path / "data") | {
        "REMINDERS_LOG_LEVEL": "debug"}
    process = Process("api", argv, env, tmp_path).start()
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.proc is not None
            if process.proc.poll() is not None:
                pytest.fail(f"the API exited ({process.proc.returncode}):\n{process.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.2)
    finally:
        process.stop()
