"""docker-compose.yml's Redis healthcheck is healthy only when Redis answers PONG: the exact
command of the compose file, run against a real redis-server answering an error (NOAUTH:
requirepass set, as a Redis still loading its AOF answers LOADING) exits non-zero, and
against a healthy one exits 0. (`redis-cli ping` alone exits 0 on both.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_docker import (
    ROOT,
    Process,
    argv_of,
    free_port,
    redis_healthcheck_argv,
    resolve,
    run_cli,
)


@pytest.fixture(scope="module")
def services() -> dict:
    """docker-compose.yml's services, as tests/test_docker.py reads them."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def start_redis(services, tmp_path: Path, *extra: str) -> tuple[Process, int]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = resolve(argv_of(services["redis"]["command"]))
    process = Process(f"redis-{port}", [*argv, "--port", str(port), "--bind", "127.0.0.1",
                                        "--dir", str(tmp_path), *extra],
                      dict(os.environ), tmp_path).start()
    process.wait_for(r"Ready to accept connections")
    return process, port


@pytest.mark.integration
def test_the_redis_healthcheck_fails_on_an_error_reply_and_passes_on_pong(services, tmp_path):
    locked, locked_port = start_redis(services, tmp_path / "locked", "--requirepass", "s3cret")
    try:
        healthy, port = start_redis(services, tmp_path / "healthy")
        try:
            argv = redis_healthcheck_argv(services["redis"], locked_port)
            bare = subprocess.run(["redis-cli", "-p", str(locked_port), "ping"],
                                  capture_output=True, text=True, timeout=30)
            assert "NOAUTH" in bare.stdout + bare.stderr  # Redis answers an error ...
            result = run_cli(argv, dict(os.environ), tmp_path)
            assert result.returncode != 0, result  # ... and the healthcheck says unhealthy
            result = run_cli(redis_healthcheck_argv(services["redis"], port),
                             dict(os.environ), tmp_path)
            assert result.returncode == 0, result
        finally:
            assert healthy.stop() == 0, healthy.output()
    finally:
        assert locked.stop() == 0, locked.output()
