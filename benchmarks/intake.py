"""Intake rate: distinct, realistic bookings through `reminders book -` (JSON lines).

    .venv/bin/python -m benchmarks.intake --n 20000          # book them on a fresh redis-server
    .venv/bin/python -m benchmarks.intake --n 20000 --write bookings.jsonl   # only the data

`realistic_bookings(n)` yields bookings that differ the way a clinic's do: names (with
accents), E.164 numbers of five countries, email addresses, patient timezones, locales,
appointment days and times, treatments (three protocols of 7 to 19 reminders),
medications (some patients on retinoids, a few with a recent isotretinoin dose, which
holds the booking) and channels. No two are the same document, and no cache keyed by a
whole booking can help: the rate measured is validation + plan + store of new data.

The run starts its own `redis-server` (the one `worker.embedded` finds) in a temporary
folder, pipes the JSON lines to a real `reminders book -` process and reports bookings/s
from the process's wall time (its start-up included), and the figures it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent

FIRST = ["Ana", "Lucía", "María", "Carmen", "Sofía", "Paula", "Elena", "Marta", "Irene",
         "Laura", "Alba", "Noa", "Julia", "Sara", "Claire", "Amélie", "Léa", "Chloé", "Emma",
         "Olivia", "Amelia", "Isla", "Grace", "Freya", "Hannah", "Lena", "Mia", "Jürgen",
         "José", "Álvaro", "Íñigo", "Pablo", "Hugo", "Liam", "Noah", "Oliver", "Ethan",
         "Mateo", "Zoë", "Siobhán", "Nuño", "Björn", "Chiara", "Giulia", "Ayşe", "Priya",
         "Mei", "Yuki", "Olusegun", "Fatima"]
LAST = ["López", "García", "Martínez", "Sánchez", "Pérez", "Gómez", "Fernández", "Ruiz",
        "Díaz", "Muñoz", "Álvarez", "Romero", "Smith", "Jones", "Taylor", "Brown", "Wilson",
        "Evans", "O'Brien", "Müller", "Schmidt", "Schneider", "Fischer", "Dubois", "Lefèvre",
        "Moreau", "Rossi", "Bianchi", "Nguyen", "Kowalski", "de la Fuente", "van der Berg",
        "Ibáñez", "Peña", "Castaño", "Okafor", "Yılmaz", "Sharma", "Tanaka", "Chen"]
DOMAINS = ["example.com", "mail.example.org", "correo.example.es", "example.co.uk",
           "post.example.de", "example.fr", "clinic-patients.example.net"]

# country: (timezone, locale weights, a function drawing a national number)
COUNTRIES: dict[str, tuple[str, str, Any]] = {
    "34": ("Europe/Madrid", "es", lambda r: f"6{r.randrange(10**8):08d}"),
    "44": ("Europe/London", "en", lambda r: f"7{r.choice('1245789')}{r.randrange(10**8):08d}"),
    "1": ("America/New_York", "en",
          lambda r: f"{r.choice(['212', '347', '617', '718', '917'])}"
                    f"{r.randrange(2, 10)}{r.randrange(10**6):06d}"),
    "49": ("Europe/Berlin", "en", lambda r: f"15{r.choice('12579')}{r.randrange(10**8):08d}"),
    "61": ("Australia/Sydney", "en", lambda r: f"4{r.randrange(10**8):08d}"),
}
TREATMENTS = [("microneedling", 5), ("chemical-peel", 3), ("tretinoin-start", 2)]


def _phone(rng: random.Random, country: str) -> str:
    import phonenumbers  # only to make sure every number drawn is a valid one

    while True:
        candidate = f"+{country}{COUNTRIES[country][2](rng)}"
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate, None)):
            return candidate


def realistic_bookings(n: int, *, seed: int = 7, now: datetime | None = None,
                       clinic: str = "glow") -> Iterator[dict[str, Any]]:
    """Yield `n` distinct, valid booking documents for appointments in the next 4 months."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    treatments = [t for t, w in TREATMENTS for _ in range(w)]
    for i in range(n):
        country = rng.choice(["34"] * 5 + ["44"] * 2 + ["1", "49", "61"])
        zone, locale, _ = COUNTRIES[country]
        tz = ZoneInfo(zone)
        first, last = rng.choice(FIRST), rng.choice(LAST)
        day = (now.astimezone(tz) + timedelta(days=rng.randrange(2, 120))).date()
        minute = rng.randrange(9 * 4, 19 * 4) * 15
        starts = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=tz)
        channels = rng.choice([["sms", "email"], ["email", "sms"], ["sms"], ["email"]])
        dose: date | None = None
        if rng.random() < 0.05:  # a few patients took isotretinoin, some recently (held)
            dose = now.date() - timedelta(days=rng.randrange(1, 400))
        local = "".join(c for c in first.lower() if c.isascii() and c.isalpha()) or "p"
        yield {
            "clinic": clinic,
            "booking_id": f"B{seed}-{i:07d}",
            "treatment": rng.choice(treatments),
            "starts_at": starts.isoformat(),
            "patient": {
                "name": f"{first} {last}",
                "email": f"{local}.{i}@{rng.choice(DOMAINS)}",
                "phone": _phone(rng, country),
                "timezone": zone,
                "locale": locale if rng.random() < 0.8 else rng.choice(["en", "es"]),
                "channels": channels,
            },
            "medications": {
                "tretinoin": rng.random() < 0.3,
                "retinol": rng.random() < 0.2,
                "isotretinoin_last_dose": dose.isoformat() if dose else None,
            },
        }


def write_jsonl(path: Path, n: int, seed: int = 7) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for doc in realistic_bookings(n, seed=seed):
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")


def book(path: Path, redis_url: str, *, extra: list[str] | None = None) -> dict[str, Any]:
    """Run `reminders book - < path`: its wall time and exit code, the CPU seconds it and
    redis-server used, and the summary it printed (stderr's tail)."""
    import resource

    import redis

    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_url, REMINDERS_CONFIG_DIR=str(ROOT / "config"),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"))
    script = Path(sys.executable).parent / "reminders"
    client = redis.Redis.from_url(redis_url)

    def redis_cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), redis_cpu()
    started = time.perf_counter()
    with path.open("rb") as stdin:
        done = subprocess.run([str(script), "book", *(extra or []), "-"], stdin=stdin,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              timeout=3600)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "returncode": done.returncode,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "redis_cpu": redis_cpu() - server_before,
            "stderr": done.stderr.decode("utf-8", "replace")[-2000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="bookings (default 20000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--write", type=Path, help="only write the JSON lines to this file")
    parser.add_argument("--again", action="store_true",
                        help="then book the same file again (every booking unchanged)")
    parser.add_argument("--jobs", type=int, help="reminders book --jobs N (default: its own)")
    args = parser.parse_args(argv)
    if args.write:
        write_jsonl(args.write, args.n, args.seed)
        return 0
    from worker.embedded import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bookings.jsonl"
        write_jsonl(data, args.n, args.seed)
        server = RedisServer(Path(tmp) / "redis").start()
        jobs = ["--jobs", str(args.jobs)] if args.jobs else []
        try:
            runs = [("distinct bookings, new", book(data, server.url, extra=jobs))]
            if args.again:
                runs.append(("the same again, unchanged", book(data, server.url, extra=jobs)))
        finally:
            server.stop()
    for what, result in runs:
        rate = args.n / result["seconds"]
        print(f"reminders book: {args.n:,} {what} (JSON lines) in {result['seconds']:.2f} s = "
              f"{rate:,.0f} bookings/s (exit {result['returncode']}); CPU per booking: "
              f"reminders {1e6 * result['cpu'] / args.n:,.0f} us, "
              f"redis-server {1e6 * result['redis_cpu'] / args.n:,.0f} us")
        print("  " + result["stderr"].strip().splitlines()[-1])
        if result["returncode"] != 0:
            print(result["stderr"], file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
