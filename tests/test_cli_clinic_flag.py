"""`--clinic` where it means nothing, as real `reminders` processes on a real Redis.

`stats`, `health`, `migrate` and `run` read or serve every clinic. They took `--clinic`
and ignored it: `reminders stats --clinic glow` printed every clinic's bookings under
"bookings kept", `reminders run --clinic glow` ran every clinic's reminders, and an
unknown clinic passed as well. Ops reading the answer as one clinic's is misled, so the
flag is refused (a usage error, exit 2) where it selects nothing; and `--help` of the
commands taking a booking id no longer says `--clinic` defaults to "the booking's own
`clinic` field" (a booking id has none: it is the only clinic configured, else required).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_cli_dead_letters_clinic import BIN, cli_env, two_clinics_dead_letters
from worker.store import Store

pytestmark = pytest.mark.integration


def reminders(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "reminders"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [
    ["stats"], ["stats", "--json"], ["health", "--role", "worker"], ["migrate", "--dry-run"]])
def test_a_command_of_every_clinic_refuses_clinic(
        redis_server, redis_client, tmp_path, catalog, booking_doc, command):
    store = Store(redis_client, "reminders")
    two_clinics_dead_letters(store, catalog, booking_doc)
    env = cli_env(redis_server.url, tmp_path)
    whole = reminders(*command, env=env)
    done = reminders(*command, "--clinic", "glow", env=env)
    assert done.returncode == 2, (command, done.returncode, done.stdout, done.stderr)
    assert "--clinic" in done.stderr and done.stdout == "", done.stderr
    if command[0] == "stats":  # what it prints for every clinic, unchanged
        assert whole.returncode == 0 and "demo" in whole.stdout and "glow" in whole.stdout


@pytest.mark.parametrize("flags", [["--clinic", "glow"], ["--json"]])
def test_run_refuses_what_it_would_ignore(tmp_path, flags):
    # A configuration that does not load: `run` stops (exit 3) before starting anything, so
    # accepting the flag shows as 3, refusing it as 2.
    env = {**cli_env("redis://127.0.0.1:1/0", tmp_path),
           "REMINDERS_CONFIG_DIR": str(tmp_path / "nowhere")}
    done = reminders("run", *flags, env=env)
    assert done.returncode == 2 and flags[0] in done.stderr, (done.returncode, done.stderr)


@pytest.mark.parametrize("command", ["show", "cancel", "release", "dead-letters", "replay",
                                     "purge", "check"])
def test_help_says_what_clinic_defaults_to(command, tmp_path):
    text = reminders(command, "--help", env=cli_env("redis://127.0.0.1:1/0", tmp_path)).stdout
    assert "booking's own" not in text, text
    assert "--clinic" in text


def test_help_names_settings_and_roles_as_the_readme_does(tmp_path):
    # `events --help` named the setting by its Python name (webhook_max_attempts), which no
    # one can set; `health --help` left out --role api, which the README's table lists.
    env = cli_env("redis://127.0.0.1:1/0", tmp_path)
    top = reminders("--help", env=env).stdout
    events = reminders("events", "--help", env=env).stdout
    health = reminders("health", "--help", env=env).stdout
    for text in (top, events):
        assert "REMINDERS_WEBHOOK_MAX_ATTEMPTS" in " ".join(text.split())
        assert "webhook_max_attempts" not in text
    for text in (top, health):
        description = " ".join(text.split("options:")[0].split())
        assert "--role api" in description, description
