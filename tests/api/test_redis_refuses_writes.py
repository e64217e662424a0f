"""A Redis that is up but refuses writes answers 503 with Retry-After, and stores nothing
(review): out of memory (`maxmemory 1mb`, `noeviction`: OOM), unable to persist (a failed
RDB save: MISCONF), a read-only replica (READONLY) or a replica between masters that
serves no stale data (MASTERDOWN: a failover's old master) answered the API's 500 "internal
error", as if the request were wrong, where a Redis that is down answers 503. Real
redis-server (its own, set by CONFIG SET as ops would), real HTTP requests to the real app;
every key of the Redis holds the same, no expiry pushed back, before and after. The refusal
begins before the request, or (forced) right after the request's rate limiter took its
token, so each route's own writes meet it (the limiter's is the first write of a keyed
request).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.api.conftest import future_booking, nudges_settled
from tests.api.test_errors import assert_error_shape
from tests.api.test_inbound import write_config
from worker.embedded import RedisServer, free_port
from worker.optout import twilio_signature
from worker.store import connect

PUBLIC = "https://reminders.example/base"
TOKEN = "twilio-auth-token-for-tests"


@pytest.fixture
def own(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def api(serve, own, tmp_path, monkeypatch):
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    return serve(redis_url=own.url, config_dir=write_config(tmp_path / "config"),
                 public_url=PUBLIC, data_dir=tmp_path / "data")


def snapshot(client) -> dict[str, Any]:
    """Every key's type and contents but the rate limiter's (a token taken before the
    refusal began). Contents, not DUMP: a read may move a big hash's incremental rehash
    on, which changes DUMP's field order and nothing else."""
    read = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "list": lambda k: client.lrange(k, 0, -1),
            "stream": lambda k: client.xrange(k)}
    out = {}
    for key in client.keys("*"):
        if ":ratelimit:" in key or key == "filler":
            continue
        kind = client.type(key)
        out[key] = (kind, read[kind](key))
    return out


def expiries(client) -> dict[str, int]:
    return {key: client.pttl(key) for key in client.keys("*") if ":ratelimit:" not in key}


def requests() -> list[tuple[str, bool, Callable[[Any], Any]]]:
    """(what, whether it is rate limited, how to send it)."""
    moved = future_booking("A-1", days=25, clinic="tw")
    moved["patient"] = moved["patient"] | {"phone": "+34600111222"}
    form = {"MessageSid": "SM" + "5" * 32, "From": "+34600111222", "To": "+34910000000",
            "Body": "STOP"}
    path = "/v1/inbound/sms/tw"
    signature = twilio_signature(TOKEN, PUBLIC + path, list(form.items()))
    return [
        ("PUT a new booking", True, lambda c: c.put(
            "/v1/bookings/B-1", json=future_booking("B-1", clinic="tw"))),
        ("PUT moving a booking", True, lambda c: c.put("/v1/bookings/A-1", json=moved)),
        ("DELETE", True, lambda c: c.delete("/v1/bookings/A-1")),
        ("release", True, lambda c: c.post("/v1/bookings/H-1/release")),
        ("batch", True, lambda c: c.post("/v1/bookings:batch", json={"bookings": [
            future_booking("C-1", clinic="tw")]})),
        ("inbound STOP", False, lambda c: c.post(
            path, data=form, headers={"X-Twilio-Signature": signature})),
    ]


class Refusal:
    """Puts the test's own Redis into refusing writes (arm) and back (disarm)."""

    def __init__(self, kind: str, server: RedisServer) -> None:
        self.kind = kind
        self.admin = connect(server.url)
        if kind == "MISCONF":
            # An RDB save that fails (its folder is gone): with a save point configured,
            # Redis refuses writes; without one (save "") it takes them again.
            self.admin.config_set("save", "3600 1")
            shutil.rmtree(server.data_dir)
            self.admin.bgsave()
            deadline = time.monotonic() + 10
            while self.admin.info("persistence")["rdb_last_bgsave_status"] != "err":
                assert time.monotonic() < deadline, "the save did not fail"
                time.sleep(0.05)
            self.disarm()
        elif kind == "OOM":
            self.admin.set("filler", "x" * 2_000_000)  # used_memory well above 1 MB
            self.admin.config_set("maxmemory-policy", "noeviction")

    def arm(self) -> None:
        if self.kind == "OOM":
            self.admin.config_set("maxmemory", "1mb")
        elif self.kind == "MISCONF":
            self.admin.config_set("save", "3600 1")
        elif self.kind == "MASTERDOWN":  # a failover's old master, its new master not
            # answering yet, serving no stale data: every command refused, reads too
            self.admin.config_set("replica-serve-stale-data", "no")
            self.admin.replicaof("127.0.0.1", free_port())
        else:  # a replica of a master that is not there: READONLY
            self.admin.replicaof("127.0.0.1", free_port())

    def disarm(self) -> None:
        if self.kind == "OOM":
            self.admin.config_set("maxmemory", "0")
        elif self.kind == "MISCONF":
            self.admin.config_set("save", "")
        else:
            self.admin.replicaof("NO", "ONE")
            self.admin.config_set("replica-serve-stale-data", "yes")


@pytest.mark.parametrize("when", ["before the request", "after the rate limit"])
@pytest.mark.parametrize("kind", ["OOM", "MISCONF", "READONLY", "MASTERDOWN"])
def test_redis_refusing_writes_is_503_and_nothing_is_stored(api, own, monkeypatch, kind, when):
    key = api.issue_key("tw")
    with api.client(key) as client:
        doc = future_booking("A-1", clinic="tw")
        doc["patient"] = doc["patient"] | {"phone": "+34600111222"}
        assert client.put("/v1/bookings/A-1", json=doc).status_code == 201
        held = future_booking("H-1", clinic="tw")
        held["medications"] = held["medications"] | {"isotretinoin_last_dose": (
            datetime.now(UTC) - timedelta(days=30)).date().isoformat()}
        assert client.put("/v1/bookings/H-1", json=held).json()["status"] == "held"
    # The pump nudges of these PUTs (worker/nudge.py: published after the answer) are in
    # before the snapshots, not landing between one and the next.
    nudges_settled(connect(own.url))
    refusal = Refusal(kind, own)
    limiter = api.app.state.services.limiter
    real_take = limiter.take
    redis_of_api = api.app.state.services.redis

    def take(key_id: str) -> Any:
        verdict = real_take(key_id)
        refusal.arm()  # the token is taken: the route's own writes meet the refusal
        return verdict

    if when == "after the rate limit":
        monkeypatch.setattr(limiter, "take", take)
    with api.client(key) as client:
        for what, limited, send in requests():
            before, ttls = snapshot(redis_of_api), expiries(redis_of_api)
            if when == "before the request" or not limited:
                refusal.arm()
            try:
                answer = send(client)
            finally:
                refusal.disarm()
            assert answer.status_code == 503, (what, answer.status_code, answer.text)
            assert answer.headers["retry-after"] == "5", what
            assert_error_shape(answer.json(), "unavailable")
            assert "refuses writes" in answer.json()["error"]["message"], what
            assert snapshot(redis_of_api) == before, what  # nothing stored, not even in part
            pushed = [name for name, ttl in expiries(redis_of_api).items() if name in ttls
                      and not (ttl <= ttls[name] if ttls[name] >= 0 else ttl == ttls[name])]
            assert not pushed, (what, pushed)
        # Once Redis takes writes again, the same request works: the same text (its
        # MessageSid) too, which the refusal did not mark as acted on. (It takes no rate
        # limit: sent before undo, which unsets the clinic's auth token too.)
        stop = requests()[-1][2](client)
        assert stop.status_code == 200 and "<Message>" in stop.text, stop.text
        assert api.app.state.services.store.opted_out("tw", "sms", "+34600111222")
        monkeypatch.undo()
        assert requests()[0][2](client).status_code == 201


def test_another_error_reply_is_still_a_500(api, monkeypatch):
    import redis

    key = api.issue_key("tw")

    def wrong(*_args: Any, **_kwargs: Any) -> None:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    monkeypatch.setattr(api.app.state.services.store, "timeline", wrong)
    with api.client(key) as client:
        answer = client.get("/v1/bookings/A-1")
    assert answer.status_code == 500
    assert_error_shape(answer.json(), "internal")
