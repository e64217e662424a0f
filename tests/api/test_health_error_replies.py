"""/readyz and /healthz while Redis answers, but with an error reply (review).

Both routes caught connection errors only. A Redis that answers a check's command with an
error reply other than a refusal of writes - NOPERM (an ACL user lacking a command the
check runs: PING, the probe's SET, TIME, HGETALL, ZRANGE), MASTERDOWN (a replica with
`replica-serve-stale-data no` whose master went away: PING, HGETALL, ZRANGE answer it) -
made them answer the catch-all's bare 500 `{"error": {"code": "internal"}}` instead of
their JSON 503 (Retry-After) that a load balancer, compose or an orchestrator reads as
"not ready". Now: 503, `"redis": "error"`, a reason naming the error (never the Redis
host or port: these routes need no key), and one WARNING log line for ops naming the
route and the error, with no password and no address. MASTERDOWN, which refuses every
command before it runs, is since taken as a refusal of writes everywhere (the clinic
routes and the send path try again): `"redis": "refuses writes"`, naming it.

Real redis-server (the test's own, put in each state as ops would: ACL SETUSER,
REPLICAOF a master that is not there), real HTTP to the real app served by uvicorn.
`reminders health` (worker/health.py `evaluate`) answers the same Redis as unhealthy in
one line, exit 1, no traceback, for every role.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator

import pytest

from tests.api.test_redis_refuses_writes import own  # noqa: F401 (fixture)
from tests.conftest import ROOT
from tests.e2e.conftest import BIN
from worker.embedded import RedisServer, free_port
from worker.health import pump_beat
from worker.store import connect

PASSWORD = "pw-of-the-health-user-for-tests"
USER = "healthcheck"


def acl_url(server: RedisServer, lacking: str) -> str:
    """A user that may run everything but `lacking` (NOPERM for it), on every key."""
    admin = connect(server.url)
    admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "&*",
                          "+@all", f"-{lacking}")
    admin.close()
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.fixture
def beating(own) -> Iterator[RedisServer]:  # noqa: F811
    """The own Redis with a fresh pump heartbeat: healthy but for what the test does."""
    admin = connect(own.url)
    pump_beat(admin, "reminders", 0.01)
    admin.close()
    yield own


def assert_not_ready(answer, server: RedisServer, error: str) -> None:
    assert answer.status_code == 503, (answer.request.url, answer.status_code, answer.text)
    assert answer.headers["retry-after"] == "5"
    body = answer.json()
    assert body["redis"] == "error", body
    assert body["status"].startswith(f"Redis answered an error ({error}"), body
    assert str(server.port) not in answer.text and "127.0.0.1" not in answer.text, answer.text


def warnings_of(caplog, route: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and route in r.getMessage()]


@pytest.mark.parametrize("lacking, routes", [
    ("ping", ("/readyz", "/healthz")),  # the first command of both
    ("set", ("/readyz", "/healthz")),  # the write probe
    # the heartbeat's age, by Redis's clock; and the rate limiter's script, which both run
    # since (tests/api/test_review_ops_noperm.py), calls it: Redis 7.0 names no command
    # denied in a script, only that one is
    ("time", ("/readyz", "/healthz")),
    ("hgetall", ("/healthz",)),  # the heartbeat
    ("zrange", ("/healthz",)),  # the oldest due reminder
])
def test_noperm_is_503_naming_the_error(serve, beating, caplog, lacking, routes):
    api = serve(redis_url=acl_url(beating, lacking))
    with api.client() as ops, caplog.at_level(logging.INFO):
        answers = {route: ops.get(route) for route in ("/readyz", "/healthz")}
    for route, answer in answers.items():
        if route not in routes:  # a route that does not run the command is unaffected
            assert answer.status_code == 200, (route, answer.text)
            continue
        in_script = lacking == "time"  # the limiter's, the first to call it
        assert_not_ready(answer, beating, "ResponseError NOPERM" if in_script
                         else "NoPermissionError")
        denied = "of a Lua script denied" if in_script else f"'{lacking}' denied"
        assert denied in answer.json()["status"], answer.text  # what to grant
        said = warnings_of(caplog, route)
        assert len(said) == 1, (route, [r.getMessage() for r in caplog.records])
        assert "NOPERM" in said[0] or "NoPermissionError" in said[0], said
        assert denied in said[0], said
        assert PASSWORD not in said[0] and str(beating.port) not in said[0], said
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_masterdown_is_503_naming_the_error(serve, beating, caplog):
    admin = connect(beating.url)
    api = serve(redis_url=beating.url)
    with api.client() as ops:
        assert ops.get("/readyz").status_code == 200
        assert ops.get("/healthz").status_code == 200
        admin.config_set("replica-serve-stale-data", "no")
        master = free_port()
        admin.replicaof("127.0.0.1", master)  # a master that is not there
        try:
            with caplog.at_level(logging.INFO):
                ready, health = ops.get("/readyz"), ops.get("/healthz")
        finally:
            admin.replicaof("NO", "ONE")
        again = ops.get("/readyz")
    for answer in (ready, health):
        # Every command refused before it runs, as a refusal of writes is: said so, as
        # the clinic routes and the send path take it (worker/health.py `refused_write`).
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        body = answer.json()
        assert body["redis"] == "refuses writes", body
        assert body["status"].startswith("Redis refuses writes (MASTERDOWN)"), body
        assert "failover" in body["status"], body
        assert str(master) not in answer.text, answer.text  # nor the master's address
        assert str(beating.port) not in answer.text and "127.0.0.1" not in answer.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert again.status_code == 200, again.text


def health(url: str, role: str, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({"REMINDERS_REDIS_URL": url, "PYTHONPATH": str(ROOT)})
    return subprocess.run([str(BIN / "reminders"), "health", "--role", role, *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("role", ["worker", "beat", "api"])
def test_reminders_health_is_unhealthy_in_one_line_on_noperm_and_masterdown(beating, role):
    # `reminders health` (a Docker healthcheck) already caught every Redis error: kept so.
    for url, error in ((acl_url(beating, "ping" if role == "api" else "hgetall"),
                        "NoPermissionError"), (beating.url, "MasterDownError")):
        admin = connect(beating.url)
        if error == "MasterDownError":
            admin.config_set("replica-serve-stale-data", "no")
            admin.replicaof("127.0.0.1", free_port())
        try:
            plain, as_json = health(url, role), health(url, role, "--json")
        finally:
            admin.replicaof("NO", "ONE")
            admin.close()
        assert plain.returncode == 1 and plain.stderr == "", (plain.stdout, plain.stderr)
        refuses = error == "MasterDownError" and role == "api"  # as /readyz: no writes
        if refuses:
            assert plain.stdout.startswith("api: unhealthy: Redis refuses writes (MASTERDOWN)"
                                           ), plain.stdout
        else:
            assert plain.stdout.startswith(
                f"{role}: unhealthy: Redis answered an error ({error}"), plain.stdout
        assert PASSWORD not in plain.stdout
        if error == "NoPermissionError":  # what ops must grant the user
            assert f"'{'ping' if role == 'api' else 'hgetall'}' denied" in plain.stdout
        body = json.loads(as_json.stdout)
        assert as_json.returncode == 1 and body["healthy"] is False, as_json.stdout
        assert body["redis"] == ("refuses writes" if refuses else "error"), body


def test_loading_is_503_saying_redis_is_loading(serve, tmp_path):
    # A Redis reading its data back at start (LOADING to almost every command, PING too):
    # redis-py's BusyLoadingError is a ConnectionError, so both routes answered their 503,
    # but said "Redis is unreachable" of a Redis that answers. They name what it is doing.
    # Real redis-server restarted on an AOF of 100,000 keys, each read back slowly
    # (`key-load-delay`, microseconds a key), so that it is loading while they are asked.
    import time

    from worker.connections import PROBE, from_url
    from worker.embedded import redis_server_binary

    first = RedisServer(tmp_path / "redis").start()
    admin = connect(first.url)
    pipe = admin.pipeline(transaction=False)  # one command a key in the AOF (a script's
    for i in range(100_000):                   # one transaction is read back at once)
        pipe.set(f"k{i}", "v")
    pipe.execute()
    admin.close()
    first.stop()  # the AOF flushed on SIGTERM
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(first.port), "--bind", "127.0.0.1", "--dir",
         str(first.data_dir.resolve()), "--appendonly", "yes", "--save", "",
         "--key-load-delay", "50", "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        watch = from_url(first.url, PROBE)  # one try a call
        deadline = time.monotonic() + 10
        while True:  # INFO is answered while loading
            try:
                if watch.info("persistence")["loading"] == 1:
                    break
            except Exception:  # noqa: BLE001 (not listening yet)
                pass
            assert time.monotonic() < deadline, "redis-server did not start loading"
            time.sleep(0.02)
        api = serve(redis_url=first.url)
        with api.client() as ops:
            answers = [ops.get("/readyz"), ops.get("/healthz")]
        cli = health(first.url, "worker")  # `reminders health`, the same words
        assert watch.info("persistence")["loading"] == 1, "loaded before the check: too fast"
        watch.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    for answer in answers:
        assert answer.status_code == 503, (answer.request.url, answer.text)
        assert answer.headers["retry-after"] == "5"
        body = answer.json()
        assert body["redis"] == "unreachable", body  # not serving: as one down, for now
        assert body["status"].startswith("Redis is loading its data (LOADING)"), body
        assert str(first.port) not in answer.text and "127.0.0.1" not in answer.text
    assert cli.returncode == 1 and cli.stderr == "", (cli.stdout, cli.stderr)
    assert cli.stdout.startswith("worker: unhealthy: Redis is loading its data (LOADING)"), \
        cli.stdout


def test_reminders_between_masters_says_a_failover_not_out_of_memory(beating):
    # `reminders` exits 3 on MASTERDOWN as on a refusal of writes; its one line named the
    # causes of the other refusals ("out of memory, read-only, cannot persist, or too few
    # replicas"), none of which it is: ops were sent looking at memory and disks (review).
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({"REMINDERS_REDIS_URL": beating.url, "PYTHONPATH": str(ROOT)})
    admin = connect(beating.url)
    admin.config_set("replica-serve-stale-data", "no")
    admin.replicaof("127.0.0.1", free_port())
    try:
        done = subprocess.run([str(BIN / "reminders"), "dead-letters"], env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        admin.replicaof("NO", "ONE")
        admin.close()
    assert done.returncode == 3, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Redis refuses writes (MASTERDOWN)"), lines
    assert "failover" in lines[0] and "out of memory" not in lines[0], lines
    assert str(beating.port) not in done.stderr, done.stderr


def test_wrong_credentials_are_named_not_unreachable(serve, beating, caplog):
    # A wrong password in REMINDERS_REDIS_URL (or a disabled ACL user): /readyz and /healthz
    # said "Redis is unreachable" of a Redis that answers, and logged nothing; ops looked
    # at the network. `reminders health` names AuthenticationError. Now they say the
    # credentials are refused, and log it at WARNING, never the user or the password.
    acl_url(beating, "flushall")  # the user exists; the API is given another password
    wrong = f"redis://{USER}:not-{PASSWORD}@127.0.0.1:{beating.port}/0"
    api = serve(redis_url=wrong)
    with api.client() as ops, caplog.at_level(logging.INFO):
        answers = {route: ops.get(route) for route in ("/readyz", "/healthz")}
    for route, answer in answers.items():
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        body = answer.json()
        assert body["redis"] == "unreachable", body  # not served, as before
        assert "AuthenticationError" in body["status"], body
        assert "credentials" in body["status"], body
        assert PASSWORD not in answer.text and USER not in answer.text, answer.text
        said = warnings_of(caplog, route)
        assert len(said) == 1 and "AuthenticationError" in said[0], said
        assert PASSWORD not in said[0] and USER not in said[0], said


@pytest.mark.parametrize("state", ["masterdown", "noperm"])
def test_metrics_scrape_says_redis_is_not_answering_and_keeps_the_api_s_own(
        serve, beating, caplog, state):
    # The schedule's gauges caught connection errors only: a Redis answering an error
    # reply (MASTERDOWN during a failover, NOPERM for a command the scrape runs) made the
    # whole /metrics a 500, so Prometheus lost the API's own request counters and never
    # saw `reminders_redis_up 0`, on which the alert rules (deploy/prometheus) fire.
    admin = connect(beating.url)
    url = acl_url(beating, "hgetall") if state == "noperm" else beating.url
    api = serve(redis_url=url)
    with api.client() as ops:
        assert ops.get("/readyz").status_code == 200
        if state == "masterdown":
            admin.config_set("replica-serve-stale-data", "no")
            admin.replicaof("127.0.0.1", free_port())  # a master that is not there
        try:
            with caplog.at_level(logging.INFO):
                scrape = ops.get("/metrics")
        finally:
            if state == "masterdown":
                admin.replicaof("NO", "ONE")
        again = ops.get("/metrics")
    assert scrape.status_code == 200, scrape.text
    lines = scrape.text.splitlines()
    assert "reminders_redis_up 0.0" in lines, scrape.text
    assert any(line.startswith('reminders_api_requests_total{method="GET",route="/readyz"')
               for line in lines), scrape.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    said = warnings_of(caplog, "metrics")
    assert said and all("MasterDownError" in line or "'hgetall' denied" in line
                        for line in said), said
    assert PASSWORD not in caplog.text and not [x for x in said if str(beating.port) in x]
    assert again.status_code == 200 and (
        "reminders_redis_up 1.0" in again.text.splitlines()) == (state == "masterdown")
