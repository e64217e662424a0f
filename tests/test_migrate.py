"""`reminders migrate`: layout-1 data written by the layout-1 store (tests/layout1.py) is
converted by the real command (a subprocess) against a real redis-server, then read by the
current store and the CLI, and served by a real worker and beat against a real SMTP sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import layout1
from tests.conftest import ROOT
from tests.e2e.conftest import (  # noqa: F401 - fixtures used by name
    e2e_config,
    make_booking,
    service,
    sms_sink,
    smtp_sink,
    wait_until,
)
from worker.catalog import Catalog
from worker.health import pump_beat
from worker.migrate import Migration
from worker.models import Booking, parse_booking
from worker.planner import Plan, plan
from worker.settings import Settings
from worker.store import Store, StoreLayoutError, _text_id, booking_contacts

PREFIX = "reminders"
HOUR = timedelta(hours=1)


def drive(old: layout1.Store, ref: str, outcome: str, now: datetime) -> None:
    """Take one reminder through the layout-1 send path: claim (first in the due set), begin,
    finish with `outcome` (sent, retry, failed, skip), or only claim it ("lease")."""
    old.redis.zadd(old.due_key, {ref: 1})
    (claim,) = old.claim_due(1, 3600)
    assert claim.ref == ref
    if outcome == "lease":
        return
    token = uuid.uuid4().hex
    assert old.begin_send(ref, claim.version, claim.claim, token, 60_000) == "ok"
    attempt = layout1.Attempt(claim.version, claim.claim, token)
    entry = {"channel": ref.rsplit(":", 1)[1]}
    if outcome == "sent":
        assert old.finish_sent(ref, attempt, datetime.now(UTC), entry) == "ok"
    elif outcome == "retry":
        assert old.finish_retry(ref, attempt, now + HOUR, "gateway answered 503", entry) == "ok"
    elif outcome == "failed":
        assert old.finish_failed(ref, attempt, "mailbox unavailable (550)", entry) == "ok"
    else:
        assert old.finish_skip(ref, attempt, "past its expiry", entry) == "ok"


def a_minute_later(client: Any) -> None:
    """The pump's claim-run keys (60 s) are gone, as a minute after the last pump run."""
    for key in client.keys(f"{PREFIX}:claimrun:*"):
        client.delete(key)


def planned(catalog: Catalog, doc: dict[str, Any], now: datetime) -> tuple[Booking, Plan]:
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], now)


def upsert(old: layout1.Store, catalog: Catalog, doc: dict[str, Any], now: datetime,
           release: bool = False) -> None:
    old.upsert(*planned(catalog, doc, now), now, release=release)


def snapshot(client: Any) -> dict[str, Any]:
    """Every key (but heartbeats and Celery's): type, value and absolute expiry (ms)."""
    out: dict[str, Any] = {}
    for key in sorted(client.keys("*")):
        # (A server secret, made once by whichever process needs it first, is not data.)
        if ":health:" in key or ":celery" in key or key.startswith("_kombu") \
                or ":secret:" in key:
            continue
        kind = client.type(key)
        value: Any
        if kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.get(key)
        out[key] = (kind, value, client.execute_command("PEXPIRETIME", key))
    return out


def dump(client: Any) -> list[tuple[str, int, bytes]]:
    out = []
    for key in client.keys("*"):
        value = client.dump(key)
        out.append((key, int(client.execute_command("PEXPIRETIME", key)), value))
    return out


def restore(client: Any, dumped: list[tuple[str, int, bytes]]) -> None:
    client.flushdb()
    for key, expires_ms, value in dumped:
        client.restore(key, max(expires_ms, 0), value, absttl=expires_ms > 0)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "reminders"), *args], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def same_view(old: dict[str, Any], new: dict[str, Any]) -> None:
    """The layout-2 timeline shows what the layout-1 one showed: every reminder's status, due
    time, attempts, sent_at, reason, expiry; the booking's status, version and hold."""
    assert new["reminders"] == old["reminders"]
    assert (new["status"], new["version"], new["hold_reason"]) == (
        old["status"], old["version"], old["hold_reason"])


def test_migrate_keeps_every_timeline_and_the_worker_sends_only_what_was_pending(
        service, e2e_config, make_booking, smtp_sink, sms_sink, redis_client):  # noqa: F811
    protocol = e2e_config / "protocols" / "quick.toml"
    # Holds recent isotretinoin; no hold notice (layout 1's planner had none to store).
    protocol.write_text('isotretinoin_washout_days = 180\nhold_template = ""\n'
                        + protocol.read_text())
    catalog = Catalog.load(Settings(config_dir=e2e_config, templates_dir=ROOT / "templates",
                                    _env_file=None))
    old = layout1.Store(redis_client, PREFIX)
    now = datetime.now(UTC)
    recent = {"isotretinoin_last_dose": (date.today() - timedelta(days=30)).isoformat()}
    # M-1: one reminder in each state; its aftercare email is the one due soon.
    upsert(old, catalog, make_booking("M-1", starts_in=4), now)
    drive(old, "e2e/M-1/confirm:email", "sent", now)
    drive(old, "e2e/M-1/prep:sms", "retry", now)
    drive(old, "e2e/M-1/prep:email", "failed", now)
    drive(old, "e2e/M-1/spf:sms", "skip", now)
    # M-2: sent, then the booking cancelled. M-3: one reminder leased (a worker died).
    upsert(old, catalog, make_booking("M-2", starts_in=3600), now)
    drive(old, "e2e/M-2/confirm:email", "sent", now)
    old.cancel("e2e", "M-2", now)
    upsert(old, catalog, make_booking("M-3", starts_in=3600), now)
    drive(old, "e2e/M-3/confirm:email", "lease", now)
    # M-4: held (isotretinoin). M-5: the same, released by the clinic; its confirmation sent.
    upsert(old, catalog, dict(make_booking("M-4", starts_in=3600), medications=recent), now)
    upsert(old, catalog, dict(make_booking("M-5", starts_in=3600), medications=recent), now,
           release=True)
    drive(old, "e2e/M-5/confirm:email", "sent", now)
    ids = ["M-1", "M-2", "M-3", "M-4", "M-5"]
    before = {b: old.timeline("e2e", b) for b in ids}
    a_minute_later(redis_client)
    assert [r["status"] for r in before["M-1"]["reminders"]] == [
        "sent", "failed", "scheduled", "skipped", "retrying"]  # by due time
    assert before["M-2"]["status"] == "cancelled" and before["M-4"]["status"] == "held"
    assert redis_client.get(f"{PREFIX}:layout") is None  # layout 1 had no such key

    # The current version refuses layout 1 and names the command.
    with pytest.raises(StoreLayoutError, match="store layout 1 .*`reminders migrate`"):
        Store(redis_client, PREFIX).timeline("e2e", "M-1")
    # A dry run reports and writes nothing.
    stored = snapshot(redis_client)
    dry = service.cli("migrate", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would convert 5 bookings" in dry.stdout
    assert "dry run: nothing was written" in dry.stdout
    assert snapshot(redis_client) == stored

    started = time.monotonic()
    done = service.cli("migrate")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr + done.stdout
    assert "converted 5 bookings; 0 converted before; 0 not convertible" in done.stdout
    counts = Counter(r["status"] for t in before.values() for r in t["reminders"])
    assert counts == {"scheduled": 14, "cancelled": 4, "sent": 3, "sending": 1, "retrying": 1,
                      "failed": 1, "skipped": 1}
    assert ("reminders converted: cancelled 4, failed 1, retrying 1, scheduled 14, sending 1, "
            "sent 3, skipped 1 (dead letters 1)") in done.stdout, done.stdout
    assert redis_client.get(f"{PREFIX}:layout") == "2"
    for pattern in ("k", "r", "v1:b"):
        assert not redis_client.keys(f"{PREFIX}:{pattern}:*")
    store = Store(redis_client, PREFIX)
    same_view(before["M-1"], service.show("M-1"))  # the command line (each run ~1 s or more)
    for b in ids:
        same_view(before[b], store.timeline("e2e", b))
        assert store.bookings_for_contact("e2e", email=f"{b.lower()}@example.com") == [b]
    # The due, lease and dead sets are as they were (members, scores): the retry due in an
    # hour, the lease held, the dead letter.
    migrated = snapshot(redis_client)
    for zset in ("due", "lease", "dead"):
        assert migrated[f"{PREFIX}:{zset}"] == stored[f"{PREFIX}:{zset}"]
    assert redis_client.zscore(f"{PREFIX}:due", "e2e/M-1/prep:sms") > time.time() + 3000
    assert redis_client.zscore(f"{PREFIX}:lease", "e2e/M-3/confirm:email") is not None
    assert [d["ref"] for d in store.dead_letters()] == ["e2e/M-1/prep:email"]
    # The reviewed medications are still the reviewed ones: booking M-5 again holds nothing
    # and changes nothing (its version stays).
    again = store.upsert(*planned(catalog, json.loads(redis_client.get(f"{PREFIX}:d:e2e/M-5")),
                                  datetime.now(UTC)), datetime.now(UTC))
    assert (again["status"], again["version"]) == ("scheduled", before["M-5"]["version"])

    # A second run changes nothing.
    migrated = snapshot(redis_client)
    second = service.cli("migrate")
    assert second.returncode == 0, second.stderr
    assert "nothing to migrate" in second.stdout
    assert snapshot(redis_client) == migrated

    # A real worker and beat: only the pending aftercare email goes; nothing sent goes again.
    service.up()
    wait_until(lambda: any("aftercare" in (m.subject or "").lower() or m.to == "m-1@example.com"
                           for m in smtp_sink.snapshot()), 40)
    wait_until(lambda: {r["id"]: r for r in store.timeline("e2e", "M-1")["reminders"]}
               ["aftercare:email"]["status"] == "sent", 20)
    time.sleep(2)  # a few pump runs more: nothing else is due
    assert [m.to for m in smtp_sink.snapshot()] == ["m-1@example.com"]
    assert sms_sink.snapshot() == []
    after = {r["id"]: r for r in service.show("M-1")["reminders"]}
    was = {r["id"]: r for r in before["M-1"]["reminders"]}
    assert after["aftercare:email"]["attempts"] == 1
    for key in ("confirm:email", "prep:sms", "prep:email", "spf:sms"):
        assert after[key] == was[key]
    print(f"migrated 5 bookings in {took:.2f}s (the command, start-up included)")


def test_migrate_refuses_while_a_worker_runs(redis_server, redis_client, catalog,
                                               booking_doc):
    env = _env(redis_server)
    old = layout1.Store(redis_client, PREFIX)
    now = datetime.now(UTC)
    upsert(old, catalog, _soon(booking_doc, "A-1", now), now)
    drive(old, "glow/A-1/booking-confirmation:email", "sent", now)
    before = old.timeline("glow", "A-1")
    # A layout-1 pump (it has no heartbeat) claimed within the last minute.
    refused = cli(env, "migrate")
    assert refused.returncode == 1
    assert "a pump claimed within the last minute" in refused.stderr
    a_minute_later(redis_client)
    pump_beat(redis_client, PREFIX, 0.01)  # a layout-2 worker's pump ran just now
    stored = snapshot(redis_client)
    refused = cli(env, "migrate")
    assert refused.returncode == 1
    assert "a pump run" in refused.stderr and "--force" in refused.stderr
    assert snapshot(redis_client) == stored
    forced = cli(env, "migrate", "--force", "--keep-old")
    assert forced.returncode == 0, forced.stderr
    assert "warning: a worker or beat seems to be running" in forced.stderr
    assert redis_client.get(f"{PREFIX}:layout") == "2"
    # --keep-old: the layout-1 keys stay, the old booking hash beside the new one.
    assert redis_client.hget(f"{PREFIX}:v1:b:glow/A-1", "doc")
    assert redis_client.exists(f"{PREFIX}:k:glow/A-1")
    same_view(before, Store(redis_client, PREFIX).timeline("glow", "A-1"))


def test_an_interrupted_migration_run_again_ends_as_one_run(redis_server, redis_client,
                                                              catalog, booking_doc):
    env = _env(redis_server)
    old = layout1.Store(redis_client, PREFIX)
    now = datetime.now(UTC)
    ids = [f"A-{n}" for n in range(1, 7)]
    docs = {b: _soon(booking_doc, b, now) for b in ids}
    # two days ahead, the pause message goes now: less than the protocol's minimum.
    docs["A-6"]["starts_at"] = (now + timedelta(days=2)).isoformat()
    for b in ids:
        upsert(old, catalog, docs[b], now)
    drive(old, "glow/A-2/booking-confirmation:email", "sent", now)
    drive(old, "glow/A-3/booking-confirmation:email", "failed", now)
    old.cancel("glow", "A-4", now)
    a_minute_later(redis_client)
    before = {b: old.timeline("glow", b) for b in ids}
    # The contact-id secret exists before the dump (a restore must not make a second one).
    Store(redis_client, PREFIX).contact_secret  # noqa: B018
    dumped = dump(redis_client)

    whole = cli(env, "migrate")
    assert whole.returncode == 0, whole.stderr
    one_run = snapshot(redis_client)
    restore(redis_client, dumped)
    crashed = cli(env, "migrate", "--crash-after", "2")
    assert crashed.returncode == 75, crashed.stderr
    assert redis_client.get(f"{PREFIX}:layout") is None  # not every booking is converted
    assert redis_client.keys(f"{PREFIX}:k:*")
    again = cli(env, "migrate")
    assert again.returncode == 0, again.stderr
    assert "converted 4 bookings; 2 converted before; 0 not convertible" in again.stdout
    assert snapshot(redis_client) == one_run
    store = Store(redis_client, PREFIX)
    for b in ids:
        same_view(before[b], store.timeline("glow", b))
    # Fields layout 2 gained, as its upsert fills them: the protocol's notice steps, the
    # patient's contacts, the late pause (A-6 only, as the planner finds it).
    for b in ids:
        fields = redis_client.hgetall(f"{PREFIX}:b:glow/{b}")
        ns = redis_client.hget(f"{PREFIX}:t", fields["ns"])
        assert ns == catalog.protocols["microneedling"].notice_steps()
        assert fields["contacts"] == booking_contacts(parse_booking(docs[b], catalog),
                                                     store.contact_secret)
        assert "doc" not in fields
        assert (fields.get("late_pause") == "1") == bool(planned(catalog, docs[b], now)[1]
                                                          .late_pause) == (b == "A-6")
    # With its notice steps, a cancel after the migration tells the patient whose invite
    # went out (A-2's confirmation was sent under layout 1).
    cancelled = store.cancel("glow", "A-2", datetime.now(UTC))
    assert [r["id"] for r in cancelled["reminders"] if r["id"].startswith("cancelled#")]


def test_a_booking_it_cannot_convert_is_named_and_the_layout_stays_unset(
        redis_server, redis_client, catalog, booking_doc):
    env = _env(redis_server)
    old = layout1.Store(redis_client, PREFIX)
    now = datetime.now(UTC)
    for b in ("A-1", "A-2"):
        upsert(old, catalog, _soon(booking_doc, b, now), now)
    doc = json.loads(redis_client.hget(f"{PREFIX}:b:glow/A-2", "doc"))
    doc["patient"]["timezone"] = "Mars/Base"
    redis_client.hset(f"{PREFIX}:b:glow/A-2", "doc", json.dumps(doc))
    result = cli(env, "migrate")
    assert result.returncode == 1
    assert "not converted: glow/A-2: its document does not validate as a booking now " \
           "(patient.timezone: " in result.stdout
    assert "reminders:layout not set" in result.stdout
    assert redis_client.get(f"{PREFIX}:layout") is None
    assert "doc" not in redis_client.hgetall(f"{PREFIX}:b:glow/A-1")  # converted, kept
    assert redis_client.keys(f"{PREFIX}:r:*")  # nothing deleted
    assert "+34600111222" not in result.stdout + result.stderr


def _env(redis_server: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_CONFIG_DIR=str(ROOT / "config"),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"))
    return env


def _soon(doc: dict[str, Any], booking_id: str, now: datetime) -> dict[str, Any]:
    return dict(doc, booking_id=booking_id, starts_at=(now + timedelta(days=10)).isoformat())


def test_a_change_between_read_and_write_and_a_text_id_collision_are_read_again(
        redis_client, catalog, booking_doc):
    """Forced: a layout-1 worker's send lands after the migration read the booking and before
    its script (the script finds the hash changed and the booking is read again), and another
    text already holds the id of the protocol's notice steps in P:t (a longer id is taken)."""
    old = layout1.Store(redis_client, PREFIX)
    now = datetime.now(UTC)
    for b in ("A-1", "A-2"):
        upsert(old, catalog, _soon(booking_doc, b, now), now)
    ns = catalog.protocols["microneedling"].notice_steps()
    taken = _text_id(ns, Store.TEXT_ID_LENGTH)
    redis_client.hset(f"{PREFIX}:t", taken, "other words")

    class Racing(Migration):
        raced = False

        def _prepare_many(self, bookings):  # type: ignore[no-untyped-def]
            out = super()._prepare_many(bookings)
            if not Racing.raced:
                Racing.raced = True
                drive(old, "glow/A-2/booking-confirmation:email", "sent", now)
            return out

    report = Racing(redis_client, PREFIX, catalog).run()
    assert Racing.raced and report.ok and len(report.converted) == 2
    assert report.reminders["sent"] == 1
    store = Store(redis_client, PREFIX)
    for b in ("A-1", "A-2"):
        fields = redis_client.hgetall(f"{PREFIX}:b:glow/{b}")
        assert fields["ns"] != taken and redis_client.hget(f"{PREFIX}:t", fields["ns"]) == ns
        timeline = store.timeline("glow", b)
        assert {r["id"]: r["status"] for r in timeline["reminders"]}[
            "booking-confirmation:email"] == ("sent" if b == "A-2" else "scheduled")
    assert redis_client.hget(f"{PREFIX}:t", taken) == "other words"


def test_migrate_on_a_live_store_already_at_layout_2_is_a_no_op_not_a_refusal(
        redis_server, redis_client, catalog, booking_doc):
    """A deploy that runs `reminders migrate` every time (idempotent, as the README says) meets
    the service running on a store at layout 2: there is nothing to convert, so nothing to
    stop the workers for. It says so and exits 0, writing nothing, without --force."""
    env = _env(redis_server)
    now = datetime.now(UTC)
    store = Store(redis_client, PREFIX)
    store.upsert(*planned(catalog, _soon(booking_doc, "L2-1", now), now), now)
    assert redis_client.get(f"{PREFIX}:layout") == "2"
    pump_beat(redis_client, PREFIX, 0.01)  # the live worker's pump ran just now
    stored = snapshot(redis_client)
    done = cli(env, "migrate")
    assert done.returncode == 0, done.stderr
    assert "nothing to migrate" in done.stdout and "refused" not in done.stderr, done
    assert snapshot(redis_client) == stored
