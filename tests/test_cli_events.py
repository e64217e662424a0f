"""`reminders events dead|replay`: clinic events given up after webhook_max_attempts are
listed (no contact data) and sent again, as real CLI processes on a real Redis, the events
delivered, signed, to a real webhook receiver: endpoint down -> given up -> endpoint up ->
replay -> delivered once. A given-up event that expired leaves the list.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.sinks import WebhookReceiver
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store
from worker.webhooks import Events, deliver_event, pump_events

BIN = Path(sys.executable).parent
PREFIX = "reminders"
SECRET = "whsec-events-cli-0123456789"
pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(SECRET).start()
    yield r
    r.stop()


@pytest.fixture
def config(tmp_path: Path, receiver: WebhookReceiver) -> Path:
    """The repository's config (clinics glow and demo), each with a webhook to `receiver`."""
    folder = tmp_path / "config"
    shutil.copytree(ROOT / "config", folder)
    for clinic in ("glow", "demo"):
        with (folder / "clinics" / f"{clinic}.toml").open("a", encoding="utf-8") as f:
            f.write(f'\n[webhook]\nurl = "{receiver.url}"\nsecret = "${{HOOK_SECRET}}"\n')
    return folder


@pytest.fixture
def settings(config: Path, tmp_path: Path, monkeypatch) -> Settings:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    return Settings(config_dir=config, templates_dir=ROOT / "templates", data_dir=tmp_path,
                    webhook_max_attempts=2, webhook_timeout_seconds=5, _env_file=None)


def cli_env(url: str, tmp_path: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=url, REMINDERS_DATA_DIR=str(tmp_path),
               REMINDERS_CONFIG_DIR=str(config), REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
               HOOK_SECRET=SECRET)
    return env


def hold(store: Store, catalog: Catalog, doc: dict[str, Any], clinic: str) -> None:
    """Store a booking of `clinic` that is held: its `booking.held` event is written."""
    doc = copy.deepcopy(doc) | {"clinic": clinic}
    doc["starts_at"] = (datetime.now(UTC) + timedelta(days=30)).replace(
        microsecond=0).isoformat()
    dose = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    doc["medications"] = {"tretinoin": True, "isotretinoin_last_dose": dose}
    booking = parse_booking(doc, catalog)
    now = datetime.now(UTC)
    timeline = store.upsert(booking, plan(booking, catalog.protocols[booking.treatment],
                                          catalog.clinics[clinic], now), now)
    assert timeline["status"] == "held"


def deliver_all(events: Events, catalog: Catalog, settings: Settings) -> list[str]:
    """Deliver every waiting event now (backoff skipped) until none waits; the outcomes."""
    outcomes: list[str] = []
    renderer = Renderer(settings.templates_dir)
    for _ in range(10):
        waiting = events.pending()
        if not waiting:
            return outcomes
        events.redis.zadd(events.due_key, {e.id: 0 for e in waiting})
        pump_events(events, lambda event_id, claim: outcomes.append(deliver_event(
            events, event_id, claim, clinics=catalog.clinics, renderer=renderer,
            settings=settings)), batch=100, lease_seconds=30)
    raise AssertionError(f"events still waiting: {events.pending()}")


def test_given_up_events_are_listed_and_replayed_once_the_endpoint_is_back(
        redis_server, redis_client, tmp_path, settings, config, receiver, booking_doc):
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX, hooks=lambda clinic: "booking.held")
    events = Events(redis_client, PREFIX, retention_days=settings.retention_days)
    hold(store, catalog, booking_doc, "glow")
    hold(store, catalog, booking_doc, "demo")  # the same booking id at another clinic
    glow_id, demo_id = (e.id for e in events.pending())

    receiver.status = 503  # the clinics' endpoint is down
    outcomes = deliver_all(events, catalog, settings)
    assert outcomes.count("given up: webhook answered HTTP 503") == 2, outcomes
    assert len(receiver.snapshot()) == 4  # two attempts each

    env = cli_env(redis_server.url, tmp_path, config)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "reminders"), "events", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    listed = cli("dead")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2, listed.stdout
    for line, (clinic, event_id) in zip(lines, (("glow", glow_id), ("demo", demo_id)),
                                        strict=True):
        assert line.split()[:4] == [f"ev:{event_id}", clinic, "booking.held", "A-1042"], line
        assert "attempts=2" in line and "webhook answered HTTP 503" in line
    # No contact data, in either form.
    as_json = cli("dead", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [(r["id"], r["ref"], r["clinic"], r["type"], r["booking_id"], r["attempts"])
            for r in rows] == [(glow_id, f"ev:{glow_id}", "glow", "booking.held", "A-1042", 2),
                               (demo_id, f"ev:{demo_id}", "demo", "booking.held", "A-1042", 2)]
    assert rows[0]["reason"] == "webhook answered HTTP 503" and rows[0]["given_up_at"]
    patient = booking_doc["patient"]
    for out in (listed.stdout, as_json.stdout):
        assert patient["phone"] not in out and patient["email"] not in out
        assert patient["name"] not in out
    only = cli("dead", "--clinic", "demo")
    assert only.returncode == 0 and only.stdout.split()[0] == f"ev:{demo_id}", only.stdout
    assert len(only.stdout.splitlines()) == 1
    unknown = cli("dead", "--clinic", "nope")
    assert unknown.returncode == 2 and "--clinic" in unknown.stderr, unknown.stderr

    # A bare booking id names one clinic's: --clinic, as `replay` of dead letters.
    ambiguous = cli("replay", "A-1042")
    assert ambiguous.returncode == 2 and "--clinic is required" in ambiguous.stderr, (
        ambiguous.stdout, ambiguous.stderr)
    nothing = cli("replay")
    assert nothing.returncode == 2 and "--all" in nothing.stderr
    missing = cli("replay", "ev:999999")
    assert missing.returncode == 1 and "ev:999999" in missing.stderr
    assert len(events.dead()) == 2  # refused: nothing replayed

    receiver.status = 200  # back up
    before = len(receiver.snapshot())
    one = cli("replay", "--clinic", "glow", "A-1042")
    assert one.returncode == 0, one.stderr
    assert f"ev:{glow_id}" in one.stdout and f"ev:{demo_id}" not in one.stdout
    assert events.dead() == [demo_id]
    assert deliver_all(events, catalog, settings) == ["delivered"]
    by_ref = cli("replay", f"ev:{demo_id}")  # an event's ref names its clinic
    assert by_ref.returncode == 0 and f"ev:{demo_id}" in by_ref.stdout, by_ref.stderr
    assert deliver_all(events, catalog, settings) == ["delivered"]
    got = [h for h in receiver.snapshot()[before:]]
    assert all(h.valid for h in got)
    assert sorted(h.json()["id"] for h in got) == sorted([glow_id, demo_id])  # once each
    assert {h.json()["clinic"] for h in got} == {"glow", "demo"}
    assert events.dead() == [] and events.pending() == []
    assert cli("dead").stdout.strip() == "no given-up clinic events"
    again = cli("replay", f"ev:{demo_id}")  # delivered: not given up any more
    assert again.returncode == 1, again.stdout


def test_replay_all_of_one_clinic(redis_server, redis_client, tmp_path, settings, config,
                                  receiver, booking_doc):
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX, hooks=lambda clinic: "booking.held")
    events = Events(redis_client, PREFIX, retention_days=settings.retention_days)
    hold(store, catalog, booking_doc, "glow")
    hold(store, catalog, dict(booking_doc, booking_id="B-7"), "glow")
    hold(store, catalog, booking_doc, "demo")
    receiver.status = 500
    deliver_all(events, catalog, settings)
    assert len(events.dead()) == 3
    receiver.status = 200
    done = subprocess.run([str(BIN / "reminders"), "events", "replay", "--all", "--clinic",
                           "glow", "--json"], env=cli_env(redis_server.url, tmp_path, config),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["replayed"]) == 2
    assert deliver_all(events, catalog, settings) == ["delivered", "delivered"]
    (left,) = events.dead()
    assert Events(redis_client, PREFIX).pending() == []
    assert redis_client.hget(f"{PREFIX}:ev:{left}", "clinic") == "demo"


def test_given_up_events_that_expired_leave_the_list(redis_client, settings, receiver,
                                                     booking_doc):
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX, hooks=lambda clinic: "booking.held")
    events = Events(redis_client, PREFIX, retention_days=1)
    hold(store, catalog, booking_doc, "glow")
    receiver.status = 503
    deliver_all(events, catalog, settings)
    (old,) = events.dead()
    assert redis_client.ttl(f"{PREFIX}:ev:{old}") > 86_000  # kept `retention`, then expires
    # Its hash expired: the listing drops it.
    redis_client.pexpire(f"{PREFIX}:ev:{old}", 1)
    time.sleep(0.05)
    assert events.dead_events() == [] and events.dead() == []
    # One given up longer ago than the retention: trimmed when another is given up.
    hold(store, catalog, dict(booking_doc, booking_id="B-1"), "glow")
    deliver_all(events, catalog, settings)
    (older,) = events.dead()
    redis_client.persist(f"{PREFIX}:ev:{older}")
    redis_client.zadd(events.dead_key, {older: time.time() - 86_400 - 60})
    hold(store, catalog, dict(booking_doc, booking_id="B-2"), "glow")
    deliver_all(events, catalog, settings)
    (newer,) = events.dead()
    assert newer != older


def test_given_up_events_are_listed_with_their_clinic_removed_or_config_broken(
        redis_server, redis_client, tmp_path, settings, config, receiver, booking_doc):
    # `events dead` read config/ first, for nothing: it exited 3 while config/ did not
    # load (a bad edit the running services survive, as `dead-letters` lists on), and
    # `--clinic X` refused a clinic removed from config/ whose given-up events are still
    # there ("unknown clinic", exit 2; `dead-letters --clinic` lists such a clinic's).
    # A clinic neither configured nor with given-up events is refused as before.
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX, hooks=lambda clinic: "booking.held")
    events = Events(redis_client, PREFIX, retention_days=settings.retention_days)
    hold(store, catalog, booking_doc, "demo")
    (demo_id,) = (e.id for e in events.pending())
    receiver.status = 503
    assert deliver_all(events, catalog, settings)[-1] == "given up: webhook answered HTTP 503"
    env = cli_env(redis_server.url, tmp_path, config)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "reminders"), "events", *args],
                              env=env | {"PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    (config / "clinics" / "demo.toml").unlink()  # removed
    only = cli("dead", "--clinic", "demo")
    assert only.returncode == 0, only.stderr
    assert only.stdout.split()[:2] == [f"ev:{demo_id}", "demo"], only.stdout
    typo = cli("dead", "--clinic", "dem")
    assert typo.returncode == 2 and "unknown clinic 'dem'" in typo.stderr, typo.stderr

    (config / "clinics" / "glow.toml").write_text("name = [\n", encoding="utf-8")  # broken
    for args in (("dead",), ("dead", "--clinic", "demo")):
        listed = cli(*args)
        assert listed.returncode == 0, (args, listed.stderr)
        assert listed.stdout.split()[:2] == [f"ev:{demo_id}", "demo"], listed.stdout
    other = cli("dead", "--clinic", "glow")  # none of it: whether it exists needs config/
    assert other.returncode == 3 and "glow.toml" in other.stderr, other.stderr
