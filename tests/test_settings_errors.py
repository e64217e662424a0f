"""A bad setting stops a `reminders` command with one line naming it as it is set (README
"Configuration": "A bad value stops the process at start with the setting named").

Before: a pydantic traceback of about 30 lines naming the field (`lease_seconds`), not the
variable, from every command, the Docker healthchecks' `reminders health` included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("REMINDERS_LEASE_SECONDS", "abc", "REMINDERS_LEASE_SECONDS: Input should be a valid integer"),
    ("REMINDERS_LOG_FORMAT", "xml", "REMINDERS_LOG_FORMAT: Input should be 'text' or 'json'"),
    ("REMINDERS_SEND_TIMEOUT_SECONDS", "200", "lease_seconds (300) must exceed 2 x "
     "send_timeout_seconds + 1 (401)"),
    ("REMINDERS_RETENTION_DAYS", "7", "REMINDERS_RETENTION_DAYS: REMINDERS_RETENTION_DAYS "
     "must be at least 8 (days): the weekly SMS cap"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, variable: str, value: str,
                                             said: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env[variable] = value
    for command, code in ((["health", "--role", "worker"], 1), (["stats"], 3)):
        result = subprocess.run([str(BIN / "reminders"), *command], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"configuration error: {said}"), result.stderr


# Review (retention): REMINDERS_RETENTION_DAYS below 8 was taken, and the weekly SMS cap then
# lost the SMS of bookings whose records had expired (tests/test_retention.py). Every
# process refuses it at start, naming the variable and the minimum: `reminders check`, the
# Celery worker and the API, as real processes; 8 is taken.
def test_a_retention_below_the_sms_week_is_refused_by_check_the_worker_and_the_api(
        tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_CONFIG_DIR=str(root / "config"),
               REMINDERS_TEMPLATES_DIR=str(root / "templates"),
               REMINDERS_DATA_DIR=str(tmp_path / "data"), REMINDERS_RETENTION_DAYS="7.5")
    said = "REMINDERS_RETENTION_DAYS must be at least 8 (days)"
    check = [str(BIN / "reminders"), "check"]
    for command in (check, [sys.executable, "-m", "worker.celery_main", "worker"],
                    [sys.executable, "-m", "uvicorn", "worker.api:app", "--port", "0"]):
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0 and said in result.stderr, (command, result.stderr)
    env["REMINDERS_RETENTION_DAYS"] = "8"
    result = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
