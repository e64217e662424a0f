"""Intake through the HTTP API: `POST /v1/bookings:batch` with the intake file.

Used by benchmarks/side_by_side.py only when the project has an HTTP API (`worker.api`).
The API is started the way `reminders run` starts it (`worker.service.api_command` when
the service module has one) or else as DESIGN.md names it (`uvicorn worker.api:app`);
its OpenAPI document says whether the batch route exists and how many bookings a batch
may hold. Each clinic gets a key from `reminders keys issue --clinic …`. One client (a
keep-alive session) sends one booking per clinic to warm the API up (as the CLI's start-up
is left out), then the batches one after the other, timed; a 429 is waited out as its
Retry-After asks, and that wait counts. Every booking must come back stored. Over the
timed part it also reads the CPU time of the API process (/proc, Linux) and of redis-server
(INFO cpu): `api_cpu_us` and `redis_cpu_us`, a booking (None where it cannot be read).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests

from benchmarks.procs import Processes, settings_under, wait_for

BIN = Path(sys.executable).parent
ROUTE = "/v1/bookings:batch"
KEY = re.compile(r"rk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
DEFAULT_BATCH = 1000


def api_argv(env: dict[str, str], port: int) -> list[str]:
    """The API's command line: the service's own when it has one, else uvicorn's."""
    import worker.service as service

    command = getattr(service, "api_command", None)
    if command is not None:
        takes_port = len(inspect.signature(command).parameters) >= 2
        settings = settings_under(env)
        return list(command(settings, port) if takes_port else command(settings))
    return [sys.executable, "-m", "uvicorn", "worker.api:app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]


def max_batch(openapi: dict[str, Any]) -> int:
    """The largest batch the OpenAPI document allows (`maxItems` of `bookings`)."""
    found = re.findall(r'"bookings":\s*\{[^{}]*"maxItems":\s*(\d+)', _dumps(openapi))
    return min(map(int, found)) if found else DEFAULT_BATCH


def _dumps(doc: Any) -> str:
    import json

    return json.dumps(doc)


def measure_batch_intake(params: Any, workdir: Path, config: Path, docs: list[dict[str, Any]],
                         procs: Processes, url: str, base_env: dict[str, str]) -> dict[str, Any]:
    from worker.embedded import free_port

    port = free_port()
    env = base_env | {
        "REMINDERS_REDIS_URL": url, "REMINDERS_CONFIG_DIR": str(config),
        "REMINDERS_TEMPLATES_DIR": str(Path(__file__).resolve().parent.parent / "templates"),
        "REMINDERS_DATA_DIR": str(workdir / "data-api"), "REMINDERS_LOG_LEVEL": "WARNING",
        "REMINDERS_API_HOST": "127.0.0.1", "REMINDERS_API_PORT": str(port),
    }
    log = workdir / "api.log"
    api = procs.spawn(api_argv(env, port), env=env, cwd=workdir, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        def answers() -> dict[str, Any] | None:
            if api.poll() is not None:
                raise RuntimeError(f"the API exited ({api.returncode}); see {log}")
            try:
                return dict(requests.get(f"{base}/openapi.json", timeout=2).json())
            except (requests.RequestException, ValueError):
                return None

        openapi = wait_for(answers, 60, "API start")
        assert isinstance(openapi, dict)
        if ROUTE not in openapi.get("paths", {}):
            return {"available": False, "reason": "no batch route yet"}
        size = max_batch(openapi)
        by_clinic: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            by_clinic.setdefault(doc["clinic"], []).append(doc)
        keys = {clinic: issue_key(clinic, env, workdir) for clinic in by_clinic}
        batches = [(clinic, items[i:i + size]) for clinic, items in by_clinic.items()
                   for i in range(0, len(items), size)]
        session = requests.Session()
        redis_client = redis.Redis.from_url(url)
        # Warm up as the CLI's start-up is left out: one booking per clinic (and key) first.
        for clinic in by_clinic:
            post_batch(session, f"{base}{ROUTE}", keys[clinic],
                       [warm_up_booking(by_clinic[clinic][0])], deadline=time.monotonic() + 60)
        api_cpu, redis_cpu = process_cpu(api.pid), server_cpu(redis_client)
        started = time.monotonic()
        for clinic, batch in batches:
            post_batch(session, f"{base}{ROUTE}", keys[clinic], batch,
                       deadline=started + params.intake_budget)
        seconds = time.monotonic() - started
        api_after, redis_after = process_cpu(api.pid), server_cpu(redis_client)
        redis_client.close()

        def per_booking(before: float | None, after: float | None) -> float | None:
            if before is None or after is None:
                return None
            return (after - before) / len(docs) * 1e6

        return {"available": True, "bookings": len(docs),
                "batch": max(len(b) for _, b in batches), "requests": len(batches),
                "seconds": seconds, "rate": len(docs) / seconds,
                "api_cpu_us": per_booking(api_cpu, api_after),
                "redis_cpu_us": per_booking(redis_cpu, redis_after)}
    finally:
        procs.stop(api)


def process_cpu(pid: int) -> float | None:
    """The CPU seconds (user + system) process `pid` has used, from /proc; None elsewhere."""
    import os

    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(client: redis.Redis) -> float | None:
    """The CPU seconds redis-server has used (INFO cpu, its main process and threads)."""
    try:
        info = client.info("cpu")
    except redis.RedisError:
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def warm_up_booking(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` under a booking id of its own (not one of the measured bookings)."""
    return {**doc, "booking_id": f"warm-up-{doc['booking_id']}"[:64]}


def issue_key(clinic: str, env: dict[str, str], workdir: Path) -> str:
    result = subprocess.run([str(BIN / "reminders"), "keys", "issue", "--clinic", clinic],
                            env=env, cwd=workdir, capture_output=True, text=True, timeout=60,
                            check=False)
    found = KEY.search(result.stdout + result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"`reminders keys issue --clinic {clinic}` gave no key "
                           f"(exit {result.returncode})")
    return found.group(0)


def post_batch(session: requests.Session, url: str, key: str, batch: list[dict[str, Any]],
               deadline: float) -> None:
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the batches did not go in within the intake budget")
        answer = session.post(url, json={"bookings": batch}, timeout=300,
                              headers={"Authorization": f"Bearer {key}"})
        if answer.status_code == 429:
            time.sleep(float(answer.headers.get("Retry-After", "1")))
            continue
        if answer.status_code != 200:
            raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:200]}")
        stored = answer.json().get("stored")
        if stored != len(batch):
            raise RuntimeError(f"{url} stored {stored} of {len(batch)} bookings")
        return


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.api_intake --n 20000`: the batch route alone, on a fresh
    redis-server, with the bookings of benchmarks/intake.py and the repository's config."""
    import argparse
    import tempfile
    from types import SimpleNamespace

    from benchmarks.intake import ROOT, realistic_bookings
    from worker.embedded import RedisServer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=20000, help="bookings (default 20000)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    docs = list(realistic_bookings(args.n, seed=args.seed))
    procs = Processes()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            result = measure_batch_intake(
                SimpleNamespace(intake_budget=600.0), Path(tmp), ROOT / "config", docs, procs,
                server.url, {k: v for k, v in __import__("os").environ.items()
                             if not k.startswith("REMINDERS_")})
        finally:
            server.stop()
    if not result.get("available"):
        print(f"no batch intake: {result.get('reason')}")
        return 1
    print(f"POST {ROUTE}: {result['bookings']:,} bookings in {result['requests']} batches of "
          f"{result['batch']:,} in {result['seconds']:.2f} s = {result['rate']:,.0f} bookings/s")
    if result["api_cpu_us"] is not None and result["redis_cpu_us"] is not None:
        print(f"CPU a booking: API process {result['api_cpu_us']:.0f} µs, redis-server "
              f"{result['redis_cpu_us']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
