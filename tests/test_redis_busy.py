"""Redis answering BUSY at the send path's worst moment (review): a Lua script (ours, or
anyone's on the same Redis) running past `busy-reply-threshold` makes Redis answer every
other command "BUSY ... You can only call SCRIPT KILL or SHUTDOWN NOSAVE", run nothing,
until the script ends. The send path tried a write again only through a refusal of writes
(OOM, MISCONF, READONLY, ...): a delivery's finish that met BUSY was given up at once, never
recorded, and once its ledger expired the reminder was claimed and sent again.

Real Redis (a real long script, then SCRIPT KILL), real Apprise, the parking gateway of
tests/test_send_batches.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from tests.test_send_batches import (  # noqa: F401  (gateway, rig: fixtures)
    gateway,
    phone,
    prep,
    rig,
    wait_for,
)
from worker.store import connect


@contextmanager
def busy_redis(client: redis.Redis, url: str) -> Iterator[None]:
    """Redis busy running a script (threshold 100 ms) until the block ends: SCRIPT KILL."""
    client.config_set("busy-reply-threshold", 100)
    runner = connect(url)
    ended = threading.Event()

    def run() -> None:
        try:
            runner.eval("while true do end", 0)
        except redis.RedisError:
            pass  # killed
        ended.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        wait_for(lambda: _answers_busy(client), timeout=5)
        yield
    finally:
        while not ended.is_set():
            try:
                client.script_kill()
            except redis.RedisError:
                time.sleep(0.05)
        runner.close()
        client.config_set("busy-reply-threshold", 5000)


def _answers_busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ResponseError as exc:
        return "BUSY" in str(exc)
    return False


def test_a_delivery_whose_finish_meets_busy_is_recorded_once_the_script_ends(
        rig, redis_client, redis_server):  # noqa: F811
    """The provider accepted the SMS; its finish meets BUSY for a second and a half."""
    rig.book(rig.doc(1))
    claims = rig.claim(prep(1))
    rig.gateway.hold = {phone(1)}
    rig.hand(claims)
    rig.gateway.wait_held()
    with busy_redis(redis_client, redis_server.url):
        rig.gateway.release(200)  # the provider accepts it: the SMS is on its way
        time.sleep(1.5)  # its finish meets BUSY
    wait_for(lambda: not rig.lanes._futures, timeout=10)
    s = rig.state(prep(1))
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["lease"], s["due"]) == (None, None), s
    assert [e["outcome"] for e in s["log"]] == ["sent"], s["log"]
    assert [b["to"] for b in rig.gateway.bodies] == [phone(1)]


def test_a_claim_whose_begin_meets_busy_goes_out_once_the_script_ends(
        rig, redis_client, redis_server):  # noqa: F811
    """The same at the begin: given up at once, the reminder waited `sending` for its lease
    to run out (5 minutes by default) though Redis answered again a moment later."""
    rig.book(rig.doc(1))
    claims = rig.claim(prep(1))
    with busy_redis(redis_client, redis_server.url):
        rig.hand(claims)
        time.sleep(1.5)  # its begin meets BUSY
    wait_for(lambda: not rig.lanes._futures, timeout=10)
    s = rig.state(prep(1))
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert [b["to"] for b in rig.gateway.bodies] == [phone(1)]
