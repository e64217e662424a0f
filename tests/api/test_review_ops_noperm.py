"""The clinic routes when Redis's ACL user lacks a permission they need (review, ops).

A least-privilege ACL user (`+@read +@write`, no `@scripting`; or a key pattern that
leaves a key out) made every keyed route answer the catch-all's bare 500 "internal error
(incident ...)", logged as an unhandled exception, as if our code were broken: the
clinic's system reads a 500 as its own request's fault, ops have to dig the denied command
out of a DEBUG line, and /readyz said 200 "ok" (it asks PING and SET only) while no clinic
request could be served. Now: 503 with Retry-After in the one error shape, saying the store
denies a command; one ERROR line for ops naming the route and the denied command (never the
user's name, its password, a key or an argument); nothing stored; and /readyz probes what
every keyed request runs first (the rate limiter's script), answering 503 `"redis":
"error"` naming what to grant.

Real redis-server (the test's own, its ACL user made as ops would: ACL SETUSER), real HTTP
to the real app served by uvicorn.
"""

from __future__ import annotations

import logging

import pytest

from tests.api.conftest import future_booking
from tests.api.test_errors import assert_error_shape
from tests.api.test_health_error_replies import PASSWORD, USER, acl_url
from tests.api.test_redis_refuses_writes import own  # noqa: F401 (fixture)
from worker.keys import ApiKeys
from worker.store import connect


def keys_url(server, patterns: str) -> str:
    """A user that may run every command, on the keys of `patterns` only."""
    admin = connect(server.url)
    admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "&*",
                          "+@all", *patterns.split())
    admin.close()
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("user, denied, ready", [
    # a "+@read +@write" user: no Lua, which the key check and the rate limiter run first
    ("-@scripting", "'evalsha' denied", False),
    # key patterns that leave the API keys out (the probes' keys in): the key check's read
    ("~reminders:health:* ~reminders:ratelimit:*", "a key denied", True),
])
def test_a_command_the_acl_denies_is_a_503_naming_it_not_a_500(serve, own, caplog,  # noqa: F811
                                                                user, denied, ready):
    admin = connect(own.url)
    key = ApiKeys(admin, "reminders").issue("glow").key
    before = sorted(admin.keys("*"))
    url = acl_url(own, user[1:]) if user.startswith("-") else keys_url(own, user)
    api = serve(redis_url=url)
    with api.client(key) as clinic, caplog.at_level(logging.INFO):
        put = clinic.put("/v1/bookings/B-1", json=future_booking("B-1"))
        after = sorted(admin.keys("*"))
        answer = clinic.get("/readyz")
    assert put.status_code == 503, put.text
    assert put.headers["retry-after"] == "5"
    assert_error_shape(put.json(), "unavailable")
    assert "denies" in put.json()["error"]["message"], put.text
    for text in (put.text, answer.text):
        assert PASSWORD not in text and USER not in text and str(own.port) not in text, text
    assert after == before  # nothing stored
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("unhandled" in s for s in said), said
    named = [s for s in said if denied in s and "PUT /v1/bookings/B-1" in s]
    assert len(named) == 1, said
    assert not any(PASSWORD in s or USER in s or "apikeys" in s for s in said), said
    if ready:  # what the probes do is granted: the route's answer and log say what is not
        assert answer.status_code == 200, answer.text
        return
    # /readyz: not ready, naming what to grant.
    assert answer.status_code == 503, answer.text
    assert answer.json()["redis"] == "error", answer.text
    assert denied in answer.json()["status"], answer.text
    admin.close()


def test_a_redis_busy_running_a_long_script_is_a_503_not_a_500(serve, own, caplog):  # noqa: F811
    """A Lua script running past `busy-reply-threshold` (a long migration, a foreign tool's
    script on the same Redis) makes Redis answer BUSY to every other command until it ends:
    nothing runs. The clinic routes answered the catch-all's 500 "internal error", logged
    as an unhandled exception; it is a moment's unavailability, as a Redis that is down:
    503 with Retry-After, nothing stored, and the same request works once it ends."""
    import threading
    import time

    admin = connect(own.url)
    key = ApiKeys(admin, "reminders").issue("glow").key
    admin.config_set("busy-reply-threshold", 100)  # ms (lua-time-limit)
    api = serve(redis_url=own.url)
    spin = ("local t0 = redis.call('TIME') local s = tonumber(t0[1]) + tonumber(ARGV[1]) "
            "while tonumber(redis.call('TIME')[1]) < s do end return 1")
    runner = connect(own.url)
    thread = threading.Thread(target=lambda: runner.eval(spin, 0, 3), daemon=True)
    with api.client(key) as clinic, caplog.at_level(logging.INFO):
        thread.start()
        probe = connect(own.url)
        deadline = time.monotonic() + 5
        while True:  # until Redis answers BUSY
            try:
                probe.ping()
            except Exception as exc:  # noqa: BLE001
                if "BUSY" in str(exc):
                    break
            assert time.monotonic() < deadline, "the script did not make Redis busy"
            time.sleep(0.02)
        before = time.monotonic()
        put = clinic.put("/v1/bookings/B-1", json=future_booking("B-1"))
        busy_still = time.monotonic() - before < 2.5
        thread.join(timeout=10)
        again = clinic.put("/v1/bookings/B-1", json=future_booking("B-1"))
    assert busy_still, "the request outlived the script: it did not meet BUSY"
    assert put.status_code == 503, put.text
    assert put.headers["retry-after"] == "5"
    assert_error_shape(put.json(), "unavailable")
    assert "busy" in put.json()["error"]["message"], put.text
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("unhandled" in s for s in said), said
    assert again.status_code == 201, again.text
    for client in (admin, runner, probe):
        client.close()
