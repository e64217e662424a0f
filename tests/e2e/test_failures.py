"""Failures end to end: killed workers, racing pumps, a mail server down, refusals, duplicates.

Real Redis, real Celery worker and beat processes, real SMTP and HTTP sinks. Whatever
goes wrong, each reminder reaches its patient exactly once, or ends as a dead letter
with the reason, and the timeline says which.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, QUICK_MESSAGES, wait_until
from tests.raw import set_reminder_fields
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Attempt, Store

pytestmark = pytest.mark.integration
PREFIX = "reminders"  # the e2e service's key prefix (the default)


# --- what should arrive, what did ---------------------------------------------------

def _norm(text: str | None) -> str:
    return (text or "").replace("\r\n", "\n").strip()


def expected_keys(config, doc: dict[str, Any], timeline: dict[str, Any],
                  only: set[str] | None = None) -> Counter:
    """Render each planned reminder of `timeline` (the one `book` returned) as its sink key.

    A key names one message: ("email", address, subject) or ("sms", number, text). Every
    quick-protocol step has its own subject or text, and every test booking its own
    contacts, so a key appearing twice at a sink means a message sent twice.
    """
    catalog = Catalog.load(Settings(config_dir=config, templates_dir=ROOT / "templates",
                                    _env_file=None))
    booking = parse_booking(doc, catalog)
    renderer = Renderer(catalog.templates_dir)
    protocol, clinic = catalog.protocols["quick"], catalog.clinics["e2e"]
    templates = {s.id: s.template for s in protocol.steps}
    plan_dates: dict[str, datetime] = {}
    for r in timeline["reminders"]:
        when = _dt(r["due_at"])
        plan_dates[r["step"]] = min(when, plan_dates.get(r["step"], when))
    keys: Counter = Counter()
    for r in timeline["reminders"]:
        if only is not None and r["id"] not in only:
            continue
        assert r["status"] == "scheduled", r
        msg = renderer.render(template=templates[r["step"]], channel=r["channel"], booking=booking,
                              clinic=clinic, protocol=protocol, occurrence=1,
                              due_at=_dt(r["due_at"]), plan_dates=plan_dates)
        if r["channel"] == "email":
            keys[("email", booking.patient.email, msg.subject)] += 1
        else:
            keys[("sms", booking.patient.phone, _norm(msg.text))] += 1
    return keys


def received_keys(smtp_sink, sms_sink) -> Counter:
    return Counter([("email", m.to, m.subject) for m in smtp_sink.snapshot()]
                   + [("sms", m.to, _norm(m.text)) for m in sms_sink.snapshot()])


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)


def assert_exactly_once(expected: Counter, got: Counter) -> None:
    """Every expected message arrived once; nothing else arrived."""
    assert all(n == 1 for n in expected.values()), "test bookings must have distinct messages"
    twice = {k: n for k, n in got.items() if n > 1}
    missing = expected - got
    extra = got - expected
    assert not twice and not missing and not extra, {
        "sent more than once": twice, "missing": missing, "unexpected": extra}


def quiet(redis_client) -> bool:
    """Nothing is due or leased: no pump can send anything any more."""
    return redis_client.zcard(f"{PREFIX}:due") == 0 and redis_client.zcard(f"{PREFIX}:lease") == 0


def settle(redis_client, seconds: float = 2.0, timeout: float = 30) -> None:
    """Wait until nothing is due or leased, then a little more for a stray send to land."""
    wait_until(lambda: quiet(redis_client), timeout)
    time.sleep(seconds)
    assert quiet(redis_client)


def bookings(make_booking, prefix: str, count: int, starts_in, first_phone: int = 0):
    """`count` bookings with their own email address and phone number."""
    return [make_booking(f"{prefix}-{i}",
                         starts_in=starts_in(i) if callable(starts_in) else starts_in,
                         phone=f"+346001{first_phone + i:05d}")
            for i in range(count)]


def show_all(service, docs) -> list[dict[str, Any]]:
    return [service.show(d["booking_id"]) for d in docs]


def reminders_of(timelines):
    return [(t["booking_id"], r) for t in timelines for r in t["reminders"]]


def ref(booking_id: str, reminder_id: str) -> str:
    return f"e2e/{booking_id}/{reminder_id}"


class Publisher:
    """A process with the service's settings that publishes send tasks as the pump would.

    Started ahead of time, so a duplicate goes out within milliseconds of being asked for.
    """

    CODE = ("import json, sys\n"
            "from worker.celery_app import send_queue\n"
            "from worker.tasks import send_reminder\n"
            "print('ready', flush=True)\n"
            "for line in sys.stdin:\n"
            "    for task_id, *args in json.loads(line):\n"
            "        send_reminder.apply_async(args=args, queue=send_queue(args[0]),\n"
            "                                  task_id=task_id)\n"
            "    print('ok', flush=True)\n")

    def __init__(self, service) -> None:
        self.log = open(service.logs / "publisher.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(BIN / "python"), "-c", self.CODE], env=service.env,
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "publisher failed to start"

    def publish(self, tasks: list[tuple[str, str, str, str]]) -> None:
        """Publish send tasks, each (task id, ref, version, claim)."""
        self.proc.stdin.write(json.dumps(tasks) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", "publisher failed"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def publisher(service):
    pub = Publisher(service)
    yield pub
    pub.close()


def task_results(worker, task_ids) -> dict[str, str]:
    """What the worker's log says each task returned, for those that finished."""
    out = {}
    for line in worker.log_path.read_text(errors="replace").splitlines():
        for task_id in task_ids:
            found = re.search(rf"reminders\.send\[{task_id}\] succeeded in \S+s: '(.*)'$", line)
            if found:
                out[task_id] = found.group(1)
    return out


# --- 1. a worker killed in the middle of a send ---------------------------------------

def test_worker_killed_mid_send_every_reminder_arrives_once(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client):
    smtp_sink.delay = 3.0  # each email holds the SMTP DATA answer for 3 s
    w1 = service.up()
    # 3 confirmations due at once, then 3 preps; the visit is far enough away that what the
    # kill held back (a lease, 10 s) and the preps (8 s before it) are still before it.
    docs = bookings(make_booking, "K", 3, starts_in=28)
    timelines = service.book(*docs)
    expected = sum((expected_keys(e2e_config, d, t) for d, t in zip(docs, timelines, strict=True)),
                   Counter())
    assert sum(expected.values()) == 3 * QUICK_MESSAGES

    wait_until(lambda: smtp_sink.data_started >= 1, 20)
    service.kill(w1)  # SIGKILL, pool and all, while a message is being handed over
    wait_until(lambda: smtp_sink.data_abandoned >= 1, 10)  # the server saw the client vanish
    assert smtp_sink.snapshot() == [], "nothing was acknowledged before the kill"
    smtp_sink.delay = 0.0  # the kill is done: the rest need not be slow to hand over
    service.worker("w2")

    # Leased reminders come back when their lease (10 s) and ledger run out.
    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 90)
    settle(redis_client)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    finals = show_all(service, docs)
    assert {r["status"] for _, r in reminders_of(finals)} == {"sent"}
    # The reminder cut off mid-DATA had begun an attempt; a second one delivered it.
    emails = [r for _, r in reminders_of(finals) if r["channel"] == "email"]
    assert any(r["attempts"] >= 2 for r in emails), finals


# --- 2. two workers, two pumps ----------------------------------------------------------

def test_two_workers_two_pumps_send_each_reminder_once(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client):
    smtp_sink.delay = 0.5  # sends stay in flight across the other pump's ticks
    w1 = service.worker("w1", wait=False)
    w2 = service.worker("w2", wait=False)
    b1 = service.beat("beat1")
    b2 = service.beat("beat2")
    service.ready(w1)
    service.ready(w2)
    service.ticked([w1, w2])
    docs = bookings(make_booking, "P", 10, starts_in=lambda i: 10 + 1.3 * i, first_phone=100)
    timelines = service.book(*docs)
    expected = sum((expected_keys(e2e_config, d, t) for d, t in zip(docs, timelines, strict=True)),
                   Counter())
    assert sum(expected.values()) == 10 * QUICK_MESSAGES

    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 90)
    settle(redis_client)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    finals = show_all(service, docs)
    assert {r["status"] for _, r in reminders_of(finals)} == {"sent"}
    assert {r["attempts"] for _, r in reminders_of(finals)} == {1}  # no send was begun twice
    # Two pumps, one claim each: the Lua claim never hands a reminder to both.
    store = Store(redis_client, PREFIX)
    claims = {ref(b, r["id"]): store.record(ref(b, r["id"])).get("claim")
              for b, r in reminders_of(finals)}
    assert set(claims.values()) == {"1"}, claims
    # Both pumps ticked and both workers sent: the race really was on.
    for beat in (b1, b2):
        assert b"reminders.pump" in beat.log_path.read_bytes(), beat.log_path
    for worker in (w1, w2):
        assert b": sent (attempt" in worker.log_path.read_bytes(), worker.log_path


# --- 3. the mail server down for 20 s ----------------------------------------------------

def test_smtp_down_for_20s_retries_with_backoff_and_sends_once(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client):
    service.configure(REMINDERS_MAX_ATTEMPTS="30")
    smtp_sink.stop()  # its port stays in the clinic's config: connections are refused
    service.up()
    # The confirmations fall due during the outage; the visit (32 s) is well after it, so
    # they are still worth sending when the server is back.
    docs = bookings(make_booking, "D", 2, starts_in=32, first_phone=200)
    timelines = service.book(*docs)
    down_since = time.time()
    expected = sum((expected_keys(e2e_config, d, t) for d, t in zip(docs, timelines, strict=True)),
                   Counter())
    store = Store(redis_client, PREFIX)

    def retrying_email():
        return [r for _, r in reminders_of(show_all(service, docs))
                if r["channel"] == "email" and r["status"] == "retrying"]

    seen = wait_until(retrying_email, 15)
    assert "could not connect to the provider" in seen[0]["reason"], seen
    time.sleep(max(0.0, down_since + 20 - time.time()))
    assert [k for k in received_keys(smtp_sink, sms_sink) if k[0] == "email"] == []
    smtp_sink.start()  # the same port again
    back_at = time.time()

    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 30)
    settle(redis_client)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    for booking_id, r in reminders_of(show_all(service, docs)):
        assert r["status"] == "sent", r
        log = store.attempts(ref(booking_id, r["id"]))
        assert [e["attempt"] for e in log] == list(range(1, r["attempts"] + 1)), log
        assert log[-1]["outcome"] == "sent"
        if r["channel"] == "sms":
            assert r["attempts"] == 1, r  # the SMS gateway was up all along
            continue
        if r["id"] == "confirm:email":
            assert r["attempts"] > 1, r  # due at once, while the server was down
            # Back-off is capped (4 s): once the server is back it goes within a few seconds.
            assert _dt(r["sent_at"]).timestamp() - back_at < 10, r
        failed = log[:-1]
        assert {e["outcome"] for e in failed} <= {"retrying"}, log
        assert all(e["error"] == "could not connect to the provider" for e in failed), log
        # Exponential back-off with jitter: never sooner than half the nominal delay
        # (1, 2, 4, 4 s...).
        for before, after in zip(log, log[1:], strict=False):
            nominal = min(4.0, 1.0 * 2 ** (before["attempt"] - 1))
            gap = (_dt(after["at"]) - _dt(before["at"])).total_seconds()
            assert gap >= nominal / 2, (r["id"], before, after)


# --- 4. permanent refusals, dead letters, replay; a gateway that recovers ---------------

def test_permanent_failures_dead_letter_once_then_replay_sends_once(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client):
    """Replay obeys the send-time rules: by the time it runs the visit has begun, so the
    pre-visit reminders are skipped with the reason and only the aftercare goes out."""
    smtp_sink.refuse_code = "550 5.1.1 No such user"
    sms_sink.status = 400
    service.up()
    docs = bookings(make_booking, "F", 2, starts_in=9, first_phone=300)
    timelines = service.book(*docs)
    after_visit = {"aftercare:email", "spf:sms"}
    expected = sum((expected_keys(e2e_config, d, t, only=after_visit)
                    for d, t in zip(docs, timelines, strict=True)), Counter())
    store = Store(redis_client, PREFIX)
    total = 2 * QUICK_MESSAGES

    def all_failed():
        rs = reminders_of(show_all(service, docs))
        return rs if all(r["status"] == "failed" for _, r in rs) else None

    failed = wait_until(all_failed, 40, interval=0.5)
    assert len(failed) == total
    for _, r in failed:
        assert r["attempts"] == 1, r
        want = "SMTP 550" if r["channel"] == "email" else "HTTP 400"
        assert r["reason"].startswith("permanent failure") and want in r["reason"], r
    refused, hits = smtp_sink.refused, len(sms_sink.requests_snapshot())
    assert refused == 6 and hits == 4  # one try each: 6 emails, 4 SMS
    time.sleep(5)  # a retry storm would show now (back-off base is 1 s)
    assert [r["attempts"] for _, r in reminders_of(show_all(service, docs))] == [1] * total
    assert (smtp_sink.refused, len(sms_sink.requests_snapshot())) == (refused, hits)
    assert smtp_sink.snapshot() == [] and sms_sink.snapshot() == []
    for booking_id, r in failed:
        log = store.attempts(ref(booking_id, r["id"]))
        assert [(e["attempt"], e["outcome"]) for e in log] == [(1, "failed")], log

    result = service.cli("dead-letters", "--json")
    assert result.returncode == 0, result.stderr
    dead = {d["ref"]: d for d in json.loads(result.stdout)}
    assert set(dead) == {ref(b, r["id"]) for b, r in failed}
    for d in dead.values():
        assert d["attempts"] == 1 and d["failed_at"], d
        assert ("550" if d["channel"] == "email" else "HTTP 400") in d["reason"], d

    # The mailbox is fixed; the SMS gateway now has an outage (503) before it recovers.
    smtp_sink.refuse_code = None
    sms_sink.status = 503
    result = service.cli("replay", "--all", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["replayed"]) == sorted(dead)
    sms_refs = [r for r in dead if dead[r]["channel"] == "sms" and dead[r]["id"] in after_visit]

    def sms_retried_twice():
        return all(sum(e["outcome"] == "retrying" and e["error"] == "HTTP 503 from the provider"
                       for e in store.attempts(r)) >= 2 for r in sms_refs)

    wait_until(sms_retried_twice, 30)
    assert sms_sink.snapshot() == []
    sms_sink.status = 200

    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 30)
    settle(redis_client)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    for booking_id, r in reminders_of(show_all(service, docs)):
        outcomes = [e["outcome"] for e in store.attempts(ref(booking_id, r["id"]))]
        if r["id"] not in after_visit:
            assert r["status"] == "skipped", r
            assert r["reason"] == (
                "not sent: it was meant for before the appointment, which has begun"), r
            assert outcomes == ["failed", "skipped"], (r, outcomes)
            continue
        assert r["status"] == "sent", r
        if r["channel"] == "email":
            # Every attempt made: the refused one, then the replay's (a fresh budget).
            assert r["attempts"] == 2 and outcomes == ["failed", "sent"], (r, outcomes)
        else:
            assert r["attempts"] >= 3, r  # two 503s or more, then the send
            assert outcomes[0] == "failed" and outcomes[-1] == "sent", outcomes
            assert set(outcomes[1:-1]) == {"retrying"}, outcomes
    result = service.cli("dead-letters", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout


# --- 5. duplicated and stale send tasks -------------------------------------------------

def test_duplicate_and_stale_send_tasks_never_send_twice(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client, publisher):
    smtp_sink.delay = 3.0  # time to publish duplicates while the first send is on the wire
    worker = service.up()
    doc = make_booking("X-1", starts_in=40, phone="+34600199001")
    (first,) = service.book(doc)
    confirm = ref("X-1", "confirm:email")

    wait_until(lambda: smtp_sink.data_started >= 1, 20)
    store = Store(redis_client, PREFIX)
    rec = store.record(confirm)
    assert rec["status"] == "sending", rec
    in_flight = [(uuid.uuid4().hex, confirm, rec["version"], rec["claim"]) for _ in range(2)]
    publisher.publish(in_flight)  # the very same task, twice, while it is being sent
    wait_until(lambda: len(smtp_sink.snapshot()) == 1, 20)
    wait_until(lambda: store.record(confirm).get("status") == "sent", 10)
    after_sent = [(uuid.uuid4().hex, confirm, rec["version"], rec["claim"]) for _ in range(2)]
    publisher.publish(after_sent)  # and twice more after it was sent
    smtp_sink.delay = 0.0

    # The visit moves: every step but the confirmation gets a new time and version 2.
    moved = make_booking("X-1", starts_in=12, phone="+34600199001")
    (second,) = service.book(moved)
    assert second["version"] == 2
    prep = ref("X-1", "prep:sms")
    rec2 = store.record(prep)
    stale = [(uuid.uuid4().hex, prep, "1", rec2.get("claim", "1")),  # the version before the move
             (uuid.uuid4().hex, ref("X-1", "spf:sms"), "1", "1"),
             (uuid.uuid4().hex, prep, "2", "999")]  # right version, a claim no pump made
    publisher.publish(stale)

    ids = [t[0] for t in in_flight + after_sent + stale]
    results = wait_until(lambda: (r := task_results(worker, ids)) and len(r) == len(ids) and r, 30)
    # Both duplicates carry the claim whose attempt is on the wire: each finds the ledger
    # held by an attempt of its own claim and is dropped, leaving the send to its owner (a
    # hand-back here would take the reminder from the working attempt: 5c5ad99). Nothing
    # is sent by either, asserted below.
    assert [results[t[0]] for t in in_flight] == ["dropped: claim in flight"] * 2, results
    assert [results[t[0]] for t in after_sent] == ["dropped: status sent"] * 2, results
    assert [results[t[0]] for t in stale] == [
        "dropped: version moved", "dropped: version moved", "dropped: stale claim"], results

    expected = (expected_keys(e2e_config, doc, first, only={"confirm:email"})
                + expected_keys(e2e_config, moved, second,
                                only={r["id"] for r in second["reminders"]} - {"confirm:email"}))
    assert sum(expected.values()) == QUICK_MESSAGES
    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= QUICK_MESSAGES, 40)
    settle(redis_client, seconds=3)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    final = service.show("X-1")
    assert {r["status"] for r in final["reminders"]} == {"sent"}, final
    assert {r["attempts"] for r in final["reminders"]} == {1}, final


# --- 6. a duplicate that finds the send in flight never undoes its outcome --------------

@pytest.mark.parametrize("outcome", ["sent", "failed", "retry"])
def test_in_flight_duplicate_never_undoes_the_finished_attempt(redis_client, outcome):
    """The interleaving test 5 cannot force with real processes, forced here.

    A duplicate of a send task finds the ledger taken ("in flight") and hands the reminder
    back to the schedule; if the owner finishes in between, that hand-back must not undo
    it: a sent reminder claimed again forever, a dead letter sent after all.
    """
    from worker.dispatch import Context, send_claimed

    now = datetime.now(UTC)
    owner_retry_at = now.timestamp() + 3600

    class OwnerFinishesMeanwhile(Store):
        def begin_send(self, ref, version, claim, token, ledger_ms, **kw):
            verdict = super().begin_send(ref, version, claim, token, ledger_ms, **kw)
            if verdict == "in flight":
                owner = Attempt(version, claim, "owner")
                if outcome == "sent":
                    assert self.finish_sent(ref, owner, now) == "ok"
                elif outcome == "failed":
                    assert self.finish_failed(ref, owner, "permanent failure: SMTP 550") == "ok"
                else:
                    retry_at = datetime.fromtimestamp(owner_retry_at, UTC)
                    assert self.finish_retry(ref, owner, retry_at, "could not connect") == "ok"
            return verdict

    store = OwnerFinishesMeanwhile(redis_client, PREFIX)
    rid = ref("R-1", "confirm:email")
    redis_client.hset(store.booking_key("e2e", "R-1"),
                      mapping={"status": "scheduled", "version": "1"})
    set_reminder_fields(store, rid, status="scheduled", version="1",
                        due_epoch=repr(now.timestamp()))
    redis_client.zadd(store.due_key, {rid: now.timestamp() - 1})
    (claim,) = store.claim_due(10, 8)
    assert store.begin_send(rid, claim.version, claim.claim, "owner", 8000) == "ok"

    settings = Settings(lease_seconds=8, send_timeout_seconds=3, _env_file=None)
    # The duplicate stops at the ledger: it renders nothing, and no step is care-critical.
    catalog = SimpleNamespace(protocols={}, critical_steps="")
    catalog.fresh = lambda settings: catalog  # no config/ to read again (worker/catalog.py)
    ctx = Context(settings=settings, store=store, catalog=catalog, renderer=None)  # type: ignore[arg-type]
    assert send_claimed(ctx, rid, claim.version, claim.claim) != "sent"  # the duplicate

    status = store.record(rid).get("status")
    due = redis_client.zscore(store.due_key, rid)
    assert redis_client.zscore(store.lease_key, rid) is None
    if outcome == "sent":
        assert (status, due) == ("sent", None)
        assert store.claim_due(10, 8) == []  # never claimed again
    elif outcome == "failed":
        assert (status, due) == ("failed", None)
        assert redis_client.zscore(store.dead_key, rid) is not None  # still a dead letter
    else:
        assert (status, due) == ("retrying", owner_retry_at)  # the owner's back-off stands
