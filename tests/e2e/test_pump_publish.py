"""A pump run's send tasks, published in one pipelined round trip (worker/tasks.py
`_publish_all`, kombu's batch publish), are what a real Celery worker takes and runs: one
task per batch on its channel's queue, Celery's message as `apply_async` makes it. And a
publish the broker's connection loses part-way (some tasks went out, the rest not, the pump
told of neither) leaves no claim lost: every claim of the run goes back to the schedule at
once, the tasks that did go out find their claim gone, and each reminder goes once.

Real Redis (reached through a TCP relay that cuts the broker's connection mid-pipeline),
the worker's pump (`pump_now`) in a process of its own with the service's settings, a real
worker and the SMTP and HTTP sinks.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, wait_until
from tests.e2e.test_failures import PREFIX
from worker.store import Store

pytestmark = pytest.mark.integration
LPUSH = b"*3\r\n$5\r\nLPUSH\r\n"  # the start of one LPUSH key value on the wire
QUEUES = {"email": "reminders.send.email", "sms": "reminders.send.sms"}

# The pump as a worker's pump thread runs it (`pump_now`; the queues declared once, as by
# a pump that has published before), a run per line asked for on stdin; each answers one
# JSON line: what it published and how many writes to Redis carried its tasks (LPUSH), or
# the error it met.
PUMP = """
import json, sys
import redis
from kombu.common import maybe_declare
from worker import tasks
from worker.celery_app import SEND_QUEUES, app

with app.producer_or_acquire() as producer:
    for queue in SEND_QUEUES.values():
        maybe_declare(app.amqp.queues[queue], producer.channel)
trips = [0]
real = redis.connection.AbstractConnection.send_packed_command

def counted(self, command, check_health=True):
    chunks = [command] if isinstance(command, (bytes, str)) else command
    if any(b"LPUSH" in bytes(c, "utf-8") if isinstance(c, str) else b"LPUSH" in bytes(c)
           for c in chunks):
        trips[0] += 1
    return real(self, command, check_health)

redis.connection.AbstractConnection.send_packed_command = counted
print("ready", flush=True)
for _ in sys.stdin:
    trips[0] = 0
    try:
        out = {"published": tasks.pump_now().published, "trips": trips[0]}
    except Exception as exc:
        out = {"error": type(exc).__name__, "trips": trips[0]}
    print(json.dumps(out), flush=True)
"""


class Relay:
    """A TCP relay to Redis that passes everything on, until `cut_before(n)`: then the
    connection carrying the n-th LPUSH from there is cut just before it (the commands before
    it reach Redis whole and run; neither side gets another byte)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.cut_at: int | None = None
        self.seen = 0
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_before(self, n: int) -> None:
        with self.lock:
            self.cut_at, self.seen = n, 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut),
                             daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        tail = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                server.close()
                return
            at = None
            with self.lock:
                if self.cut_at is not None:
                    seen = tail + data
                    start = 0
                    while (found := seen.find(LPUSH, start)) >= 0:
                        self.seen += 1
                        if self.seen >= self.cut_at:
                            at = max(0, found - len(tail))
                            self.cut_at = None
                            self.cuts += 1
                            break
                        start = found + 1
                tail = data[-(len(LPUSH) - 1):]
            if at is None:
                server.sendall(data)
                continue
            server.sendall(data[:at])
            cut.set()
            server.shutdown(socket.SHUT_WR)  # Redis reads what came, then the end
            client.close()
            return

    def _down(self, server: socket.socket, client: socket.socket,
              cut: threading.Event) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if not cut.is_set():
                try:
                    client.sendall(data)
                except OSError:
                    pass
        server.close()
        if not cut.is_set():
            client.close()

    def close(self) -> None:
        self.listener.close()


class Pump:
    """The pump in a process of its own with the service's settings, its Redis (the broker
    and the store) through `relay`."""

    def __init__(self, service: Any, redis_url: str, relay: Relay) -> None:
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        env = {**service.env, "REMINDERS_SEND_BATCH_SIZE": "2",
               "REMINDERS_REDIS_URL": redis_url.replace(f":{port}", f":{relay.port}")}
        self.log = open(service.logs / "pump.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(BIN / "python"), "-c", PUMP], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready", "the pump did not start"

    def run(self) -> dict[str, Any]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def book_due(service: Any, redis_client: Any, make_booking: Any, prefix: str,
             n: int) -> dict[str, list[str]]:
    """Book `n` visits two days away: each one's confirmation email is due at once; make
    its SMS "prep" due now too. Return the refs due, per channel."""
    docs = [make_booking(f"{prefix}-{i}", starts_in=2 * 86400, phone=f"+3460020{i:04d}"
                         if prefix == "P" else f"+3460030{i:04d}") for i in range(n)]
    service.book(*docs)
    sms = [f"e2e/{d['booking_id']}/prep:sms" for d in docs]
    redis_client.zadd(f"{PREFIX}:due", {ref: time.time() - 100 for ref in sms})
    return {"email": [f"e2e/{d['booking_id']}/confirm:email" for d in docs], "sms": sms}


def queued(redis_client: Any) -> dict[str, list[dict[str, Any]]]:
    """Each send queue's messages as Redis holds them (kombu's envelope), oldest first."""
    return {channel: [json.loads(raw) for raw in reversed(
        redis_client.lrange(f"{PREFIX}:celery:{queue}", 0, -1))]
        for channel, queue in QUEUES.items()}


def claims_of(message: dict[str, Any]) -> list[list[str]]:
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {} and isinstance(args[1], float)
    return args[0]


def test_a_runs_tasks_go_in_one_round_trip_and_a_publish_cut_part_way_loses_no_claim(
        service, redis_server, redis_client, smtp_sink, sms_sink, make_booking):
    # Claims wait in the queues for the worker started later: their start-by (the send
    # wait, the lease) outlasts that.
    service.configure(REMINDERS_LEASE_SECONDS="90", REMINDERS_SEND_MAX_WAIT_SECONDS="60")
    store = Store(redis_client, PREFIX)
    for channel in QUEUES:  # a worker's senders, 10 threads a channel, as registered
        redis_client.zadd(f"{PREFIX}:send:senders:{channel}", {"elsewhere|10": time.time() + 600})
    relay = Relay(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    pump = Pump(service, redis_server.url, relay)
    try:
        # 1. A run of 12 claims, 6 batches of 2: one write to the broker carries them all.
        first = book_due(service, redis_client, make_booking, "P", 6)
        assert pump.run() == {"published": 12, "trips": 1}
        tasks = queued(redis_client)
        for channel, messages in tasks.items():
            assert len(messages) == 3, tasks
            for message in messages:  # Celery's task message, routed to its channel's queue
                assert message["headers"]["task"] == "reminders.send_batch"
                assert message["properties"]["delivery_info"]["routing_key"] == QUEUES[channel]
                assert message["content-type"] == "application/json"
                assert {c[0].rpartition(":")[2] for c in claims_of(message)} == {channel}
            assert sorted(c[0] for m in messages for c in claims_of(m)) == sorted(first[channel])
        ids = [m["headers"]["id"] for ms in tasks.values() for m in ms]
        assert len(set(ids)) == 6

        # 2. The next run's publish is cut before its fourth task: three went out.
        second = book_due(service, redis_client, make_booking, "Q", 6)
        relay.cut_before(4)
        assert pump.run()["error"] == "BatchPublishError"
        assert relay.cuts == 1
        after = queued(redis_client)
        went = [m for ms in after.values() for m in ms if m["headers"]["id"] not in ids]
        assert len(went) == 3, after
        # None of its claims is left leased with no task, nor counted as handed out: all
        # back in the schedule, due now (the tasks that went out hold stale claims).
        for ref in second["email"] + second["sms"]:
            assert redis_client.zscore(store.lease_key, ref) is None, ref
            assert store.record(ref)["status"] == "scheduled", store.record(ref)
            assert redis_client.zscore(store.due_key, ref) <= time.time() + 1, ref
        for channel in QUEUES:
            out = redis_client.zrange(f"{PREFIX}:send:out:{channel}", 0, -1)
            assert not [m for m in out if m.partition("@")[2] in second[channel]], out
        # The same pump publishes again on a fresh connection (kombu declares the queues
        # again on it first): each claimed once more.
        assert pump.run()["published"] == 12
        ids += [m["headers"]["id"] for m in went]
        ids += [m["headers"]["id"] for ms in queued(redis_client).values() for m in ms
                if m["headers"]["id"] not in ids]
        assert len(ids) == 15
    finally:
        pump.close()
        relay.close()

    # 3. A real worker takes and runs all 15 tasks: each reminder goes once.
    worker = service.worker(concurrency=1)
    refs = [ref for due in (first, second) for refs in due.values() for ref in refs]
    wait_until(lambda: all(store.record(ref)["status"] == "sent" for ref in refs), 40)
    ran = re.compile(r"Task reminders\.send_batch\[([0-9a-f-]+)\] succeeded")
    wait_until(lambda: set(ids) <= set(ran.findall(worker.log_path.read_text())), 20)
    time.sleep(1.0)  # a copy would land by now
    emails = Counter(m.to for m in smtp_sink.snapshot())
    texts = Counter(m.to for m in sms_sink.snapshot())
    assert emails == Counter(f"{b.lower()}@example.com" for b in
                             [r.split("/")[1] for r in first["email"] + second["email"]])
    assert sorted(texts) == sorted({f"+3460020{i:04d}" for i in range(6)}
                                   | {f"+3460030{i:04d}" for i in range(6)})
    assert set(texts.values()) == {1}, texts
    assert redis_client.llen(f"{PREFIX}:celery:{QUEUES['sms']}") == 0
