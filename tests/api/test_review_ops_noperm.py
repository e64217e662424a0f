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
