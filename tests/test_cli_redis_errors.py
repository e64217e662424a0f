"""Any Redis error reply a command meets, as a real `reminders` process on a real Redis.

redis-py's message for a failed pipelined command quotes the command and its arguments
(the first 100 characters): an SMS cap's opt-out read names the patient's email address.
`reminders book`'s stderr lands in cron mails and CI logs: it was a traceback ending in
that message, exit 1 ("a booking was refused"). Now one line naming the error class, the
Redis error code and the Redis command, scrubbed, exit 3 (as Redis unreachable or
refusing writes); the traceback only at REMINDERS_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_cli_book_stops import cli_env, snapshot

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

NAME, EMAIL, PHONE = "Rosalind Quimby", "rosalind.quimby@example.fr", "+34649103265"
BOOKING = {
    "clinic": "glow", "booking_id": "LEAK-1", "treatment": "microneedling",
    "starts_at": "2027-03-18T13:30:00+01:00",
    "patient": {"name": NAME, "email": EMAIL, "phone": PHONE, "timezone": "Europe/Madrid",
                "locale": "es", "channels": ["email", "sms"]},
    "medications": {"tretinoin": False, "retinol": False, "isotretinoin_last_dose": None},
}


def book(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "reminders"), "book", "-"], input=json.dumps(BOOKING),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_redis_error_quoting_a_patients_address_is_one_scrubbed_line(
        redis_server, redis_client, tmp_path):
    # The clinic's opt-out hash is a string (a stray SET, a foreign tool on the same
    # database): the SMS cap's HEXISTS of the patient's address fails, in the script that
    # reads the caps of a store batch (f20f74b; a pipelined HEXISTS before it).
    redis_client.set("reminders:optout:glow", "x")
    before = snapshot(redis_client)
    env = cli_env(redis_server.url, tmp_path)
    done = book(env)
    assert EMAIL not in done.stderr and "rosalind" not in done.stderr.lower(), done.stderr
    assert PHONE not in done.stderr and PHONE[1:] not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 3, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    # The range stored is said first (as for any stop while storing), then the error.
    assert lines[:-1] == ["stopped after storing 0 to 1 of 1 bookings (booking them again "
                          "is safe: an unchanged booking stays as it is)"], done.stderr
    assert "ResponseError" in lines[-1] and "WRONGTYPE" in lines[-1], done.stderr
    assert "in one of its Lua scripts" in lines[-1] and "storing bookings" in lines[-1], \
        done.stderr
    after = snapshot(redis_client)  # nothing stored: only the store's own set-up keys
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {"reminders:layout", "reminders:secret:contact"}, after

    # At DEBUG the traceback (and so the message) is there for whoever asked for it.
    env["REMINDERS_LOG_LEVEL"] = "DEBUG"
    done = book(env)
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "Traceback" in done.stderr and "WRONGTYPE" in done.stderr, done.stderr


def test_a_command_the_acl_denies_is_named_on_the_one_line(redis_server, redis_client,
                                                            tmp_path):
    # Redis's ACL user lacks a command `book` needs (no @scripting: a "+@read +@write"
    # user): the line said "NoPermissionError", and what to grant was only in the
    # DEBUG traceback. It names the command denied (worker/health.py `error_detail`, as
    # `reminders health` and the API do), never the user, its password or the message.
    user, password = "bookings-only", "pw-of-the-acl-user"
    redis_client.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", "~*",
                                 "&*", "+@all", "-@scripting")
    try:
        url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
        done = book(cli_env(url, tmp_path))
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "NoPermissionError" in last and "'evalsha' denied" in last, done.stderr
    assert user not in done.stderr and password not in done.stderr, done.stderr
