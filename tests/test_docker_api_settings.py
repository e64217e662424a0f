"""The settings the API itself reads reach the compose api service from `.env`.

The api service lists its own environment (not the worker's anchor), and it left out two
settings the API reads: REMINDERS_RETENTION_DAYS (worker/api/services.py: the Store that
stores every booking the clinic PUTs sets its keys' expiry from it) and
REMINDERS_PUMP_INTERVAL_SECONDS (/healthz's lag limit and its heartbeat age, worker/api/ops.py).
So with `REMINDERS_RETENTION_DAYS=30` in `.env`, a booking stored by `reminders book` (the
worker's environment) was kept 30 days after its last reminder, the same booking PUT to
the API 90.

Here `docker-compose config` resolves the file with such a `.env`, and the api command and
`reminders book` run for real with what it resolved (only the host-specific values
replaced, as tests/test_docker.py does) against a real Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.test_docker import (
    BIN,
    COMPOSE_FILE,
    ROOT,
    Process,
    argv_of,
    db_url,
    dockerfile_env,
    environment_of,
    free_port,
    resolve,
    run_cli,
)
from worker.settings import Settings

# Settings the API's code reads (worker/api/), each as `.env` would set it away from its default.
API_READS = {"REMINDERS_RETENTION_DAYS": "30", "REMINDERS_PUMP_INTERVAL_SECONDS": "4"}


def resolved_services(tmp_path: Path, dot_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    compose = shutil.which("docker-compose")
    if not compose:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    env_file = tmp_path / "dot.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in dot_env.items()), encoding="utf-8")
    host = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run([compose, "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
                             "config"], cwd=ROOT, env=host, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = yaml.safe_load(result.stdout)["services"]
    return services


def run_env(service: dict[str, Any], redis_url: str, data_dir: Path) -> dict[str, str]:
    """The resolved service's environment, host-specific values replaced."""
    declared = {k: v for k, v in environment_of(service).items() if v is not None}
    host = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    host["PATH"] = f"{BIN}{os.pathsep}{host.get('PATH', '')}"
    host["PYTHONPATH"] = str(ROOT)
    data_dir.mkdir(parents=True, exist_ok=True)
    return host | dockerfile_env() | declared | {
        "REMINDERS_REDIS_URL": redis_url, "REMINDERS_DATA_DIR": str(data_dir),
        "REMINDERS_CONFIG_DIR": str(ROOT / "config"),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates")}


def test_settings_the_api_reads_reach_the_api_service(tmp_path: Path) -> None:
    assert set(API_READS) <= {"REMINDERS_" + n.upper() for n in Settings.model_fields}
    services = resolved_services(tmp_path, API_READS)
    for name in ("worker", "api"):
        env = environment_of(services[name])
        assert {k: env.get(k) for k in API_READS} == API_READS, name


def longest_ttl(client: redis.Redis, booking_id: str) -> int:
    ttls = [int(client.ttl(key)) for key in client.scan_iter(match=f"*{booking_id}*")]
    assert ttls and min(ttls) > 0, ttls
    return max(ttls)


@pytest.mark.integration
def test_a_booking_put_to_the_compose_api_is_kept_as_long_as_one_booked_by_the_worker(
        redis_server, tmp_path: Path) -> None:
    services = resolved_services(tmp_path, API_READS)
    url = db_url(redis_server.url, 10)
    api_env = run_env(services["api"], url, tmp_path / "api")
    worker_env = run_env(services["worker"], url, tmp_path / "worker")
    booking = json.loads((ROOT / "examples" / "booking.json").read_text(encoding="utf-8"))
    booking["starts_at"] = time.strftime("%Y-%m-%dT10:00:00+00:00",
                                         time.gmtime(time.time() + 20 * 86400))
    booking["booking_id"] = "BY-CLI"
    booked = subprocess.run([str(BIN / "reminders"), "book", "-"], env=worker_env,
                            cwd=tmp_path, input=json.dumps(booking), capture_output=True,
                            text=True, timeout=60)
    assert booked.returncode == 0, booked.stderr

    port = str(free_port())
    argv = resolve(argv_of(services["api"]["command"]))
    argv[argv.index("--port") + 1] = port
    argv[argv.index("--host") + 1] = "127.0.0.1"
    process = Process("api", argv, api_env, tmp_path).start()
    try:
        process.wait_for(r"Uvicorn running on")
        key = run_cli([str(BIN / "reminders"), "keys", "issue", "--clinic", "glow"], worker_env,
                      tmp_path).stdout.strip()
        del booking["booking_id"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/bookings/BY-API", data=json.dumps(booking).encode(),
            method="PUT", headers={"Authorization": f"Bearer {key}",
                                   "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 201
    finally:
        process.stop()
    client = redis.Redis.from_url(url)
    try:
        by_cli, by_api = longest_ttl(client, "BY-CLI"), longest_ttl(client, "BY-API")
    finally:
        client.close()
    # The same booking (its last reminder on the same day), stored a few seconds apart.
    assert abs(by_api - by_cli) < 600, (
        f"kept {by_api / 86400:.1f} days when PUT to the API, {by_cli / 86400:.1f} when booked")
