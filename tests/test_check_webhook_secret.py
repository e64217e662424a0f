"""A clinic's webhook signing secret (`[webhook] secret = "${NAME}"`) set to fewer than 32
characters fails `reminders check` (exit 3), naming the clinic file and webhook.secret and
never showing the value: anyone could forge the clinic's event signatures with a short one.
Sends still use it (an existing clinic's webhooks do not stop). The real CLI on a copy of
config/ with the webhook turned on."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = "Tr0ub4dor&3-glow-hooks"  # 22 characters: a person's choice
WEBHOOK = '''
[webhook]
url = "https://booking.glow.example/hooks/reminders"
secret = "${GLOW_WEBHOOK_SECRET}"
'''


@pytest.fixture
def config(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    shutil.copytree(ROOT / "config", folder)
    glow = folder / "clinics" / "glow.toml"
    text = glow.read_text(encoding="utf-8")
    head, sep, tail = text.partition("\n[sms]")  # before the first table: a top-level table
    glow.write_text(head + "\n" + WEBHOOK + sep + tail, encoding="utf-8")
    return folder


def check(config: Path, secret: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REMINDERS_") and k != "GLOW_WEBHOOK_SECRET"}
    env.update(REMINDERS_CONFIG_DIR=str(config),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
               REMINDERS_DATA_DIR=str(config.parent / "data"),
               REMINDERS_REDIS_URL="redis://127.0.0.1:9/0")  # never reached
    if secret is not None:
        env["GLOW_WEBHOOK_SECRET"] = secret
    return subprocess.run([str(BIN / "reminders"), "check", *args], env=env,
                          cwd=config.parent, capture_output=True, text=True, timeout=60)


def test_a_short_webhook_secret_fails_check_naming_the_file_not_the_value(config) -> None:
    result = check(config, SHORT)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    glow = config / "clinics" / "glow.toml"
    assert (f"configuration error: {glow}: webhook.secret: environment variable "
            "GLOW_WEBHOOK_SECRET must be at least 32 characters") in result.stderr, output
    assert SHORT not in output and "Tr0ub4dor" not in output, output
    assert "1 error(s)" in result.stdout  # the rest of the check still ran: the SMS table
    assert "SMS templates:" in result.stdout
    as_json = check(config, SHORT, "--json")
    assert as_json.returncode == 3 and SHORT not in as_json.stdout + as_json.stderr
    assert "webhook.secret" in as_json.stdout


def test_a_long_webhook_secret_passes_and_unset_is_a_warning(config) -> None:
    long = check(config, secrets.token_urlsafe(32))
    assert long.returncode == 0, long.stdout + long.stderr
    assert "webhook.secret" not in long.stdout + long.stderr
    assert check(config, "x" * 32).returncode == 0  # 32 is the least taken
    unset = check(config, None)
    assert unset.returncode == 0, unset.stdout + unset.stderr
    assert "GLOW_WEBHOOK_SECRET is not set" in unset.stdout


def test_a_webhook_url_whose_host_cannot_be_used_fails_check(config) -> None:
    # A typo the URL pattern lets through ("booking..glow.example": an empty label) loads,
    # but no delivery can reach it (worker/webhooks.py: each attempt fails, then the events
    # are given up): `reminders check` says so before the clinic's events are lost.
    glow = config / "clinics" / "glow.toml"
    glow.write_text(glow.read_text(encoding="utf-8").replace(
        "booking.glow.example", "booking..glow.example"), encoding="utf-8")
    result = check(config, secrets.token_urlsafe(32))
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert f"configuration error: {glow}: webhook.url: the host " in result.stderr, output


def test_a_short_previous_secret_fails_check_naming_webhook_previous_secret(config) -> None:
    glow = config / "clinics" / "glow.toml"
    glow.write_text(glow.read_text(encoding="utf-8").replace(
        WEBHOOK, WEBHOOK + 'previous_secret = "${GLOW_WEBHOOK_SECRET_OLD}"\n'),
        encoding="utf-8")
    os.environ["GLOW_WEBHOOK_SECRET_OLD"] = SHORT
    try:
        result = check(config, secrets.token_urlsafe(32))
    finally:
        del os.environ["GLOW_WEBHOOK_SECRET_OLD"]
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert (f"configuration error: {glow}: webhook.previous_secret: environment variable "
            "GLOW_WEBHOOK_SECRET_OLD must be at least 32 characters") in result.stderr, output
    assert SHORT not in output, output
