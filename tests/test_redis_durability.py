"""Ops are told when Redis is configured to lose or evict the schedule (review): nothing read
Redis's persistence or eviction policy, so a Redis without AOF (a restart goes back to the
last RDB snapshot, or loses everything), with `appendfsync no`, or evicting keys
(`volatile-lru` evicts the bookings' keys, which carry a TTL; `allkeys-lru` any key,
Celery's queues too), or a replica, passed every check.

Real redis-server processes, each started with the compose file's own command and one bad
setting on top (later options win); real `reminders check --redis` and `reminders health`
processes; real HTTP requests to the API's /readyz. A policy ops chose is warned about,
never an outage: the exit codes and the 200 stay what they were. With CONFIG renamed away
(managed Redis), the settings INFO shows are read from it and the rest is "could not read".
The compose Redis and the embedded default (`reminders run`, tests/conftest.py's
`redis_server`) pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.conftest import ApiServer, api_settings
from tests.test_check import EXIT_OK, run_check
from tests.test_docker import ROOT, Process, argv_of, container_env, free_port, resolve
from worker.health import pump_beat
from worker.settings import Settings
from worker.store import connect


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def start_redis(services: dict, folder: Path, *extra: str) -> tuple[Process, str]:
    """The compose file's Redis command on a free loopback port, `extra` options on top."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = resolve(argv_of(services["redis"]["command"]))
    process = Process(f"redis-{port}", [*argv, "--port", str(port), "--bind", "127.0.0.1",
                                        "--dir", str(folder), *extra],
                      dict(os.environ), folder).start()
    process.wait_for(r"Ready to accept connections")
    return process, f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_with(services, tmp_path) -> Iterator:
    started: list[Process] = []

    def start(*extra: str) -> str:
        process, url = start_redis(services, tmp_path / f"redis{len(started)}", *extra)
        started.append(process)
        return url

    yield start
    for process in started:
        process.stop()


def health(url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=url, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "worker.cli", "health", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def readyz(url: str, tmp_path: Path) -> httpx.Response:
    server = ApiServer(api_settings(data_dir=tmp_path / "data"), url).start()
    try:
        with server.client() as client:
            return client.get("/readyz")
    finally:
        server.stop()


def check(url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_check(ROOT / "config", ROOT / "templates", "--redis", *args, cwd=cwd,
                     env={"REMINDERS_REDIS_URL": url})


def redis_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("WARNING: Redis ")]


# (options on top of the compose command, the setting named, words of the problem, the fix)
BAD = [
    (("--appendonly", "no"), "appendonly", "no", "restart", "appendonly yes"),
    (("--appendonly", "no", "--save", ""), "appendonly", "no", "restart", "appendonly yes"),
    (("--appendfsync", "no"), "appendfsync", "no", "crash", "appendfsync everysec"),
    (("--maxmemory-policy", "volatile-lru"), "maxmemory-policy", "volatile-lru", "TTL",
     "maxmemory-policy noeviction"),
    (("--maxmemory-policy", "allkeys-lru", "--maxmemory", "512mb"), "maxmemory-policy",
     "allkeys-lru", "any key", "maxmemory-policy noeviction"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("extra", "setting", "value", "words", "fix"), BAD,
                         ids=[" ".join(b[0]) for b in BAD])
def test_a_redis_that_can_lose_or_evict_the_schedule_is_warned_about_never_failed(
        redis_with, tmp_path, extra, setting, value, words, fix):
    url = redis_with(*extra)
    client = connect(url)
    pump_beat(client, Settings.model_fields["key_prefix"].default, 0.01)  # a pump just ran
    client.close()

    found = check(url, tmp_path)
    assert found.returncode == EXIT_OK, found.stderr  # a warning, not a configuration error
    warnings = redis_warnings(found.stdout)
    assert len(warnings) == 1, found.stdout
    assert warnings[0].startswith(f"WARNING: Redis {setting} is {value}: "), warnings
    assert words in warnings[0] and fix in warnings[0], warnings
    assert "could not read" not in found.stdout

    as_json = check(url, tmp_path, "--json")
    assert as_json.returncode == EXIT_OK, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is True
    assert [(s["setting"], s["value"]) for s in doc["redis_settings"]] == [(setting, value)]

    client = connect(url)  # the pump again: the two checks above may take 30 s on a loaded host
    pump_beat(client, Settings.model_fields["key_prefix"].default, 0.01)
    client.close()
    alive = health(url, tmp_path)
    assert alive.returncode == 0, alive.stdout + alive.stderr  # still healthy
    first, *rest = alive.stdout.splitlines()
    assert first.startswith("worker: healthy: ok: the last pump run was"), alive.stdout
    assert len(rest) == 1 and rest[0].startswith(f"warning: Redis {setting} is {value}: "), rest
    assert fix in rest[0]
    alive_json = health(url, tmp_path, "--json")
    assert alive_json.returncode == 0
    assert [s["setting"] for s in json.loads(alive_json.stdout)["redis_settings"]] == [setting]

    ready = readyz(url, tmp_path)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ok" and body["redis"] == "ok"
    assert [(s["setting"], s["value"]) for s in body["redis_settings"]] == [(setting, value)]
    assert fix in body["redis_settings"][0]["problem"]


@pytest.mark.integration
def test_a_replica_is_warned_about(redis_with, tmp_path):
    url = redis_with("--replicaof", "127.0.0.1", str(free_port()))
    found = check(url, tmp_path)
    assert found.returncode == EXIT_OK, found.stderr
    warnings = redis_warnings(found.stdout)
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: Redis role is replica: "), \
        found.stdout
    assert "master" in warnings[0]
    alive = health(url, tmp_path)  # no pump heartbeat (a replica takes no write): unhealthy
    assert alive.returncode == 1
    assert alive.stdout.splitlines()[1].startswith("warning: Redis role is replica: ")


@pytest.mark.integration
def test_without_config_the_settings_come_from_info_and_the_rest_could_not_be_read(
        redis_with, tmp_path):
    bad = redis_with("--rename-command", "CONFIG", "", "--appendonly", "no",
                     "--maxmemory-policy", "allkeys-lru")
    found = check(bad, tmp_path)
    assert found.returncode == EXIT_OK, found.stderr
    warnings = redis_warnings(found.stdout)
    assert [w.split(": ")[1] for w in warnings] == [
        "Redis appendonly is no", "Redis maxmemory-policy is allkeys-lru"], found.stdout
    # appendfsync is moot without AOF: not asked for.

    good = redis_with("--rename-command", "CONFIG", "")
    found = check(good, tmp_path)
    assert found.returncode == EXIT_OK, found.stderr
    warnings = redis_warnings(found.stdout)
    assert len(warnings) == 1, found.stdout
    assert warnings[0].startswith("WARNING: Redis appendfsync could not be read (CONFIG "), \
        warnings
    assert "everysec" in warnings[0]
    alive = health(good, tmp_path, "--role", "beat")
    assert alive.returncode == 1  # no beat tick recorded: as before
    assert alive.stdout.splitlines()[1].startswith(
        "warning: Redis appendfsync could not be read"), alive.stdout
    ready = readyz(good, tmp_path)
    assert ready.status_code == 200
    assert [(s["setting"], s["value"]) for s in ready.json()["redis_settings"]] == [
        ("appendfsync", None)]


@pytest.mark.integration
def test_the_compose_redis_and_the_embedded_default_pass(redis_with, redis_server, redis_client,
                                                       tmp_path):
    for url in (redis_with(), redis_server.url):
        found = check(url, tmp_path)
        assert found.returncode == EXIT_OK, found.stderr
        assert not redis_warnings(found.stdout), found.stdout
        assert ("Redis: appendonly yes, appendfsync everysec, maxmemory-policy noeviction, "
                "a master: the schedule survives a restart and is never evicted"
                in found.stdout), found.stdout
        alive = health(url, tmp_path, "--role", "beat")
        assert len(alive.stdout.splitlines()) == 1, alive.stdout
        ready = readyz(url, tmp_path)
        assert ready.status_code == 200 and ready.json()["redis_settings"] == [], ready.text


@pytest.mark.integration
def test_a_worker_started_on_such_a_redis_logs_a_warning_and_runs(services, redis_with,
                                                                  tmp_path):
    """Ops who never run check or read health see it in the worker's log at start."""
    url = redis_with("--maxmemory-policy", "allkeys-lru")
    env = container_env(services["worker"], url, tmp_path / "data")
    worker = Process("worker", resolve(argv_of(services["worker"]["command"])), env, tmp_path)
    worker.start()
    try:
        worker.wait_for(r"celery@\S+ ready\.")
        [line] = worker.wait_for(r".*Redis maxmemory-policy is allkeys-lru: .*")
        assert '"level": "WARNING"' in line and "maxmemory-policy noeviction" in line, line
        assert "appendonly" not in line  # the compose Redis's other settings pass
    finally:
        assert worker.stop() == 0, worker.output()


@pytest.mark.integration
def test_the_unauthenticated_health_answers_do_not_name_the_redis_master(redis_with, tmp_path):
    # A replica that takes writes (replica-read-only no): /readyz and /healthz answer 200 with
    # the replica warning. They need no key, so the master's internal host and port must not
    # be in them; `reminders health` (ops, on the host) still names it.
    master = f"127.0.0.1:{free_port()}"
    url = redis_with("--replicaof", *master.split(":"), "--replica-read-only", "no")
    client = connect(url)
    pump_beat(client, Settings.model_fields["key_prefix"].default, 0.01)  # a pump just ran
    client.close()

    server = ApiServer(api_settings(data_dir=tmp_path / "data"), url).start()
    try:
        with server.client() as http:
            answers = [http.get("/readyz"), http.get("/healthz")]
    finally:
        server.stop()
    for answer in answers:
        assert answer.status_code == 200, answer.text
        found = answer.json()["redis_settings"]
        assert [(s["setting"], s["value"]) for s in found] == [("role", "replica")], found
        assert "role is replica" in found[0]["problem"] and "master" in found[0]["problem"]
        assert master not in answer.text and "127.0.0.1" not in answer.text, answer.text

    alive = health(url, tmp_path, "--json")
    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert master in json.loads(alive.stdout)["redis_settings"][0]["problem"]
    assert master in health(url, tmp_path).stdout
