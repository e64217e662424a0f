"""Naive ETA tasks versus the durable schedule, side by side, in one run on one machine.

    python -m benchmarks [--n 200] [--m 2000] [--quick] [--json PATH]

Both sides get a fresh real redis-server (worker.embedded.RedisServer, in a temporary
folder), real Celery worker processes with the same concurrency and the same broker
transport options (a visibility timeout scaled down from 1 h to a few seconds, and the
unacked-restore sweep scaled with it), then the same two phases:

1. Window: N reminders due evenly over [lead, lead + window] seconds after scheduling.
   We wait until the last is due plus a grace period, then count the sends.
   - naive: `send_task("naive.send", eta=due)` (benchmarks/naive_app.py); each task
     execution appends one line to a Redis list.
   - ours: N bookings of a one-step benchmark protocol (one email reminder each, clinic
     window 00:00-24:00, no channel URL so messages go to the outbox), validated with
     worker.models.parse_booking, planned with worker.planner.plan and stored with
     worker.store.Store.upsert; the project's worker and beat send them. Each outbox
     file is one send.
   Lateness is send time minus due time of each reminder's first send.
2. Memory: M reminders due in a day are scheduled the same way. Once the worker has
   taken every naive task (the queue is empty, M messages are unacked), and right away
   for ours, we read the worker's resident memory (VmRSS summed over its process group,
   from /proc) and Redis's `used_memory`; then again after holding for a while, during
   which the naive worker gets each pending task again every visibility timeout.

Processes are stopped (SIGTERM to the process group, then SIGKILL) however the run ends.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import celery
import kombu
import redis

from benchmarks import naive_app
from benchmarks.procs import Processes, group_rss_bytes, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLINIC = "bench"
PROTOCOL = "bench"
STEP_OFFSET_SECONDS = 5  # the benchmark protocol's one step: 5 s before the "appointment"
START_TIMEOUT = 60.0
KEY_PREFIX = "reminders"

BENCH_PROTOCOL = f"""
name = "Benchmark protocol"
description = "One email reminder {STEP_OFFSET_SECONDS} s before the start (benchmarks only)."
[[steps]]
id = "remind"
offset = "-{STEP_OFFSET_SECONDS}s"
channels = ["email"]
template = "day-before"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
clean_skin_on_the_day = true
ask_cold_sore_or_infection = true
"""
BENCH_CLINIC = """
name = "Benchmark Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
# No channel URLs: every message goes to the outbox (REMINDERS_OUTBOX_DIR), one file each.
"""


@dataclass(frozen=True)
class Params:
    """What one run measures; `make bench` uses the defaults."""

    n: int = 200  # reminders due within the window
    m: int = 2000  # far-future reminders pending during the memory phase
    lead: float = 5.0  # seconds from scheduling to the first due reminder
    window: float = 30.0  # the N reminders are due evenly over [lead, lead + window]
    far: float = 86400.0  # the M reminders are due this many seconds ahead
    visibility_timeout: int = 5  # broker transport option, both sides
    restore_interval: int = 1  # kombu's unacked-restore sweep, seconds (throttle 1), both sides
    concurrency: int = 2  # worker processes, both sides
    grace: float = 7.0  # wait after the last due time before counting
    hold: float = 12.0  # memory phase: how long the M reminders stay pending

    def transport_options(self) -> dict[str, Any]:
        return {"visibility_timeout": self.visibility_timeout,
                "unacked_restore_interval": self.restore_interval,
                "unacked_restore_throttle": 1}

    def dues(self, t0: float) -> list[float]:
        """Return the N due instants (epoch seconds) for scheduling at `t0`."""
        if self.n == 1:
            return [t0 + self.lead]
        return [t0 + self.lead + self.window * i / (self.n - 1) for i in range(self.n)]


QUICK = {"n": 20, "m": 200, "lead": 3.0, "window": 4.0, "visibility_timeout": 2,
         "grace": 4.0, "hold": 3.0}


@dataclass
class Measured:
    """What one side did: raw observations, before any summary."""

    sends: list[tuple[str, float, float]] = field(default_factory=list)  # (id, due, sent)
    expected: list[str] = field(default_factory=list)  # ids of the N window reminders
    rss_before_m: int = 0  # worker RSS (bytes), nothing pending
    rss_with_m: int = 0  # worker RSS with the M pending
    rss_after_hold: int = 0  # worker RSS after holding them `hold` seconds
    rss_peak: int = 0  # highest worker RSS sampled during the run
    redis_before_m: int = 0  # used_memory before scheduling the M
    redis_with_m: int = 0  # used_memory with the M pending
    beat_rss: int = 0  # RSS of the beat process (ours only)
    deliveries: int = 0  # send tasks the worker received ("Task <name>[id] received" lines)
    seconds: dict[str, float] = field(default_factory=dict)  # how long each step took


# --- the summary and the table ----------------------------------------------------------

# (key, label, unit, decimals). The table shows them in this order.
ROWS: list[tuple[str, str, str, int]] = [
    ("sends", "sends (N reminders due)", "", 0),
    ("duplicate_sends", "duplicate sends", "", 0),
    ("reminders_sent_twice_or_more", "reminders sent more than once", "", 0),
    ("max_sends_one_reminder", "most sends of one reminder", "", 0),
    ("missed", "reminders never sent", "", 0),
    ("deliveries", "send tasks delivered to the worker", "", 0),
    ("lateness_p50_ms", "lateness p50", "ms", 1),
    ("lateness_p95_ms", "lateness p95", "ms", 1),
    ("lateness_max_ms", "lateness max", "ms", 1),
    ("worker_rss_idle_mb", "worker RSS, nothing pending", "MB", 1),
    ("worker_rss_pending_mb", "worker RSS, M pending", "MB", 1),
    ("worker_rss_per_pending_kb", "worker RSS per pending reminder", "KB", 2),
    ("worker_rss_after_hold_mb", "worker RSS, M pending, after hold", "MB", 1),
    ("worker_rss_peak_mb", "worker RSS, peak", "MB", 1),
    ("redis_bytes_per_pending", "Redis memory per pending reminder", "B", 0),
    ("beat_rss_mb", "beat process RSS", "MB", 1),
]
MB = 1024 * 1024


def percentile(values: list[float], p: float) -> float:
    """Return the nearest-rank p-th percentile of `values` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(measured: Measured, params: Params) -> dict[str, float]:
    """Return each table row's value for one side, from its raw observations."""
    expected = set(measured.expected)
    counts = Counter(rid for rid, _, _ in measured.sends)
    first: dict[str, float] = {}
    for rid, due, sent in sorted(measured.sends, key=lambda s: s[2]):
        first.setdefault(rid, sent - due)
    late_ms = [first[rid] * 1000 for rid in first if rid in expected]
    sent_ids = expected & set(counts)
    return {
        "sends": float(len(measured.sends)),
        "duplicate_sends": float(len(measured.sends) - len(counts)),
        "reminders_sent_twice_or_more": float(sum(1 for c in counts.values() if c > 1)),
        "max_sends_one_reminder": float(max(counts.values(), default=0)),
        "missed": float(len(expected - sent_ids)),
        "deliveries": float(measured.deliveries),
        "lateness_p50_ms": percentile(late_ms, 50),
        "lateness_p95_ms": percentile(late_ms, 95),
        "lateness_max_ms": max(late_ms, default=0.0),
        "worker_rss_idle_mb": measured.rss_before_m / MB,
        "worker_rss_pending_mb": measured.rss_with_m / MB,
        "worker_rss_per_pending_kb":
            (measured.rss_with_m - measured.rss_before_m) / params.m / 1024,
        "worker_rss_after_hold_mb": measured.rss_after_hold / MB,
        "worker_rss_peak_mb": measured.rss_peak / MB,
        "redis_bytes_per_pending": (measured.redis_with_m - measured.redis_before_m) / params.m,
        "beat_rss_mb": measured.beat_rss / MB,
    }


def ratio(naive: float, ours: float, decimals: int) -> float | None:
    """Return naive ÷ ours, or None when ours shows as zero at the table's precision.

    Dividing by a value the table prints as 0 (a 4 KiB RSS wobble spread over M
    reminders) would print a huge ratio that means nothing.
    """
    return naive / ours if round(ours, decimals) > 0 else None


def build_rows(naive: dict[str, float], ours: dict[str, float]) -> list[dict[str, Any]]:
    return [{"key": key, "metric": label, "unit": unit, "decimals": decimals,
             "naive": naive[key], "ours": ours[key],
             "ratio": ratio(naive[key], ours[key], decimals)}
            for key, label, unit, decimals in ROWS]


def fmt_value(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def fmt_ratio(value: float | None) -> str:
    """Two decimals, or two significant digits below 0.1 (so 0.0036× is not shown as 0.00×)."""
    if value is None:
        return "—"
    if value == 0 or value >= 0.1:
        return f"{value:,.2f}×"
    return f"{value:.2g}×"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Return the rows as an aligned plain-text table."""
    header = ["metric", "naive ETA", "schedule (ours)", "ratio naive÷ours"]
    body = []
    for row in rows:
        label = f"{row['metric']} ({row['unit']})" if row["unit"] else row["metric"]
        body.append([label, fmt_value(row["naive"], row["decimals"]),
                     fmt_value(row["ours"], row["decimals"]), fmt_ratio(row["ratio"])])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                       zip(cells[1:], widths[1:], strict=True)])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


# --- shared plumbing --------------------------------------------------------------------


class RssSampler:
    """Sample a process group's RSS in the background; keep the peak."""

    def __init__(self, pgid: int, interval: float = 0.25) -> None:
        self.pgid, self.interval, self.peak = pgid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = group_rss_bytes(self.pgid)
        self.peak = max(self.peak, rss)
        return rss

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def celery_env(extra: dict[str, str], params: Params) -> dict[str, str]:
    """The children's environment: ours, no REMINDERS_* from outside, this repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REMINDERS_", "BENCH_", "CELERY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["BENCH_TRANSPORT_OPTIONS"] = json.dumps(params.transport_options())
    env.update(extra)
    return env


def start_worker(procs: Processes, app: str, queues: str, name: str, env: dict[str, str],
                 workdir: Path, params: Params) -> subprocess.Popen[bytes]:
    """Start `celery -A app worker` in its own process group; return it once ready."""
    log = workdir / f"{name}.log"
    proc = procs.spawn([str(BIN / "celery"), "-A", app, "worker", "--loglevel=INFO",
                        f"--concurrency={params.concurrency}", "--pool=prefork", "-Q", queues,
                        "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                        "--without-heartbeat"], env=env, cwd=workdir, log=log)
    try:
        wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None,
                 START_TIMEOUT, f"{name} worker start")
    except TimeoutError:
        raise RuntimeError(f"{name} worker did not start; see {log}") from None
    if proc.poll() is not None:
        raise RuntimeError(f"{name} worker exited ({proc.returncode}):\n{_tail(log)}")
    return proc


def count_received(log: Path, task: str) -> int:
    """Return how many times the worker logged receiving a `task` message."""
    pattern = re.compile(rb"Task " + re.escape(task.encode()) + rb"\[[^\]]+\] received")
    return len(pattern.findall(log.read_bytes()))


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _timed(seconds: dict[str, float], key: str) -> Any:
    @contextmanager
    def timer() -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            seconds[key] = round(time.monotonic() - start, 3)

    return timer()


# --- the naive side ---------------------------------------------------------------------


def run_naive(params: Params, workdir: Path, procs: Processes, redis_server: Any) -> Measured:
    out = Measured()
    client = redis.Redis.from_url(redis_server.url)
    env = celery_env({"BENCH_REDIS_URL": redis_server.url}, params)
    with _timed(out.seconds, "start"):
        worker = start_worker(procs, "benchmarks.naive_app", naive_app.QUEUE, "naive", env,
                              workdir, params)
    app = naive_app.make_app(redis_server.url, params.transport_options())
    try:
        with RssSampler(worker.pid) as rss, app.producer_or_acquire() as producer:

            def publish(rid: str, due: float) -> None:
                app.send_task(naive_app.TASK, args=(rid, due), queue=naive_app.QUEUE,
                              eta=datetime.fromtimestamp(due, UTC), producer=producer)

            # Phase 1: N due within the window.
            t0 = time.time()
            dues = params.dues(t0)
            out.expected = [f"W-{i:06d}" for i in range(params.n)]
            with _timed(out.seconds, "schedule_n"):
                for rid, due in zip(out.expected, dues, strict=True):
                    publish(rid, due)
            _sleep_until(dues[-1] + params.grace)
            out.sends = [tuple(json.loads(x)) for x in client.lrange(naive_app.SENDS_KEY, 0, -1)]

            # Phase 2: M far in the future, pending in the worker.
            out.rss_before_m, out.redis_before_m = rss.sample(), used_memory(client)
            with _timed(out.seconds, "schedule_m"):
                far = time.time() + params.far
                for i in range(params.m):
                    publish(f"F-{i:06d}", far)
            with _timed(out.seconds, "settle_m"):
                wait_for(lambda: client.llen(naive_app.QUEUE) == 0
                         and client.hlen("unacked") >= params.m, 120,
                         "naive worker taking the far-future tasks")
                time.sleep(1.0)
            out.rss_with_m, out.redis_with_m = rss.sample(), used_memory(client)
            time.sleep(params.hold)
            out.rss_after_hold = rss.sample()
        out.rss_peak = rss.peak
    finally:
        app.close()
        procs.stop(worker)
        client.close()
    out.deliveries = count_received(workdir / "naive.log", naive_app.TASK)
    return out


def _sleep_until(epoch: float) -> None:
    while (left := epoch - time.time()) > 0:
        time.sleep(min(left, 0.5))


# --- our side ---------------------------------------------------------------------------


def write_config(folder: Path) -> Path:
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    (folder / "protocols" / f"{PROTOCOL}.toml").write_text(BENCH_PROTOCOL, encoding="utf-8")
    (folder / "clinics" / f"{CLINIC}.toml").write_text(BENCH_CLINIC, encoding="utf-8")
    return folder


def booking_doc(booking_id: str, due: float) -> dict[str, Any]:
    """A booking whose one reminder (STEP_OFFSET_SECONDS before the start) is due at `due`."""
    start = datetime.fromtimestamp(due, UTC) + timedelta(seconds=STEP_OFFSET_SECONDS)
    return {
        "clinic": CLINIC, "booking_id": booking_id, "treatment": PROTOCOL,
        "starts_at": start.isoformat(),
        "patient": {"name": "Ana López", "email": f"{booking_id.lower()}@example.com",
                    "timezone": "UTC", "locale": "en", "channels": ["email"]},
    }


class Booker:
    """Stores bookings the way the project does: validate, plan, Store.upsert."""

    def __init__(self, config_dir: Path, url: str) -> None:
        from worker.catalog import Catalog
        from worker.settings import Settings
        from worker.store import Store, connect

        settings = Settings(config_dir=config_dir, templates_dir=ROOT / "templates",
                            key_prefix=KEY_PREFIX, _env_file=None)
        self.catalog = Catalog.load(settings)
        self.client = connect(url)
        self.store = Store(self.client, KEY_PREFIX)

    def book(self, booking_id: str, due: float) -> float:
        """Store one booking; return its reminder's planned due instant (epoch seconds)."""
        from worker.models import parse_booking
        from worker.planner import plan

        booking = parse_booking(booking_doc(booking_id, due), self.catalog)
        now = datetime.now(UTC)
        planned = plan(booking, self.catalog.protocols[PROTOCOL], self.catalog.clinics[CLINIC], now)
        (reminder,) = planned.reminders
        if reminder.status != "scheduled":
            raise RuntimeError(f"{booking_id}: planned {reminder.status}: {reminder.reason}")
        self.store.upsert(booking, planned, now)
        return reminder.due_at.timestamp()

    def book_all(self, items: list[tuple[str, float]]) -> list[float]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda item: self.book(*item), items))


def outbox_sends(outbox: Path, dues: dict[str, float]) -> list[tuple[str, float, float]]:
    """Return (booking id, due, written at) for each message file in the outbox."""
    parser = email.parser.BytesHeaderParser()
    sends = []
    for path in sorted(outbox.glob("*.eml")) if outbox.is_dir() else []:
        with open(path, "rb") as fh:
            ref = parser.parse(fh)["X-Reminder"]
        booking_id = ref.split("/")[1]
        sends.append((booking_id, dues.get(booking_id, math.nan), path.stat().st_mtime))
    return sends


def run_ours(params: Params, workdir: Path, procs: Processes, redis_server: Any) -> Measured:
    out = Measured()
    config = write_config(workdir / "config")
    outbox = workdir / "outbox"
    env = celery_env({
        "REMINDERS_REDIS_URL": redis_server.url,
        "REMINDERS_CONFIG_DIR": str(config),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(workdir / "data"),
        "REMINDERS_OUTBOX_DIR": str(outbox),
        "REMINDERS_KEY_PREFIX": KEY_PREFIX,
    }, params)
    booker = Booker(config, redis_server.url)
    beat = None
    with _timed(out.seconds, "start"):
        worker = start_worker(procs, "benchmarks.ours_app", "reminders.send,reminders.pump",
                              "ours", env, workdir, params)
        beat_log = workdir / "beat.log"
        beat = procs.spawn([str(BIN / "celery"), "-A", "benchmarks.ours_app", "beat",
                            "--loglevel=INFO", "-s", str(workdir / "beat-schedule")],
                           env=env, cwd=workdir, log=beat_log)
        try:
            # The worker's banner lists "reminders.pump" too: wait for a tick it received.
            wait_for(lambda: b"Task reminders.pump[" in (workdir / "ours.log").read_bytes()
                     or beat.poll() is not None, START_TIMEOUT, "first pump tick")
        except TimeoutError:
            raise RuntimeError(f"beat never ran the pump; see {beat_log}") from None
        if beat.poll() is not None:
            raise RuntimeError(f"beat exited ({beat.returncode}):\n{_tail(beat_log)}")
    try:
        with RssSampler(worker.pid) as rss:
            # Phase 1: N due within the window.
            t0 = time.time()
            out.expected = [f"W-{i:06d}" for i in range(params.n)]
            with _timed(out.seconds, "schedule_n"):
                planned = booker.book_all(list(zip(out.expected, params.dues(t0), strict=True)))
            dues = dict(zip(out.expected, planned, strict=True))
            _sleep_until(max(planned) + params.grace)
            out.sends = outbox_sends(outbox, dues)

            # Phase 2: M far in the future, pending in Redis.
            out.rss_before_m, out.redis_before_m = rss.sample(), used_memory(booker.client)
            with _timed(out.seconds, "schedule_m"):
                far = time.time() + params.far
                booker.book_all([(f"F-{i:06d}", far) for i in range(params.m)])
            with _timed(out.seconds, "settle_m"):
                time.sleep(1.0)
            out.rss_with_m, out.redis_with_m = rss.sample(), used_memory(booker.client)
            out.beat_rss = group_rss_bytes(beat.pid)
            time.sleep(params.hold)
            out.rss_after_hold = rss.sample()
        out.rss_peak = rss.peak
    finally:
        booker.client.close()
        procs.stop(beat)
        procs.stop(worker)
    out.deliveries = count_received(workdir / "ours.log", "reminders.send")
    return out


# --- the run ----------------------------------------------------------------------------


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def measure(params: Params, workdir: Path) -> dict[str, Any]:
    """Run both sides, one after the other; return the report (rows and raw data)."""
    from worker.embedded import RedisServer

    procs = Processes()
    started = time.monotonic()
    results: dict[str, Measured] = {}
    versions: dict[str, str] = {}
    try:
        for side, run in (("naive", run_naive), ("ours", run_ours)):
            side_dir = workdir / side
            side_dir.mkdir()
            server = RedisServer(side_dir / "redis").start()
            try:
                versions["redis"] = redis_version(server.url)
                print(f"[bench] {side}: running (redis {server.url}) ...", file=sys.stderr,
                      flush=True)
                results[side] = run(params, side_dir, procs, server)
            finally:
                server.stop()
    finally:
        procs.stop_all()
    naive, ours = summarize(results["naive"], params), summarize(results["ours"], params)
    return {
        "params": asdict(params),
        "environment": {
            "python": platform.python_version(), "redis": versions.get("redis", "?"),
            "celery": celery.__version__, "kombu": kombu.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
        },
        "rows": build_rows(naive, ours),
        "measured": {side: asdict(m) for side, m in results.items()},
        "seconds": round(time.monotonic() - started, 1),
    }


def command_line(argv: list[str]) -> str:
    """Return the command as run, e.g. `.venv/bin/python -m benchmarks --quick`."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(ROOT))
    except ValueError:
        shown = str(python)
    return " ".join([shown, "-m", "benchmarks", *map(shlex.quote, argv)])


def explicit_command(params: Params) -> str:
    """Return the command with every parameter spelled out (independent of the defaults)."""
    args = []
    for name, value in asdict(params).items():
        args += [f"--{name.replace('_', '-')}", f"{value:g}"]
    return " ".join(["python -m benchmarks", *args])


def render_report(report: dict[str, Any]) -> str:
    p, env = report["params"], report["environment"]
    by_key = {row["key"]: row for row in report["rows"]}
    lines = [
        f"ETA tasks vs. durable schedule: {p['n']} reminders due, "
        f"naive sent {by_key['sends']['naive']:.0f}, ours sent {by_key['sends']['ours']:.0f}.",
        "",
        render_table(report["rows"]),
        "",
        f"N = {p['n']} reminders due evenly {p['lead']:g}-{p['lead'] + p['window']:g} s after "
        f"scheduling, counted {p['grace']:g} s after the last was due; "
        f"M = {p['m']} reminders due in {p['far']:g} s, held pending {p['hold']:g} s.",
        f"Both sides: broker visibility_timeout {p['visibility_timeout']} s, unacked restore "
        f"sweep every {p['restore_interval']} s (throttle 1), worker --concurrency "
        f"{p['concurrency']} (prefork), prefetch multiplier 1, acks late, a fresh "
        f"redis-server each.",
        "Naive: send_task(eta=due) on benchmarks/naive_app.py. Ours: the worker.celery_app "
        "app (run as benchmarks/ours_app.py for the transport options above) worker + beat, "
        "pump every 1 s (the project default), bookings through "
        "parse_booking/plan/Store.upsert, delivered to the outbox.",
        "Lateness: first send of each reminder minus its due time. Worker RSS: VmRSS summed "
        "over the worker's process group (main + pool). Redis: used_memory delta / M.",
        f"Python {env['python']}, Redis {env['redis']}, Celery {env['celery']}, "
        f"kombu {env['kombu']}, {env['cpus']} CPUs, {env['platform']}.",
        "Every row: lower is better, except sends, which must equal N.",
        f"Run time {report['seconds']:.0f} s. Reproduce: "
        + ("make bench, i.e. " if report["argv"] == [] else "")
        + report["command"],
        f"All parameters explicit: {report['explicit_command']}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[Params, argparse.Namespace]:
    defaults = Params()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"a small, fast run ({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    for name, help_text in [
        ("n", "reminders due within the window"),
        ("m", "far-future reminders pending during the memory phase"),
        ("lead", "seconds from scheduling to the first due reminder"),
        ("window", "seconds over which the N reminders fall due"),
        ("far", "seconds ahead the M reminders are due"),
        ("visibility-timeout", "broker visibility timeout, seconds (both sides)"),
        ("restore-interval", "kombu unacked restore sweep, seconds (both sides)"),
        ("concurrency", "worker processes (both sides)"),
        ("grace", "seconds to wait after the last due time before counting"),
        ("hold", "seconds the M reminders stay pending before the last RSS reading"),
    ]:
        attr = name.replace("-", "_")
        kind = type(getattr(defaults, attr))
        ap.add_argument(f"--{name}", type=kind, default=None,
                        help=f"{help_text} (default {getattr(defaults, attr):g})")
    ap.add_argument("--json", metavar="PATH",
                    help="also write the report as JSON to PATH ('-' for stdout, table to stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, outbox)")
    ap.add_argument("--workdir", type=Path,
                    help="work folder to use (must not exist or be empty; kept afterwards)")
    args = ap.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values |= {k: v for k, v in vars(args).items()
               if k in Params.__dataclass_fields__ and v is not None}
    params = Params(**values)
    if params.n < 1 or params.m < 1 or params.concurrency < 1 or params.visibility_timeout < 1:
        ap.error("--n, --m, --concurrency and --visibility-timeout must be at least 1")
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
            _rmtree(workdir)
        else:
            print(f"[bench] work folder kept: {workdir}", file=sys.stderr)
    text = render_report(report)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    return 0


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
