"""A warm shutdown, for real: a worker process sent SIGTERM (what `docker stop` sends to the
container's main process) while its senders are in the middle of a batch.

Real Redis, real `celery worker` and `celery beat` processes, a real HTTP SMS gateway and a
real SMTP server on 127.0.0.1 that park the sends the test chooses. What must hold: the
worker stops claiming; the sends it has under way finish within the grace period and are
recorded; the claims it had not begun go back to the schedule at once and another worker
sends them within seconds (not a lease later); a send still talking to its provider when
the grace period ends is recorded as of unknown outcome and sent once, after its ledger
expires; nothing is lost and nothing is sent twice (the sinks' messages, the attempt logs
and the final Redis state say so).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, QUICK_PROTOCOL, Service, wait_until
from tests.sinks import SmtpSink
from tests.test_send_batches import Gateway as HoldingGateway
from tests.test_send_batches import Rig, phone, prep
from worker.dispatch import CUT_REASON, STOPPED_BEFORE_SENDING, attempt
from worker.embedded import free_port
from worker.pump import Keys
from worker.service import WORKER_QUEUES
from worker.store import Store

pytestmark = pytest.mark.integration
PREFIX = "reminders"  # the default key prefix: the processes run with it

ONE_SMS = """
name = "One SMS"
[[steps]]
id = "confirm"
at = "booking"
channels = ["sms"]
template = "confirmation"
late = "send"
""" + QUICK_PROTOCOL[QUICK_PROTOCOL.index("[advice]"):]  # what the templates state
ONE_EMAIL = ONE_SMS.replace('"One SMS"', '"One email"').replace('["sms"]', '["email"]')


class Gateway:
    """An HTTP SMS gateway that parks the first `park` requests (after the first
    `answer_first`, answered at once) until `release()`, answers the rest at once (200), or
    after `delay` seconds (a slow provider), and records every request when it arrives: a
    request that reached it counts as delivered, as with a real provider."""

    def __init__(self, park: int, delay: float = 0.0, answer_first: int = 0) -> None:
        self.port = free_port()
        self.park = park
        self.answer_first = answer_first
        self.delay = delay
        self.arrived: list[tuple[float, str]] = []  # (time, to)
        self.parked = threading.Semaphore(0)
        self._gate = threading.Event()
        self._lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with gateway._lock:
                    gateway.arrived.append((time.time(), body.get("to", "")))
                    parking = (gateway.answer_first < len(gateway.arrived)
                               <= gateway.answer_first + gateway.park)
                if parking:
                    gateway.parked.release()
                    gateway._gate.wait(60)
                elif gateway.delay:
                    time.sleep(gateway.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 128
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._gate.set()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.arrived)

    def close(self) -> None:
        self._gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway(park=2)
    yield g
    g.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


def make_config(tmp_path: Path, gateway: Gateway, smtp: SmtpSink) -> Path:
    config = tmp_path / "config"
    (config / "protocols").mkdir(parents=True)
    (config / "clinics").mkdir()
    (config / "protocols" / "onesms.toml").write_text(ONE_SMS, encoding="utf-8")
    (config / "protocols" / "oneemail.toml").write_text(ONE_EMAIL, encoding="utf-8")
    (config / "clinics" / "ops.toml").write_text(f"""
name = "Ops Skin Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@ops.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{gateway.port}/sms?:to={{to}}"
""", encoding="utf-8")
    return config


@pytest.fixture
def service(tmp_path: Path, redis_server, redis_client, gateway: Gateway,
            smtp_sink: SmtpSink) -> Iterator[Service]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({
        "REMINDERS_REDIS_URL": redis_server.url,
        "REMINDERS_CONFIG_DIR": str(make_config(tmp_path, gateway, smtp_sink)),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
        "REMINDERS_SEND_THREADS": "2",
    })
    svc = Service(env, tmp_path)
    yield svc
    svc.discard()


def booking(n: int, treatment: str) -> dict[str, Any]:
    starts = datetime.now(UTC) + timedelta(days=3)
    return {"clinic": "ops", "booking_id": f"S-{n}", "treatment": treatment,
            "starts_at": starts.isoformat(timespec="seconds"),
            "patient": {"name": "Ana López", "email": f"s{n}@example.com",
                        "phone": f"+346001{n:05d}", "timezone": "Europe/Madrid",
                        "locale": "en", "channels": ["sms", "email"]}}


def sigterm(proc) -> float:
    """SIGTERM to the worker's main process only, as `docker stop` does; return when."""
    proc.send_signal(signal.SIGTERM)
    return time.time()


def wait_exit(proc, timeout: float) -> int | None:
    """The exit status, or None if still running after `timeout` (the caller's assertion
    then shows the worker's log)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return int(proc.returncode)


def final_state(store: Store, refs: list[str]) -> dict[str, Any]:
    client = store.redis
    return {
        "due": client.zcard(store.due_key),
        "lease": client.zcard(store.lease_key),
        "dead": client.zcard(store.dead_key),
        "outstanding": sum(client.zcard(Keys(PREFIX).outstanding(c)) for c in ("email", "sms")),
        "ledgers": {ref: client.get(store.ledger_key(ref)) for ref in refs},
    }


def test_sigterm_mid_batch_finishes_what_is_sending_and_hands_back_the_rest(
        service: Service, gateway: Gateway, redis_client, tmp_path: Path) -> None:
    """Two sends parked at the gateway, more claims waiting for the worker's two threads:
    SIGTERM; the parked ones finish within the grace period, the waiting ones go out on
    another worker within seconds. A lease of 60 s shows they did not wait for it."""
    # A send timeout long enough that the parked sends are still waiting when the SIGTERM
    # comes, however slowly the second worker starts on a busy machine.
    service.configure(REMINDERS_LEASE_SECONDS="60", REMINDERS_SEND_TIMEOUT_SECONDS="20",
                      REMINDERS_SEND_MAX_WAIT_SECONDS="40",
                      REMINDERS_SHUTDOWN_GRACE_SECONDS="15")
    a, _ = service.start("a", concurrency=1)
    docs = [booking(n, "onesms") for n in range(1, 9)]
    service.book(*docs)
    assert gateway.parked.acquire(timeout=15) and gateway.parked.acquire(timeout=15), \
        "the first two sends never reached the gateway"
    store = Store(redis_client, PREFIX)
    # More claims wait in A's senders for its two (parked) threads.
    wait_until(lambda: redis_client.zcard(Keys(PREFIX).outstanding("sms")) >= 4, 15)
    b = service.worker("b", concurrency=1)
    stopped_at = sigterm(a)
    time.sleep(1.0)
    assert a.poll() is None, "the worker must wait for the sends under way"
    released_at = time.time()
    gateway.release()
    assert wait_exit(a, 15) == 0, a.log_path.read_text()
    exited_at = time.time()

    phones = {d["patient"]["phone"] for d in docs}
    wait_until(lambda: {to for _, to in gateway.snapshot()} == phones, 20)
    time.sleep(2.0)  # room for a stray second copy to arrive
    arrivals = gateway.snapshot()
    counts = Counter(to for _, to in arrivals)
    assert counts == Counter(phones), f"each SMS once: {counts}"

    a_log = a.log_path.read_text(errors="replace")
    handed_back = re.findall(r"send (\S+): the worker is stopping; handed back", a_log)
    sent_by_a = set(re.findall(r"send (\S+): sent \(attempt", a_log))
    sent_by_b = set(re.findall(r"send (\S+): sent \(attempt", b.log_path.read_text()))
    assert handed_back, a_log
    assert len(sent_by_a) == 2 and not sent_by_a & sent_by_b  # the two that were parked
    assert set(handed_back) <= sent_by_b
    assert sent_by_a | sent_by_b == {f"ops/S-{n}/confirm:sms" for n in range(1, 9)}
    # The handed-back ones went out on B within seconds of the SIGTERM, not a lease later.
    late = [at - stopped_at for at, to in arrivals
            if f"ops/S-{int(to[-5:])}/confirm:sms" in handed_back]
    assert late and max(late) < 10, late
    assert exited_at - stopped_at < 15, "within the grace period"
    # The pump stopped claiming: nothing published by A once its senders began to stop.
    stopping_at = a_log.index("senders: stopping")
    assert "pump: published" not in a_log[stopping_at:], a_log[stopping_at:]

    refs = [f"ops/S-{n}/confirm:sms" for n in range(1, 9)]
    wait_until(lambda: final_state(store, refs)["outstanding"] == 0, 10)
    state = final_state(store, refs)
    assert state == {"due": 0, "lease": 0, "dead": 0, "outstanding": 0,
                     "ledgers": dict.fromkeys(refs, "sent")}, state
    for ref in refs:
        log = store.attempts(ref)
        assert [line["outcome"] for line in log] == ["sent"], (ref, log)
    for doc in docs:
        timeline = store.timeline("ops", doc["booking_id"])
        assert [(r["status"], r["attempts"]) for r in timeline["reminders"]] == [("sent", 1)]
    print(f"SIGTERM -> exit {exited_at - stopped_at:.1f}s (sends released after "
          f"{released_at - stopped_at:.1f}s); handed back {len(handed_back)}, sent on B "
          f"{max(late):.1f}s after the SIGTERM at the latest")


def test_sigterm_cuts_a_send_still_handing_over_when_the_grace_period_ends(
        service: Service, smtp_sink: SmtpSink, redis_client, tmp_path: Path) -> None:
    """Two emails parked in the SMTP server's DATA for longer than the grace period: the
    worker records them as of unknown outcome when it runs out and exits; the server never
    acknowledged them, so nothing was delivered; they are sent once, by the other worker,
    when their ledger expires (lease_seconds after the attempt began)."""
    lease = 12
    service.configure(REMINDERS_LEASE_SECONDS=str(lease), REMINDERS_SEND_TIMEOUT_SECONDS="5",
                      REMINDERS_SHUTDOWN_GRACE_SECONDS="2")
    smtp_sink.delay = 30.0
    a, _ = service.start("a", concurrency=1)
    docs = [booking(n, "oneemail") for n in (1, 2)]
    service.book(*docs)
    wait_until(lambda: smtp_sink.data_started >= 2, 15)
    begun_at = time.time()
    smtp_sink.delay = 0.0  # what comes next is answered at once
    # At once: the grace (2 s) must end well before the sends' own timeout (5 s).
    stopped_at = sigterm(a)
    b = service.worker("b", concurrency=1)  # takes over; the cut sends wait for their ledger
    assert wait_exit(a, 15) == 0, a.log_path.read_text()
    exited_at = time.time()
    a_log = a.log_path.read_text(errors="replace")
    assert len(re.findall(r"send ops/S-\d/confirm:email: the worker stopped before the "
                          r"provider answered", a_log)) == 2, a_log
    assert "2 send(s) cut while handing over" in a_log

    addresses = {d["patient"]["email"] for d in docs}
    wait_until(lambda: {m.to for m in smtp_sink.snapshot()} == addresses, lease + 10)
    time.sleep(2.0)  # room for a stray second copy to arrive
    got = Counter(m.to for m in smtp_sink.snapshot())
    assert got == Counter(addresses), got
    assert smtp_sink.data_abandoned == 2  # the cut ones: never acknowledged, not delivered
    first = min(m.at for m in smtp_sink.snapshot())
    # Not before their ledger expired: never two attempts at once.
    assert first >= begun_at + lease - 2, (first - begun_at)

    store = Store(redis_client, PREFIX)
    refs = [f"ops/S-{n}/confirm:email" for n in (1, 2)]
    state = final_state(store, refs)
    assert state == {"due": 0, "lease": 0, "dead": 0, "outstanding": 0,
                     "ledgers": dict.fromkeys(refs, "sent")}, state
    for ref in refs:
        log = store.attempts(ref)
        assert [line["outcome"] for line in log] == ["unknown", "sent"], (ref, log)
        assert CUT_REASON in log[0]["error"]
    sent_by_b = set(re.findall(r"send (\S+): sent \(attempt 2", b.log_path.read_text()))
    assert sent_by_b == set(refs)
    for doc in docs:
        timeline = store.timeline("ops", doc["booking_id"])
        assert [(r["status"], r["attempts"]) for r in timeline["reminders"]] == [("sent", 2)]
    print(f"SIGTERM -> exit {exited_at - stopped_at:.1f}s (grace 2s); the cut sends went out "
          f"{first - begun_at:.1f}s after they began (lease {lease}s)")


PARK_KEY = "tests:pump:park"  # tests/ops/pump_park.py holds A's pump-run lock while set


def test_sigterm_while_a_pump_run_is_under_way_hands_back_at_once(
        service: Service, gateway: Gateway, redis_client, tmp_path: Path) -> None:
    """A pump run under way in the stopping pool process (stalled on its broker or on Redis)
    does not hold its senders open: the claims not begun go back to the schedule at once and
    another worker sends them, while the run and the parked sends finish. (The shutdown
    waited for the run first, up to 10 s, and meanwhile the senders began those claims.)"""
    service.configure(REMINDERS_LEASE_SECONDS="60", REMINDERS_SEND_TIMEOUT_SECONDS="20",
                      REMINDERS_SEND_MAX_WAIT_SECONDS="40",
                      REMINDERS_SHUTDOWN_GRACE_SECONDS="15")
    a = service._spawn([str(BIN / "celery"), "-A", "worker.celery_app", "worker",
                        "--loglevel=INFO", "--concurrency=1", "-Q", WORKER_QUEUES,
                        "-n", "a@%h", "--without-gossip", "--without-mingle",
                        "-I", "tests.ops.pump_park"], "a")
    wait_until(lambda: b" ready." in a.log_path.read_bytes() or a.poll() is not None, 30)
    assert a.poll() is None, a.log_path.read_text()
    service.beat(worker=a)
    docs = [booking(n, "onesms") for n in range(1, 9)]
    service.book(*docs)
    assert gateway.parked.acquire(timeout=15) and gateway.parked.acquire(timeout=15), \
        "the first two sends never reached the gateway"
    wait_until(lambda: redis_client.zcard(Keys(PREFIX).outstanding("sms")) >= 4, 15)
    # A pump run under way in A's (only) pool process, parked until the key goes.
    from celery import Celery

    publisher = Celery(broker=service.env["REMINDERS_REDIS_URL"], set_as_current=False)
    publisher.conf.broker_transport_options = {"global_keyprefix": f"{PREFIX}:celery:"}
    try:
        publisher.send_task("tests.pump.park", args=(PARK_KEY,), queue="reminders.pump")
    finally:
        publisher.close()
    wait_until(lambda: redis_client.get(PARK_KEY) == "parked", 15)
    b = service.worker("b", concurrency=1)
    sigterm(a)
    # Handed back while the run is still under way and the two sends still parked.
    # (Within 8 s: waiting for the run first handed them back 10 s after the shutdown began.)
    wait_until(lambda: b"senders: stopping" in a.log_path.read_bytes(), 8)
    assert redis_client.get(PARK_KEY) == "parked" and a.poll() is None
    gateway.release()
    redis_client.delete(PARK_KEY)  # the run ends
    assert wait_exit(a, 15) == 0, a.log_path.read_text()

    phones = {d["patient"]["phone"] for d in docs}
    wait_until(lambda: {to for _, to in gateway.snapshot()} == phones, 20)
    time.sleep(1.0)  # room for a stray second copy to arrive
    counts = Counter(to for _, to in gateway.snapshot())
    assert counts == Counter(phones), f"each SMS once: {counts}"
    a_log = a.log_path.read_text(errors="replace")
    handed_back = set(re.findall(r"send (\S+): the worker is stopping; handed back", a_log))
    sent_by_a = set(re.findall(r"send (\S+): sent \(attempt", a_log))
    sent_by_b = set(re.findall(r"send (\S+): sent \(attempt", b.log_path.read_text()))
    assert len(sent_by_a) == 2 and handed_back and handed_back <= sent_by_b, a_log
    assert sent_by_a | sent_by_b == {f"ops/S-{n}/confirm:sms" for n in range(1, 9)}
    store = Store(redis_client, PREFIX)
    refs = [f"ops/S-{n}/confirm:sms" for n in range(1, 9)]
    wait_until(lambda: final_state(store, refs)["outstanding"] == 0, 10)
    assert final_state(store, refs) == {"due": 0, "lease": 0, "dead": 0, "outstanding": 0,
                                        "ledgers": dict.fromkeys(refs, "sent")}


# One SMS due a set time after booking (its visit a minute after that).
SOON_SMS = ONE_SMS.replace('"One SMS"', '"Soon SMS"').replace('at = "booking"', 'offset = "-60s"')


def test_sigterm_with_redis_down_ends_within_the_grace_period(
        service: Service, gateway: Gateway, redis_server, redis_client) -> None:
    """SIGTERM (`docker stop`) while Redis is unreachable: the worker still ends within its
    grace period and a few seconds (README "Operate"), what it could not hand back left to
    its lease, not after each pool process waited out the Redis client's retries (~40 s)
    first: past the compose file's stop grace period of 30 s, Docker SIGKILLs it mid-drain.
    Real Redis (frozen, SIGSTOP, just as a reminder falls due, then SIGKILLed; started
    again on its port and AOF), worker and beat.

    With a pump run under way when Redis dies (the pump thread's follow-up run for that
    reminder waits on the frozen Redis): the run waits out the client's retries, which the
    stop waited for 10 s (PUMP_RUN_WAIT_SECONDS) whatever the grace: 10 s and more with a
    grace of 4 s (this test, with Redis simply killed, met it by chance on a loaded machine:
    11.4 s). And Celery's own heartbeat, published every 2 s on the worker's main loop,
    retried the frozen broker until it was back: the SIGTERM was never acted on."""
    gateway.park = 0
    grace = 4.0
    config = Path(service.env["REMINDERS_CONFIG_DIR"])
    (config / "protocols" / "soon.toml").write_text(SOON_SMS, encoding="utf-8")
    # Beat's ticks 5 s apart: the run before the reminder's due instant follows up for it.
    service.configure(REMINDERS_SHUTDOWN_GRACE_SECONDS=str(grace),
                      REMINDERS_PUMP_INTERVAL_SECONDS="5")
    worker, _ = service.start()
    service.book(booking(1, "onesms"))  # the senders are up and used
    wait_until(lambda: gateway.snapshot(), 15)
    due = time.time() + 4.0
    soon = booking(2, "soon") | {"starts_at": datetime.fromtimestamp(due + 60, UTC).isoformat(
        timespec="milliseconds")}
    service.book(soon)
    assert redis_server.process is not None
    time.sleep(max(0.0, due - 0.3 - time.time()))
    assert len(gateway.snapshot()) == 1, "the second SMS went before Redis froze"
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(max(0.0, due + 0.7 - time.time()))  # the follow-up run waits on Redis
        redis_server.process.kill()
        redis_server.process.wait()
        stopped = sigterm(worker)
        status = wait_exit(worker, grace + 20)
        took = time.time() - stopped
    finally:
        redis_server.start()
    log = worker.log_path.read_text()  # type: ignore[attr-defined]
    assert status == 0 and took < grace + 6, (took, status, log[-3000:])
    assert "senders: stopping with Redis unreachable" in log, log[-3000:]
    assert len(gateway.snapshot()) == 1  # the second SMS waits for Redis and its lease


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "still-parked"])
def test_sigterm_then_redis_dies_mid_stop_still_ends_within_the_grace_period(
        service: Service, gateway: Gateway, redis_server, redis_client, accepted: bool) -> None:
    """Redis dies DURING a warm stop (the fault drill: SIGTERM, Redis SIGKILLed seconds
    later): two sends parked at the gateway when the SIGTERM comes, accepted by it once
    Redis is gone, so their records wait on Redis, or still parked when the grace ends, so
    they are cut and their records (unknown outcome) wait on Redis. The worker still ends
    within its grace period and a few seconds (README "Operate"): what it could not record
    is brought back by its lease and ledger, as after a SIGKILL. (The stop went on to
    deregister its senders in Redis, or to record the first cut send, waiting out the
    client's retries, ~40 s, past the grace: Docker's SIGKILL then cut it mid-drain.)"""
    # Longer than the drain's wait for a pump run caught by the outage (10 s from the
    # stop's start, worker/tasks.py PUMP_RUN_WAIT_SECONDS): the grace is what is measured.
    grace = 8.0
    service.configure(REMINDERS_LEASE_SECONDS="60", REMINDERS_SEND_TIMEOUT_SECONDS="20",
                      REMINDERS_SEND_MAX_WAIT_SECONDS="40",
                      REMINDERS_SHUTDOWN_GRACE_SECONDS=str(grace))
    worker, _ = service.start(concurrency=1)
    service.book(*[booking(n, "onesms") for n in (1, 2)])
    assert gateway.parked.acquire(timeout=15) and gateway.parked.acquire(timeout=15), \
        "the two sends never reached the gateway"
    assert redis_server.process is not None
    stopped = sigterm(worker)
    try:
        wait_until(lambda: b"Warm shutdown" in worker.log_path.read_bytes(), 5)
        time.sleep(1.5)  # the pool process is draining: its senders' sends still parked
        redis_server.process.kill()
        redis_server.process.wait()
        if accepted:
            gateway.release()  # accepted now: recording them needs the Redis that is gone
        status = wait_exit(worker, grace + 60)
        took = time.time() - stopped
    finally:
        gateway.release()
        redis_server.start()
    log = worker.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    # The grace, the cut's wait for the records (2 s), the last report's (1 s), the exit:
    # within the compose file's stop grace (30 s) at the default grace (20 s).
    assert status == 0 and took < grace + 8, (took, status, log[-3000:])
    print(f"SIGTERM -> exit {took:.1f}s (grace {grace:g}s; Redis killed during the stop)")


def test_the_main_process_drains_without_importing_the_send_path(redis_server) -> None:
    """The prefork pool's main process has no senders: its warm shutdown does not import
    the send path (Apprise, Jinja2, about 450 modules, half a second or more) to find none."""
    code = ("import sys, worker.tasks as t; t._drain(); "
            "print('worker.dispatch' in sys.modules, 'apprise' in sys.modules)")
    env = {**os.environ, "REMINDERS_REDIS_URL": redis_server.url}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout


# --- the same paths in one process, forced step by step ---------------------------------


@pytest.fixture
def holding() -> Iterator[HoldingGateway]:
    g = HoldingGateway()
    yield g
    g.close()


def test_an_attempt_not_yet_handed_over_goes_back_at_once_when_the_senders_stop(
        tmp_path: Path, redis_client, holding: HoldingGateway) -> None:
    rig = Rig(tmp_path, redis_client, holding)
    rig.book(rig.doc(1))
    (claim,) = rig.claim(prep(1))
    rig.lanes.close(grace=1.0)  # stopping: nothing new is handed to a provider
    before = time.time()
    # Begun (it takes the ledger), then finds the senders stopping before the hand-over.
    assert attempt(rig.ctx, claim.ref, claim.version, claim.claim,
                   guard=rig.lanes) == "handed back"
    s = rig.state(prep(1))
    assert s["record"]["status"] == "scheduled", s
    assert s["record"]["reason"] == STOPPED_BEFORE_SENDING
    assert s["lease"] is None and s["ledger"] is None  # free for the next claim at once
    assert before - 1 <= s["due"] <= time.time() + 1  # due now, not a lease later
    assert [line["outcome"] for line in s["log"]] == ["abandoned"]
    assert holding.bodies == []
    # A stale copy of the same claim is fenced off; the next claim sends it once.
    assert attempt(rig.ctx, claim.ref, claim.version, claim.claim) == "dropped: status scheduled"
    (again,) = rig.claim(prep(1))
    assert attempt(rig.ctx, again.ref, again.version, again.claim) == "sent"
    assert [b["to"] for b in holding.bodies] == [phone(1)]
    assert rig.state(prep(1))["record"]["status"] == "sent"


def test_close_cuts_what_is_still_handing_over_when_the_grace_ends(
        tmp_path: Path, redis_client, holding: HoldingGateway) -> None:
    rig = Rig(tmp_path, redis_client, holding, send_threads=1)
    for n in (1, 2):
        rig.book(rig.doc(n))
    holding.hold = {phone(1)}
    rig.hand(rig.claim(prep(1), prep(2)))  # prep(1) sends, prep(2) waits for the thread
    holding.wait_held()
    started = time.monotonic()
    rig.lanes.close(grace=0.5)
    took = time.monotonic() - started
    assert 0.5 <= took < 0.5 + 2.5, took  # the grace, then at most the wait for recording
    cut = rig.state(prep(1))
    assert cut["record"]["status"] == "retrying", cut
    assert cut["ledger"] not in (None, "sent")  # kept: no second attempt while it may live
    ttl = redis_client.pttl(rig.store.ledger_key(prep(1))) / 1000
    assert cut["due"] >= time.time() + ttl - 0.5  # tried again once the ledger expires
    assert [line["outcome"] for line in cut["log"]] == ["unknown"]
    assert CUT_REASON in cut["log"][0]["error"]
    waiting = rig.state(prep(2))  # never begun: handed back at once
    assert waiting["record"]["status"] == "scheduled" and waiting["log"] == [], waiting
    assert waiting["lease"] is None and waiting["due"] <= time.time()
    # In a pool process the process ends soon after. Here the thread lives on: the
    # provider's late acceptance is a delivery, recorded over the unknown outcome (else it
    # would be sent again once the ledger expires: tests/ops/test_sigterm_late_answer.py).
    holding.release(200)
    wait_until(lambda: len(rig.state(prep(1))["log"]) == 2, 5)
    late = rig.state(prep(1))
    assert [line["outcome"] for line in late["log"]] == ["unknown", "sent"]
    assert late["record"]["status"] == "sent" and late["ledger"] == "sent"
    assert late["due"] is None
