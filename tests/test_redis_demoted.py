"""A master demoted under a plain REMINDERS_REDIS_URL (review): a managed Redis (or a
virtual IP, a DNS name ops flip) fails over by pointing its name at the promoted replica,
and the old master, now a replica, keeps the connections it had. Every command on them
answers READONLY, for good: redis-py makes a new connection (which would reach the new
master) only when its pool has none free. The send path tries a refused write again (worker/
dispatch.py `durably`) on the same connection, so a delivery accepted by its provider as the
failover happened was never recorded, and was sent again once its ledger expired; the
pump, the API and every send met READONLY until the processes were restarted.

Real redis-servers (a master and its replica, swapped as a failover does), a real TCP
forwarder standing for the name (new connections go to whichever it points at), and the
parking gateway of tests/test_send_batches.py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.test_send_batches import Rig, gateway, phone, prep, wait_for  # noqa: F401
from worker.connections import from_url
from worker.embedded import RedisServer, free_port
from worker.store import connect


class Name:
    """A Redis address that ops can point elsewhere: new connections go to `target`, those
    made before keep going where they went."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[RedisServer, RedisServer]]:
    servers = [RedisServer(tmp_path / f"redis{n}").start() for n in range(2)]
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def test_a_delivery_as_the_master_is_demoted_is_recorded_on_the_new_one(
        tmp_path, pair, gateway):  # noqa: F811
    old, new = pair
    admin_old, admin_new = connect(old.url), connect(new.url)
    admin_old.config_set("repl-diskless-sync-delay", 0)  # a replica in sync at once
    admin_new.replicaof("127.0.0.1", old.port)
    wait_for(lambda: admin_new.info("replication")["master_link_status"] == "up")
    name = Name(old.port)
    rig = Rig(tmp_path, from_url(name.url), gateway)
    try:
        rig.book(rig.doc(1))
        claims = rig.claim(prep(1))
        rig.gateway.hold = {phone(1)}
        rig.hand(claims)
        rig.gateway.wait_held()
        assert admin_old.wait(1, 5000) == 1  # the replica has all of it
        # The failover: the replica promoted, the old master its replica, the name moved.
        admin_new.replicaof("NO", "ONE")
        admin_old.replicaof("127.0.0.1", new.port)
        name.target = new.port
        rig.gateway.release(200)  # the provider accepts it: the SMS is on its way
        wait_for(lambda: not rig.lanes._futures, timeout=15)
        store = rig.store
        assert admin_new.get(store.ledger_key(prep(1))) == "sent"  # recorded, never again
        assert admin_new.zscore(store.lease_key, prep(1)) is None
        assert [b["to"] for b in rig.gateway.bodies] == [phone(1)]
    finally:
        rig.gateway.release()
        rig.drain()
        name.listener.close()
        for client in (admin_old, admin_new, rig.store.redis):
            client.close()
