"""`reminders check --redis`: reminders still to be sent that name a clinic or protocol
config/ no longer has (its file deleted by mistake, or left out of a deploy). Their sends
fail as 'not configured', are retried with backoff and dead-lettered after max_attempts
(commit 7dd0e67); `check` said 'ok' all the while, as it reads config/ only. With --redis
it names each such file, with how many reminders and bookings, as an error (exit 3).

Real `reminders check` processes, a real Redis holding bookings the store wrote (one
reminder claimed by the pump's claim: in the lease set).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import EXAMPLE_BOOKING, ROOT
from tests.test_check import EXIT_CONFIG, EXIT_OK, run_check
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.settings import Settings
from worker.store import Store


def store_bookings(config: Path, templates: Path, redis_client) -> Store:
    settings = Settings(config_dir=config, templates_dir=templates, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, settings.key_prefix)
    now = datetime.now(UTC)
    starts = (now + timedelta(days=20)).replace(microsecond=0).isoformat()
    for clinic, booking_id, treatment in (("glow", "M-1", "microneedling"),
                                          ("glow", "P-1", "chemical-peel"),
                                          ("glow", "P-2", "chemical-peel"),
                                          ("demo", "D-1", "demo")):
        doc: dict[str, Any] = json.loads(json.dumps(EXAMPLE_BOOKING))
        doc.update(clinic=clinic, booking_id=booking_id, treatment=treatment, starts_at=starts)
        booking = parse_booking(doc, catalog)
        store.upsert(booking, plan(booking, catalog.protocols[treatment],
                                   catalog.clinics[clinic], now), now)
    return store


def pending(store: Store, prefix: str) -> int:
    return sum(1 for ref, _ in store.redis.zscan_iter(store.due_key)
               if ref.startswith(prefix)) + sum(
        1 for ref, _ in store.redis.zscan_iter(store.lease_key) if ref.startswith(prefix))


def test_check_redis_names_pending_reminders_of_a_missing_clinic_or_protocol(
        tmp_path, redis_server, redis_client):
    config, templates = tmp_path / "config", tmp_path / "templates"
    shutil.copytree(ROOT / "config", config)
    shutil.copytree(ROOT / "templates", templates)
    store = store_bookings(config, templates, redis_client)
    # One of the demo clinic's reminders is being sent: claimed, in the lease set.
    ref = next(r for r, _ in store.redis.zscan_iter(store.due_key) if r.startswith("demo/"))
    store.redis.zadd(store.due_key, {ref: 0})
    # The others' booking confirmations are due too inside the clinics' send window (09:00
    # to 20:00 in Madrid): claimed with it, they are being sent as well (the counts below
    # add the due and lease sets either way); outside it, only this one is.
    assert ref in [c.ref for c in store.claim_due(100, 300)]
    demo_pending, peel_pending = pending(store, "demo/"), pending(store, "glow/P-")
    assert demo_pending > 1 and peel_pending > 1
    (config / "clinics" / "demo.toml").unlink()
    (config / "protocols" / "chemical-peel.toml").unlink()
    env = {"REMINDERS_REDIS_URL": redis_server.url}

    # Without --redis: config/ alone is fine, and no Redis is read (none is reachable here).
    alone = run_check(config, templates, cwd=tmp_path,
                      env={"REMINDERS_REDIS_URL": "redis://127.0.0.1:9/0"})
    assert alone.returncode == EXIT_OK, alone.stderr
    assert alone.stdout.splitlines()[-1].startswith("ok: "), alone.stdout

    found = run_check(config, templates, "--redis", cwd=tmp_path, env=env)
    assert found.returncode == EXIT_CONFIG, (found.stdout, found.stderr)
    errors = [line for line in found.stderr.splitlines()
              if line.startswith("configuration error: ")]
    assert len(errors) == 2, found.stderr
    clinic_error, protocol_error = sorted(errors)
    assert clinic_error.startswith(
        f"configuration error: {config / 'clinics' / 'demo.toml'}: missing, yet "
        f"{demo_pending} reminder(s) of 1 booking(s) still to be sent in Redis are of "
        "clinic 'demo'"), clinic_error
    assert protocol_error.startswith(
        f"configuration error: {config / 'protocols' / 'chemical-peel.toml'}: missing, yet "
        f"{peel_pending} reminder(s) of 2 booking(s) still to be sent in Redis are of "
        "treatment 'chemical-peel'"), protocol_error
    assert "dead-lettered after 8 attempts (about 64 minutes of backoff)" in clinic_error
    assert "Ana" not in found.stderr and "+34" not in found.stderr  # no patient data
    assert found.stdout.splitlines()[-1].startswith("2 error(s): "), found.stdout

    as_json = run_check(config, templates, "--redis", "--json", "--clinic", "glow",
                        cwd=tmp_path, env=env)
    assert as_json.returncode == EXIT_CONFIG, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False
    assert doc["unconfigured"] == [{
        "kind": "protocol", "name": "chemical-peel",
        "path": str(config / "protocols" / "chemical-peel.toml"),
        "reminders": peel_pending, "bookings": 2}]  # --clinic glow: not demo's

    # The files back: nothing to say.
    shutil.copy(ROOT / "config" / "clinics" / "demo.toml", config / "clinics")
    shutil.copy(ROOT / "config" / "protocols" / "chemical-peel.toml", config / "protocols")
    back = run_check(config, templates, "--redis", cwd=tmp_path, env=env)
    assert back.returncode == EXIT_OK, back.stderr
    assert ("Redis: every reminder still to be sent is of a configured clinic and protocol"
            in back.stdout), back.stdout
