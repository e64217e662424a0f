"""REMINDERS_UNSUBSCRIBE_SECRET shorter than 32 characters (or .env.example's placeholder)
stops every process at start with the setting named and the value never shown: a short or
guessable key would let anyone forge a patient's unsubscribe link. Real processes: the CLI,
the API (uvicorn) and the Celery worker; a 43-character secret is taken."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import SECRET_PLACEHOLDER

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = "Tr0ub4dor&3-clinic"  # 18 characters: a person's choice


def run(argv: list[str], secret: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_CONFIG_DIR=str(ROOT / "config"),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
               REMINDERS_DATA_DIR=str(tmp_path / "data"),
               REMINDERS_REDIS_URL="redis://127.0.0.1:9/0")  # never reached
    if secret is not None:
        env["REMINDERS_UNSUBSCRIBE_SECRET"] = secret
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


PROCESSES = {
    "cli": [str(BIN / "reminders"), "check"],
    "api": [str(BIN / "uvicorn"), "worker.api:app", "--host", "127.0.0.1", "--port", "0"],
    "worker": [sys.executable, "-m", "worker.celery_main", "worker", "--concurrency=1"],
}


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("secret", [SHORT, SECRET_PLACEHOLDER])
def test_a_weak_unsubscribe_secret_stops_the_process_naming_it_not_showing_it(
        process, secret, tmp_path):
    result = run(PROCESSES[process], secret, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "REMINDERS_UNSUBSCRIBE_SECRET must be at least 32 characters" in output, output
    assert secret not in output and "Tr0ub4dor" not in output, output
    if process == "cli":
        assert result.returncode == 3 and "configuration error:" in result.stderr


def test_a_long_random_secret_is_taken(tmp_path):
    unset = run(PROCESSES["cli"], None, tmp_path)
    long = run(PROCESSES["cli"], secrets.token_urlsafe(32), tmp_path)
    assert "UNSUBSCRIBE_SECRET" not in long.stdout + long.stderr
    assert (long.returncode, long.stdout) == (unset.returncode, unset.stdout)
