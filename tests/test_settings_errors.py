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
