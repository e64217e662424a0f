"""A sudden scale-down, for real: one of two workers SIGKILLed mid-burst (its container
removed, the OOM killer), or paused (SIGSTOP: a frozen VM, a stalled host) past the lapse of
its senders' registration and then let go on (SIGCONT); or SIGKILLed and its container
restarted, its pool process under the same hostname and pid as the one that died.

Real Redis, two real `celery worker` processes (each one pool process, two SMS threads),
`celery beat`, and a real HTTP SMS gateway that parks the first two sends. A burst of SMS
falls due at once; the pump's first window (two claims a thread, nothing measured yet) goes
to one worker as one batch: its two threads are parked at the gateway, the rest wait in it,
not begun, and the other worker is idle while the rest of the burst waits due. Then that
worker is gone. What must hold: once its registration lapses, its claims stop counting
against the channel's capacity and those it had not begun go back to the schedule (fenced by
their claim), so the survivor sends the whole burst within seconds, not once the claims'
hold (41 s here) or lease (300 s) runs out; each SMS reaches the gateway once; the two sends
that were at the gateway when it went are left to their ledger (their outcome is unknown);
and a worker that was only slow sends nothing late twice, nor anything cancelled meanwhile.
Both workers' registrations lapse 3 s after their last refresh (tests/ops/senders_lapse.py;
10 s by default).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import BIN, Service, wait_until
from tests.ops import test_sigterm
from tests.ops.senders_lapse import LAPSE_TTL
from tests.ops.test_sigterm import PREFIX, Gateway, booking, final_state
from tests.sinks import SmtpSink, WebhookReceiver
from worker.clock import redis_time
from worker.pump import Keys
from worker.service import WORKER_QUEUES
from worker.store import Store

pytestmark = pytest.mark.integration
service, gateway, smtp_sink = test_sigterm.service, test_sigterm.gateway, test_sigterm.smtp_sink
BURST = 24
HOLD = 10 + 2 * 15 + 1  # what an outstanding claim counts for, at the default settings
# The survivor sends the burst within this long of the other worker going: its lapse and a
# few seconds, far below the claims' hold and lease.
BOUND = LAPSE_TTL + 6


def ref(n: int) -> str:
    return f"ops/S-{n}/confirm:sms"


def number(phone: str) -> int:
    return int(phone[-5:])


# A worker as in a container named `worker-<name>`: the first process of a pid namespace of
# its own, so that its pool process has the pid the same worker's pool process had before it
# (a container restarted keeps its hostname and numbers its processes afresh).
CONTAINED = ["unshare", "--user", "--map-root-user", "--uts", "--pid", "--fork",
             "--kill-child", "sh", "-c", 'hostname "worker-$0" && exec "$@"']


def containers() -> None:
    """Skip unless this host lets a test make a container's namespaces (user, UTS, pid)."""
    try:
        made = subprocess.run([*CONTAINED, "probe", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no unshare here: {exc}")
    if made.returncode != 0:
        pytest.skip(f"this host makes no user/pid namespaces: {made.stderr.decode()[-200:]}")


def start(service: Service, name: str, *, contained: bool = False,
          log: str | None = None) -> subprocess.Popen[bytes]:
    proc = service._spawn([*(CONTAINED + [name] if contained else []), str(BIN / "celery"), "-A",
                           "worker.celery_app", "worker",
                           "--loglevel=INFO", "--concurrency=1", "-Q", WORKER_QUEUES,
                           "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                           "-I", "tests.ops.senders_lapse"], log or name)
    proc.concurrency = 1  # type: ignore[attr-defined]
    return proc


def pool_of(worker: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The worker's pool processes (under the celery main process when contained)."""
    main = psutil.Process(worker.pid)
    if main.name() == "unshare":
        inside = main.children()
        if not inside:
            return []
        main = inside[0]
    return main.children()


def ready(service: Service, worker: subprocess.Popen[bytes]) -> None:
    """`Service.ready`, for a worker contained or not: ready, its pool warmed up too."""
    if psutil.Process(worker.pid).name() != "unshare":
        service.ready(worker)
        return
    wait_until(lambda: b" ready." in worker.log_path.read_bytes()  # type: ignore[attr-defined]
               or worker.poll() is not None, 30)
    assert worker.poll() is None, worker.log_path.read_text()  # type: ignore[attr-defined]

    def warm() -> bool:
        try:
            pool = pool_of(worker)
            return len(pool) >= 1 and all(p.num_threads() > 1 for p in pool)
        except psutil.NoSuchProcess:
            return False
    wait_until(warm, 30)


def own_pid(process: psutil.Process) -> int:
    """The pid a process sees for itself (in its own pid namespace, if contained)."""
    with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {process.pid}")


def burst_held_by_one(service: Service, gateway: Gateway, redis_client, *,
                      contained: bool = False,
                      ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], set[int],
                                 set[int]]:
    """Start two workers and beat, book the burst; return (the worker holding the pump's
    first window, the other, the bookings it has at the gateway, those waiting in it)."""
    a = start(service, "a", contained=contained)
    b = start(service, "b", contained=contained)
    service.beat(worker=[a, b])
    ready(service, a)
    ready(service, b)
    # Both registered: the pump counts four threads (a window of eight before any is measured).
    senders = Keys(PREFIX).senders("sms")
    wait_until(lambda: redis_client.zcard(senders) == 2, 10)
    service.book(*[booking(n, "onesms") for n in range(1, BURST + 1)])
    assert gateway.parked.acquire(timeout=15) and gateway.parked.acquire(timeout=15), \
        "the first two sends never reached the gateway"
    parked = {number(to) for _, to in gateway.snapshot()}
    assert len(parked) == 2

    def at_gateway(worker: subprocess.Popen[bytes]) -> int:
        found = 0
        for child in pool_of(worker):
            try:
                found += sum(1 for c in child.net_connections("tcp")
                             if c.raddr and c.raddr.port == gateway.port)
            except psutil.NoSuchProcess:
                pass
        return found

    victim, survivor = (a, b) if at_gateway(a) else (b, a)
    assert at_gateway(victim) == 2 and at_gateway(survivor) == 0
    time.sleep(0.5)  # the pump's runs meanwhile hand out nothing more: the window is full
    out = Keys(PREFIX).outstanding("sms")
    held = {int(m.split("/")[1][2:]) for m in redis_client.zrange(out, 0, -1)}
    waiting = held - parked
    assert parked <= held and len(waiting) >= 3, (held, parked)
    # The rest of the burst is still due: the survivor has been handed nothing.
    assert redis_client.zcard(Store(redis_client, PREFIX).due_key) == BURST - len(held)
    assert survivor.poll() is None and victim.poll() is None
    return victim, survivor, parked, waiting


def wait_sent(gateway: Gateway, expected: set[int], since: float) -> None:
    """Wait BOUND seconds for every SMS of `expected` to reach the gateway; else fail,
    saying which arrived and when."""
    try:
        wait_until(lambda: {number(to) for _, to in gateway.snapshot()} >= expected, BOUND)
    except AssertionError:
        got = sorted((round(at - since, 1), number(to)) for at, to in gateway.snapshot())
        raise AssertionError(f"within {BOUND:g}s of the worker going, the gateway got only "
                             f"(seconds after, booking) {got}, not {sorted(expected)}") from None


def sent_in(log: str) -> set[int]:
    return {int(n) for n in re.findall(r"send ops/S-(\d+)/confirm:sms: sent \(attempt", log)}


def records(store: Store, n: int) -> tuple[Any, ...]:
    (reminder,) = store.timeline("ops", f"S-{n}")["reminders"]
    return reminder["status"], reminder["attempts"], reminder["reason"], [
        line["outcome"] for line in store.attempts(ref(n))]


def test_a_worker_killed_mid_burst_holds_its_claims_only_until_its_registration_lapses(
        service: Service, gateway: Gateway, redis_client) -> None:
    victim, survivor, parked, waiting = burst_held_by_one(service, gateway, redis_client)
    killed_at = time.time()
    service.kill(victim)  # the whole worker, pool and all, as a container removed
    everyone = set(range(1, BURST + 1))
    rest = everyone - parked

    def arrived() -> Counter[int]:
        return Counter(number(to) for _, to in gateway.snapshot())

    # Every SMS not at the gateway when the worker went: sent by the survivor within
    # seconds of its registration lapsing. (Before: none for the claims' hold, 41 s: the
    # dead worker's claims filled the channel's window; those it held, its lease, 300 s.)
    wait_sent(gateway, everyone, killed_at)
    took = max(at for at, to in gateway.snapshot() if number(to) in rest) - killed_at
    assert took < BOUND < HOLD, took
    time.sleep(1.0)  # room for a stray second copy
    assert arrived() == Counter(everyone), arrived()  # each once
    assert sent_in(survivor.log_path.read_text()) == rest  # type: ignore[attr-defined]

    store = Store(redis_client, PREFIX)
    for n in rest:
        assert records(store, n) == ("sent", 1, None, ["sent"]), (n, records(store, n))
        assert redis_client.get(store.ledger_key(ref(n))) == "sent"
    # The two at the gateway when the worker went: outcome unknown, left to their ledger
    # (held by the dead worker's attempt) and lease: never sent again beside it.
    for n in parked:
        found = records(store, n)
        assert found == ("sending", 1, "when the booking arrives", []), (n, found)
        ledger = store.ledger_key(ref(n))
        assert redis_client.get(ledger) not in (None, "sent")
        assert redis_client.pttl(ledger) > 200_000  # the attempt's: lease_seconds, 300 s
        assert redis_client.zscore(store.lease_key, ref(n)) is not None
    # Nothing left counting against the channel, nothing due.
    state = final_state(store, [ref(n) for n in everyone])
    assert (state["due"], state["lease"], state["dead"], state["outstanding"]) == (0, 2, 0, 0)
    print(f"killed the worker holding {len(parked) + len(waiting)} claims; the survivor sent "
          f"the {len(rest)} others {took:.1f}s after (registration lapse {LAPSE_TTL:g}s, "
          f"hold {HOLD}s)")


def test_a_worker_killed_mid_burst_whose_container_restarts_under_the_same_pid_holds_nothing(
        service: Service, gateway: Gateway, redis_client) -> None:
    """Containers number their processes afresh: a worker's container restarted (OOM-killed,
    `restart: always`; a pod's container restarted keeps the pod's hostname) runs its pool
    process under the same hostname and pid as the one that died, as every container does
    (its processes numbered alike at each start). Its senders then register under the dead
    one's name: the dead one's registration must still lapse, and what it held go to the
    live senders within seconds, not a hold or lease later.

    The restarted worker comes up while the one it replaces still refreshes its
    registration, and then that one is killed: in Redis the same as a restart that registers
    within the dead one's lapse (10 s by default: a worker starts in a few), without
    depending on how fast a loaded machine starts one."""
    # A send held at the gateway, and claims waiting for the senders, both outlast the
    # restart on a busy machine: the waiting claims are never handed back by their own
    # worker's start-by meanwhile.
    containers()
    service.configure(REMINDERS_SEND_TIMEOUT_SECONDS="60", REMINDERS_SEND_MAX_WAIT_SECONDS="60")
    hold = 60 + 2 * 60 + 1
    victim, survivor, parked, waiting = burst_held_by_one(service, gateway, redis_client,
                                                          contained=True)
    argv = list(victim.args)  # type: ignore[arg-type]
    name = str(argv[argv.index("-n") + 1]).partition("@")[0]
    # The dead one's clinic event senders, registered by its pool process as it warmed up.
    (events_of_dead,) = [m for m in redis_client.zrange(f"{PREFIX}:ev:senders", 0, -1)
                         if m.startswith(f"worker-{name}:")]
    restarted = start(service, name, contained=True, log=f"{name}-restarted")
    ready(service, restarted)
    (dead,), (again,) = pool_of(victim), pool_of(restarted)
    assert own_pid(dead) == own_pid(again), (own_pid(dead), own_pid(again))  # the forcing
    killed_at = time.time()
    service.kill(victim)
    everyone = set(range(1, BURST + 1))
    rest = everyone - parked

    def arrived() -> Counter[int]:
        return Counter(number(to) for _, to in gateway.snapshot())

    wait_sent(gateway, everyone, killed_at)
    took = max(at for at, to in gateway.snapshot() if number(to) in rest) - killed_at
    assert took < BOUND < hold, took
    # Its clinic event senders' registration lapses too (what they held then stops counting
    # against the event threads: worker/webhooks.py `_CLAIM`), not kept alive by the
    # restarted worker's under the same name.
    try:
        wait_until(lambda: (redis_client.zscore(f"{PREFIX}:ev:senders", events_of_dead)
                            or 0) < redis_time(redis_client), BOUND)
    except AssertionError:
        raise AssertionError(f"the dead worker's event senders ({events_of_dead}) are still "
                             f"registered {time.time() - killed_at:.1f}s after") from None
    time.sleep(1.0)  # room for a stray second copy
    assert arrived() == Counter(everyone), arrived()  # each once
    sent = [sent_in(w.log_path.read_text())  # type: ignore[attr-defined]
            for w in (survivor, restarted)]
    assert sent[0] | sent[1] == rest and not sent[0] & sent[1], sent
    store = Store(redis_client, PREFIX)
    for n in rest:
        assert records(store, n) == ("sent", 1, None, ["sent"]), (n, records(store, n))
    for n in parked:  # left to their ledger and lease, as ever
        assert records(store, n)[0] == "sending", (n, records(store, n))
        assert redis_client.get(store.ledger_key(ref(n))) not in (None, "sent")
    state = final_state(store, [ref(n) for n in everyone])
    assert (state["due"], state["lease"], state["dead"], state["outstanding"]) == (0, 2, 0, 0)
    print(f"killed the worker holding {len(parked) + len(waiting)} claims, its restart "
          f"under pid {own_pid(again)} up: the others sent {took:.1f}s after")


def test_a_worker_paused_past_its_lapse_then_let_go_on_sends_nothing_twice_nor_cancelled(
        service: Service, gateway: Gateway, redis_client) -> None:
    victim, survivor, parked, waiting = burst_held_by_one(service, gateway, redis_client)
    stopped_at = time.time()
    os.killpg(victim.pid, signal.SIGSTOP)  # slow, not dead: every process of it paused
    store = Store(redis_client, PREFIX)
    try:
        # The clinic cancels one booking the paused worker holds, not begun.
        cancelled = min(waiting)
        done = service.cli("cancel", "--clinic", "ops", f"S-{cancelled}")
        assert done.returncode == 0, done.stderr
        everyone = set(range(1, BURST + 1))
        rest = everyone - parked - {cancelled}

        def arrived() -> Counter[int]:
            return Counter(number(to) for _, to in gateway.snapshot())

        wait_sent(gateway, everyone - {cancelled}, stopped_at)
        took = time.time() - stopped_at
        assert sent_in(survivor.log_path.read_text()) == rest  # type: ignore[attr-defined]
        # The parked two: at the gateway, its answer waiting for the paused worker.
        gateway.release()
        time.sleep(0.5)
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    # Let go on: it records its two sends and begins the claims it held, each fenced off
    # (handed back and sent by the survivor meanwhile, or cancelled).
    wait_until(lambda: all(records(store, n)[0] == "sent" for n in parked), 10)
    wait_until(lambda: redis_client.zcard(Keys(PREFIX).outstanding("sms")) == 0
               and b"dropped" in victim.log_path.read_bytes(), 10)  # type: ignore[attr-defined]
    time.sleep(1.5)  # room for a stray late send
    assert arrived() == Counter(everyone - {cancelled}), arrived()  # each once, no cancelled
    victim_log = victim.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    assert sent_in(victim_log) == parked, victim_log[-3000:]
    for n in parked | rest:
        assert records(store, n) == ("sent", 1, None, ["sent"]), (n, records(store, n))
    status, _, reason, outcomes = records(store, cancelled)
    assert status == "cancelled" and outcomes == [], records(store, cancelled)
    print(f"the cancelled one: {reason!r}")
    state = final_state(store, [ref(n) for n in everyone - {cancelled}])
    assert state == {"due": 0, "lease": 0, "dead": 0, "outstanding": 0,
                     "ledgers": {ref(n): "sent" for n in everyone - {cancelled}}}, state
    assert victim.poll() is None and survivor.poll() is None
    print(f"paused the worker holding {len(parked) + len(waiting)} claims; the survivor sent "
          f"{len(rest)} within {took:.1f}s; let go on, it sent its 2 parked and nothing else")


# --- the clinic's events: the same lapse -------------------------------------------------

WEBHOOK_SECRET = "ops-webhook-secret-0123456789"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(WEBHOOK_SECRET).start()
    yield r
    r.gate.set()
    r.stop()


def test_a_worker_killed_with_a_clinic_event_keeps_no_event_threads_from_its_replacement(
        service: Service, gateway: Gateway, smtp_sink: SmtpSink, receiver: WebhookReceiver,
        redis_client, tmp_path: Path) -> None:
    """The clinic's webhooks (reminder.sent here; booking.held alerts alike) are claimed no
    more than the registered event senders take at once, each counted until it finishes or
    its lease ends. A worker killed while delivering one, and the worker that replaces it:
    once the dead one's registration lapses, what it held stops counting, so the clinic's
    other events go at once, not after the dead one's lease (60 s here; 300 s by default).
    The event it was delivering is the clinic's again after its lease (at least once)."""
    clinic = tmp_path / "config" / "clinics" / "ops.toml"
    clinic.write_text(clinic.read_text() + f'[webhook]\nurl = "{receiver.url}"\n'
                      'secret = "${OPS_WEBHOOK_SECRET}"\n', encoding="utf-8")
    service.configure(OPS_WEBHOOK_SECRET=WEBHOOK_SECRET, REMINDERS_LEASE_SECONDS="60",
                      REMINDERS_WEBHOOK_THREADS="1")
    receiver.gate.clear()  # every delivery parked until set
    a = start(service, "a")
    service.beat(worker=a)
    service.ready(a)
    docs = [booking(n, "oneemail") for n in range(1, 7)]
    service.book(*docs)
    wait_until(lambda: len(smtp_sink.snapshot()) == len(docs), 15)
    wait_until(lambda: receiver.snapshot(), 15)  # A's one event thread, parked
    time.sleep(0.5)
    parked = {h.headers["Reminders-Event-Id"] for h in receiver.snapshot()}
    assert len(parked) == 1 and redis_client.zcard(f"{PREFIX}:ev:out") == 1
    killed_at = time.time()
    service.kill(a)
    receiver.gate.set()  # the endpoint answers from here on
    # Its registration lapses; then its replacement starts.
    wait_until(lambda: not redis_client.zrangebyscore(f"{PREFIX}:ev:senders", time.time(),
                                                      "+inf"), LAPSE_TTL + 3)
    b = start(service, "b")
    service.ready(b)

    def delivered() -> Counter[str]:
        return Counter(h.headers["Reminders-Event-Id"] for h in receiver.snapshot()
                       if h.headers["Reminders-Event-Id"] not in parked)

    others = 2 * len(docs) - 1  # each booking's reminder.sent and booking.completed

    # B's one event thread takes one event a pump tick (1 s): the pump claims no more than
    # the threads take at once. So within its lapse and a few seconds, plus a tick an event:
    # far below the dead worker's lease (60 s), which would hold B's only thread's place.
    try:
        wait_until(lambda: len(delivered()) == others, BOUND + others)
    except AssertionError:
        raise AssertionError(f"{time.time() - killed_at:.1f}s after the kill, the clinic got "
                             f"{sum(delivered().values())} of the {others} other events"
                             ) from None
    time.sleep(1.0)
    assert set(delivered().values()) == {1}, delivered()  # each once
    assert all(h.valid for h in receiver.snapshot())
    types = Counter(h.json()["type"] for h in receiver.snapshot())
    assert types == {"reminder.sent": len(docs), "booking.completed": len(docs)}, types
    # The one the dead worker was delivering: due again once its lease ends, not before.
    (event,) = parked
    due = redis_client.zscore(f"{PREFIX}:ev:due", event)
    assert due is not None and due > time.time() + 40, due
    assert redis_client.zcard(f"{PREFIX}:ev:out") <= 1
    print(f"killed the worker delivering a clinic event; its replacement delivered the "
          f"{others} others {time.time() - killed_at:.1f}s after (lease 60s)")
