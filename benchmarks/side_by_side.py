"""One table, measured side by side in one run: the raw client, the naive ETA peer, ours.

    python -m benchmarks [--quick] [--burst 1000] [--json PATH] [--help]

Everything runs on 127.0.0.1: a real SMTP server and a real HTTP SMS gateway
(benchmarks/sinks.py, in this process) take every message, and time it as it arrives.
Each side gets a fresh redis-server (worker.embedded.RedisServer: AOF on, noeviction, as
`reminders run` starts it). In order:

1. Raw client (benchmarks/raw_client.py): the burst's messages sent straight to the
   sinks, one serial client per channel, both channels at once: smtplib with a new
   connection per message, `requests.post` without a session. The limit of the sinks and
   of a client that does nothing else.
2. Naive peer (benchmarks/naive_app.py): `celery -A benchmarks.naive_app worker`
   (--concurrency as ours), one `send_task(eta=due)` per reminder, Apprise to the sinks.
   Idle worker RSS; the burst; the steady stream; then up to --naive-pending far-future
   ETA tasks, which its worker takes into memory: worker RSS and Redis memory with them.
3. Ours, driven only through its public interfaces, so a change to the worker shows up
   here without an edit:
   - intake: `reminders book FILE` on --intake realistic bookings (JSON lines; the
     shipped protocols; a fresh Redis, no worker), and `POST /v1/bookings:batch` when the
     HTTP API has that route (looked for at run time);
   - the service: the Celery worker and beat exactly as `reminders run` and
     docker-compose start them (worker.service.celery_command, i.e. `python -m
     worker.celery_main worker|beat`), their channels pointing at the sinks;
   - idle worker RSS; the burst and the steady stream, booked through `reminders book`;
   - the pending set: --pending-bookings realistic bookings (the shipped protocols less
     their at-booking step, so nothing falls due while they wait) loaded through parallel
     `reminders book` processes while the worker runs: Redis memory per pending reminder
     (`reminders stats`), worker RSS with them pending.

The burst: --burst email and --burst SMS reminders due at one instant. Rate per channel =
messages delivered / (last arrival - due instant); lateness = arrival - due. The steady
stream: --steady-rate reminders a second (email and SMS alternating) for
--steady-seconds. Worker RSS: VmRSS summed over the worker's process group (main process
and pool), from /proc, median of five readings.

Long phases have time budgets (--load-budget, --intake-budget, --drain-timeout), so a
slow build still finishes: a phase cut short says so in the table. Every process is
stopped (SIGTERM, then SIGKILL, to its process group) however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import celery
import kombu
import redis

from benchmarks import naive_app
from benchmarks.bookings import mobile, realistic
from benchmarks.procs import (
    Processes,
    group_rss_bytes,
    service_command,
    settings_under,
    wait_for,
)
from benchmarks.sinks import HttpSink, SmtpSink

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 90.0
SHIPPED_PROTOCOLS = ("microneedling", "chemical-peel", "tretinoin-start")
STEP_OFFSET_SECONDS = 1  # the benchmark protocol's one step: 1 s after the "appointment"
MB = 1024 * 1024
# ETA tasks the naive worker takes in a second, at the least: its lead before a due time.
NAIVE_INTAKE_PER_SECOND = 300
BACKLOG_WAIT_SECONDS = 15.0  # for ours to send what the stream left before the memory phase

BENCH_PROTOCOL = f"""
name = "Benchmark"
description = "One message {STEP_OFFSET_SECONDS} s after the start, on each channel taken."
[[steps]]
id = "spf"
offset = "{STEP_OFFSET_SECONDS}s"
channels = ["email", "sms"]
template = "spf-morning"
# What that template states: values as in config/protocols/microneedling.toml.
[advice]
spf = 30
sun_sensitive = true
"""
# (clinic id, name, timezone, locale, send window): `bench` takes the burst and the steady
# stream (all day); the other two the realistic bookings (the example clinic's hours).
CLINICS = [("bench", "Bench Skin Clinic", "UTC", "en", ("00:00", "24:00")),
           ("bench-es", "Clínica Bench", "Europe/Madrid", "es", ("09:00", "20:00")),
           ("bench-en", "Bench Skin Clinic London", "Europe/London", "en", ("09:00", "20:00"))]
# Where each phase's patients live: distinct addresses and numbers per phase and side.
PHONE_BASE = {"raw": 1_000_000, "naive-burst": 2_000_000, "naive-steady": 3_000_000,
              "ours-burst": 4_000_000, "ours-steady": 5_000_000}


@dataclass(frozen=True)
class Params:
    """What one run measures; `make bench` uses the defaults."""

    burst: int = 1000  # reminders due at one instant, per channel (email and SMS)
    steady_rate: float = 100.0  # reminders a second in the steady stream
    steady_seconds: float = 20.0  # how long the steady stream lasts
    intake: int = 20_000  # realistic bookings in the `reminders book` intake file
    pending_bookings: int = 100_000  # realistic bookings: Redis memory per pending reminder
    pending_reminders: int = 1_000_000  # then more, up to this many pending: worker RSS
    naive_pending: int = 100_000  # far-future ETA tasks given to the naive worker (cap)
    naive_concurrency: int = 2  # the naive worker's --concurrency (ours: celery_command's)
    loaders: int = 2  # parallel `reminders book` processes loading the pending set
    drain_timeout: float = 40.0  # give up waiting for a burst this long after its due instant
    steady_drain: float = 15.0  # ... for the steady stream, this long after its last due time
    intake_budget: float = 45.0  # give up on the intake file (each route) after this long
    load_budget: float = 75.0  # stop adding pending reminders (each side) after this long
    seed: int = 7


# The summary line `reminders book` ends with: "booked N bookings: ... in 1.23 s (...)".
BOOKED_IN = re.compile(r"^booked [\d,]+ bookings?: .* in ([\d.]+) s\b", re.MULTILINE)
QUICK = {"burst": 25, "steady_rate": 20.0, "steady_seconds": 3.0, "intake": 300,
         "pending_bookings": 400, "pending_reminders": 5000, "naive_pending": 500,
         "drain_timeout": 60.0,
         "steady_drain": 30.0,
         "intake_budget": 60.0, "load_budget": 60.0}
HELP = {
    "burst": "reminders due at one instant, per channel (5000: 10,000 due in one second; "
             "raise --drain-timeout with it)",
    "steady_rate": "reminders a second in the steady stream",
    "steady_seconds": "seconds the steady stream lasts",
    "intake": "realistic bookings in the `reminders book` intake file",
    "pending_bookings": "realistic bookings pending for the Redis figure (ours)",
    "pending_reminders": "reminders pending for the worker RSS figure (ours; more bookings)",
    "naive_pending": "far-future ETA tasks given to the naive worker (at most)",
    "naive_concurrency": "the naive worker's --concurrency",
    "loaders": "parallel `reminders book` processes loading the pending set",
    "drain_timeout": "seconds to wait for a burst after its due instant",
    "steady_drain": "seconds to wait for the steady stream after its last due time",
    "intake_budget": "seconds allowed for the intake file",
    "load_budget": "seconds allowed for loading pending reminders, each side",
    "seed": "seed of the realistic bookings",
}


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- what was expected, what arrived -----------------------------------------------------


def email_of(phase: str, i: int) -> str:
    return f"{phase}-{i}@example.com"


def phone_of(phase: str, i: int) -> str:
    return mobile("es", PHONE_BASE[phase] + i)


def sink_key(channel: str, to: str) -> str:
    """Name a recipient the same way whoever sent to it (URL quoting, case)."""
    return to.strip().lower() if channel == "email" else re.sub(r"\D", "", to)


class Sinks:
    """The SMTP server and the SMS gateway every side sends to."""

    def __init__(self) -> None:
        self.smtp = SmtpSink().start()
        self.sms = HttpSink().start()

    @property
    def email_url(self) -> str:
        return f"mailto://127.0.0.1:{self.smtp.port}?from=clinic@example.com&to={{to}}&mode=insecure"

    @property
    def sms_url(self) -> str:
        return f"json://127.0.0.1:{self.sms.port}/sms?:to={{to}}"

    def mark(self) -> tuple[int, int]:
        return self.smtp.count(), self.sms.count()

    def since(self, mark: tuple[int, int]) -> dict[tuple[str, str], list[float]]:
        """Return (channel, recipient key) -> arrival times, for messages after `mark`."""
        out: dict[tuple[str, str], list[float]] = {}
        for sink, start in ((self.smtp, mark[0]), (self.sms, mark[1])):
            for m in sink.snapshot(start):
                out.setdefault((m.channel, sink_key(m.channel, m.to)), []).append(m.at)
        return out

    def stop(self) -> None:
        self.smtp.stop()
        self.sms.stop()


def collect(sinks: Sinks, mark: tuple[int, int], expected: dict[tuple[str, str], float],
            until: float, what: str) -> dict[str, Any]:
    """Wait until every expected message arrived (or the epoch `until`); return them.

    `expected` maps (channel, recipient key) to its due instant (epoch seconds). The
    result lists, per expected message, [channel, due, first arrival or None, copies].
    """
    total, last_report = len(expected), time.monotonic()
    while True:
        arrived = sinks.since(mark)
        got = sum(1 for k in expected if k in arrived)
        if got == total or time.time() > until:
            break
        if time.monotonic() - last_report > 10:
            say(f"{what}: {got}/{total} arrived")
            last_report = time.monotonic()
        time.sleep(0.25)
    time.sleep(0.5)  # a late extra copy still lands in the count
    arrived = sinks.since(mark)
    messages = []
    for (channel, key), due in expected.items():
        times = sorted(arrived.get((channel, key), []))
        messages.append([channel, due, times[0] if times else None, len(times)])
    missing = sum(1 for m in messages if m[2] is None)
    say(f"{what}: {total - missing}/{total} arrived" + (f", {missing} missing" if missing else ""))
    return {"messages": messages, "expected": total, "until": until}


# --- figures from observations ---------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Return the nearest-rank p-th percentile of `values` (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * p / 100)) - 1]


def burst_figures(obs: dict[str, Any]) -> dict[str, float | None]:
    """Rates per channel and together, lateness, missing and extra copies, of one burst.

    A message that never arrived counts as infinitely late (a percentile that lands on
    one is shown as "> the wait"), and a channel with one missing drained at the rate of
    what arrived over the whole wait.
    """
    due = obs["due"]
    out: dict[str, float | None] = {}
    for channel in ("email", "sms", "both"):
        mine = [m for m in obs["messages"] if channel in ("both", m[0])]
        got = [m[2] for m in mine if m[2] is not None]
        end = max(got, default=due) if len(got) == len(mine) else obs["until"]
        out[f"{channel}_rate"] = len(got) / (end - due) if got and end > due else None
    late = _lateness(obs["messages"])
    out["drain_seconds"] = max(late, default=None)
    out["lateness_p50"], out["lateness_p99"] = percentile(late, 50), percentile(late, 99)
    out |= _counts(obs["messages"])
    return out


def steady_figures(obs: dict[str, Any]) -> dict[str, float | None]:
    late = _lateness(obs["messages"])
    return {"lateness_p50": percentile(late, 50), "lateness_p99": percentile(late, 99),
            "lateness_max": max(late, default=None), **_counts(obs["messages"])}


def _lateness(messages: list[list[Any]]) -> list[float]:
    return [math.inf if m[2] is None else m[2] - m[1] for m in messages]


def _counts(messages: list[list[Any]]) -> dict[str, float | None]:
    return {"missing": float(sum(1 for m in messages if m[2] is None)),
            "extra_copies": float(sum(max(0, m[3] - 1) for m in messages))}


def rss_sample(pgid: int, readings: int = 5, interval: float = 0.25) -> int:
    """Return the median of a few readings of the group's summed VmRSS, in bytes."""
    values = []
    for i in range(readings):
        if i:
            time.sleep(interval)
        values.append(group_rss_bytes(pgid))
    return int(statistics.median(values))


def used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _sleep_until(epoch: float) -> None:
    while (left := epoch - time.time()) > 0:
        time.sleep(min(left, 0.2))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_redis(folder: Path, servers: list[Any]) -> Any:
    from worker.embedded import RedisServer

    server = RedisServer(folder).start()
    servers.append(server)
    return server


def stop_redis(server: Any, servers: list[Any]) -> None:
    # Nothing in a benchmark's Redis is worth keeping: no final AOF flush to wait for.
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()
    if server in servers:
        servers.remove(server)


# --- 1. the raw client -------------------------------------------------------------------


def run_raw(params: Params, sinks: Sinks, workdir: Path, procs: Processes) -> dict[str, Any]:
    say(f"raw client: {params.burst} emails and {params.burst} SMS, one serial client each")
    n = params.burst
    recipients = {"email": [email_of("raw", i) for i in range(n)],
                  "sms": [phone_of("raw", i) for i in range(n)]}
    start_at = time.time() + 2.0  # both clients imported and waiting by then
    mark = sinks.mark()
    children = []
    for channel, port in (("email", sinks.smtp.port), ("sms", sinks.sms.port)):
        listing = workdir / f"raw-{channel}.txt"
        listing.write_text("\n".join(recipients[channel]) + "\n", encoding="utf-8")
        children.append(procs.spawn(
            [sys.executable, "-m", "benchmarks.raw_client", channel, "--port", str(port),
             "--start-at", repr(start_at), "-"], env=child_env({}), cwd=ROOT,
            log=workdir / f"raw-{channel}.log", stdin=listing))
    expected = {("email", sink_key("email", r)): start_at for r in recipients["email"]}
    expected |= {("sms", sink_key("sms", r)): start_at for r in recipients["sms"]}
    obs = collect(sinks, mark, expected, start_at + params.drain_timeout, "raw burst")
    for child in children:
        if child.wait(timeout=30) != 0:
            raise RuntimeError(f"the raw client failed:\n{_tail(Path(workdir / 'raw-email.log'))}"
                               f"\n{_tail(workdir / 'raw-sms.log')}")
        procs.running.remove(child)
    return {"burst": obs | {"due": start_at}}


# --- shared by both services ---------------------------------------------------------------


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The children's environment: no REMINDERS_*, BENCH_* or CELERY_* from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REMINDERS_", "BENCH_", "CELERY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def wait_in_log(log: Path, needle: bytes, proc: subprocess.Popen[bytes], what: str) -> None:
    try:
        wait_for(lambda: needle in log.read_bytes() or proc.poll() is not None,
                 START_TIMEOUT, what)
    except TimeoutError:
        raise RuntimeError(f"{what}: not within {START_TIMEOUT:g}s; see {log}") from None
    if proc.poll() is not None:
        raise RuntimeError(f"{what}: exited ({proc.returncode}):\n{_tail(log)}")


# --- 2. the naive peer ---------------------------------------------------------------------


def naive_publish(app: Any, items: list[tuple[tuple[Any, ...], float]]) -> None:
    """send_task(eta=...) for each (args, due epoch), pipelined (kombu's producer batch)."""
    with app.producer_or_acquire() as producer:
        batch = producer.batch(1000) if hasattr(producer, "batch") else contextlib.nullcontext()
        with batch:
            for args, due in items:
                app.send_task(naive_app.TASK, args=args, queue=naive_app.QUEUE,
                              eta=datetime.fromtimestamp(due, UTC), producer=producer)


def naive_items(phase: str, dues: list[float], channels: list[str]) -> tuple[
        list[tuple[tuple[Any, ...], float]], dict[tuple[str, str], float]]:
    items, expected = [], {}
    for i, (due, channel) in enumerate(zip(dues, channels, strict=True)):
        to = email_of(phase, i) if channel == "email" else phone_of(phase, i)
        items.append(((f"{phase}/{i}/{channel}", channel, quote(to, safe="+@"), "Ana", due), due))
        expected[(channel, sink_key(channel, to))] = due
    return items, expected


class NaiveService:
    """The naive peer's Redis and worker; restartable fresh (a new Redis, a new worker)."""

    def __init__(self, params: Params, sinks: Sinks, workdir: Path, procs: Processes,
                 servers: list[Any]) -> None:
        self.params, self.sinks, self.workdir = params, sinks, workdir
        self.procs, self.servers, self.starts = procs, servers, 0

    def start(self) -> None:
        self.starts += 1
        self.server = start_redis(self.workdir / f"redis-{self.starts}", self.servers)
        self.url = self.server.url
        self.client = redis.Redis.from_url(self.url)
        env = child_env({"BENCH_REDIS_URL": self.url, "BENCH_EMAIL_URL": self.sinks.email_url,
                         "BENCH_SMS_URL": self.sinks.sms_url})
        log = self.workdir / ("worker.log" if self.starts == 1 else f"worker-{self.starts}.log")
        self.worker = self.procs.spawn(
            [sys.executable, "-m", "celery", "-A", "benchmarks.naive_app", "worker",
             "--loglevel=INFO", f"--concurrency={self.params.naive_concurrency}",
             "-Q", naive_app.QUEUE, "--without-gossip", "--without-mingle"],
            env=env, cwd=self.workdir, log=log)
        self.app = naive_app.make_app(self.url)
        wait_in_log(log, b" ready.", self.worker, "naive worker start")
        time.sleep(3.0)

    def stop(self) -> None:
        self.app.close()
        self.client.close()
        self.procs.kill(self.worker)  # a warm shutdown would hand back every ETA task it holds
        stop_redis(self.server, self.servers)


def run_naive(params: Params, sinks: Sinks, workdir: Path, procs: Processes,
              servers: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"restarts": []}
    svc = NaiveService(params, sinks, workdir, procs, servers)
    svc.start()
    try:
        out["rss_idle"] = rss_sample(svc.worker.pid)

        # The burst: 2 x burst ETA tasks due at one instant, given time to reach the worker
        # (it takes a few hundred a second on a busy 2-core machine).
        n = params.burst
        due = time.time() + 4.0 + 2 * n / NAIVE_INTAKE_PER_SECOND
        items, expected = naive_items("naive-burst", [due] * 2 * n, ["email", "sms"] * n)
        say(f"naive: burst of {2 * n} ETA tasks due in {due - time.time():.0f}s")
        mark = sinks.mark()
        naive_publish(svc.app, items)
        _sleep_until(due)
        in_queue = int(svc.client.llen(naive_app.QUEUE))
        out["burst"] = collect(sinks, mark, expected, due + params.drain_timeout, "naive burst") | {
            "due": due, "not_yet_in_worker_at_due": in_queue}
        fresh_if_behind(out, "naive", "burst", "steady stream", svc.stop, svc.start)

        # The steady stream.
        out["steady"] = run_naive_steady(params, sinks, svc.app, svc.client)
        out["rss_zero_after"] = rss_sample(svc.worker.pid)
        fresh_if_behind(out, "naive", "steady", "memory phase", svc.stop, svc.start)

        # Pending: far-future ETA tasks, held in the worker's memory.
        out["pending"] = run_naive_pending(params, svc.client, svc.url, svc.app, svc.worker)
    finally:
        svc.stop()
    return out


def fresh_if_behind(out: dict[str, Any], side: str, phase: str, upcoming: str,
                    stop: Callable[[], None], start: Callable[[], None]) -> None:
    """If `phase` left messages unsent, give the next phase a fresh Redis and worker: a
    backlog would be measured as part of it."""
    unsent = sum(1 for m in out[phase]["messages"] if m[2] is None)
    if unsent:
        say(f"{side}: the {phase} left {unsent:,} unsent; a fresh Redis and worker for the "
            f"{upcoming}")
        out["restarts"].append({"after": phase, "unsent": unsent, "before": upcoming})
        stop()
        start()


def run_naive_steady(params: Params, sinks: Sinks, app: Any,
                     client: redis.Redis) -> dict[str, Any]:
    count = max(1, round(params.steady_rate * params.steady_seconds))
    start = time.time() + 4.0 + count / NAIVE_INTAKE_PER_SECOND
    dues = [start + i / params.steady_rate for i in range(count)]
    channels = [("email", "sms")[i % 2] for i in range(count)]
    items, expected = naive_items("naive-steady", dues, channels)
    say(f"naive: steady {params.steady_rate:g}/s for {params.steady_seconds:g}s ({count} tasks)")
    mark = sinks.mark()
    naive_publish(app, items)
    _sleep_until(start)
    in_queue = int(client.llen(naive_app.QUEUE))
    return collect(sinks, mark, expected, dues[-1] + params.steady_drain, "naive steady") | {
        "not_yet_in_worker_at_due": in_queue}


def run_naive_pending(params: Params, client: redis.Redis, url: str, app: Any,
                      worker: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Give the worker up to `naive_pending` far-future ETA tasks, as many as it takes
    within the load budget; return memory before and after."""
    say(f"naive: up to {params.naive_pending:,} far-future ETA tasks (budget "
        f"{params.load_budget:g}s)")
    res: dict[str, Any] = {"target": params.naive_pending, "rss_before": rss_sample(worker.pid),
                           "redis_before": used_memory(url)}
    due = time.time() + 86400
    t0, published, chunk = time.monotonic(), 0, 2000
    # At the worker's pace (it slows down as it holds more): the next chunk once it took
    # all but half a chunk of the last, and none after the budget.
    while published < params.naive_pending and time.monotonic() - t0 < params.load_budget:
        if int(client.llen(naive_app.QUEUE)) > chunk // 2:
            time.sleep(0.2)
            continue
        n = min(chunk, params.naive_pending - published)
        naive_publish(app, [((f"naive-pending/{published + i}", "email",
                              f"p{published + i}@example.com", "Ana", due), due)
                            for i in range(n)])
        published += n
    res["published"], res["publish_seconds"] = published, time.monotonic() - t0
    while client.llen(naive_app.QUEUE) and time.monotonic() - t0 < params.load_budget + 15:
        time.sleep(0.5)
    res["seconds"] = time.monotonic() - t0
    res["taken"] = max(0, published - int(client.llen(naive_app.QUEUE)))
    time.sleep(2.0)
    res["rss_after"], res["redis_after"] = rss_sample(worker.pid), used_memory(url)
    say(f"naive: worker holds {res['taken']:,} of {published:,} ETA tasks "
        f"({res['seconds']:.0f}s)")
    return res


# --- 3. ours -------------------------------------------------------------------------------


def strip_at_booking(text: str) -> str:
    """Return a protocol file without its `at = "booking"` steps (due when booked)."""
    head, *steps = re.split(r"(?m)^\[\[steps\]\]\s*$", text)
    kept = [s for s in steps if not re.search(r'(?m)^\s*at\s*=\s*"booking"', s)]
    return head + "".join(f"[[steps]]{s}" for s in kept)


def write_config(folder: Path, sinks: Sinks, *, pending_only: bool) -> Path:
    """The benchmark's config/: the shipped protocols (without their at-booking step when
    `pending_only`), the benchmark protocol, and three clinics sending to the sinks."""
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    for name in SHIPPED_PROTOCOLS:
        text = (ROOT / "config" / "protocols" / f"{name}.toml").read_text(encoding="utf-8")
        (folder / "protocols" / f"{name}.toml").write_text(
            strip_at_booking(text) if pending_only else text, encoding="utf-8")
    (folder / "protocols" / "bench.toml").write_text(BENCH_PROTOCOL, encoding="utf-8")
    for cid, name, tz, locale, (start, end) in CLINICS:
        (folder / "clinics" / f"{cid}.toml").write_text(f"""
name = "{name}"
phone = "+34910000000"
timezone = "{tz}"
locale = "{locale}"
[send_window]
start = "{start}"
end = "{end}"
[channels]
email = "{sinks.email_url}"
sms = "{sinks.sms_url}"
""", encoding="utf-8")
    return folder


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    return path


class Ours:
    """This project's service and CLI, as ops run them, on one Redis and one config/."""

    def __init__(self, workdir: Path, url: str, config: Path, procs: Processes) -> None:
        self.workdir, self.url, self.procs = workdir, url, procs
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.env = child_env({
            "REMINDERS_REDIS_URL": url,
            "REMINDERS_CONFIG_DIR": str(config),
            "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
            "REMINDERS_DATA_DIR": str(workdir / "data"),
            "REMINDERS_LOG_LEVEL": "INFO",
        })
        self.worker: subprocess.Popen[bytes] | None = None
        self.beat: subprocess.Popen[bytes] | None = None

    def command(self, role: str) -> list[str]:
        """The Celery command `reminders run` would start, under this environment."""
        return service_command(role, self.env)

    def pump_interval(self) -> float:
        return float(settings_under(self.env).pump_interval_seconds)

    def start(self, instance: int = 1) -> None:
        """Start the worker, then beat; return once beat has sent its first pump tick."""
        tag = "" if instance == 1 else f"-{instance}"  # each start its own logs
        wlog, blog = self.workdir / f"worker{tag}.log", self.workdir / f"beat{tag}.log"
        self.worker = self.procs.spawn(self.command("worker"), env=self.env, cwd=self.workdir,
                                       log=wlog)
        wait_in_log(wlog, b" ready.", self.worker, "worker start")
        self.beat = self.procs.spawn(self.command("beat"), env=self.env, cwd=self.workdir,
                                     log=blog)
        wait_in_log(blog, b"Sending due task", self.beat, "beat's first pump tick")

    def stop(self) -> None:
        for proc in (self.beat, self.worker):
            if proc is not None and proc in self.procs.running:
                self.procs.stop(proc)

    def cli(self, *args: str, timeout: float | None = None, stdin: Path | None = None,
            log: str = "cli.log") -> subprocess.CompletedProcess[bytes]:
        with open(self.workdir / log, "ab") as err, \
                open(stdin or os.devnull, "rb") as given:
            return subprocess.run([str(BIN / "reminders"), *args], env=self.env,
                                  cwd=self.workdir, stdin=given, stdout=subprocess.PIPE,
                                  stderr=err, timeout=timeout, check=False)

    def book(self, path: Path, timeout: float | None = None) -> float:
        """`reminders book FILE` (its printout discarded); return its wall time."""
        started = time.monotonic()
        with open(self.workdir / "book.log", "ab") as err:
            result = subprocess.run([str(BIN / "reminders"), "book", str(path)], env=self.env,
                                    cwd=self.workdir, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, timeout=timeout,
                                    check=False)
        if result.returncode != 0:
            raise RuntimeError(f"reminders book {path.name} exited {result.returncode}; see "
                               f"{self.workdir / 'book.log'}:\n{_tail(self.workdir / 'book.log')}")
        return time.monotonic() - started

    def booked_seconds(self) -> float:
        """The seconds the last `book` reported for its own work: from its first booking
        read to its last stored, without the interpreter's start-up and imports."""
        times = BOOKED_IN.findall((self.workdir / "book.log").read_text())
        if not times:
            raise RuntimeError(f"`reminders book` printed no time; see {self.workdir / 'book.log'}")
        return float(times[-1])

    def stats(self) -> dict[str, Any]:
        result = self.cli("stats", "--json", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"reminders stats exited {result.returncode}")
        return dict(json.loads(result.stdout))


def run_ours(params: Params, sinks: Sinks, workdir: Path, procs: Processes,
             servers: list[Any], now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["intake"], out["intake_api"] = run_intake(params, sinks, workdir / "intake", procs,
                                                  servers, now)
    # How fast `reminders book` goes, to book the burst and the stream early enough (when
    # the intake ran out of time: half the bound it did not reach, to be safe).
    intake_rate = out["intake"]["rate"] or out["intake"]["rate_below"] / 2
    # ... within bounds: a small intake file measures mostly noise.
    intake_rate = min(max(intake_rate, 100.0), 1000.0)
    startup = out["intake"]["startup_seconds"]

    config = write_config(workdir / "config", sinks, pending_only=True)
    svc = OursService(workdir, config, procs, servers)
    svc.start()
    ours = svc.ours
    out["worker_command"] = shown_command(ours.command("worker"))
    out["beat_command"] = shown_command(ours.command("beat"))
    say(f"ours: started `{out['worker_command']}` and `{out['beat_command']}`")
    out["restarts"] = []
    try:
        assert ours.worker is not None
        out["pump_interval"] = ours.pump_interval()
        time.sleep(3.0)
        out["rss_idle"] = rss_sample(ours.worker.pid)

        # The burst: `burst` bookings, each an email and an SMS due at one instant.
        n = params.burst
        lead = 4.0 + 2.0 * (startup + n / intake_rate)
        due = time.time() + lead
        docs, expected = [], {}
        for i in range(n):
            email, phone = email_of("ours-burst", i), phone_of("ours-burst", i)
            docs.append(bench_booking(f"burst-{i}", due, email, phone, ["email", "sms"]))
            expected[("email", sink_key("email", email))] = due
            expected[("sms", sink_key("sms", phone))] = due
        say(f"ours: burst of {2 * n} reminders ({n} bookings) due in {lead:.0f}s")
        mark = sinks.mark()
        out["burst_booking_seconds"] = ours.book(write_jsonl(workdir / "burst.jsonl", docs))
        booked_at = time.time()
        out["burst"] = collect(sinks, mark, expected, due + params.drain_timeout, "ours burst") | {
            "due": due, "booked_before_due": booked_at < due}
        fresh_if_behind(out, "ours", "burst", "steady stream", svc.stop, svc.start)

        out["steady"] = run_ours_steady(params, sinks, svc.ours, workdir, intake_rate, startup)
        assert svc.ours.worker is not None
        out["rss_zero_after"] = rss_sample(svc.ours.worker.pid)
        fresh_if_behind(out, "ours", "steady", "memory phase", svc.stop, svc.start)

        out["pending"] = run_ours_pending(params, svc.ours, workdir, now, startup)
        assert svc.ours.beat is not None
        out["beat_rss"] = rss_sample(svc.ours.beat.pid)
    finally:
        svc.stop()
    return out


class OursService:
    """Ours on its own Redis: worker and beat as `reminders run` starts them; restartable
    fresh (a new Redis, a new worker and beat)."""

    def __init__(self, workdir: Path, config: Path, procs: Processes,
                 servers: list[Any]) -> None:
        self.workdir, self.config, self.procs, self.servers = workdir, config, procs, servers
        self.starts = 0
        self.server: Any = None
        self.ours: Ours

    def start(self) -> None:
        self.starts += 1
        self.server = start_redis(self.workdir / f"redis-{self.starts}", self.servers)
        self.ours = Ours(self.workdir, self.server.url, self.config, self.procs)
        self.ours.start(self.starts)

    def stop(self) -> None:
        if self.server is not None:
            self.ours.stop()
            stop_redis(self.server, self.servers)
            self.server = None


def shown_command(argv: list[str]) -> str:
    """The command as a reader would type it: `python -m celery ...`, no venv path."""
    return " ".join(["python" if i == 0 else shlex.quote(a) for i, a in enumerate(argv)])


def bench_booking(booking_id: str, due: float, email: str | None, phone: str | None,
                  channels: list[str]) -> dict[str, Any]:
    """A booking of the benchmark protocol whose one step is due at `due` (epoch seconds)."""
    start = datetime.fromtimestamp(due, UTC) - timedelta(seconds=STEP_OFFSET_SECONDS)
    patient: dict[str, Any] = {"name": "Ana García", "timezone": "UTC", "locale": "en",
                               "channels": channels}
    if email:
        patient["email"] = email
    if phone:
        patient["phone"] = phone
    return {"clinic": "bench", "booking_id": booking_id, "treatment": "bench",
            "starts_at": start.isoformat(timespec="milliseconds"), "patient": patient}


def run_ours_steady(params: Params, sinks: Sinks, ours: Ours, workdir: Path,
                    intake_rate: float, startup: float) -> dict[str, Any]:
    count = max(1, round(params.steady_rate * params.steady_seconds))
    lead = 4.0 + 2.0 * (startup + count / intake_rate)
    start = time.time() + lead
    docs, expected = [], {}
    for i in range(count):
        due = start + i / params.steady_rate
        if i % 2 == 0:
            email = email_of("ours-steady", i)
            docs.append(bench_booking(f"steady-{i}", due, email, None, ["email"]))
            expected[("email", sink_key("email", email))] = due
        else:
            phone = phone_of("ours-steady", i)
            docs.append(bench_booking(f"steady-{i}", due, None, phone, ["sms"]))
            expected[("sms", sink_key("sms", phone))] = due
    say(f"ours: steady {params.steady_rate:g}/s for {params.steady_seconds:g}s ({count} "
        f"bookings), first due in {lead:.0f}s")
    mark = sinks.mark()
    ours.book(write_jsonl(workdir / "steady.jsonl", docs))
    booked_at = time.time()
    last_due = start + (count - 1) / params.steady_rate
    return collect(sinks, mark, expected, last_due + params.steady_drain, "ours steady") | {
        "booked_before_due": booked_at < start}


def run_intake(params: Params, sinks: Sinks, workdir: Path, procs: Processes,
               servers: list[Any], now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """`reminders book` on the intake file (and the HTTP batch route if there is one)."""
    workdir.mkdir(parents=True)
    config = write_config(workdir / "config", sinks, pending_only=False)
    docs = realistic(params.intake, now, params.seed, prefix="I")
    path = write_jsonl(workdir / "intake.jsonl", docs)
    one = write_jsonl(workdir / "one.jsonl", realistic(1, now, params.seed, prefix="S"))
    res: dict[str, Any] = {"bookings": params.intake, "finished": False, "rate": None}
    server = start_redis(workdir / "redis", servers)
    try:
        ours = Ours(workdir, server.url, config, procs)
        # What every `reminders book` pays before its first booking: start, imports, config.
        res["startup_seconds"] = min(ours.book(one) for _ in range(2))
        say(f"ours: intake, `reminders book` on {params.intake:,} realistic bookings "
            f"(budget {params.intake_budget:g}s)")
        try:
            res["seconds"] = ours.book(path, timeout=params.intake_budget)
            res["finished"] = True
            # The rate is the command's own (printed with its summary): wall time less a
            # separately measured start-up is noise when the file takes well under a second.
            res["work_seconds"] = ours.booked_seconds()
            stats = ours.stats()
            res["stored"] = stats["bookings_total"] - 1
            res["reminders"] = stats["reminders_kept"]
            res["rate"] = params.intake / max(1e-9, res["work_seconds"])
            say(f"ours: intake took {res['seconds']:.1f}s ({res['rate']:,.0f} bookings/s "
                f"over its {res['work_seconds']:.2f}s of work; start-up alone "
                f"{res['startup_seconds']:.1f}s)")
        except subprocess.TimeoutExpired:
            res["seconds"] = params.intake_budget
            # An upper bound: it did not finish within the budget.
            res["rate_below"] = params.intake / max(1e-9, params.intake_budget
                                                    - res["startup_seconds"])
            say(f"ours: intake not finished within {params.intake_budget:g}s")
    finally:
        stop_redis(server, servers)
    api = run_intake_api(params, workdir, config, docs, procs, servers)
    return res, api


def run_intake_api(params: Params, workdir: Path, config: Path, docs: list[dict[str, Any]],
                   procs: Processes, servers: list[Any]) -> dict[str, Any]:
    """POST /v1/bookings:batch with the intake file, if the project has that route."""
    import importlib.util

    if importlib.util.find_spec("worker.api") is None:
        return {"available": False, "reason": "no API yet"}
    from benchmarks.api_intake import measure_batch_intake

    server = start_redis(workdir / "redis-api", servers)
    try:
        return measure_batch_intake(params, workdir, config, docs, procs, server.url,
                                    child_env({}))
    except Exception as exc:  # report it in the table; the other figures still stand
        say(f"ours: HTTP batch intake failed: {exc}")
        return {"available": False, "reason": f"failed: {type(exc).__name__}: {exc}"[:160]}
    finally:
        stop_redis(server, servers)


class Loader:
    """Loads realistic bookings through parallel `reminders book` processes, in chunks
    sized from the rate seen so far, never starting one that would overrun the deadline."""

    def __init__(self, params: Params, ours: Ours, folder: Path, now: datetime,
                 startup: float, deadline: float) -> None:
        self.params, self.ours, self.folder, self.now = params, ours, folder, now
        self.startup, self.deadline = startup, deadline
        self.stored = 0  # bookings stored, numbered 0 .. stored - 1
        self.rate: float | None = None  # bookings a second of one process, start-up excluded
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, count: int) -> int:
        """Store the next `count` bookings (fewer if the deadline comes); return how many."""
        first, launched = self.stored, 0
        running: dict[subprocess.Popen[bytes], tuple[int, float, Path]] = {}
        with open(self.folder / "book.log", "ab") as log:
            while True:
                left = self.deadline - time.monotonic()
                while len(running) < self.params.loaders and launched < count:
                    size = 2000 if self.rate is None else \
                        int(min(25_000, max(1000, self.rate * 10)))
                    size = min(size, count - launched)
                    if self.rate is not None and self.startup + size / self.rate > left:
                        size = min(size, int((left - self.startup) * self.rate))
                        if size < 500:
                            count = launched  # no time for more
                            break
                    if self.rate is None and left < 0:
                        count = launched
                        break
                    running[self._start(first + launched, size, log)] = (
                        size, time.monotonic(), self.folder / f"{first + launched}.jsonl")
                    launched += size
                if not running:
                    return launched
                for proc in [p for p in running if p.poll() is not None]:
                    size, began, path = running.pop(proc)
                    self.ours.procs.running.remove(proc)
                    if proc.returncode != 0:
                        raise RuntimeError(f"reminders book {path.name} exited "
                                           f"{proc.returncode}; see {self.folder / 'book.log'}")
                    self.stored += size
                    took = max(0.05, time.monotonic() - began - self.startup)
                    self.rate = size / took if self.rate is None else \
                        0.5 * self.rate + 0.5 * size / took
                    path.unlink()
                time.sleep(0.1)

    def _start(self, start: int, size: int, log: Any) -> subprocess.Popen[bytes]:
        path = write_jsonl(self.folder / f"{start}.jsonl",
                           realistic(size, self.now, self.params.seed + 1, prefix="P",
                                     start=start))
        proc = subprocess.Popen([str(BIN / "reminders"), "book", str(path)], env=self.ours.env,
                                cwd=self.ours.workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.ours.procs.running.append(proc)
        return proc


def run_ours_pending(params: Params, ours: Ours, workdir: Path, now: datetime,
                     startup: float) -> dict[str, Any]:
    """While the worker runs, load --pending-bookings realistic bookings (Redis memory per
    pending reminder), then more until --pending-reminders are pending (worker RSS), as
    far as the load budget allows."""
    assert ours.worker is not None
    say(f"ours: loading {params.pending_bookings:,} realistic bookings, then up to "
        f"{params.pending_reminders:,} pending reminders, with {params.loaders} `reminders "
        f"book` processes (budget {params.load_budget:g}s)")
    backlog_until = time.monotonic() + BACKLOG_WAIT_SECONDS
    while True:  # "0 pending": wait a little for what the stream left to be sent
        before = ours.stats()
        if before["due"] + before["leased"] == 0 or time.monotonic() > backlog_until:
            break
        time.sleep(1.0)
    res: dict[str, Any] = {"target": params.pending_bookings,
                           "target_reminders": params.pending_reminders,
                           "rss_before": rss_sample(ours.worker.pid),
                           "redis_before": used_memory(ours.url), "due_before": before["due"]}
    t0 = time.monotonic()
    loader = Loader(params, ours, workdir / "pending", now, startup, t0 + params.load_budget)
    loader.load(params.pending_bookings)
    res["bookings"], res["seconds"] = loader.stored, time.monotonic() - t0
    res["reminders"] = ours.stats()["due"] - before["due"]
    res["redis_after"] = used_memory(ours.url)
    say(f"ours: {loader.stored:,} bookings, {res['reminders']:,} reminders pending "
        f"({res['seconds']:.0f}s)")
    pending = res["reminders"]
    while loader.stored and pending < params.pending_reminders:
        # Bookings plan different numbers of reminders: aim 1 % over, check, repeat.
        per_booking = pending / loader.stored
        if not loader.load(math.ceil((params.pending_reminders - pending) / per_booking * 1.01)):
            break  # out of time
        pending = ours.stats()["due"] - before["due"]
    res["bookings_total"], res["seconds_total"] = loader.stored, time.monotonic() - t0
    res["reminders_total"] = pending
    time.sleep(3.0)  # a few pump ticks over the full schedule
    res["rss_after"] = rss_sample(ours.worker.pid)
    say(f"ours: {loader.stored:,} bookings, {res['reminders_total']:,} reminders pending "
        f"({res['seconds_total']:.0f}s)")
    return res


# --- the table -----------------------------------------------------------------------------


def div(a: float, b: float) -> float | None:
    """a / b, or None (no figure) when there was nothing to divide by."""
    return a / b if b else None


@dataclass
class Row:
    key: str
    metric: str
    unit: str
    decimals: int
    raw: float | None = None
    naive: float | None = None
    ours: float | None = None
    ratio: float | None = None  # ours / raw
    goal: str = ""
    met: bool | None = None
    na: dict[str, str] | None = None  # side -> why there is no figure ("no API yet")


def build_rows(m: dict[str, Any], params: Params) -> list[Row]:
    """Every row of the table, from the raw observations in `m` (the JSON's `measured`)."""
    raw, naive, ours = m["raw"], m["naive"], m["ours"]
    rb, nb, ob = (burst_figures(s["burst"]) for s in (raw, naive, ours))
    ns, os_ = steady_figures(naive["steady"]), steady_figures(ours["steady"])
    n, rows = params.burst, []

    def ratio(o: float | None, r: float | None) -> float | None:
        return o / r if o is not None and r else None

    for ch, label in (("email", "email"), ("sms", "SMS")):
        r = ratio(ob[f"{ch}_rate"], rb[f"{ch}_rate"])
        rows.append(Row(f"burst_{ch}_rate", f"burst drain, {label} ({n:,} due at once)",
                        "msg/s", 1, rb[f"{ch}_rate"], nb[f"{ch}_rate"], ob[f"{ch}_rate"], r,
                        "≥ 0.5× raw", None if r is None else r >= 0.5))
    rows.append(Row("burst_both_rate", f"burst drain, both channels ({2 * n:,})", "msg/s", 1,
                    rb["both_rate"], nb["both_rate"], ob["both_rate"],
                    ratio(ob["both_rate"], rb["both_rate"])))
    rows.append(Row("burst_drain_seconds", "burst: last message after the due instant", "s", 2,
                    rb["drain_seconds"], nb["drain_seconds"], ob["drain_seconds"]))
    for p in ("p50", "p99"):
        rows.append(Row(f"burst_lateness_{p}", f"burst lateness {p}", "s", 2, rb[f"lateness_{p}"],
                        nb[f"lateness_{p}"], ob[f"lateness_{p}"]))
    rows.append(Row("burst_missing", f"burst: not delivered within {params.drain_timeout:g} s",
                    "messages", 0, rb["missing"], nb["missing"], ob["missing"], goal="0",
                    met=ob["missing"] == 0))
    rows.append(Row("burst_extra", "burst: extra copies delivered", "messages", 0,
                    rb["extra_copies"], nb["extra_copies"], ob["extra_copies"], goal="0",
                    met=ob["extra_copies"] == 0))
    pump = float(ours.get("pump_interval", 1.0))
    count = max(1, round(params.steady_rate * params.steady_seconds))
    steady = f"steady {params.steady_rate:g}/s for {params.steady_seconds:g} s"
    for p in ("p50", "p99", "max"):
        goal = f"≤ {pump + 1:g} s (pump {pump:g} s + 1 s)" if p == "p99" else ""
        value = os_[f"lateness_{p}"]
        rows.append(Row(f"steady_lateness_{p}", f"{steady}: lateness {p}", "s", 2,
                        None, ns[f"lateness_{p}"], value, goal=goal,
                        met=(value is not None and value <= pump + 1) if goal else None))
    rows.append(Row("steady_missing", f"{steady}: not delivered ({count:,} due)", "messages", 0,
                    None, ns["missing"], os_["missing"], goal="0", met=os_["missing"] == 0))

    intake = ours["intake"]
    if intake["finished"]:
        rows.append(Row("intake_cli", f"intake: reminders book, {intake['bookings']:,} JSON lines",
                        "bookings/s", 0, ours=intake["rate"], goal="≥ 5,000/s",
                        met=intake["rate"] >= 5000))
    else:
        rows.append(Row("intake_cli", f"intake: reminders book, {intake['bookings']:,} JSON lines",
                        "bookings/s", 0, goal="≥ 5,000/s", met=False,
                        na={"ours": f"< {intake['rate_below']:,.0f} (not done in "
                                    f"{intake['seconds']:g} s)"}))
    api = ours["intake_api"]
    if api.get("available") and api.get("rate"):
        rows.append(Row("intake_api", f"intake: POST /v1/bookings:batch, {api['bookings']:,} "
                        f"in batches of {api['batch']:,}", "bookings/s", 0, ours=api["rate"],
                        goal="≥ 5,000/s", met=api["rate"] >= 5000))
    else:
        rows.append(Row("intake_api", "intake: POST /v1/bookings:batch", "bookings/s", 0,
                        na={"ours": api.get("reason", "n/a")}))

    np_, op = naive["pending"], ours["pending"]
    rows.append(Row("load_rate", "loading the pending set", "reminders/s", 0,
                    None, div(np_["published"], np_["publish_seconds"]),
                    div(op["reminders_total"], op["seconds_total"])))
    ours_bytes = div(op["redis_after"] - op["redis_before"], op["reminders"])
    rows.append(Row("redis_per_pending", f"Redis per pending reminder ({short(np_['published'])}"
                    f" / {short(op['reminders'])})", "B", 0,
                    None, div(np_["redis_after"] - np_["redis_before"], np_["published"]),
                    ours_bytes, goal="≤ 400 B",
                    met=None if ours_bytes is None else ours_bytes <= 400))
    rows.append(Row("rss_idle", "worker RSS, idle, 0 pending", "MB", 1, None,
                    naive["rss_idle"] / MB, ours["rss_idle"] / MB, goal="≤ naive's",
                    met=ours["rss_idle"] <= naive["rss_idle"]))
    backlog = {side: "backlog" for side, data in (("naive", naive), ("ours", ours))
               if any(r["after"] == "steady" for r in data.get("restarts", []))}
    rows.append(Row("rss_zero_after", "worker RSS, 0 pending, after the sends", "MB",
                    1, None, None if "naive" in backlog else naive["rss_zero_after"] / MB,
                    None if "ours" in backlog else ours["rss_zero_after"] / MB,
                    na=backlog or None))
    held = f"{short(np_['taken'])} / {short(op['reminders_total'])}"
    rows.append(Row("rss_pending", f"worker RSS, pending ({held})", "MB", 1, None,
                    np_["rss_after"] / MB, op["rss_after"] / MB))
    change_o = 100 * (op["rss_after"] - op["rss_before"]) / op["rss_before"]
    rows.append(Row("rss_change", "worker RSS change, 0 → pending", "%", 1, None,
                    100 * (np_["rss_after"] - np_["rss_before"]) / np_["rss_before"], change_o,
                    goal="within ±10 %", met=abs(change_o) <= 10))
    rows.append(Row("rss_per_pending", "worker RSS per pending reminder", "B", 0, None,
                    div(np_["rss_after"] - np_["rss_before"], np_["taken"]),
                    div(op["rss_after"] - op["rss_before"], op["reminders_total"])))
    rows.append(Row("beat_rss", "beat process RSS", "MB", 1, None, None,
                    ours["beat_rss"] / MB))
    for row in rows:  # a percentile that fell on a message that never came
        for side in ("raw", "naive", "ours"):
            if getattr(row, side) == math.inf:
                setattr(row, side, None)
                wait = params.steady_drain if row.key.startswith("steady") else \
                    params.drain_timeout
                row.na = (row.na or {}) | {side: f"> {wait:g} s"}
    return rows


def short(count: int) -> str:
    """1,234,567 -> "1.23M", 100,000 -> "100k", 950 -> "950"."""
    if count >= 1_000_000:
        return f"{count / 1e6:.3g}M"
    if count >= 10_000:
        return f"{count / 1e3:.3g}k"
    return f"{count:,}"


def fmt(value: float | None, decimals: int) -> str:
    return "—" if value is None else f"{value:,.{decimals}f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


COLUMNS = ["metric", "unit", "raw client", "naive ETA", "ours", "ours÷raw", "goal (issue 7)"]


def table_cells(row: Row) -> list[str]:
    cells = [row.metric, row.unit]
    for side in ("raw", "naive", "ours"):
        why = (row.na or {}).get(side)
        cells.append(f"n/a ({why})" if why else fmt(getattr(row, side), row.decimals))
    cells.append(fmt_ratio(row.ratio))
    goal = row.goal
    if goal and row.met is not None:
        goal += ": met" if row.met else ": not met"
    cells.append(goal)
    return cells


def render_table(rows: list[Row]) -> str:
    body = [table_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in [COLUMNS, *body]) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        left = {0, 1, 6}
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(COLUMNS), "  ".join("-" * w for w in widths), *map(line, body)])


# --- the run ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    import apprise

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"cores": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(),
            "celery": celery.__version__, "kombu": kombu.__version__,
            "apprise": apprise.__version__, "platform": platform.platform(),
            "commit": commit or "?"}


def measure(params: Params, workdir: Path) -> dict[str, Any]:
    """Run the three sides one after the other; return the report (rows and raw data)."""
    procs, servers = Processes(), []
    started, now = time.monotonic(), datetime.now(UTC)
    sinks = Sinks()
    measured: dict[str, Any] = {}
    env = machine()
    try:
        probe = start_redis(workdir / "redis-probe", servers)
        client = redis.Redis.from_url(probe.url)
        env["redis"] = str(client.info("server")["redis_version"])
        client.close()
        stop_redis(probe, servers)
        for side, run in (("raw", lambda d: run_raw(params, sinks, d, procs)),
                          ("naive", lambda d: run_naive(params, sinks, d, procs, servers)),
                          ("ours", lambda d: run_ours(params, sinks, d, procs, servers, now))):
            side_dir = workdir / side
            side_dir.mkdir()
            t = time.monotonic()
            measured[side] = run(side_dir)
            measured[side]["phase_seconds"] = round(time.monotonic() - t, 1)
            # Kept with the logs: what was measured survives a failure further on.
            (workdir / "measured.json").write_text(json.dumps(measured), encoding="utf-8")
    finally:
        procs.stop_all()
        for server in list(servers):
            stop_redis(server, servers)
        sinks.stop()
    rows = build_rows(measured, params)
    return {"date": now.isoformat(timespec="seconds"), "params": asdict(params),
            "machine": env, "rows": [asdict(r) for r in rows], "measured": measured,
            "seconds": round(time.monotonic() - started, 1)}


def command_line(argv: list[str]) -> str:
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(ROOT))
    except ValueError:
        shown = str(python)
    return " ".join([shown, "-m", "benchmarks", *map(shlex.quote, argv)])


def explicit_command(params: Params) -> str:
    args = []
    for name, value in asdict(params).items():
        args += [f"--{name.replace('_', '-')}", str(value) if isinstance(value, int)
                 else f"{value:g}"]
    return " ".join([".venv/bin/python -m benchmarks", *args])


def render_report(report: dict[str, Any]) -> str:
    p, env = report["params"], report["machine"]
    m = report["measured"]
    rows = [Row(**r) for r in report["rows"]]
    naive_worker = (f"celery -A benchmarks.naive_app worker --concurrency="
                    f"{p['naive_concurrency']}")
    ours_cmd = (f" (`{m['ours']['worker_command']}`, `{m['ours']['beat_command']}`)"
                if "worker_command" in m["ours"] else "")
    lines = [
        f"Aftercare reminders, side by side: {report['date'][:16].replace('T', ' ')} UTC, "
        f"commit {env['commit']}",
        f"Machine: {env['cores']} cores, {env['ram_bytes'] / 2**30:.1f} GiB RAM, Python "
        f"{env['python']}, Redis {env['redis']}, Celery {env['celery']}, kombu {env['kombu']}, "
        f"Apprise {env['apprise']}, {env['platform']}",
        "",
        render_table(rows),
        "",
        f"Raw client: one serial client per channel, both at once (smtplib, a new connection "
        f"per message; requests.post, no session). Naive: {naive_worker}, one "
        f"send_task(eta=due) per reminder, Apprise to the same sinks. Ours: the worker and "
        f"beat as `reminders run` starts them{ours_cmd}.",
        f"Burst: {p['burst']:,} email + {p['burst']:,} SMS due at one instant; rate = "
        f"delivered / (last arrival - due). Lateness = arrival at the sink - due. Steady: "
        f"{p['steady_rate']:g} reminders/s (email and SMS alternating) for "
        f"{p['steady_seconds']:g} s.",
        f"Intake: realistic bookings (2 clinics, 3 shipped treatments, distinct patients); "
        f"`reminders book` start-up ({m['ours']['intake'].get('startup_seconds', 0):.1f} s, "
        f"measured on one booking) not counted. Pending set: the same kind of bookings, "
        f"shipped protocols less the at-booking step, loaded while the worker runs.",
        pending_note(report),
        *warnings(report),
        "Redis: used_memory delta / pending reminders. Worker RSS: VmRSS summed over the "
        "worker's process group (main + pool), median of 5 readings; shared pages count "
        "once per process, alike for both.",
        f"Run time {report['seconds']:.0f} s. Reproduce: "
        + ("make bench, i.e. " if report.get("argv") == [] else "") + report["command"],
        f"All parameters explicit: {report['explicit_command']}",
    ]
    return "\n".join(lines)


def warnings(report: dict[str, Any]) -> list[str]:
    """Lines about anything that makes a figure less than it seems."""
    out, m = [], report["measured"]
    for phase in ("burst", "steady"):
        if not m["ours"][phase].get("booked_before_due", True):
            out.append(f"WARNING: ours: `reminders book` for the {phase} finished after its "
                       "first due time; its lateness includes the booking.")
    for side in ("naive", "ours"):
        for r in m[side].get("restarts", []):
            out.append(f"Note: {side}: the {r['after']} left {r['unsent']:,} messages unsent in "
                       f"its wait; the {r['before']} ran on a fresh Redis and worker.")
    if m["ours"]["pending"]["due_before"]:
        out.append(f"Note: ours: {m['ours']['pending']['due_before']:,} reminders of the stream "
                   "were still unsent when the memory phase began (the worker was sending them).")
    for phase in ("burst", "steady"):
        if m["naive"][phase].get("not_yet_in_worker_at_due"):
            out.append(f"Note: naive: {m['naive'][phase]['not_yet_in_worker_at_due']} {phase} "
                       "tasks had not reached its worker by the first due time.")
    if not m["ours"]["intake"]["finished"]:
        out.append(f"Note: the intake file was not stored within "
                   f"{report['params']['intake_budget']:g} s; its row is a bound.")
    return out


def pending_note(report: dict[str, Any]) -> str:
    """Say how many reminders were pending for the memory rows, and whether a budget cut it."""
    p, m = report["params"], report["measured"]
    np_, op = m["naive"]["pending"], m["ours"]["pending"]
    text = (f"Pending: naive {np_['published']:,} far-future ETA tasks published, "
            f"{np_['taken']:,} of them held by its worker; ours {op['bookings']:,} bookings = "
            f"{op['reminders']:,} reminders in Redis for the Redis row, "
            f"{op['bookings_total']:,} bookings = {op['reminders_total']:,} reminders for the "
            f"worker RSS rows.")
    cut = []
    if np_["published"] < p["naive_pending"]:
        cut.append(f"naive {np_['published']:,} of {p['naive_pending']:,}")
    if op["bookings"] < p["pending_bookings"]:
        cut.append(f"ours {op['bookings']:,} of {p['pending_bookings']:,} bookings")
    elif op["reminders_total"] < p["pending_reminders"]:
        cut.append(f"ours {op['reminders_total']:,} of {p['pending_reminders']:,} reminders")
    if cut:
        text += (f" Cut short by the {p['load_budget']:g} s load budget: "
                 + ", ".join(cut) + ".")
    return text


def parse_args(argv: list[str]) -> tuple[Params, argparse.Namespace]:
    defaults = Params()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"a small run ({', '.join(f'{k}={v:g}' for k, v in QUICK.items())})")
    for f in fields(Params):
        value = getattr(defaults, f.name)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=None,
                        help=f"{HELP[f.name]} (default {value:g})")
    ap.add_argument("--json", metavar="PATH", default=str(ROOT / ".reminders" / "bench.json"),
                    help="also write the report as JSON here ('-': to stdout, the table to "
                         "stderr; default .reminders/bench.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument("--workdir", type=Path,
                    help="work folder (must not exist or be empty; kept afterwards)")
    args = ap.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values |= {k: v for k, v in vars(args).items()
               if k in Params.__dataclass_fields__ and v is not None}
    params = Params(**values)
    if min(params.burst, params.intake, params.pending_bookings, params.naive_pending,
           params.naive_concurrency, params.loaders) < 1 or params.steady_rate <= 0:
        ap.error("sizes, rates and concurrency must be positive")
    return params, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    params, args = parse_args(argv)
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            print(f"--workdir {args.workdir} is not empty", file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir, keep = args.workdir.resolve(), True
    else:
        workdir, keep = Path(tempfile.mkdtemp(prefix="reminders-bench-")), args.keep

    def on_signal(signum: int, frame: object) -> None:
        # Once: a second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ok = False
    try:
        report = measure(params, workdir)
        report |= {"argv": argv, "command": command_line(argv),
                   "explicit_command": explicit_command(params)}
        ok = True
    except KeyboardInterrupt:
        print("[bench] interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ok and not keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] work folder kept: {workdir}", file=sys.stderr)
    text = render_report(report)
    data = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    if args.json == "-":
        print(text, file=sys.stderr)
        print(data, end="")
    else:
        print(text)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(data, encoding="utf-8")
            print(f"[bench] JSON report: {args.json}", file=sys.stderr)
    return 0


