"""Every Prometheus metric of the service, in one place, and where each one is kept.

Three kinds, kept three ways (chosen so that every process sees the same exact counts,
the hot send path pays no extra Redis round trip, and a worker-only deployment is
observable):

1. **Outcome counters, in Redis.** The Lua script that records a state change
   (worker/store.py: the upsert's apply, finish, replay) also does `HINCRBY P:metrics
   "<what>|<clinic>|<channel>" n` in the same atomic step. So the counts are exact (a
   count exists if and only if the state change does), shared by every worker process on
   every host, and survive restarts, with no round trip of their own. Exposed as:

     reminders_scheduled_total       reminders put into the schedule by a booking write
                                     (new, moved, re-opened or released)
     reminders_sent_total            deliveries recorded (a stale attempt's too: it went out)
     reminders_failed_attempts_total attempts that did not deliver (transient, unknown or
                                     permanent): each retried or dead-lettered one
     reminders_retried_total         attempts put back in the schedule for a retry
     reminders_dead_lettered_total   reminders that failed for good (out of attempts or a
                                     permanent failure)
     reminders_skipped_total         reminders skipped (by the plan, or expired at send time)
     reminders_deferred_total        attempts deferred to the patient's send window
     reminders_replayed_total        dead letters sent again (`replay`)

   each with labels clinic and channel; every one of them for every (clinic, channel) any
   of them has counted, at 0 until it counts (a series first scraped at 1 shows Prometheus
   no increase: `increase(reminders_dead_lettered_total[30m])` missed a channel's first
   dead letter). Only an attempt that still owned its reminder
   counts a failure, retry, skip or deferral (an attempt the clinic's change overtook
   changes nothing, so counts nothing).

2. **Gauges, read from Redis at scrape time** (`ScheduleCollector`): the due set's depth,
   the reminders due now and the age of the oldest overdue one, the lease set's size, the
   dead letters, each Celery queue's length (the broker's Redis lists, `queue_key` in
   worker/celery_app.py), each channel's sender threads in the live worker processes
   (`reminders_senders`, the pump's senders sets: 0 means no worker sends it), and the age
   of the pump's and beat's heartbeats (worker/health.py). One pipelined round trip per
   scrape; Redis down, or answering an error reply (MASTERDOWN, NOPERM: a WARNING naming
   it), gives `reminders_redis_up 0` and nothing else of it; the rest of the scrape is
   served. Then, with a round trip or two of their own, whether Redis keeps the schedule
   (`redis_keeping`: an unsafe setting, keys evicted, memory used of maxmemory).

3. **Histograms, per worker process** (`Histograms`): send duration by channel (the
   delivery call: Apprise or the outbox), lateness by channel (sent minus the instant the
   attempt was due: what the pump and senders add), and the pump run's duration; with
   them one gauge, `reminders_clock_skew_seconds`: this host's clock minus Redis's, as the
   senders last measured it (worker/clock.py; the most recent of the live processes). They
   are observed in the Celery pool processes, so they use prometheus-client's multiprocess
   mode: each process writes its own file under `<data_dir>/metrics/<host>-<pid>/` (one
   folder per worker, wiped when it starts), and the worker's main process serves them,
   merged, with the Redis counters and gauges, on `REMINDERS_METRICS_PORT` (0: off) at
   `REMINDERS_METRICS_HOST`. Multiprocess mode is switched on in that worker only
   (`start_worker_metrics`, before its pool forks), never by environment for every
   process: the API's own metrics stay in-process. The senders, the clock and the pump
   report through worker/observe.py, which hands each observation to these histograms only
   in a process that imported this module: with the port off, a pool process keeps none
   (nothing could show them) and does without prometheus-client.

The API's `/metrics` (worker/api/metrics.py) serves its own request counts and latencies
plus the same Redis counters and gauges (not the worker's histograms: scrape the worker's
port for those). Labels never carry a booking id or anything of a patient.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import redis
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import observe
from .durability import findings, read_settings
from .health import error_detail

log = logging.getLogger(__name__)

# The outcome counters kept in Redis (the Lua scripts' names) and their exposition.
COUNTERS: dict[str, tuple[str, str]] = {
    "scheduled": ("reminders_scheduled", "Reminders put into the schedule by a booking write"),
    "sent": ("reminders_sent", "Reminder deliveries recorded"),
    "failed_attempt": ("reminders_failed_attempts",
                       "Send attempts that did not deliver (transient, unknown or permanent)"),
    "retried": ("reminders_retried", "Send attempts put back in the schedule for a retry"),
    "dead_lettered": ("reminders_dead_lettered", "Reminders that failed for good"),
    "skipped": ("reminders_skipped", "Reminders skipped (by the plan or at send time)"),
    "deferred": ("reminders_deferred", "Send attempts deferred to the send window"),
    "replayed": ("reminders_replayed", "Dead letters sent again"),
}
# worker/celery_app.py's queues, written out: importing the Celery app here would make the
# API build a Celery app (tests/ops/test_metrics.py checks they are the same).
QUEUES = ("reminders.send.email", "reminders.send.sms", "reminders.pump", "reminders.events")
CHANNELS = ("email", "sms")  # worker/models.py's, likewise without importing the models
SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
PUMP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def counters_key(prefix: str) -> str:
    return f"{prefix}:metrics"


def read_counters(client: redis.Redis, prefix: str) -> dict[tuple[str, str, str], int]:
    """Return the outcome counters: (what, clinic, channel) -> count."""
    raw = cast(dict[Any, Any], client.hgetall(counters_key(prefix)))
    return _parse_counters(raw)


def _parse_counters(raw: dict[Any, Any]) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for name, value in raw.items():
        parts = _s(name).split("|")
        if len(parts) == 3:
            out[(parts[0], parts[1], parts[2])] = int(_s(value))
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ScheduleCollector(Collector):
    """The Redis-kept counters and the schedule's gauges, read at each scrape."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only: the registry must not collect() on register

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        up = GaugeMetricFamily("reminders_redis_up", "Whether Redis answered this scrape")
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(counters_key(p))
            pipe.zcard(f"{p}:due")
            pipe.zrange(f"{p}:due", 0, 0, withscores=True)
            pipe.zcard(f"{p}:lease")
            pipe.zcard(f"{p}:dead")
            pipe.hget(f"{p}:health:pump", "at")
            pipe.hget(f"{p}:health:beat", "at")
            for queue in QUEUES:
                pipe.llen(f"{p}:celery:{queue}")
            pipe.zcard(f"{p}:ev:due")  # clinic events waiting (worker/webhooks.py)
            pipe.zcard(f"{p}:ev:dead")  # clinic events given up
            for channel in CHANNELS:  # each live process's sender threads (worker/pump.py)
                pipe.zrange(f"{p}:send:senders:{channel}", 0, -1, withscores=True)
            replies = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            up.add_metric([], 0)
            yield up
            return
        except redis.ResponseError as exc:
            # An error reply (MASTERDOWN in a failover, NOPERM for a command read here):
            # no figures from Redis, said as `reminders_redis_up 0`, the rest of the
            # scrape served (a raised error lost the whole scrape: a 503).
            log.warning("metrics: Redis answered an error (%s): reminders_redis_up 0",
                        error_detail(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        (secs, micros), raw, due, first, leased, dead, pump_at, beat_at = replies[:8]
        now = secs + micros / 1_000_000
        counts = _parse_counters(raw)
        # Every counter of every (clinic, channel) any counter names, at 0 until counted: a
        # series that first appears at 1 shows Prometheus no increase (it has no sample of
        # it before), so a clinic channel's first dead letter (or failure) alerted nothing.
        pairs = sorted({(clinic, channel) for _, clinic, channel in counts})
        for what, (name, text) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=["clinic", "channel"])
            for clinic, channel in pairs:
                family.add_metric([clinic, channel], counts.get((what, clinic, channel), 0))
            yield family
        yield _gauge("reminders_due", "Reminders in the due set (waiting for their time)", due)
        overdue = max(0.0, now - float(first[0][1])) if first else 0.0
        yield _gauge("reminders_oldest_overdue_seconds",
                     "Age of the oldest reminder past its due time and not yet claimed "
                     "(0 if none)", overdue if first and float(first[0][1]) <= now else 0.0)
        yield _gauge("reminders_leased", "Reminders claimed and being sent (the lease set)",
                     leased)
        yield _gauge("reminders_dead_letters", "Reminders waiting in the dead letters", dead)
        for name, text, at in (
                ("reminders_pump_heartbeat_age_seconds", "Seconds since the last pump run",
                 pump_at),
                ("reminders_beat_heartbeat_age_seconds",
                 "Seconds since beat last published a pump tick", beat_at)):
            if at is not None:
                yield _gauge(name, text, max(0.0, now - float(_s(at))))
        queues = GaugeMetricFamily("reminders_celery_queue_length",
                                   "Messages waiting in a Celery queue (the broker's list)",
                                   labels=["queue"])
        for queue, length in zip(QUEUES, replies[8:8 + len(QUEUES)], strict=True):
            queues.add_metric([queue], length)
        yield queues
        events_due, events_dead = replies[8 + len(QUEUES):10 + len(QUEUES)]
        senders = GaugeMetricFamily(
            "reminders_senders", "Sender threads of the channel in the worker processes "
            "alive now (0: no worker takes its queue, and the pump hands it nothing)",
            labels=["channel"])
        for channel, members in zip(CHANNELS, replies[10 + len(QUEUES):], strict=True):
            senders.add_metric([channel], sum(int(_s(m).rpartition("|")[2])
                                              for m, until in members if until > now))
        yield senders
        yield _gauge("reminders_clinic_events_waiting",
                     "Clinic events (webhooks, alerts) waiting to be delivered or retried",
                     events_due)
        yield _gauge("reminders_clinic_events_given_up",
                     "Clinic events given up after REMINDERS_WEBHOOK_MAX_ATTEMPTS, kept for "
                     "`reminders events replay` until the retention ends (some may have "
                     "expired and not yet been removed from the count)", events_dead)
        yield from redis_keeping(self.client)


# The settings `reminders_redis_setting_unsafe` has a series for (worker/durability.py).
SETTINGS = ("appendonly", "appendfsync", "maxmemory-policy", "role")


def redis_keeping(client: redis.Redis) -> Iterator[Metric]:
    """Whether Redis keeps the schedule, as metrics (README "Redis requirements"):

      reminders_redis_setting_unsafe{setting}  1 while the setting can lose or evict the
          schedule (worker/durability.py `findings`: AOF off, appendfsync no, an evicting
          maxmemory-policy, a replica), else 0; no series for one Redis does not show
          (CONFIG refused and INFO silent: `reminders check --redis` says so)
      reminders_redis_evicted_keys_total       keys Redis evicted since it started (INFO
          stats evicted_keys: a reminder, a booking's record, a ledger entry gone)
      reminders_redis_memory_used_ratio        used_memory / maxmemory (0 with no
          maxmemory): at 1, under noeviction, Redis refuses every booking and record (OOM)

    Read with their own round trips, never failing the scrape: an error leaves them out
    (a WARNING naming it)."""
    try:
        read = read_settings(client)
        pipe = client.pipeline(transaction=False)
        pipe.info("stats")
        pipe.info("memory")
        stats, memory = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        log.warning("metrics: Redis's settings could not be read (%s)", error_detail(exc))
        return
    bad = {f.setting for f in findings(read) if f.value is not None}
    values = {"appendonly": read.appendonly, "appendfsync": read.appendfsync,
              "maxmemory-policy": read.maxmemory_policy, "role": read.role}
    unsafe = GaugeMetricFamily(
        "reminders_redis_setting_unsafe", "1 while this Redis setting can lose or evict the "
        "schedule (README, Redis requirements), else 0", labels=["setting"])
    for name in SETTINGS:
        if values[name] is not None:
            unsafe.add_metric([name], 1 if name in bad else 0)
    yield unsafe
    if not isinstance(stats, Exception) and "evicted_keys" in stats:
        evicted = CounterMetricFamily(
            "reminders_redis_evicted_keys", "Keys Redis evicted since it started (INFO "
            "evicted_keys): reminders and their records gone unsent")
        evicted.add_metric([], int(stats["evicted_keys"]))
        yield evicted
    if not isinstance(memory, Exception) and "used_memory" in memory:
        limit = int(memory.get("maxmemory") or 0)
        yield _gauge("reminders_redis_memory_used_ratio", "Redis's used_memory / maxmemory "
                     "(0: no maxmemory); at 1 Redis refuses writes (OOM, noeviction)",
                     int(memory["used_memory"]) / limit if limit else 0.0)


class ConfigCollector(Collector):
    """`reminders_config_loads`: 1 while config/ as it is on disk now loads, 0 when it does
    not (an edit the running processes keep out, logged once at ERROR: worker/catalog.py;
    a worker started now refuses to start). Read again at a scrape only when its files
    changed (their names, modification times and sizes). `loads`: how to find out (1.0,
    0.0, or None when it could not tell: asked again at the next scrape); by default in
    this process (the API, which holds the catalog anyway). The Celery worker's main process
    only routes messages and passes worker/tasks.py's check in a child Python: the
    catalog's imports, about 4 MB, would stay in it for nothing."""

    def __init__(self, settings: Any, *,
                 loads: Callable[[], float | None] | None = None) -> None:
        self.settings = settings
        self.loads = loads if loads is not None else lambda: _loads_here(settings)
        self._seen: tuple[Any, float] | None = None  # (stamp, value)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stamp = _config_stamp(self.settings)
        if self._seen is None or self._seen[0] != stamp:
            value = self.loads()
            if value is not None:  # could not tell: asked again at the next scrape
                self._seen = (stamp, value)
        if self._seen is not None:
            yield _gauge("reminders_config_loads",
                         "Whether config/ as it is on disk now loads (0: an edit is kept out)",
                         self._seen[1])


def _config_stamp(settings: Any) -> tuple[tuple[str, int, int], ...]:
    """The config files' names, modification times and sizes (as worker/catalog.py's
    `config_stamp`, without importing the catalog)."""
    stamp = []
    for folder in (settings.protocols_dir, settings.clinics_dir):
        try:
            for path in sorted(folder.glob("*.toml")):
                if not path.name.startswith("."):
                    st = path.stat()
                    stamp.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((str(folder), -1, -1))
    return tuple(stamp)


def _loads_here(settings: Any) -> float:
    from .catalog import Catalog
    from .errors import ConfigError

    try:
        Catalog.load(settings)
    except (ConfigError, OSError):
        return 0.0
    return 1.0


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class Histograms:
    """The per-process histograms (send duration, lateness, pump run)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.send_seconds = Histogram(
            "reminders_send_duration_seconds",
            "Duration of one delivery call (Apprise or the outbox), by channel and result",
            ["channel", "result"], buckets=SEND_BUCKETS, registry=registry)
        self.lateness = Histogram(
            "reminders_lateness_seconds",
            "Seconds between the instant a reminder was due (for this attempt) and its "
            "delivery", ["channel"], buckets=LATENESS_BUCKETS, registry=registry)
        self.pump_seconds = Histogram(
            "reminders_pump_run_duration_seconds", "Duration of one pump run",
            buckets=PUMP_BUCKETS, registry=registry)
        self.clock_skew = Gauge(
            "reminders_clock_skew_seconds",
            "This host's clock minus Redis's, as the senders last measured it",
            registry=registry, multiprocess_mode="livemostrecent")


_lock = threading.Lock()
_histograms: Histograms | None = None


def histograms() -> Histograms:
    """Return this process's histograms (registered nowhere: the worker's server merges
    every process's files in multiprocess mode; without it they are kept and not shown)."""
    global _histograms
    with _lock:
        if _histograms is None:
            _histograms = Histograms(registry=None)
        return _histograms


# The send path reports through worker/observe.py (which imports no prometheus-client): to
# these histograms from now on, in this process and in the pool processes forked from it.
observe.keep_in(histograms)
observe_send = observe.observe_send
observe_lateness = observe.observe_lateness
observe_pump = observe.observe_pump
set_clock_skew = observe.set_clock_skew


def exposition(registry: CollectorRegistry) -> bytes:
    from prometheus_client.exposition import generate_latest

    return generate_latest(registry)


# --- the worker's own /metrics ----------------------------------------------------------

_server: Any = None


def worker_metrics_dir(data_dir: Path) -> Path:
    return data_dir / "metrics" / f"{socket.gethostname()}-{os.getpid()}"


# A worker touches ALIVE_FILE in its folder every ALIVE_EVERY seconds; a folder of another
# host untouched for STALE_AFTER is a gone worker's (a re-created container's hostname is new).
ALIVE_FILE = "alive"
ALIVE_EVERY = 60.0
STALE_AFTER = 900.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _last_touched(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [entry.stat().st_mtime for entry in folder.iterdir() if entry.is_file()]
    return max(times)


def remove_gone_folders(metrics_root: Path, *, host: str | None = None,
                        now: float | None = None) -> list[Path]:
    """Remove the metrics folders (`<host>-<pid>`) of worker processes that are gone, and
    return them: on this host, those whose pid is not alive; of another host (a container
    since re-created, whose hostname was its id), those untouched for STALE_AFTER (a live
    worker touches its ALIVE_FILE every ALIVE_EVERY). Nothing is lost: a folder holds only
    its own worker's histograms and skew gauge, which only that worker's port served (the
    outcome counters live in Redis)."""
    host = socket.gethostname() if host is None else host
    now = time.time() if now is None else now
    removed = []
    try:
        folders = [entry for entry in metrics_root.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return []
    for folder in folders:
        owner, sep, pid = folder.name.rpartition("-")
        if not sep or not owner or not pid.isdigit():
            continue  # not a worker's folder
        try:
            if owner == host:
                gone = int(pid) != os.getpid() and not _pid_alive(int(pid))
            else:
                gone = now - _last_touched(folder) > STALE_AFTER
        except OSError:
            continue  # removed meanwhile by another worker starting
        if gone:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _keep_alive(folder: Path) -> None:
    while True:
        try:
            (folder / ALIVE_FILE).touch()
        except OSError:
            pass
        time.sleep(ALIVE_EVERY)


def start_worker_metrics(scrape: redis.Redis, prefix: str, data_dir: Path, host: str,
                         port: int, config: Collector | None = None
                         ) -> tuple[str, int] | None:
    """In the Celery worker's main process, before its pool forks: switch the histograms to
    multiprocess mode and serve every process's figures with the Redis ones on host:port.

    Returns the address served, or None when `port` is 0 (then nothing shows the histograms:
    a pool process that does not import this module keeps none, worker/observe.py).
    """
    global _server
    if port == 0 or _server is not None:
        return None
    from prometheus_client import values
    from prometheus_client.exposition import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = worker_metrics_dir(data_dir)
    shutil.rmtree(folder, ignore_errors=True)  # a previous run's files would count again
    for gone in remove_gone_folders(folder.parent):
        log.info("metrics: removed %s, the folder of a worker that is gone", gone.name)
    folder.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_keep_alive, args=(folder,), name="metrics-alive",
                     daemon=True).start()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    with _lock:
        global _histograms
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _histograms = None  # made again, in multiprocess mode, on first use
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    registry.register(ScheduleCollector(scrape, prefix))
    if config is not None:
        registry.register(config)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("metrics: cannot serve on %s:%d (%s); this worker runs without its metrics "
                  "port (the API's /metrics still shows the counters)", host, port, exc.strerror)
        return None
    _server = server
    bound = cast(tuple[str, int], server.server_address[:2])
    log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", *bound)
    return bound
