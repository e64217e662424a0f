"""Retention: a booking's keys expire after its last reminder; dead letters stay until
replayed or purged; `reminders stats`, `purge`. Real Redis, real CLI.

The bookings here are relative to the real today, planned at the real now: Redis expires
keys by its own (real) clock, so a booking at fixed dates would have its keys expire the
moment they are written once its last reminder plus the retention has passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from tests.conftest import ROOT
from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from tests.test_redis_durability import redis_with, services  # noqa: F401 (fixtures)
from worker.models import parse_booking
from worker.planner import plan
from worker.settings import Settings
from worker.store import Attempt, Store, connect

DAY = 86400
MADRID = ZoneInfo("Europe/Madrid")


def soon(doc: dict[str, Any]) -> dict[str, Any]:
    """DESIGN.md's booking with its visit at 14:30 Madrid 14 days from today (as 5 Dec is
    from the example's 21 Nov): every reminder of it is still ahead."""
    day = (datetime.now(MADRID) + timedelta(days=14)).date()
    starts = datetime(day.year, day.month, day.day, 14, 30, tzinfo=MADRID)
    return dict(doc, starts_at=starts.isoformat())


def book(store, catalog, doc):
    """Plan and store `soon(doc)` now (the real now, Redis's clock)."""
    booking = parse_booking(soon(doc), catalog)
    now = datetime.now(UTC)
    planned = plan(booking, catalog.protocols[booking.treatment],
                   catalog.clinics[booking.clinic], now)
    return store.upsert(booking, planned, now), planned


def booking_keys(store, clinic="glow", booking_id="A-1042"):
    """Every key a booking has before any attempt: its hash (with all its reminders) and its
    document."""
    return [store.booking_key(clinic, booking_id), store.doc_key(clinic, booking_id)]


def test_every_key_of_a_booking_expires_retention_after_its_last_reminder(
        redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=90)
    _, planned = book(store, catalog, booking_doc)
    last = max(r.due_at.timestamp() for r in planned.reminders)
    for key in booking_keys(store):
        assert abs(redis_client.expiretime(key) - (last + 90 * DAY)) <= 1, key
    assert redis_client.zscore(store.bookings_key("glow"), "A-1042") == redis_client.expiretime(
        store.booking_key("glow", "A-1042"))


def test_a_dead_letter_keeps_its_booking_until_replayed_or_purged(
        redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=90)
    book(store, catalog, booking_doc)
    ref = "glow/A-1042/booking-confirmation:email"
    redis_client.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    attempt = Attempt(claim.version, claim.claim, "tok")
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    assert store.finish_failed(ref, attempt, "permanent failure: SMTP 550") == "ok"
    for key in booking_keys(store) + [store.attempts_key(ref)]:
        assert redis_client.ttl(key) == -1, key  # kept: no expiry while a dead letter waits
    assert store.purge([ref], datetime.now(UTC)) == [ref]
    assert store.dead_letters() == []
    assert store.record(ref)["status"] == "failed"
    assert store.record(ref)["reason"].startswith("purged from the dead letters")
    for key in booking_keys(store):
        assert redis_client.ttl(key) > 89 * DAY, key


def test_a_sent_ledger_expires_with_its_booking_but_a_held_one_keeps_its_own_ttl(
        redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=90)
    book(store, catalog, booking_doc)
    refs = ["glow/A-1042/booking-confirmation:email", "glow/A-1042/stop-retinoids:sms"]
    for ref in refs:
        redis_client.zadd(store.due_key, {ref: 0})
    claims = {c.ref: c for c in store.claim_due(50, 60)}
    for ref in refs:
        assert store.begin_send(ref, claims[ref].version, claims[ref].claim, "t" + ref,
                                60_000) == "ok"
    sent = Attempt(claims[refs[0]].version, claims[refs[0]].claim, "t" + refs[0])
    assert store.finish_sent(refs[0], sent, datetime.now(UTC)) == "ok"
    assert redis_client.ttl(store.ledger_key(refs[0])) > 89 * DAY
    assert 0 < redis_client.pttl(store.ledger_key(refs[1])) <= 60_000  # still in flight


def reminders_cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_url, REMINDERS_KEY_PREFIX="reminders",
               REMINDERS_CONFIG_DIR=str(ROOT / "config"),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"))
    return subprocess.run([str(Path(sys.executable).parent / "reminders"), *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_stats_and_purge_commands(redis_server, redis_client, catalog, booking_doc):
    store = Store(redis_client, "reminders")
    timeline, _ = book(store, catalog, booking_doc)
    ref = "glow/A-1042/booking-confirmation:email"
    redis_client.zadd(store.due_key, {ref: 0})
    # It alone (due at 0, the first): a wider claim would lease any other reminder already
    # due by Redis's clock too.
    (claim,) = store.claim_due(1, 60)
    assert claim.ref == ref
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"), "permanent: HTTP 400")

    stats = json.loads(reminders_cli("stats", "--json", redis_url=redis_server.url).stdout)
    n = len(timeline["reminders"])
    assert stats == {"retention_days": 90.0, "bookings": {"glow": 1}, "bookings_total": 1,
                     "reminders_kept": n, "attempt_logs": 1, "ledger_entries": 0,
                     "due": n - 1, "leased": 0, "dead_letters": 1}
    text = reminders_cli("stats", redis_url=redis_server.url).stdout
    assert "bookings kept: 1" in text and "dead letters 1" in text

    missing = reminders_cli("purge", "glow/A-1042/nope", redis_url=redis_server.url)
    assert missing.returncode == 1 and "not dead-lettered: glow/A-1042/nope" in missing.stderr
    assert reminders_cli("purge", redis_url=redis_server.url).returncode == 2
    done = reminders_cli("purge", "--json", "--clinic", "glow", "A-1042",
                         redis_url=redis_server.url)
    assert json.loads(done.stdout) == {"purged": [ref]}
    assert store.dead_letters() == []


# Review (retention): a cancelled booking kept its keys (the patient's name, phone and email
# in its document, the contact index) until `retention` after the visit it no longer has:
# every write of retention only ever lengthened it. A tretinoin start booked ten months
# ahead and cancelled today kept the patient's details for thirteen months, not for the
# retention after its last reminder (the cancel, or the notice of it). Real Redis (the keys'
# expiry as Redis holds it), a real `reminders cancel` process.
def test_a_cancelled_booking_is_kept_retention_after_the_cancel_not_after_its_old_visit(
        redis_server, redis_client, catalog, booking_doc):
    store = Store(redis_client, "reminders", retention_days=90)
    day = (datetime.now(MADRID) + timedelta(days=300)).date()
    far = dict(booking_doc, starts_at=datetime(day.year, day.month, day.day, 14, 30,
                                               tzinfo=MADRID).isoformat())
    booking = parse_booking(far, catalog)
    now = datetime.now(UTC)
    store.upsert(booking, plan(booking, catalog.protocols[booking.treatment],
                               catalog.clinics[booking.clinic], now), now)
    # Its confirmation went out: an attempt log and a sent ledger, and a notice of the cancel.
    ref = "glow/A-1042/booking-confirmation:email"
    redis_client.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    assert store.finish_sent(ref, Attempt(claim.version, claim.claim, "tok"),
                             datetime.now(UTC)) == "ok"
    assert redis_client.ttl(store.booking_key("glow", "A-1042")) > 300 * DAY
    done = reminders_cli("cancel", "A-1042", "--clinic", "glow", redis_url=redis_server.url)
    assert done.returncode == 0, done.stderr
    assert store.timeline("glow", "A-1042")["status"] == "cancelled"
    cancelled = datetime.now(UTC).timestamp()
    contacts = [k for k in redis_client.scan_iter("reminders:c:glow/*")]
    assert contacts
    keys = [*booking_keys(store), store.attempts_key(ref), store.ledger_key(ref), *contacts]
    for key in keys:
        at = redis_client.expiretime(key)
        assert cancelled + 89 * DAY < at <= cancelled + 93 * DAY, (key, (at - cancelled) / DAY)
    assert redis_client.zscore(store.bookings_key("glow"), "A-1042") == redis_client.expiretime(
        store.booking_key("glow", "A-1042"))


def least_retention_days() -> int:
    """The shortest REMINDERS_RETENTION_DAYS the settings take (whole days)."""
    for days in range(1, 400):
        try:
            Settings(_env_file=None, retention_days=days)
        except ValidationError:
            continue
        return days
    raise AssertionError("no retention accepted")


def time_passes_to(redis_client, when: float) -> None:
    """Redis's expiries as of `when` (epoch seconds, ahead of now): every key whose expiry
    is by then expires; the others are kept, as they would be."""
    for key in redis_client.scan_iter("*"):
        if 0 < redis_client.expiretime(key) <= when:
            redis_client.pexpire(key, 1)
    time.sleep(0.05)


# Review (retention): REMINDERS_RETENTION_DAYS took any value from 1 day, but the weekly SMS
# cap reads a patient's SMS from the records of their bookings, which expire `retention`
# after each booking's last reminder. Below a week (and a day for the patient's zone: the
# store's CAPS_REACH), a booking stored once the patient's previous one has expired shares a
# week with SMS the cap no longer sees: the patient gets more SMS than "3 in any 7 days".
# Real Redis (keys expiring by their own expiry times), the real planner and store: the
# patient's second booking arrives the moment the first's records expire, at the least
# retention the settings take, and is capped as if the first were still kept.
def test_the_sms_cap_counts_an_expired_booking_s_sms_at_the_least_retention_taken(
        redis_client, catalog, booking_doc):
    days = least_retention_days()
    short = Store(redis_client, "short", retention_days=days)
    kept = Store(redis_client, "kept", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    first = parse_booking(soon(booking_doc), catalog)  # visit in 14 days, its SMS to come
    now = datetime.now(UTC)
    planned = plan(first, catalog.protocols[first.treatment], catalog.clinics["glow"], now)
    for store in (short, kept):
        store.upsert(first, planned, now)
    sms = sorted(r.due_at for r in planned.reminders
                 if r.channel == "sms" and r.status == "scheduled")
    assert len(sms) >= 3, sms
    gone = redis_client.expiretime(short.booking_key("glow", "A-1042"))
    time_passes_to(redis_client, gone + 1)
    assert not redis_client.exists(short.booking_key("glow", "A-1042"))  # expired
    assert redis_client.exists(kept.booking_key("glow", "A-1042"))

    # Booked the moment the first's records are gone: its visit two days later.
    later = datetime.fromtimestamp(gone + 60, UTC)
    day = (later.astimezone(MADRID) + timedelta(days=2)).date()
    doc = dict(booking_doc, booking_id="A-2000", starts_at=datetime(
        day.year, day.month, day.day, 14, 30, tzinfo=MADRID).isoformat())
    second = parse_booking(doc, catalog)
    planned = plan(second, catalog.protocols[second.treatment], catalog.clinics["glow"], later)
    timelines = [store.upsert(second, planned, later) for store in (short, kept)]

    def sms_of(timeline):
        return [(r["id"], r["status"], r["due_at"]) for r in timeline["reminders"]
                if r["channel"] == "sms"]

    assert sms_of(timelines[0]) == sms_of(timelines[1]), (
        f"with REMINDERS_RETENTION_DAYS={days}, the first booking's SMS ({sms}) were no "
        "longer counted by the cap")


# `reminders stats` pruned each clinic's booking index (expired members) by the host's
# clock as it counted: a write, so on a read-only replica (where ops run reports, off the
# master) it failed with READONLY and printed nothing. And since only `stats` pruned it,
# the index of a clinic whose operators never ran it grew by one member per booking ever
# made. Now stats only reads (counted by Redis's clock), and storing a booking removes a
# few expired members of its clinic's index. Real master and replica redis-servers, the
# real `reminders stats` process.
def replica_of(start_redis, master_url: str):
    host, port = master_url.removeprefix("redis://").split("/")[0].split(":")
    url = start_redis("--replicaof", host, port)
    replica = connect(url)
    deadline = time.monotonic() + 30
    while replica.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.1)
    return url, replica


def caught_up(master, replica) -> None:
    master.set("probe:sync", str(time.time()))
    expected = master.get("probe:sync")
    deadline = time.monotonic() + 10
    while replica.get("probe:sync") != expected:
        assert time.monotonic() < deadline, "the replica fell behind"
        time.sleep(0.05)


def test_stats_reads_a_read_only_replica(redis_with, catalog, booking_doc):  # noqa: F811
    master_url = redis_with()
    master = connect(master_url)
    store = Store(master, "reminders")
    timeline, _ = book(store, catalog, booking_doc)
    master.zadd(store.bookings_key("glow"), {"GONE-1": time.time() - DAY})  # keys expired
    url, replica = replica_of(redis_with, master_url)
    caught_up(master, replica)

    done = reminders_cli("stats", "--json", redis_url=url)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads(done.stdout)
    assert stats["bookings"] == {"glow": 1} and stats["bookings_total"] == 1
    assert stats["reminders_kept"] == len(timeline["reminders"])
    # The same figures as on the master, and the master's index untouched by reading it.
    assert json.loads(reminders_cli("stats", "--json", redis_url=master_url).stdout) == stats
    assert master.zscore(store.bookings_key("glow"), "GONE-1") is not None


def test_storing_a_booking_prunes_expired_members_of_its_clinics_index(
        redis_server, redis_client, catalog, booking_doc):
    store = Store(redis_client, "reminders")
    index = store.bookings_key("glow")
    gone = {f"GONE-{i}": time.time() - DAY - i for i in range(3)}
    redis_client.zadd(index, gone)
    redis_client.zadd(store.bookings_key("demo"), {"OTHER-GONE": time.time() - DAY})
    book(store, catalog, booking_doc)
    assert sorted(redis_client.zrange(index, 0, -1)) == ["A-1042"]
    # Another clinic's index is that clinic's writes' to prune.
    assert redis_client.zrange(store.bookings_key("demo"), 0, -1) == ["OTHER-GONE"]
    # A booking stored again (unchanged, or changed) prunes too.
    redis_client.zadd(index, gone)
    book(store, catalog, dict(booking_doc, patient={**booking_doc["patient"], "name": "Ana M."}))
    assert sorted(redis_client.zrange(index, 0, -1)) == ["A-1042"]
