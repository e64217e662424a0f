"""`reminders book/show/cancel/release/dead-letters/replay` against a real Redis server."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


@pytest.fixture
def cli(redis_server, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "reminders"), *args],
            input=stdin,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


# A visit about six months ahead, at 14:30 Madrid time (the planner refuses one more than two
# years ahead, and a last isotretinoin dose after today).
VISIT = (datetime.now(UTC) + timedelta(days=180)).astimezone(ZoneInfo("Europe/Madrid")).replace(
    hour=14, minute=30, second=0, microsecond=0)


def future(doc, starts_at=None):
    doc = copy.deepcopy(doc)
    doc["starts_at"] = starts_at or VISIT.isoformat()
    return doc


def test_book_show_cancel(cli, booking_doc):
    doc = future(booking_doc)
    booked = cli("book", "--json", "-", stdin=json.dumps(doc))
    assert booked.returncode == 0, booked.stderr
    timeline = json.loads(booked.stdout)
    assert (timeline["clinic"], timeline["booking_id"], timeline["version"]) == (
        "glow",
        "A-1042",
        1,
    )
    shown = cli("show", "--clinic", "glow", "--json", "A-1042")
    assert json.loads(shown.stdout) == timeline
    table = cli("show", "--clinic", "glow", "A-1042")
    assert "glow/A-1042  status=scheduled  version=1" in table.stdout
    assert "stop-retinoids:sms" in table.stdout and VISIT.strftime("%Z") in table.stdout
    cancelled = cli("cancel", "--clinic", "glow", "--json", "A-1042")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert {r["status"] for r in json.loads(cancelled.stdout)["reminders"]} == {"cancelled"}


def test_a_batch_with_one_bad_booking_stores_none(cli, booking_doc):
    good = future(booking_doc)
    bad = dict(future(booking_doc), booking_id="A-2", patient={**good["patient"], "phone": "123"})
    result = cli("book", "-", stdin=json.dumps([good, bad]))
    assert result.returncode == 1
    assert "booking 2 (A-2) refused" in result.stderr and "patient.phone" in result.stderr
    assert "nothing was stored" in result.stderr
    missing = cli("show", "--clinic", "glow", "A-1042")
    assert missing.returncode == 1 and "not found: glow/A-1042" in missing.stderr


def test_book_refuses_a_past_appointment(cli, booking_doc):
    result = cli("book", "-", stdin=json.dumps(future(booking_doc, "2020-01-01T10:00:00+01:00")))
    assert result.returncode == 1
    assert "starts_at: the appointment is in the past" in result.stderr


def test_clinic_is_required_when_several_exist(cli, booking_doc):
    result = cli("show", "A-1042")
    assert result.returncode == 2 and "--clinic is required" in result.stderr
    unknown = cli("show", "--clinic", "nope", "A-1042")
    assert unknown.returncode == 2 and "unknown clinic 'nope'" in unknown.stderr


def test_release_a_held_booking(cli, booking_doc):
    doc = future(booking_doc)
    # 181 days before the visit's day in Madrid, inside the 182-day washout whatever the
    # hour: "yesterday" by the machine's date was 182 days before a visit whose 14:30 fell
    # on the next Madrid day (late evening UTC, the visit in summer time): not held.
    doc["medications"]["isotretinoin_last_dose"] = (VISIT.date() - timedelta(days=181)).isoformat()
    held = json.loads(cli("book", "--json", "-", stdin=json.dumps(doc)).stdout)
    assert held["status"] == "held" and "isotretinoin" in held["hold_reason"]
    released = cli("release", "--clinic", "glow", "--json", "A-1042")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout)["status"] == "scheduled"
    again = cli("release", "--clinic", "glow", "A-1042")
    assert again.returncode == 1 and "is not held (status scheduled)" in again.stderr


def test_dead_letters_and_replay_usage(cli):
    empty = cli("dead-letters")
    assert empty.returncode == 0 and empty.stdout.strip() == "no dead letters"
    assert json.loads(cli("dead-letters", "--json").stdout) == []
    usage = cli("replay")
    assert usage.returncode == 2 and "--all" in usage.stderr
    unknown = cli("replay", "glow/A-1/x:sms")
    assert unknown.returncode == 1 and "not dead-lettered: glow/A-1/x:sms" in unknown.stderr


def test_commands_say_when_redis_is_not_there(tmp_path, booking_doc):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["REMINDERS_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [str(BIN / "reminders"), "show", "--clinic", "glow", "A-1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "REMINDERS_REDIS_URL" in result.stderr and "reminders run" in result.stderr


def test_show_reads_a_removed_clinics_booking_and_while_config_does_not_load(
        cli, redis_server, tmp_path, booking_doc):
    # An ops read of what Redis holds: `show --clinic X ID` refused X as unknown once its
    # file was removed (exit 2), though its pending reminders go on (and fail "not
    # configured"), and any booking while config/ did not load (exit 3: a bad edit the
    # running services survive). Now it shows the booking Redis holds; a clinic neither
    # configured nor holding that booking is refused as before (a typo reads as nothing).
    import shutil

    booked = cli("book", "--json", "-", stdin=json.dumps(future(booking_doc)))
    assert booked.returncode == 0, booked.stderr
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    (config / "clinics" / "glow.toml").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path),
               REMINDERS_CONFIG_DIR=str(config), PYTHONPATH=str(ROOT))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "reminders"), *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    expected = json.loads(booked.stdout)
    shown = run("show", "--clinic", "glow", "--json", "A-1042")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == expected
    table = run("show", "--clinic", "glow", "A-1042")
    assert table.returncode == 0 and "glow/A-1042" in table.stdout, table.stderr
    typo = run("show", "--clinic", "glo", "A-1042")
    assert typo.returncode == 2 and "unknown clinic 'glo'" in typo.stderr, typo.stderr
    missing = run("show", "--clinic", "glow", "A-9999")
    assert missing.returncode == 2 and "unknown clinic 'glow'" in missing.stderr

    (config / "clinics" / "demo.toml").write_text("name = [\n", encoding="utf-8")  # broken
    shown = run("show", "--clinic", "glow", "--json", "A-1042")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == expected
    cancel = run("cancel", "--clinic", "glow", "A-1042")  # a write still needs config/
    assert cancel.returncode == 3 and "demo.toml" in cancel.stderr, cancel.stderr
    assert json.loads(run("show", "--clinic", "glow", "--json", "A-1042").stdout) == expected


def test_show_tells_the_patients_sms_replies(cli, redis_client, booking_doc):
    """The patient confirmed the visit (reply C) and asked to be called (reply R): GET and
    `show --json` carry `confirmed_at` and `call_requested_at`; the table `reminders show`
    prints for the clinic's desk said neither, so a patient waiting for a call went
    unseen there. It says both, at the patient's local time as its other times."""
    from worker.store import Store

    doc = future(booking_doc)
    assert cli("book", "-", stdin=json.dumps(doc)).returncode == 0
    store = Store(redis_client, "reminders")
    madrid = ZoneInfo("Europe/Madrid")
    confirmed = datetime(2026, 11, 20, 9, 15, tzinfo=UTC)
    called = datetime(2026, 11, 21, 18, 40, tzinfo=UTC)
    assert store.note_reply("glow", "A-1042", "confirmed_at", confirmed, "confirm",
                            starts_at=doc["starts_at"])
    assert store.note_reply("glow", "A-1042", "call_requested_at", called, "reschedule")
    shown = json.loads(cli("show", "--clinic", "glow", "--json", "A-1042").stdout)
    assert (shown["confirmed_at"], shown["call_requested_at"]) == (
        "2026-11-20T09:15:00Z", "2026-11-21T18:40:00Z")
    table = cli("show", "--clinic", "glow", "A-1042")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    # The table's clock has seconds when a due time does (the confirmation, booked inside
    # the send window, is due at the booking's own second): the same clock for the replies.
    clock = "%H:%M:%S" if any(datetime.fromisoformat(r["due_at"]).second
                              for r in shown["reminders"] if r["due_at"]) else "%H:%M"
    assert ("CONFIRMED: the patient confirmed this visit by SMS on "
            + confirmed.astimezone(madrid).strftime(f"%a %Y-%m-%d {clock} %Z")) in lines, \
        table.stdout
    assert ("CALL REQUESTED: the patient asked by SMS to be called, on "
            + called.astimezone(madrid).strftime(f"%a %Y-%m-%d {clock} %Z")) in lines, \
        table.stdout


def test_plan_says_why_a_held_bookings_step_is_skipped_as_show_does(cli, booking_doc):
    """A visit 5 hours away whose patient took isotretinoin a month ago: held, and its steps
    before the visit skipped as too late. `reminders plan` (the dry run of what would be
    scheduled) gave every skipped step the hold's reason, as if the clinic's release would
    send it, while the stored timeline (`book`, `show`, GET) says it is too late. The dry
    run now says what the stored timeline says."""
    doc = copy.deepcopy(booking_doc)
    now = datetime.now(UTC)
    doc["starts_at"] = (now + timedelta(hours=5)).replace(second=0, microsecond=0).isoformat()
    doc["medications"]["isotretinoin_last_dose"] = (now - timedelta(days=30)).date().isoformat()
    planned = cli("plan", "--json", "-", stdin=json.dumps(doc))
    assert planned.returncode == 0, planned.stderr
    assert cli("book", "-", stdin=json.dumps(doc)).returncode == 0
    stored = json.loads(cli("show", "--clinic", "glow", "--json", "A-1042").stdout)
    assert stored["status"] == json.loads(planned.stdout)["status"] == "held"

    def reasons(timeline):
        return {r["id"]: (r["status"], r["reason"]) for r in timeline["reminders"]}

    skipped = {k: v for k, v in reasons(stored).items() if v[0] == "skipped"}
    assert skipped and all("held" not in why for _, why in skipped.values()), skipped
    assert reasons(json.loads(planned.stdout)) == reasons(stored)
