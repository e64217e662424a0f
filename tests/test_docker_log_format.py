"""The README's Docker steps (`cp .env.example .env`, then docker-compose) give JSON log
lines, as the README says, while `reminders` outside Docker with the same .env writes text
(the settings' default): `docker-compose config` with .env.example as the .env resolves
REMINDERS_LOG_FORMAT to json for the worker, beat and API."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_dot_env_gives_json_lines_in_docker_and_text_outside(tmp_path):
    binary = shutil.which("docker-compose")
    if not binary:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    host = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "--env-file",
         str(ROOT / ".env.example"), "config"],
        cwd=ROOT, env=host, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("worker", "beat", "api"):
        env = services[name]["environment"]
        assert env["REMINDERS_LOG_FORMAT"] == "json", (name, env["REMINDERS_LOG_FORMAT"])
    assert "Logs are JSON lines" in (ROOT / "README.md").read_text(encoding="utf-8")
    # Outside Docker, the same file leaves the default: text.
    for name in list(os.environ):
        assert not name.startswith("REMINDERS_LOG_FORMAT"), "unset it to run this test"
    assert Settings(_env_file=ROOT / ".env.example").log_format == "text"
