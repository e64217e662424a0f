"""SMS over a gateway that keeps HTTP/1.1 connections alive, as providers' gateways do:
the send path (worker/dispatch.py `send_claimed`, Apprise's json:// plugin, the sending
thread's session in worker/delivery.py) reuses the thread's connection from one SMS to
the next, and a gateway that closes a connection after accepting an SMS loses nothing
and duplicates nothing: each SMS reaches it once and is recorded sent once.

Real Redis, a real HTTP gateway on 127.0.0.1 (tests/sinks.py `HttpSink(keep_alive=True)`),
real Apprise; the rig of tests/test_send_fast_path.py.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from urllib3.connectionpool import HTTPConnectionPool

from tests.sinks import HttpSink, SmtpSink
from tests.test_send_fast_path import Rig
from worker import delivery

N = 5


@pytest.fixture
def rig(tmp_path, redis_client, monkeypatch) -> Iterator[Rig]:
    # A loaded machine must not make a kept connection look idle between two sends.
    monkeypatch.setattr(delivery, "HTTP_IDLE_SECONDS", 60.0)
    smtp, sms = SmtpSink().start(), HttpSink(keep_alive=True).start()
    yield Rig(tmp_path / "config", redis_client, smtp, sms)
    smtp.stop()
    sms.stop()


def phone(n: int) -> str:
    return f"+3460011{n:04d}"


def send_all(rig: Rig, each_closed: bool = False) -> list[str]:
    """Send the N SMS one after another; `each_closed`: each only once the gateway has
    closed the connection of the one before (its FIN on the wire), so the next SMS finds
    the kept connection closed, not one closing as it is written (that interleaving is
    the third test's)."""
    for n in range(N):
        rig.book(f"K-{n}", phone=phone(n))
    outcomes = []
    for n in range(N):
        if each_closed:
            deadline = time.monotonic() + 5
            while rig.sms.closed < n and time.monotonic() < deadline:
                time.sleep(0.005)
            assert rig.sms.closed == n, (rig.sms.closed, n)
        outcomes.append(rig.send(f"fc/K-{n}/prep:sms"))
    return outcomes


def assert_each_sent_once(rig: Rig) -> None:
    """Each SMS reached the gateway once and is recorded sent once, nothing left over."""
    assert sorted(p.to for p in rig.sms.snapshot()) == [phone(n) for n in range(N)]
    assert len(rig.sms.requests_snapshot()) == N  # no request of unknown outcome either
    for n in range(N):
        ref = f"fc/K-{n}/prep:sms"
        assert rig.store.record(ref)["status"] == "sent", ref
        assert [e["outcome"] for e in rig.store.attempts(ref)] == ["sent"], ref
        for key in (rig.store.due_key, rig.store.lease_key, rig.store.dead_key):
            assert rig.store.redis.zscore(key, ref) is None, (key, ref)


def test_the_gateway_sees_one_connection_for_a_threads_sms(rig):
    assert send_all(rig) == ["sent"] * N
    assert_each_sent_once(rig)
    peers = rig.sms.peers
    assert len(peers) == N and len(set(peers)) == 1, peers  # one handshake, not N


def test_a_connection_the_gateway_drops_after_accepting_loses_and_repeats_nothing(rig):
    """The gateway answers 200 and then closes the connection without a word (its
    keep-alive ran out; a load balancer): the next SMS of the thread goes over a new
    connection, none is of unknown outcome, none goes twice."""
    rig.sms.drop_after_answer = True
    assert send_all(rig, each_closed=True) == ["sent"] * N
    assert_each_sent_once(rig)
    assert len(set(rig.sms.peers)) == N  # each over a fresh connection


def test_a_kept_connection_dropped_as_the_sms_goes_out_is_sent_once_later(rig, monkeypatch):
    """Forced: the gateway closes the thread's kept connection after urllib3 found it
    open and before the SMS is written to it (a keep-alive running out at that instant).
    The request meets a closed connection: the gateway never has it, the sender cannot
    know that, so the outcome is unknown, never retried while its ledger lives; then it
    goes once. Nothing lost, no copy."""
    rig.ctx = replace(rig.ctx, settings=rig.settings.model_copy(update={"lease_seconds": 8}))
    for n in range(2):
        rig.book(f"K-{n}", phone=phone(n))
    assert rig.send("fc/K-0/prep:sms") == "sent"  # the connection the next SMS reuses
    (kept,) = rig.sms.peers
    real_get_conn = HTTPConnectionPool._get_conn
    parked: list[int] = []

    def get_conn(pool: HTTPConnectionPool, *args: Any, **kwargs: Any) -> Any:
        conn = real_get_conn(pool, *args, **kwargs)  # checked: not dropped
        if not parked and conn.sock is not None:
            port = conn.sock.getsockname()[1]
            parked.append(port)
            rig.sms.drop(port)  # the competing change, then release
            assert select.select([conn.sock], [], [], 5)[0]  # its close has arrived
        return conn

    monkeypatch.setattr(HTTPConnectionPool, "_get_conn", get_conn)
    ref = "fc/K-1/prep:sms"
    assert rig.send(ref) == "unknown"
    assert parked == [kept]  # it was the kept connection
    assert [p.to for p in rig.sms.snapshot()] == [phone(0)]  # the gateway never had it
    record = rig.store.record(ref)
    assert record["status"] != "sent" and "outcome unknown" in record["reason"], record
    assert rig.store.redis.get(rig.store.ledger_key(ref)) is not None  # no retry meanwhile
    assert rig.send(ref) == "requeued"  # another attempt may still be in flight
    assert [p.to for p in rig.sms.snapshot()] == [phone(0)]
    deadline = time.monotonic() + 20
    while rig.store.redis.get(rig.store.ledger_key(ref)) is not None:
        assert time.monotonic() < deadline, "the ledger of the unknown attempt never expired"
        time.sleep(0.2)
    assert rig.send(ref) == "sent"
    assert sorted(p.to for p in rig.sms.snapshot()) == [phone(0), phone(1)]
    assert rig.store.record(ref)["status"] == "sent"
    assert [e["outcome"] for e in rig.store.attempts(ref)] == ["unknown", "sent"]
