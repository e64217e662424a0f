"""SMS over a gateway that keeps HTTP/1.1 connections alive, as providers' gateways do:
the send path (worker/dispatch.py `send_claimed`, Apprise's json:// plugin, the sending
thread's session in worker/delivery.py) reuses the thread's connection from one SMS to
the next, and a gateway that closes a connection after accepting an SMS loses nothing
and duplicates nothing: each SMS reaches it once and is recorded sent once.

Real Redis, a real HTTP gateway on 127.0.0.1 (tests/sinks.py `HttpSink(keep_alive=True)`),
real Apprise; the rig of tests/test_send_fast_path.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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


def send_all(rig: Rig) -> list[str]:
    for n in range(N):
        rig.book(f"K-{n}", phone=phone(n))
    return [rig.send(f"fc/K-{n}/prep:sms") for n in range(N)]


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
    assert send_all(rig) == ["sent"] * N
    assert_each_sent_once(rig)
    assert len(set(rig.sms.peers)) == N  # each over a fresh connection
