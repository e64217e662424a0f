"""Races on the send path, forced: an attempt is parked mid-flight, the clinic's change lands,
then the attempt finishes. Real Redis, real Apprise, a real HTTP gateway on 127.0.0.1 that
holds each request until the test answers it.

For each change (cancel, move, new medications) and each outcome of the parked attempt
(sent, transient 503, permanent 400, no answer -> unknown) the final state of everything
is asserted: status, schedule, lease, dead letters, ledger, timeline, attempt log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.raw import set_reminder_fields
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.embedded import free_port
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Attempt, Store

PREFIX = "race"
PROTOCOL = """
name = "Race protocol"
[[steps]]
id = "stop"
offset = "-3h"
channels = ["sms"]
template = "stop-retinoids"
only_if_any = ["tretinoin"]
late = "send"
[[steps]]
id = "prep"
offset = "-2h"
channels = ["sms"]
template = "day-before"
late = "send"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
clean_skin_on_the_day = true
ask_cold_sore_or_infection = true
retinoids_sensitise = true
no_retinoid_on_the_day = true
retinoid_pause_min_days = 5
gentle_care = true
"""


class Gate:
    """An SMS gateway that parks every request until `answer(status)`; None: never answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrived = threading.Event()
        self._release = threading.Event()
        self.status: int | None = 200
        self.bodies: list[dict[str, Any]] = []
        self.answered: list[int] = []
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gate.bodies.append(body)
                gate.arrived.set()
                gate._release.wait(30)
                if gate.status is None:
                    time.sleep(5)  # longer than the client's read timeout: it gives up first
                    return
                gate.answered.append(gate.status)
                self.send_response(gate.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, status: int | None) -> None:
        self.status = status
        self._release.set()

    def reset(self) -> None:
        self.arrived.clear()
        self._release.clear()
        self.status = 200

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.close()


def write_config(
    folder: Path, gate_port: int, window: tuple[str, str] = ("00:00", "24:00")
) -> Path:
    (folder / "protocols").mkdir(parents=True, exist_ok=True)
    (folder / "clinics").mkdir(exist_ok=True)
    (folder / "protocols" / "race.toml").write_text(PROTOCOL, encoding="utf-8")
    (folder / "clinics" / "rc.toml").write_text(f"""
name = "Race Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[sms]  # several SMS minutes apart: not a test of the frequency cap
max_per_day = 10
max_per_week = 70
[send_window]
start = "{window[0]}"
end = "{window[1]}"
[channels]
sms = "json://127.0.0.1:{gate_port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate_port}/email?:to={{to}}"
""", encoding="utf-8")
    return folder


@dataclass
class Rig:
    store: Store
    ctx: Context
    catalog: Catalog
    gate: Gate

    def booking(self, *, starts_in: timedelta = timedelta(days=2), tretinoin: bool = True,
                booking_id: str = "R-1") -> dict[str, Any]:
        starts = (datetime.now(UTC) + starts_in).replace(microsecond=0)
        return {
            "clinic": "rc", "booking_id": booking_id, "treatment": "race",
            "starts_at": starts.isoformat(),
            "patient": {"name": "Ana López", "phone": "+34600111222", "timezone": "UTC",
                        "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": tretinoin},
        }

    def book(self, doc: dict[str, Any]) -> dict[str, Any]:
        booking = parse_booking(doc, self.catalog)
        now = datetime.now(UTC)
        planned = plan(booking, self.catalog.protocols["race"], self.catalog.clinics["rc"], now)
        return self.store.upsert(booking, planned, now)

    def claim_now(self, ref: str):
        """Make `ref` due now and claim it, as the pump would."""
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        claims = [c for c in self.store.claim_due(100, self.ctx.settings.lease_seconds)
                  if c.ref == ref]
        assert len(claims) == 1, claims
        return claims[0]

    def park(self, ref: str) -> tuple[threading.Thread, dict[str, str]]:
        """Start sending `ref` in a thread; return once its request is held at the gate."""
        claim = self.claim_now(ref)
        result: dict[str, str] = {}

        def run() -> None:
            result["outcome"] = send_claimed(self.ctx, ref, claim.version, claim.claim)

        thread = threading.Thread(target=run)
        thread.start()
        assert self.gate.arrived.wait(10), "the attempt never reached the gateway"
        return thread, result

    def state(self, ref: str) -> dict[str, Any]:
        r = self.store.redis
        return {
            "record": self.store.record(ref),
            "due": r.zscore(self.store.due_key, ref),
            "lease": r.zscore(self.store.lease_key, ref),
            "dead": r.zscore(self.store.dead_key, ref),
            "ledger": r.get(self.store.ledger_key(ref)),
            "ledger_ttl": r.pttl(self.store.ledger_key(ref)),
            "log": self.store.attempts(ref),
        }


@pytest.fixture
def rig(tmp_path, redis_client, gate) -> Rig:
    config = write_config(tmp_path / "config", gate.port)
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX)
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


STOP = "rc/R-1/stop:sms"
PREP = "rc/R-1/prep:sms"
ANSWERS = {"sent": 200, "transient": 503, "permanent": 400, "unknown": None}
RETURNED = {"sent": "sent", "transient": "retrying", "permanent": "failed", "unknown": "unknown"}


def assert_no_claim(rig: Rig) -> None:
    """Nothing of the booking is claimable now (nothing due, no lease to expire)."""
    rig.store.redis.zadd(rig.store.lease_key, {"never": 0})  # force an expired-lease pass
    rig.store.redis.zrem(rig.store.lease_key, "never")
    assert rig.store.claim_due(100, 8) == []


# --- cancel during an attempt --------------------------------------------------------------

@pytest.mark.parametrize("outcome", list(ANSWERS))
def test_cancel_during_an_attempt(rig, outcome):
    rig.book(rig.booking())
    thread, result = rig.park(PREP)
    rig.store.cancel("rc", "R-1", datetime.now(UTC))
    rig.gate.answer(ANSWERS[outcome])
    thread.join(20)
    assert result["outcome"] == RETURNED[outcome]
    s = rig.state(PREP)
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s
    timeline = rig.store.timeline("rc", "R-1")
    entry = {r["id"]: r for r in timeline["reminders"]}["prep:sms"]
    assert timeline["status"] == "cancelled"
    if outcome == "sent":
        # It went out: the record says so, and nothing can send it again.
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
        assert entry["sent_at"] and entry["sent_version"] == 1
        assert "while the booking was being changed" in entry["reason"]
        assert s["log"][-1]["result"] == "stale: recorded as sent"
    else:
        assert s["record"]["status"] == "cancelled", s
        assert entry["reason"] == "cancelled by the clinic"
        assert s["log"][-1]["result"] == "stale"
        if outcome == "unknown":
            assert s["ledger"] is not None and s["ledger_ttl"] > 0  # kept until it expires
        else:
            assert s["ledger"] is None
    assert_no_claim(rig)
    # Re-opening the booking: a delivered reminder is history; an undelivered one comes back.
    reopened = {r["id"]: r for r in rig.book(rig.booking())["reminders"]}["prep:sms"]
    assert reopened["status"] == ("sent" if outcome == "sent" else "scheduled")


# --- the appointment moves during an attempt --------------------------------------------------

@pytest.mark.parametrize("outcome", list(ANSWERS))
def test_move_during_an_attempt(rig, outcome):
    rig.book(rig.booking())
    thread, result = rig.park(PREP)
    moved = rig.booking(starts_in=timedelta(days=9))
    timeline = rig.book(moved)
    new_due = {r["id"]: r for r in timeline["reminders"]}["prep:sms"]["due_at"]
    rig.gate.answer(ANSWERS[outcome])
    thread.join(20)
    assert result["outcome"] == RETURNED[outcome]
    s = rig.state(PREP)
    new_epoch = datetime.fromisoformat(new_due).timestamp()
    # Whatever the stale attempt did, the reminder waits for its new time (a week away).
    assert s["record"]["status"] == "scheduled", s
    assert s["due"] == new_epoch and s["lease"] is None and s["dead"] is None, s
    assert s["record"]["version"] == "2"
    entry = {r["id"]: r for r in rig.store.timeline("rc", "R-1")["reminders"]}["prep:sms"]
    assert entry["due_at"] == new_due
    if outcome == "sent":
        assert entry["sent_at"] and entry["sent_version"] == 1
        assert "already sent at" in entry["reason"] and entry["reason"].startswith("rescheduled")
        assert s["ledger"] is None  # the new plan may send it again at its new time
        assert s["log"][-1]["result"] == "stale: delivery recorded beside the new plan"
    else:
        assert "sent_at" not in s["record"]
        assert s["log"][-1]["result"] == "stale"
        assert (s["ledger"] is not None) == (outcome == "unknown"), s


# --- new medications during an attempt: the step leaves the plan ------------------------------

@pytest.mark.parametrize("outcome", list(ANSWERS))
def test_step_removed_during_an_attempt(rig, outcome):
    rig.book(rig.booking())
    thread, result = rig.park(STOP)
    timeline = rig.book(rig.booking(tretinoin=False))
    assert {r["id"]: r for r in timeline["reminders"]}["stop:sms"]["status"] == "cancelled"
    rig.gate.answer(ANSWERS[outcome])
    thread.join(20)
    assert result["outcome"] == RETURNED[outcome]
    s = rig.state(STOP)
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s
    if outcome == "sent":
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    else:
        # Never resurrected: a later claim could otherwise send it under the new version.
        assert s["record"]["status"] == "cancelled", s
        assert s["record"]["reason"] == "no longer in the plan after a change"
    # The other step is untouched and still due at its time.
    assert rig.state(PREP)["record"]["status"] == "scheduled"
    rig.store.redis.zrem(rig.store.due_key, PREP)
    assert_no_claim(rig)


# --- a finish landing inside a reconcile or next to a cancel ----------------------------------

def test_finish_landing_inside_a_reconcile_is_not_overwritten(rig, redis_server):
    """The attempt's finish lands between the upsert's reads and its EXEC: WATCH retries."""
    from worker.store import connect

    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    attempt = Attempt(claim.version, claim.claim, "tok")
    assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok", 8000) == "ok"
    other = Store(connect(redis_server.url), PREFIX)
    calls = []
    real = Store._reconcile

    def reconcile_with_a_finish_landing(*args):
        calls.append(1)
        if len(calls) == 1:  # between the reads and the write of the first try
            assert other.finish_sent(PREP, attempt, datetime.now(UTC)) == "ok"
        return real(*args)

    rig.store._reconcile = reconcile_with_a_finish_landing  # type: ignore[method-assign]
    timeline = rig.book(rig.booking(starts_in=timedelta(days=9)))
    assert len(calls) == 2  # the first try saw its watched record change, and ran again
    entry = {r["id"]: r for r in timeline["reminders"]}["prep:sms"]
    assert entry["status"] == "sent" and entry["sent_version"] == 1  # history, not rescheduled
    s = rig.state(PREP)
    assert (s["due"], s["lease"], s["ledger"]) == (None, None, "sent"), s


@pytest.mark.parametrize("order", ["finish first", "cancel first"])
def test_cancel_and_finish_in_either_order(rig, order):
    """Cancel is one script: a finish is wholly before or after it, and the delivery stays."""
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    attempt = Attempt(claim.version, claim.claim, "tok")
    assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok", 8000) == "ok"
    if order == "finish first":
        assert rig.store.finish_sent(PREP, attempt, datetime.now(UTC)) == "ok"
        rig.store.cancel("rc", "R-1", datetime.now(UTC))
    else:
        rig.store.cancel("rc", "R-1", datetime.now(UTC))
        assert rig.store.finish_sent(PREP, attempt, datetime.now(UTC)) == (
            "stale: recorded as sent")
    records = {r["id"]: r for r in rig.store.timeline("rc", "R-1")["reminders"]}
    assert records["prep:sms"]["status"] == "sent"
    assert records["stop:sms"]["status"] == "cancelled"
    assert rig.state(PREP)["ledger"] == "sent"


# --- dead letters, held bookings, repeated calls ----------------------------------------------

def test_a_dead_letter_that_leaves_the_plan_leaves_the_dead_letters(rig):
    rig.book(rig.booking())
    rig.gate.status = 400
    rig.gate.answer(400)
    claim = rig.claim_now(STOP)
    assert send_claimed(rig.ctx, STOP, claim.version, claim.claim) == "failed"
    assert [d["ref"] for d in rig.store.dead_letters()] == [STOP]
    rig.book(rig.booking(tretinoin=False))
    assert rig.store.dead_letters() == []
    assert rig.store.record(STOP)["status"] == "cancelled"


def test_a_task_dropped_for_a_held_booking_settles_its_reminder(rig):
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    rig.store.redis.hset(rig.store.booking_key("rc", "R-1"), "status", "held")
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: booking held"
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled" and s["lease"] is None and s["due"] is None, s
    assert rig.gate.bodies == []


def test_begin_and_finish_are_idempotent_for_the_same_token(rig):
    """A client retry after a lost reply runs a script twice: the second run changes nothing."""
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    attempt = Attempt(claim.version, claim.claim, "tok")
    for _ in range(2):
        assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok", 8000) == "ok"
    assert rig.store.record(PREP)["attempts"] == "1"
    assert rig.store.finish_sent(PREP, attempt, datetime.now(UTC)) == "ok"
    assert rig.store.finish_sent(PREP, attempt, datetime.now(UTC)) == "repeated"
    assert len(rig.store.attempts(PREP)) == 1


# --- send-time rules -----------------------------------------------------------------------

def test_outside_the_send_window_at_send_time_waits_for_the_next_opening(
        tmp_path, redis_client, gate):
    now = datetime.now(UTC)
    minute = now.hour * 60 + now.minute
    # A window that excludes the present minute (patient in UTC), at least 2 h away.
    start, end = ("14:00", "20:00") if minute < 12 * 60 else ("02:00", "08:00")
    config = write_config(tmp_path / "config", gate.port, window=(start, end))
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX)
    rig = Rig(store, Context(settings, store, catalog, Renderer(catalog.templates_dir)),
              catalog, gate)
    rig.book(rig.booking(starts_in=timedelta(days=3)))
    claim = rig.claim_now(PREP)  # a retry or a backlog claimed outside the window
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "deferred"
    s = rig.state(PREP)
    opening = now.replace(hour=int(start[:2]), minute=0, second=0, microsecond=0)
    if opening < now:
        opening += timedelta(days=1)
    assert s["record"]["status"] == "scheduled" and s["due"] == opening.timestamp(), s
    assert s["record"]["attempts"] == "0" and s["ledger"] is None and s["lease"] is None
    assert "outside the send window" in s["record"]["reason"]
    assert s["log"][-1]["outcome"] == "deferred"
    assert gate.bodies == []  # nothing left the machine


def test_past_its_expiry_at_send_time_is_skipped_not_sent(rig):
    rig.book(rig.booking())
    # The outage outlasted the appointment: the pre-visit reminder must not go after it.
    set_reminder_fields(rig.store, PREP, expires_epoch=repr(time.time() - 1))
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "skipped"
    s = rig.state(PREP)
    assert s["record"]["status"] == "skipped", s
    assert s["record"]["reason"] == (
        "not sent: it was meant for before the appointment, which has begun")
    assert (s["due"], s["lease"], s["dead"], s["ledger"]) == (None, None, None, None)
    assert rig.gate.bodies == []


def test_replay_obeys_the_send_time_rules(rig):
    rig.book(rig.booking())
    rig.gate.answer(400)
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "failed"
    set_reminder_fields(rig.store, PREP, expires_epoch=repr(time.time() - 1))
    assert rig.store.replay([PREP], datetime.now(UTC)) == [PREP]
    (claim,) = rig.store.claim_due(10, 8)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "skipped"
    assert len(rig.gate.bodies) == 1  # only the first, refused attempt


def test_replays_racing_a_dead_letter_of_unknown_outcome_send_it_once_its_ledger_expires(rig):
    """The last attempt the budget allows is still held at the gateway when the client gives
    up (unknown outcome): dead-lettered, its ledger kept (the provider may have it). Two
    replays race (two `reminders replay`, or the CLI and POST /v1/dead-letters/replay): one
    puts it back. Two workers given its claim then find that attempt in flight and requeue it
    (nothing reaches the gateway); once its ledger has expired it goes, once: at most the
    one retry an unknown outcome already allows, never a third copy."""
    ctx = replace(rig.ctx, settings=rig.ctx.settings.model_copy(update={"max_attempts": 1}))
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    first: dict[str, str] = {}
    thread = threading.Thread(target=lambda: first.update(
        outcome=send_claimed(ctx, PREP, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10)
    rig.gate.answer(None)  # holds the request past the client's timeout
    thread.join(20)
    assert first["outcome"] == "failed"
    s = rig.state(PREP)
    assert s["record"]["status"] == "failed" and s["dead"] is not None, s
    assert s["ledger"] not in (None, "sent") and s["ledger_ttl"] > 0, s  # may be delivered
    results: list[list[str]] = []
    start = threading.Barrier(2)

    def replay() -> None:
        start.wait()
        results.append(rig.store.replay([PREP], datetime.now(UTC)))

    racers = [threading.Thread(target=replay) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(10)
    assert sorted(results) == [[], [PREP]], results
    claim = rig.claim_now(PREP)
    outcomes: list[str] = []
    workers = [threading.Thread(target=lambda: outcomes.append(
        send_claimed(ctx, PREP, claim.version, claim.claim))) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    assert len(outcomes) == 2 and "requeued" in outcomes and all(
        o.startswith(("requeued", "dropped")) for o in outcomes), outcomes
    assert len(rig.gate.bodies) == 1  # nothing more reached the gateway
    s = rig.state(PREP)
    assert s["record"]["status"] in ("scheduled", "retrying") and s["dead"] is None, s
    assert s["due"] is not None and s["due"] > time.time(), s  # after the ledger expires
    rig.store.redis.pexpire(rig.store.ledger_key(PREP), 1)  # its time passes
    time.sleep(0.05)
    rig.gate.answer(200)
    claim = rig.claim_now(PREP)
    assert send_claimed(ctx, PREP, claim.version, claim.claim) == "sent"
    claim_again = rig.store.claim_due(10, 8)
    assert [c for c in claim_again if c.ref == PREP] == []
    assert len(rig.gate.bodies) == 2  # the held one and its one retry
    s = rig.state(PREP)
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s


# --- Redis unreachable when the provider has accepted ------------------------------------------

def test_a_delivery_is_recorded_after_a_redis_outage_at_the_moment_of_finishing(
        tmp_path, gate):
    """Redis goes down while the message is on the wire and comes back a few seconds later:
    the delivery is recorded (client retries), never left `sending` to be sent again."""
    from worker.embedded import RedisServer
    from worker.store import connect

    server = RedisServer(tmp_path / "redis").start()
    restarted = None
    try:
        config = write_config(tmp_path / "config", gate.port)
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            lease_seconds=60, send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(connect(server.url), PREFIX)
        rig = Rig(store, Context(settings, store, catalog, Renderer(catalog.templates_dir)),
                  catalog, gate)
        rig.book(rig.booking())
        thread, result = rig.park(PREP)
        server.stop()  # SIGTERM: the AOF is flushed, as after a clean restart
        gate.answer(200)  # the provider accepts while Redis is away
        time.sleep(3)
        assert thread.is_alive()  # still trying to record the delivery
        restarted = RedisServer(tmp_path / "redis", port=server.port).start()
        thread.join(60)
        assert result["outcome"] == "sent"
        s = rig.state(PREP)
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
        assert (s["due"], s["lease"]) == (None, None)
        assert [e["outcome"] for e in s["log"]] == ["sent"]
        store.redis.zadd(store.lease_key, {PREP: 0})  # even if its lease had run out
        assert store.claim_due(10, 60) == []
        assert len(gate.bodies) == 1
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()


def test_a_delivery_is_recorded_when_redis_refuses_writes_at_the_moment_of_finishing(
        rig, redis_client):
    """The provider accepts while Redis refuses writes for a moment (NOREPLICAS: a master with
    `min-replicas-to-write`, as the README advises with Sentinel, whose replica lags; OOM,
    MISCONF and READONLY alike): the finish is tried again until Redis takes it, as through
    an outage. It was given up at once: the delivery never recorded, the reminder left
    `sending` with its ledger, and sent a second time once the ledger expired (review)."""
    rig.book(rig.booking())
    thread, result = rig.park(PREP)
    redis_client.config_set("min-replicas-to-write", 1)  # no replica: every write refused
    try:
        rig.gate.answer(200)  # the provider accepts while Redis refuses writes
        time.sleep(1.2)  # refused at least once (it is tried again every second)
    finally:
        redis_client.config_set("min-replicas-to-write", 0)  # the replica caught up
    thread.join(20)
    assert result.get("outcome") == "sent", result
    s = rig.state(PREP)
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s
    assert [e["outcome"] for e in s["log"]] == ["sent"]
    rig.store.redis.zadd(rig.store.lease_key, {PREP: 0})  # even if its lease had run out
    assert [c for c in rig.store.claim_due(10, 8) if c.ref == PREP] == []
    assert len(rig.gate.bodies) == 1


# --- found by review: each forced -----------------------------------------------------------

def test_cancel_then_rebook_while_in_flight_does_not_send_the_same_words_again(rig):
    doc = rig.booking()  # one document: made twice, a second could pass between (a move)
    rig.book(doc)
    thread, result = rig.park(PREP)
    rig.store.cancel("rc", "R-1", datetime.now(UTC))
    rig.book(doc)  # the clinic undoes its cancel: the same plan again
    rig.gate.answer(200)
    thread.join(20)
    s = rig.state(PREP)
    assert result["outcome"] == "sent"
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"]) == (None, None)
    assert_no_claim(rig)
    assert len(rig.gate.bodies) == 1


def test_a_change_landing_after_begin_but_before_the_hand_over_sends_nothing(rig):
    """The fence is checked again just before the provider call."""
    rig.book(rig.booking())

    class CancelsWhileRendering(Store):
        def plan_dates(self, clinic, booking_id, *rest):
            self.cancel(clinic, booking_id, datetime.now(UTC))
            return super().plan_dates(clinic, booking_id, *rest)

    store = CancelsWhileRendering(rig.store.redis, PREFIX)
    ctx = Context(rig.ctx.settings, store, rig.catalog, rig.ctx.renderer)
    claim = rig.claim_now(PREP)
    assert send_claimed(ctx, PREP, claim.version, claim.claim) == (
        "dropped: overtaken before sending")
    s = rig.state(PREP)
    assert s["record"]["status"] == "cancelled" and s["ledger"] is None, s
    assert [(e["outcome"], e["result"]) for e in s["log"]] == [("abandoned", "stale")]
    assert rig.gate.bodies == []


def test_a_redis_error_while_preparing_is_transient_not_a_dead_letter(rig):
    import redis as redis_lib

    rig.book(rig.booking())

    class RedisFailsOnce(Store):
        failed = False

        def plan_dates(self, clinic, booking_id, *rest):
            if not RedisFailsOnce.failed:
                RedisFailsOnce.failed = True
                raise redis_lib.ConnectionError("Connection reset by peer")
            return super().plan_dates(clinic, booking_id, *rest)

    store = RedisFailsOnce(rig.store.redis, PREFIX)
    ctx = Context(rig.ctx.settings, store, rig.catalog, rig.ctx.renderer)
    claim = rig.claim_now(PREP)
    assert send_claimed(ctx, PREP, claim.version, claim.claim) == "retrying"
    s = rig.state(PREP)
    assert s["record"]["status"] == "retrying" and s["dead"] is None and s["due"], s
    assert s["record"]["last_error"] == "could not prepare the message (ConnectionError)"
    assert rig.gate.bodies == []


def test_unknown_outcomes_end_in_a_dead_letter_after_max_attempts(rig):
    """Each unknown outcome may be a delivery: never an endless series of them."""
    rig.book(rig.booking())
    set_reminder_fields(rig.store, PREP, attempts="4")  # max_attempts is 5
    thread, result = rig.park(PREP)
    rig.gate.answer(None)  # no answer: the client's read timeout
    thread.join(20)
    assert result["outcome"] == "failed"
    s = rig.state(PREP)
    assert s["record"]["status"] == "failed" and s["dead"] is not None, s
    assert s["record"]["reason"].startswith(
        "gave up after 5 attempts, the last of unknown outcome (it may have been delivered)")
    # it may have been: its ledger stays until it expires (a replay waits for it)
    assert s["ledger"] not in (None, "sent") and 0 < s["ledger_ttl"] <= 8000, s


def test_the_claim_script_run_twice_for_one_pump_run_answers_the_same(rig):
    """A client retry after a lost reply re-runs the script: no claim is left without a task."""
    rig.book(rig.booking())
    rig.store.redis.zadd(rig.store.due_key, {PREP: 0, STOP: 0})
    keys = [rig.store.due_key, rig.store.lease_key, f"{PREFIX}:claimrun:run-1"]
    args = [10, 8, PREFIX]
    first = rig.store._claim(keys=keys, args=args)
    assert sorted(r[0] for r in first) == [PREP, STOP]
    assert rig.store._claim(keys=keys, args=args) == first
    assert 0 < rig.store.redis.ttl(keys[2]) <= 60
