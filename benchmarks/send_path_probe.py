"""The send path without the provider: CPU and Redis round trips per attempt (not part of
`make bench`).

    python -m benchmarks.send_path_probe [--n 1000] [--channels email,sms] [--profile FILE]

Starts a private redis-server, books --n bookings of the benchmark protocol (one step, due
now, email and SMS) and runs every attempt in this process, in one thread, as a sender
thread would (worker/dispatch.py `attempt`: begin, send-time rules, render, the fence
before the hand-over, finish), with the provider call replaced by a no-op: what is left
is this project's own cost per message. Prints per channel the CPU milliseconds per
attempt (this process; Redis's own CPU apart) and the Redis round trips per attempt
(commands written to a socket in one go: a pipeline or a script counts once).
--profile FILE writes cProfile's stats of the attempts to FILE (pstats format).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.connection import AbstractConnection

from benchmarks.side_by_side import BENCH_PROTOCOL, STEP_OFFSET_SECONDS
from worker import dispatch
from worker.catalog import Catalog
from worker.embedded import RedisServer
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store, connect

ROOT = Path(__file__).resolve().parent.parent
BATCH = 50  # attempts per CPU measurement


class RoundTrips:
    """Counts what the Redis clients write to their sockets (one write per round trip)."""

    def __init__(self) -> None:
        self.count = 0
        self._real = AbstractConnection.send_packed_command

    def __enter__(self) -> RoundTrips:
        probe = self

        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            probe.count += 1
            probe._real(conn, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AbstractConnection.send_packed_command = self._real  # type: ignore[method-assign]


def write_config(folder: Path) -> Path:
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    (folder / "protocols" / "bench.toml").write_text(BENCH_PROTOCOL, encoding="utf-8")
    (folder / "clinics" / "bench.toml").write_text("""
name = "Bench Skin Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:2525?from=clinic@bench.test&to={to}&mode=insecure"
sms = "json://127.0.0.1:9999/sms?:to={to}"
""", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.send_path_probe")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--channels", default="email,sms")
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="send-path-probe-"))
    server = RedisServer(work / "redis").start()
    try:
        settings = Settings(config_dir=write_config(work / "config"),
                            templates_dir=ROOT / "templates", public_url="https://r.example",
                            _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(connect(server.url), "probe")
        ctx = dispatch.Context(settings=settings, store=store, catalog=catalog,
                               renderer=Renderer(catalog.templates_dir))
        dispatch.deliver = lambda *a, **k: "stub"  # type: ignore[assignment]
        now = datetime.now(UTC)
        start = now.timestamp() + 60 - STEP_OFFSET_SECONDS  # due in a minute; claimed now
        bookings = []
        for i in range(args.n):
            doc = {"clinic": "bench", "booking_id": f"P-{i}", "treatment": "bench",
                   "starts_at": datetime.fromtimestamp(start, UTC).isoformat(),
                   "patient": {"name": "Ana García", "timezone": "UTC", "locale": "en",
                               "email": f"ana{i}@example.com", "phone": f"+4478{i:08d}",
                               "channels": ["email", "sms"]}}
            bookings.append(parse_booking(doc, catalog))
        for booking in bookings:
            store.upsert(booking, plan(booking, catalog.protocols["bench"],
                                       catalog.clinics["bench"], now), now)
        profile = cProfile.Profile() if args.profile else None
        for channel in args.channels.split(","):
            refs = [f"bench/P-{i}/spf:{channel}" for i in range(args.n)]
            store.redis.zadd(store.due_key, dict.fromkeys(refs, 0))
            claims = store.claim_due(len(refs), settings.lease_seconds)
            # Warm up (templates compiled, texts read) on the first claim, then measure.
            first, rest = claims[0], claims[1:]
            assert dispatch.attempt(ctx, first.ref, first.version, first.claim) == "sent"
            outcomes, per_batch = [], []
            store.redis.config_resetstat()
            with RoundTrips() as trips:
                cpu, wall = time.process_time(), time.perf_counter()
                if profile:
                    profile.enable()
                for at in range(0, len(rest), BATCH):
                    batch, began = rest[at:at + BATCH], time.thread_time()

                    def run(batch: list[Any] = batch, out: list[str] = outcomes) -> None:
                        out.extend(dispatch.attempt(ctx, c.ref, c.version, c.claim)
                                   for c in batch)

                    # Through a C call (ffi_call), so that `valgrind --tool=callgrind
                    # --collect-atstart=no --toggle-collect=ffi_call` counts the attempts'
                    # instructions only: a figure the machine's other load cannot disturb.
                    ctypes.CFUNCTYPE(None)(run)()
                    per_batch.append((time.thread_time() - began) / len(batch))
                if profile:
                    profile.disable()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert set(outcomes) == {"sent"}, set(outcomes)
            n = len(rest)
            # Redis's own time in the commands (measured inside the server).
            stats = store.redis.info("commandstats")
            redis_us = sum(v["usec"] for k, v in stats.items()
                           if k not in ("cmdstat_config", "cmdstat_info"))
            # The least CPU a batch took per attempt: the figure least disturbed by whatever
            # else runs on the machine.
            print(f"{channel}: {n} attempts: {cpu / n * 1000:.3f} ms CPU (batches of {BATCH}: "
                  f"min {min(per_batch) * 1000:.3f}, median "
                  f"{statistics.median(per_batch) * 1000:.3f}), {wall / n * 1000:.3f} ms wall, "
                  f"{trips.count / n:.2f} round trips each, Redis {redis_us / n:.0f} us in "
                  "commands each", flush=True)
        if profile and args.profile:
            profile.dump_stats(str(args.profile))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("REMINDERS_LOG_LEVEL", "INFO")
    raise SystemExit(main())
