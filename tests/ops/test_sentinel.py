"""High availability with Redis Sentinel, for real: a master, a replica and three sentinels
(`redis-server --sentinel`) on 127.0.0.1; the worker, beat and the API reach Redis only
through the sentinels (REMINDERS_REDIS_SENTINELS). The master is SIGKILLed while reminders
are being sent; Sentinel promotes the replica; everything carries on: every reminder is
delivered, bookings made through the API after the failover are sent too, and a message
may arrive twice only if its first copy went out inside the failover window (from just
before the kill until the replica was promoted: what asynchronous replication may lose).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, Service, wait_until
from tests.e2e.test_failures import expected_keys, received_keys
from worker.connections import broker, client, describe
from worker.embedded import free_port, redis_server_binary
from worker.settings import Settings

pytestmark = pytest.mark.integration
MASTER = "mymaster"
TRANSPORT = "worker.broker:SentinelTransport"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


class RedisProcess:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Cluster:
    """A master, one replica and three sentinels, each on its own free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.binary = redis_server_binary()
        self.processes: list[RedisProcess] = []
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]

    def _server(self, name: str, port: int, *extra: str) -> RedisProcess:
        data = self.root / name
        data.mkdir(parents=True)
        process = RedisProcess([self.binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(data), "--appendonly", "yes",
                                "--appendfsync", "everysec", "--save", "",
                                "--maxmemory-policy", "noeviction", *extra],
                               self.root / f"{name}.log")
        self.processes.append(process)
        return process

    def start(self) -> Cluster:
        self.master = self._server("master", self.master_port)
        self.replica = self._server("replica", self.replica_port,
                                    "--replicaof", "127.0.0.1", str(self.master_port))
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(f"""port {port}
bind 127.0.0.1
dir {self.root}
sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2
sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}
sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}
sentinel parallel-syncs {MASTER} 1
""", encoding="utf-8")
            self.processes.append(RedisProcess([self.binary, str(conf), "--sentinel"],
                                               self.root / f"sentinel-{port}.log"))
        replica = redis.Redis(port=self.replica_port, decode_responses=True)
        wait_until(lambda: _quiet(lambda: replica.info("replication")
                                  .get("master_link_status") == "up"), 15)
        # Every sentinel knows the replica and the two other sentinels: a failover can happen.
        # (They hear of each other by hellos every 2 s: 20 s was once too short in a loaded
        # full run.)
        for port in self.sentinel_ports:
            s = redis.Redis(port=port, decode_responses=True)
            wait_until(lambda s=s: _quiet(lambda: len(s.sentinel_slaves(MASTER)) == 1
                                          and len(s.sentinel_sentinels(MASTER)) == 2), 45)
        return self

    def master_address(self) -> tuple[str, int] | None:
        for port in self.sentinel_ports:
            try:
                sentinel = redis.Redis(port=port, socket_timeout=1)
                host, found = sentinel.sentinel_get_master_addr_by_name(MASTER)
                return host.decode() if isinstance(host, bytes) else host, int(found)
            except (redis.RedisError, TypeError):
                continue
        return None

    def discovered_master(self) -> int | None:
        """The master's port as redis-py's Sentinel client finds it (every sentinel asked,
        the master's flags checked), or None while none qualifies, as during a failover."""
        from redis.sentinel import MasterNotFoundError, Sentinel

        sentinel = Sentinel([("127.0.0.1", port) for port in self.sentinel_ports],
                            socket_timeout=1)
        try:
            return int(sentinel.discover_master(MASTER)[1])
        except MasterNotFoundError:
            return None

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()


def _quiet(check: Any) -> Any:
    try:
        return check()
    except redis.RedisError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "redis").start()
    yield c
    c.stop()


def test_settings_name_the_sentinels_for_every_client() -> None:
    settings = Settings(redis_sentinels="10.0.0.1:26379, sentinel-2:26380,[::1]:26381",
                        redis_sentinel_master=MASTER,
                        redis_url="redis://:s3cret@unused:1/3", _env_file=None)
    assert settings.sentinel_addresses == [("10.0.0.1", 26379), ("sentinel-2", 26380),
                                           ("::1", 26381)]
    url, transport, options = broker(settings)
    assert transport == "worker.broker:SentinelTransport"
    assert url.split(";") == ["sentinel://:s3cret@10.0.0.1:26379/3",
                              "sentinel://:s3cret@sentinel-2:26380/3",
                              "sentinel://:s3cret@::1:26381/3"]
    assert options["master_name"] == MASTER
    assert "s3cret" not in describe(settings) and MASTER in describe(settings)
    # Without sentinels: the URL, kombu's Redis transport (with worker/broker.py's fix).
    plain = Settings(redis_url="redis://:s3cret@redis:6379/0", _env_file=None)
    assert broker(plain) == ("redis://:s3cret@redis:6379/0", "worker.broker:Transport", {})
    assert "s3cret" not in describe(plain)
    for bad in ("127.0.0.1:26379,nohost", "host:port", "host:0", ""):
        with pytest.raises(ValueError, match="redis_sentinels"):
            Settings(redis_sentinels=bad, _env_file=None)


def api_put(port: int, key: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    """PUT a booking through the API; return its timeline if it was created (201)."""
    body = dict(doc)
    booking_id = body.pop("booking_id")
    body.pop("clinic")
    result = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--max-time", "10", "-X", "PUT",
         f"http://127.0.0.1:{port}/v1/bookings/{booking_id}",
         "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
         "-d", json.dumps(body)], capture_output=True, text=True, timeout=20)
    answer, _, status = result.stdout.rpartition("\n")
    return json.loads(answer) if status == "201" else None


def test_master_killed_mid_run_sentinel_promotes_the_replica_and_everything_carries_on(
        cluster: Cluster, tmp_path: Path, e2e_config: Path, smtp_sink, sms_sink,
        make_booking) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({
        "REMINDERS_REDIS_SENTINELS": cluster.sentinels,
        "REMINDERS_REDIS_SENTINEL_MASTER": MASTER,
        "REMINDERS_CONFIG_DIR": str(e2e_config),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
        "REMINDERS_BACKOFF_BASE_SECONDS": "1",
        "REMINDERS_BACKOFF_CAP_SECONDS": "2",
        "REMINDERS_LEASE_SECONDS": "10",
        "REMINDERS_SEND_TIMEOUT_SECONDS": "4",
        "REMINDERS_MAX_ATTEMPTS": "30",
    })
    service = Service(env, tmp_path)
    api_port = free_port()
    t0 = time.monotonic()
    # The store's client reaches the master through the sentinels.
    probe = client(Settings(redis_sentinels=cluster.sentinels, _env_file=None))
    probe.set("probe", "1")
    assert redis.Redis(port=cluster.master_port).get("probe") == b"1"
    probe.close()
    try:
        service.start("w1")
        api = service._spawn([str(BIN / "uvicorn"), "worker.api:app", "--host", "127.0.0.1",
                              "--port", str(api_port)], "api")
        key = service.cli("keys", "issue", "--clinic", "e2e").stdout.strip()
        assert key, "no API key issued through the sentinels"
        wait_until(lambda: b"Uvicorn running" in api.log_path.read_bytes(), 30)

        # Before the failover: bookings whose messages fall due over the next ~15 s.
        up = time.monotonic()
        before = [make_booking(f"HA-{i}", starts_in=6 + 0.3 * i, phone=f"+346002{i:05d}")
                  for i in range(6)]
        timelines = service.book(*before)
        expected = Counter()
        for doc, timeline in zip(before, timelines, strict=True):
            expected += expected_keys(e2e_config, doc, timeline)
        wait_until(lambda: len(smtp_sink.snapshot()) + len(sms_sink.snapshot()) >= 6, 20)

        killed_at = time.time()
        cluster.master.kill()
        promoted = wait_until(lambda: (cluster.master_address() or ("", 0))[1]
                              == cluster.replica_port, 20)
        promoted_at = time.time()
        assert promoted

        # After: the API takes bookings on the new master (it may answer 503 for a moment).
        after = [make_booking(f"HA-{i}", starts_in=6, phone=f"+346002{i:05d}")
                 for i in range(6, 10)]
        for doc in after:
            timeline = wait_until(lambda doc=doc: api_put(api_port, key, doc), 15, interval=0.5)
            expected += expected_keys(e2e_config, doc, timeline)

        def delivered() -> bool:
            got = received_keys(smtp_sink, sms_sink)
            return all(got[k] >= 1 for k in expected)

        wait_until(delivered, 40, interval=0.5)
        time.sleep(2.0)  # room for a stray copy
        got = received_keys(smtp_sink, sms_sink)
        missing = [k for k in expected if got[k] < 1]
        extra = {k: n for k, n in got.items() if k not in expected}
        twice = {k: n for k, n in got.items() if n > 1}
        # A copy too many is allowed only if the first went out inside the failover window.
        arrivals = [("email", m.to, m.subject, m.at) for m in smtp_sink.snapshot()] + \
                   [("sms", m.to, m.text.replace("\r\n", "\n").strip(), m.at)
                    for m in sms_sink.snapshot()]
        unexplained = []
        for k in twice:
            first = min(at for c, to, s, at in arrivals if (c, to, s) == k)
            if not killed_at - 1.0 <= first <= promoted_at + 1.0:
                unexplained.append(k)
        print(f"\ncluster and service up in {up - t0:.1f}s; all delivered "
              f"{time.monotonic() - up:.1f}s after the first booking")
        print(f"failover: master killed, replica promoted {promoted_at - killed_at:.1f}s "
              f"later; expected {len(expected)}, delivered {sum(1 for k in expected if got[k])}"
              f", duplicates {sum(n - 1 for n in twice.values())} "
              f"({len(unexplained)} outside the failover window), lost {len(missing)}")
        assert not missing, missing
        assert not extra, extra
        assert not unexplained, {k: twice[k] for k in unexplained}
        # The worker, beat and API carry on after it (no restart): still running.
        for proc in service.processes:
            assert proc.poll() is None, proc.log_path.read_text()[-3000:]
        ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{api_port}/readyz"],
                               capture_output=True, text=True, timeout=20).stdout
        assert ready == "200", ready
    finally:
        service.discard()


# --- worker/broker.py's fix, through Sentinel ----------------------------------------------

def _held_message(cluster: Cluster, transport: str, queue: str) -> tuple[Any, Any]:
    """A connection through the sentinels, and a channel holding one unacked message of
    `queue` (acks late), next to a channel with an auto-delete fanout queue (gossip, pidbox)."""
    from kombu import Connection, Exchange, Producer, Queue

    url = ";".join(f"sentinel://127.0.0.1:{port}/0" for port in cluster.sentinel_ports)
    conn = Connection(url, transport=transport, transport_options={"master_name": MASTER})
    conn.connect()
    work = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
    holder = conn.channel()
    Producer(holder).publish({"n": 1}, exchange=work.exchange, routing_key=queue,
                             declare=[work])
    message = holder.basic_get(queue, no_ack=False)
    assert message is not None and message.payload == {"n": 1}
    gossip = conn.channel()
    Queue(f"{queue}.gossip", Exchange(f"{queue}.gossip", type="fanout"), auto_delete=True)(
        gossip).declare()
    return conn, holder


def test_our_sentinel_transport_gives_an_unacked_message_back_on_the_new_master(
        cluster: Cluster) -> None:
    """What Celery does when the master dies under a worker (tests/e2e/test_supervision.py
    has the single-Redis case): a channel holds a delivered, unacknowledged message (acks
    late); the consumer collects its connection, which cuts the transport loose; Sentinel
    promotes the replica; the channel is closed. kombu's own Sentinel channel then fails on
    the closed connection (kept as a canary: when it stops failing, kombu fixed it) and
    leaves its message in `unacked` until the visibility timeout; ours asks the remembered
    sentinels for the new master and gives the message back to its queue at once."""
    ours_conn, ours = _held_message(cluster, TRANSPORT, "drill.ours")
    stock_conn, stock = _held_message(cluster, "sentinel", "drill.stock")
    replica = redis.Redis(port=cluster.replica_port)
    wait_until(lambda: replica.hlen("unacked") == 2, 5)  # replicated before the kill
    cluster.master.kill()
    ours_conn.collect()  # Consumer.on_connection_error_after_connected
    stock_conn.collect()
    assert not ours.closed and not stock.closed
    # Promoted as every client sees it: a sentinel names the new master before its flags
    # let a client take it (MasterNotFoundError in between).
    wait_until(lambda: cluster.discovered_master() == cluster.replica_port, 20)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute"):
        stock.close()
    ours.close()  # QoS.restore_unacked_once -> restore_unacked -> the pool -> the new master
    assert replica.llen("drill.ours") == 1 and replica.llen("drill.stock") == 0
    assert replica.hlen("unacked") == 1  # the stock channel's, until the visibility timeout
