"""Supervision and broker faults: restart backoff, and Redis killed under a running worker."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

import worker.service as run_service
from tests.e2e.conftest import QUICK_MESSAGES, wait_until
from tests.e2e.test_failures import (
    assert_exactly_once,
    expected_keys,
    received_keys,
    reminders_of,
    settle,
    show_all,
)
from worker.embedded import RedisServer
from worker.errors import ConfigError
from worker.service import Child, describe_exit, restart_delay

KILLS = 8


@pytest.mark.parametrize(("restart", "delay"), [
    (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (7, 30.0), (10_000, 30.0),
])
def test_restart_delay_doubles_from_one_second_to_a_cap(restart, delay):
    assert restart_delay(restart) == delay


def test_restart_delay_takes_its_own_start_and_cap():
    assert [restart_delay(n, first=0.5, cap=3.0) for n in range(1, 6)] == [0.5, 1, 2, 3, 3]


@pytest.mark.parametrize(("returncode", "text"), [
    (-signal.SIGKILL, "exited with signal SIGKILL"),
    (-signal.SIGTERM, "exited with signal SIGTERM"),
    (0, "exited with code 0"),
    (3, "exited with code 3"),
])
def test_describe_exit_names_the_signal_or_the_code(returncode, text):
    assert describe_exit(returncode) == text


def _exiting(code: int) -> subprocess.Popen[bytes]:
    """A real child process that exits at once with `code`."""
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"],
                            start_new_session=True)


def test_child_restarts_with_growing_delay_and_resets_once_it_stayed_up(capsys, monkeypatch):
    child = Child("worker", lambda: _exiting(3))
    child.start()
    assert child.process is not None
    child.process.wait()
    t0 = child.started_at

    child.supervise(t0 + 0.5)  # died after 0.5 s: first restart in 1 s
    assert child.restart_at == t0 + 1.5
    assert "worker exited with code 3; restarting in 1s (restart 1)" in capsys.readouterr().err
    child.supervise(t0 + 1.0)  # still waiting
    assert child.restart_at == t0 + 1.5

    monkeypatch.setattr(run_service.time, "monotonic", lambda: t0 + 1.5)
    child.supervise(t0 + 1.5)  # restarted; dies again at once: the delay doubles
    assert child.restart_at is None and child.started_at == t0 + 1.5
    child.process.wait()
    child.supervise(t0 + 1.6)
    assert child.restart_at == pytest.approx(t0 + 3.6)
    assert "restarting in 2s (restart 2)" in capsys.readouterr().err

    # A child that stayed up past STABLE_AFTER_SECONDS starts again from 1 s.
    monkeypatch.setattr(run_service.time, "monotonic", lambda: t0 + 3.6)
    child.supervise(t0 + 3.6)
    child.process.wait()
    child.supervise(t0 + 3.6 + run_service.STABLE_AFTER_SECONDS)
    assert child.restarts == 1
    assert "restarting in 1s (restart 1)" in capsys.readouterr().err


def test_child_whose_start_fails_is_tried_again_with_backoff(capsys):
    """The embedded Redis may fail to come back (its port taken): try again, later."""
    attempts = []

    def spawn() -> subprocess.Popen[bytes]:
        attempts.append(1)
        raise ConfigError("redis.log", "redis-server did not start")

    child = Child("redis", spawn, own_group=False)
    child.restart_at = 10.0
    child.restarts = 1
    child.supervise(10.0)
    assert attempts == [1] and child.restarts == 2 and child.restart_at == 12.0
    assert "redis failed to start (" in capsys.readouterr().err
    child.supervise(11.0)
    assert attempts == [1]


# --- a Redis of the test's own, killed with SIGKILL and started again ---------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (AOF on), to kill and start again on the same port."""
    server = RedisServer(tmp_path / "own-redis").start()
    yield server
    server.stop()


def restart_redis(server: RedisServer, down_for: float) -> None:
    """SIGKILL the server, wait `down_for` seconds, start it on the same port and data dir."""
    _kill(server)
    time.sleep(down_for)
    server.start()


def _kill(server: RedisServer) -> None:
    assert server.process is not None
    server.process.kill()
    server.process.wait()


# --- the kombu path: a channel closed after its connection lost Redis ----------------------

def _channel_left_open_by_a_lost_connection(server: RedisServer, transport: str):
    """Return (connection, channel holding one unacked message) after Redis died and came back.

    The calls Celery makes when Redis goes away under a worker: a channel holds a delivered,
    unacked message (acks late); a second channel has an auto-delete fanout queue (gossip,
    pidbox). Redis is SIGKILLed; the consumer collects the connection, whose close of the
    fanout channel fails on the dead socket and leaves the first channel open, while the
    transport is cut loose from the connection; Redis comes back.
    """
    conn = Connection(server.url, transport=transport)
    conn.connect()
    work = Queue("drill.work", Exchange("drill.work", type="direct"), routing_key="drill.work")
    holder = conn.channel()
    Producer(holder).publish({"n": 1}, exchange=work.exchange, routing_key="drill.work",
                             declare=[work])
    message = holder.basic_get("drill.work", no_ack=False)
    assert message is not None and message.payload == {"n": 1}
    gossip = conn.channel()
    Queue("drill.gossip", Exchange("drill.gossip", type="fanout"), auto_delete=True)(
        gossip).declare()
    _kill(server)
    conn.collect()  # Consumer.on_connection_error_after_connected
    assert not holder.closed
    server.start()
    return conn, holder


@pytest.mark.integration
def test_stock_kombu_raises_the_hostname_error_on_that_channel(own_redis):
    """The upstream bug, kept as a canary: when it fails, kombu fixed it; drop worker/broker.py."""
    _, holder = _channel_left_open_by_a_lost_connection(own_redis, "redis")
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'hostname'"):
        holder.close()  # QoS.restore_unacked_once -> restore_unacked -> _connparams
    client = redis.Redis.from_url(own_redis.url)
    assert client.llen("drill.work") == 0 and client.hlen("unacked") == 1  # not restored


@pytest.mark.integration
def test_our_transport_restores_the_unacked_message_at_once(own_redis):
    _, holder = _channel_left_open_by_a_lost_connection(own_redis, "worker.broker:Transport")
    holder.close()
    client = redis.Redis.from_url(own_redis.url)
    assert client.llen("drill.work") == 1 and client.hlen("unacked") == 0  # back in its queue


@pytest.mark.integration
def test_our_transport_fails_as_a_connection_error_while_redis_is_down(own_redis):
    _, holder = _channel_left_open_by_a_lost_connection(own_redis, "worker.broker:Transport")
    _kill(own_redis)
    with pytest.raises(redis.ConnectionError):
        holder.close()  # an error kombu and Celery handle; the message waits in `unacked`
    own_redis.start()
    assert redis.Redis.from_url(own_redis.url).hlen("unacked") == 1


# --- Redis killed (SIGKILL) and restarted under a running worker -------------------------

@pytest.mark.integration
def test_redis_restarts_under_a_running_worker_every_reminder_arrives_once(
        own_redis, service, smtp_sink, sms_sink, make_booking, e2e_config):
    """SIGKILL Redis again and again while confirmations are being sent; nothing is lost."""
    # own_redis before service: set up first, so stopped last, after the worker and beat
    # (a worker stopped with its Redis gone waits out the whole stop timeout).
    smtp_sink.delay = 1.0  # each email holds the SMTP DATA answer: sends are in flight
    service.configure(REMINDERS_REDIS_URL=own_redis.url)
    worker, beat = service.start()

    # A booking between kills: its confirmation is sent (or queued) when Redis dies next.
    # The visits start late enough that no pre-visit step expires during the outages: 40 s
    # after the first booking (the loop of kills takes about 25 s), and never sooner than
    # 25 s after its own booking (its prep, 8 s before, still 17 s away).
    rng = random.Random(582970)
    docs, expected = [], Counter()
    visits_at = time.monotonic() + 40
    for i in range(KILLS):
        starts_in = max(25.0, visits_at - time.monotonic())
        doc = make_booking(f"R-{i}", starts_in=starts_in, phone=f"+3460020{i:04d}")
        [timeline] = service.book(doc)
        docs.append(doc)
        expected += expected_keys(e2e_config, doc, timeline)
        time.sleep(rng.uniform(0.3, 1.5))
        restart_redis(own_redis, down_for=rng.uniform(0.1, 1.5))
        assert worker.poll() is None, worker.log_path.read_text()[-5000:]
    assert sum(expected.values()) == KILLS * QUICK_MESSAGES

    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 150)
    settle(redis.Redis.from_url(own_redis.url))
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    assert {r["status"] for _, r in reminders_of(show_all(service, docs))} == {"sent"}
    assert worker.poll() is None and beat.poll() is None, "worker and beat outlived every restart"
    assert "AttributeError" not in worker.log_path.read_text()

