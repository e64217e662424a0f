"""Redis memory per pending reminder and batch intake speed of the store (layout 2).

    python -m benchmarks.store_layout [--bookings 100000] [--batch 1000] [--redis-url URL]

Loads N new microneedling bookings of N patients (sms + email, tretinoin: 10 reminders each) with
`Store.upsert_many` into a fresh redis-server of its own (no persistence) or an EMPTY
database at --redis-url, and prints:
  bytes per pending reminder   (used_memory after - before) / reminders stored
  bookings/s                   upsert_many wall time only (parse and plan are done first)
  client and Redis CPU         per booking, which a busy machine inflates less than wall time
The bookings start at 50 different times over two months, so their plans differ; each plan
is made once and shared by the bookings starting then (planning is not what is measured).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import timeit
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from worker.catalog import Catalog
from worker.embedded import free_port, redis_server_binary
from worker.models import Booking, parse_booking
from worker.planner import Plan, plan
from worker.settings import Settings
from worker.store import Store, connect

ROOT = Path(__file__).resolve().parent.parent
STARTS = 50


def bookings(catalog: Catalog, count: int, now: datetime) -> list[tuple[Booking, Plan]]:
    """Return `count` distinct new bookings with their plans."""
    base: list[tuple[Booking, Plan]] = []
    for n in range(STARTS):
        doc = {
            "clinic": "glow", "booking_id": f"M-{n}", "treatment": "microneedling",
            "starts_at": (now + timedelta(days=14, hours=n * 29)).isoformat(timespec="seconds"),
            "patient": {"name": "Ana López", "email": "ana@example.com", "phone": "+34600111222",
                        "timezone": "Europe/Madrid", "locale": "es", "channels": ["sms", "email"]},
            "medications": {"tretinoin": True, "retinol": False, "isotretinoin_last_dose": None},
        }
        booking = parse_booking(doc, catalog)
        base.append((booking, plan(booking, catalog.protocols["microneedling"],
                                   catalog.clinics["glow"], now)))
    out = []
    for i in range(count):
        booking, planned = base[i % STARTS]
        # A patient each (their own contact index entries; no SMS cap between them).
        patient = booking.patient.model_copy(
            update={"phone": f"+346{i:08d}", "email": f"p{i}@example.com"})
        out.append((booking.model_copy(update={"booking_id": f"B-{i:07d}", "patient": patient}),
                    planned))
    return out


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU the Redis server has used (its main thread and all)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(client: redis.Redis, items: list[tuple[Booking, Plan]], now: datetime,
            batch: int) -> dict[str, float]:
    store = Store(client, "bench")
    store.upsert_many(items[:1], now)  # the layout key, the scripts and the texts
    before = int(client.info("memory")["used_memory"])
    server_cpu = redis_cpu(client)
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(1, len(items), batch):
        store.upsert_many(items[i:i + batch], now)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    server_cpu = redis_cpu(client) - server_cpu
    used = int(client.info("memory")["used_memory"]) - before
    reminders = sum(len(p.reminders) for _, p in items[1:])
    sample = store.booking_key("glow", items[-1][0].booking_id)
    return {
        "bookings": len(items) - 1,
        "reminders": reminders,
        "bytes_per_pending_reminder": round(used / reminders, 1),
        "bookings_per_second": round((len(items) - 1) / seconds),
        "microseconds_per_booking": round(seconds / (len(items) - 1) * 1e6, 1),
        # Where the time went, robust to a busy machine's waiting: this process's CPU and
        # the Redis server's.
        "client_cpu_us_per_booking": round(cpu / (len(items) - 1) * 1e6, 1),
        "redis_cpu_us_per_booking": round(server_cpu / (len(items) - 1) * 1e6, 1),
        # A yardstick for the machine: one datetime.isoformat() (about 0.3 us when idle).
        "isoformat_us": round(timeit.timeit(now.isoformat, number=100_000) * 10, 2),
        "booking_hash_bytes": int(client.memory_usage(sample, samples=0) or 0),
        "booking_hash_encoding": str(client.object("encoding", sample)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bookings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="bookings per upsert_many call")
    parser.add_argument("--redis-url", help="an EMPTY Redis database to use (default: own server)")
    args = parser.parse_args(argv)
    settings = Settings(config_dir=ROOT / "config", templates_dir=ROOT / "templates",
                        _env_file=None)
    catalog = Catalog.load(settings)
    now = datetime.now(UTC)
    items = bookings(catalog, args.bookings + 1, now)
    with tempfile.TemporaryDirectory() as folder:
        server = None
        if args.redis_url:
            url = args.redis_url
        else:  # no persistence: its buffers would count in used_memory
            port = free_port()
            server = subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", folder],
                stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
        client = connect(url)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            if client.dbsize():
                parser.error(f"{url} is not empty")
            result = measure(client, items, now, args.batch)
        finally:
            client.close()
            if server is not None:
                server.terminate()
                server.wait(10)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
