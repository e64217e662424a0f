"""`reminders replay|purge BOOKING_ID` act on one clinic's booking, as real processes on a
real Redis: two clinics may use the same booking id and never meet (a REF names its clinic;
a booking id takes --clinic, or the only clinic configured, as `show` and `cancel` do)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Attempt, Store

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def cli_env(url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=url, REMINDERS_DATA_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))  # this checkout's code, whichever the venv points at
    return env


def dead_letter(store: Store, catalog, doc) -> str:
    booking = parse_booking(doc, catalog)
    now = datetime.now(UTC)
    store.upsert(booking, plan(booking, catalog.protocols[booking.treatment],
                               catalog.clinics[booking.clinic], now), now)
    ref = f"{booking.clinic}/{booking.booking_id}/booking-confirmation:email"
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    assert store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"),
                               "permanent: HTTP 400") == "ok"
    return ref


def two_clinics_dead_letters(store: Store, catalog, booking_doc) -> tuple[str, str]:
    assert {"glow", "demo"} <= set(catalog.clinics)
    doc = copy.deepcopy(booking_doc)
    doc["starts_at"] = (datetime.now(UTC) + timedelta(days=30)).replace(
        microsecond=0).isoformat()
    return dead_letter(store, catalog, doc), dead_letter(store, catalog, {**doc, "clinic": "demo"})


@pytest.mark.parametrize("verb", ["purge", "replay"])
def test_an_empty_clinic_is_refused_not_every_clinic(
        redis_server, redis_client, tmp_path, catalog, booking_doc, verb):
    # `reminders purge --all --clinic "$CLINIC"` in a script with CLINIC unset: --clinic ""
    # read as "no clinic" purged (or replayed) every clinic's dead letters.
    store = Store(redis_client, "reminders")
    glow, demo = two_clinics_dead_letters(store, catalog, booking_doc)
    before = store.dead_letters()
    done = subprocess.run([str(BIN / "reminders"), verb, "--all", "--clinic", ""],
                          env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--clinic" in done.stderr and "empty" in done.stderr, done.stderr
    assert store.dead_letters() == before and {d["ref"] for d in before} == {glow, demo}
    listed = subprocess.run([str(BIN / "reminders"), "dead-letters", "--clinic", ""],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 2 and glow not in listed.stdout, listed.stdout


@pytest.mark.parametrize("verb", ["purge", "replay"])
def test_a_booking_id_names_one_clinics_dead_letters(
        redis_server, redis_client, tmp_path, catalog, booking_doc, verb):
    assert {"glow", "demo"} <= set(catalog.clinics)
    store = Store(redis_client, "reminders")
    doc = copy.deepcopy(booking_doc)
    doc["starts_at"] = (datetime.now(UTC) + timedelta(days=30)).replace(
        microsecond=0).isoformat()
    glow = dead_letter(store, catalog, doc)
    demo = dead_letter(store, catalog, {**doc, "clinic": "demo"})
    env = cli_env(redis_server.url, tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "reminders"), *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    ambiguous = cli(verb, "A-1042")
    assert ambiguous.returncode == 2 and "--clinic is required" in ambiguous.stderr, (
        ambiguous.stdout, ambiguous.stderr)
    assert {d["ref"] for d in store.dead_letters()} == {glow, demo}
    one = cli(verb, "--clinic", "glow", "A-1042")
    assert one.returncode == 0, one.stderr
    assert glow in one.stdout and demo not in one.stdout
    assert [d["ref"] for d in store.dead_letters()] == [demo]
    by_ref = cli(verb, demo)  # a REF names its clinic
    assert by_ref.returncode == 0 and demo in by_ref.stdout, by_ref.stderr
    assert store.dead_letters() == []


@pytest.mark.parametrize("command", [["purge", "--all"], ["replay", "--all"], ["dead-letters"]])
def test_a_clinic_not_configured_and_without_dead_letters_is_refused(
        redis_server, redis_client, tmp_path, catalog, booking_doc, command):
    # `reminders replay --all --clinic glwo` (a typo) answered "replayed 0 dead letter(s)",
    # exit 0: the operator took the clinic's dead letters as sent again.
    store = Store(redis_client, "reminders")
    two_clinics_dead_letters(store, catalog, booking_doc)
    before = store.dead_letters()
    done = subprocess.run([str(BIN / "reminders"), *command, "--clinic", "glwo"],
                          env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--clinic" in done.stderr and "'glwo'" in done.stderr, done.stderr
    assert done.stdout == ""
    assert store.dead_letters() == before


@pytest.mark.parametrize("how", ["--all", "booking id"])
def test_a_removed_clinics_dead_letters_can_still_be_listed_and_purged(
        redis_server, redis_client, tmp_path, catalog, booking_doc, how):
    # A clinic taken out of config/ keeps its dead letters in Redis: ops must still be
    # able to see and clear them by its id, all of them or by booking id (which was
    # refused: "unknown clinic", found by review).
    store = Store(redis_client, "reminders")
    glow, demo = two_clinics_dead_letters(store, catalog, booking_doc)
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    (config / "clinics" / "demo.toml").unlink()
    env = {**cli_env(redis_server.url, tmp_path), "REMINDERS_CONFIG_DIR": str(config)}
    listed = subprocess.run([str(BIN / "reminders"), "dead-letters", "--clinic", "demo"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and demo in listed.stdout and glow not in listed.stdout, (
        listed.stdout, listed.stderr)
    # Glow uses the same booking id: only demo's goes.
    named = ["--all"] if how == "--all" else [demo.split("/")[1]]
    purged = subprocess.run([str(BIN / "reminders"), "purge", *named, "--clinic", "demo"],
                            env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert purged.returncode == 0, (purged.stdout, purged.stderr)
    assert {d["ref"] for d in store.dead_letters()} == {glow}
