"""`reminders health` and /healthz read the heartbeats (worker/health.py) in a real Redis.

The command runs as a real subprocess, as a Docker healthcheck runs it; the heartbeats are
stamped by real Celery worker and beat processes, or forced stale in Redis.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, wait_until
from worker.health import beat_key, pump_beat, pump_key, stamp

pytestmark = pytest.mark.integration
PREFIX = "reminders"


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "reminders"), "health", *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def env(redis_server, redis_client, tmp_path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    out.update({"REMINDERS_REDIS_URL": redis_server.url, "REMINDERS_DATA_DIR": str(tmp_path),
                "REMINDERS_HEALTH_MAX_AGE_SECONDS": "20",
                "PYTHONPATH": str(ROOT)})  # this checkout's code, wherever the venv points
    return out


def test_health_is_unhealthy_without_a_heartbeat_then_healthy_then_stale(env, redis_client):
    never = health(env, "--role", "worker")
    assert never.returncode == 1
    assert never.stdout.strip() == ("worker: unhealthy: no pump run recorded yet; are beat and "
                                    "a worker taking the reminders.pump queue running?")
    stamped = time.time()
    pump_beat(redis_client, PREFIX, 0.012)
    fresh = health(env, "--role", "worker", "--json")
    # The age is the heartbeat's at the check: at most the time the command took (a loaded
    # machine starts it seconds late), never what was stamped before it.
    took = time.time() - stamped
    assert fresh.returncode == 0, fresh.stdout
    body = json.loads(fresh.stdout)
    assert body["healthy"] is True and body["role"] == "worker"
    assert 0 <= body["age_seconds"] <= took + 0.5 and body["max_age_seconds"] == 20
    # A heartbeat older than the limit: the pump stopped (Redis's clock decides the age).
    stamped = time.time()
    redis_client.hset(pump_key(PREFIX), "at", f"{stamped - 95:.6f}")
    stale = health(env)  # --role worker is the default
    took = time.time() - stamped
    assert stale.returncode == 1
    said = re.fullmatch(r"worker: unhealthy: the last pump run was (\d+)s ago \(limit 20s\); .*",
                        stale.stdout.strip())
    assert said and len(stale.stdout.strip().splitlines()) == 1, stale.stdout
    # 95 s old when stamped, plus however long the command took to look (rounded).
    assert 95 <= int(said[1]) <= 95 + took + 0.5, (said[1], took)
    assert health(env, "--max-age", "120").returncode == 0  # the limit is the caller's too


def test_beat_role_reads_beats_own_tick_not_the_pumps(env, redis_client):
    pump_beat(redis_client, PREFIX, 0.01)
    no_beat = health(env, "--role", "beat", "--json")
    assert no_beat.returncode == 1
    assert json.loads(no_beat.stdout)["status"].startswith("no beat tick published recorded")
    stamp(redis_client, beat_key(PREFIX), node="test")
    assert health(env, "--role", "beat").returncode == 0
    stamped = time.time()
    redis_client.hset(beat_key(PREFIX), "at", f"{stamped - 60:.6f}")
    stale = health(env, "--role", "beat")
    took = time.time() - stamped
    said = re.search(r"the last beat tick published was (\d+)s ago", stale.stdout)
    assert stale.returncode == 1 and said, stale.stdout
    assert 60 <= int(said[1]) <= 60 + took + 0.5, (said[1], took)  # however long it took


def test_health_is_unhealthy_when_redis_is_unreachable(env):
    from worker.embedded import free_port

    env = env | {"REMINDERS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = time.monotonic()
    down = health(env, "--role", "worker")
    assert down.returncode == 1 and "Redis is unreachable" in down.stdout
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("role", ["worker", "beat", "api"])
def test_an_error_reply_from_redis_is_unhealthy_in_one_line(env, redis_client, role):
    # Redis answers, but with an error (here WRONGTYPE: the heartbeat key is not a hash; in
    # production NOPERM from an ACL, MASTERDOWN from a replica cut off from its master): the
    # healthcheck's answer is still "unhealthy", exit 1, one line or one JSON object, as
    # README says. It was the generic Redis-error line on stderr, nothing on stdout (no JSON
    # for --json) and exit 3.
    redis_client.set(pump_key(PREFIX), "x")
    redis_client.set(beat_key(PREFIX), "x")
    plain = health(env, "--role", role)
    assert plain.returncode == 1, (plain.returncode, plain.stdout, plain.stderr)
    assert plain.stdout.startswith(f"{role}: unhealthy: Redis answered an error "
                                   "(ResponseError WRONGTYPE)"), plain.stdout
    assert len(plain.stdout.splitlines()) == 1 and plain.stderr == "", plain.stderr
    as_json = health(env, "--role", role, "--json")
    assert as_json.returncode == 1, (as_json.returncode, as_json.stdout, as_json.stderr)
    body = json.loads(as_json.stdout)
    assert body["healthy"] is False and body["redis"] == "error", body
    assert body["status"].startswith("Redis answered an error (ResponseError WRONGTYPE)")


def test_a_running_worker_and_beat_are_healthy_and_stop_being_so_when_beat_stops(service):
    service.configure(REMINDERS_HEALTH_MAX_AGE_SECONDS="3")
    worker, beat = service.start()
    # The broker is never idle for long here (a tick a second): health does not care.
    wait_until(lambda: health(service.env, "--role", "beat").returncode == 0, 15)
    wait_until(lambda: health(service.env, "--role", "worker").returncode == 0, 15)
    service.kill(beat)
    # No more ticks: beat's evidence and the pump's both go stale within the limit.
    down = wait_until(lambda: (lambda r: r if r.returncode == 1 else None)(
        health(service.env, "--role", "worker")), 15)
    assert "the last pump run was" in down.stdout
    assert health(service.env, "--role", "beat").returncode == 1
    assert worker.poll() is None  # the worker itself is up: what stopped is the ticking


def test_beat_with_no_worker_to_run_its_ticks_does_not_pile_them_up(
        service, redis_client, smtp_sink, make_booking):
    """Beat ticking while no worker consumes the pump queue (workers down, crash-looping on
    a bad deploy): each tick was one more ~1 KB message in the queue's Redis list, 86 MB a
    day under `noeviction`, and a worker coming back discarded every expired one, in order,
    before it ran the pump at all (50,000, 14 hours of ticks, took it over two minutes: no
    reminder went meanwhile). A tick behind ticks nobody ran adds nothing: beat publishes
    none while a few wait, and says it is alive all the same."""
    service.configure(REMINDERS_HEALTH_MAX_AGE_SECONDS="3")
    beat = service.beat()
    queue = f"{PREFIX}:celery:reminders.pump"
    time.sleep(12.0)  # a tick a second
    assert redis_client.llen(queue) <= 5, redis_client.llen(queue)
    assert b"Sending due task pump" in beat.log_path.read_bytes()  # type: ignore[attr-defined]
    verdict = health(service.env, "--role", "beat")
    assert verdict.returncode == 0, verdict.stdout  # beat is up: what is missing is a worker
    assert health(service.env, "--role", "worker").returncode == 1  # ... which this says
    # A worker back: the ticks waiting go at once, the pump runs, a booking's message goes.
    service.worker()
    doc = make_booking("B-TICKS", starts_in=60.0)
    service.book(doc)
    wait_until(lambda: any(m.to == doc["patient"]["email"] for m in smtp_sink.snapshot()), 15)
    wait_until(lambda: redis_client.llen(queue) <= 1, 10)
