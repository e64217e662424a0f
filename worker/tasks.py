"""Celery tasks, thin: build the context once per process, then call plain functions.

  reminders.pump        start a pump run (in a thread beside the senders): claim what each
                        channel's senders can take, publish it in batches (all of a claim
                        round's tasks in one pipelined round trip, `_publish_all`); the
                        thread runs again when the next reminder falls due before beat's
                        next tick
  reminders.send_batch  hand a batch of claims [[ref, version, claim], ...] to this process's
                        senders for their channel (worker/dispatch.py `hand_over`)
  reminders.send        send one claimed reminder now, in the task (the same attempt; kept
                        for tools that publish a single claim)
  reminders.clinic_event  hand one claimed clinic event (a signed webhook, or the held
                        alert by email; worker/webhooks.py) to this process's event senders
                        (worker/event_senders.py); the pump claims them too

The send path's modules (dispatch, delivery, rendering, Apprise) are imported in the pool
processes that send, not in the Celery main process, which only routes messages.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from .celery_app import (
    EVENTS_QUEUE,
    PUMP_QUEUE,
    SEND_QUEUES,
    WORKER_QUEUES,
    app,
    nudge_pump,
    queue_key,
    send_queue,
)
from .settings import get_settings

if TYPE_CHECKING:
    from .dispatch import Context, Lanes
    from .event_senders import EventSenders
    from .models import Channel
    from .pump import Batch, Run
    from .webhooks import Events

log = logging.getLogger(__name__)
NUDGE_DEBOUNCE_MS = 200  # at most one nudge per channel in this long, whoever asks
# A warm shutdown waits for a pump run under way to finish: within its grace period, at
# least PUMP_RUN_MIN_WAIT_SECONDS (a run takes milliseconds with Redis up), at most
# PUMP_RUN_WAIT_SECONDS from the shutdown's start. (A run waiting on a Redis that died
# waits out the client's retries, ~45 s: not for the stop to wait for past its grace.)
PUMP_RUN_WAIT_SECONDS = 10.0
PUMP_RUN_MIN_WAIT_SECONDS = 3.0
# A pump thread waiting for the next due instant runs again no sooner than this after its
# last run began: reminders falling due a few milliseconds apart (a hand-back's pace, a
# stream of bookings) make at most ten runs a second, each claiming what fell due by then.
FOLLOW_UP_GAP_SECONDS = 0.1
_DISPATCH = f"{__package__}.dispatch"  # the senders' module (imported where they run)
_EVENT_SENDERS = f"{__package__}.event_senders"  # the clinic events' threads (likewise)

_context: Context | None = None
_context_lock = threading.Lock()


def context() -> Context:
    """Return this process's send context (settings, store, catalog, renderer), made once."""
    global _context
    with _context_lock:
        if _context is None:
            from .catalog import Catalog
            from .connections import client
            from .dispatch import Context
            from .rendering import Renderer
            from .store import Store

            settings = get_settings()
            catalog = Catalog.load(settings)
            _context = Context(
                settings=settings,
                store=Store(
                    client(settings),
                    settings.key_prefix,
                    retention_days=settings.retention_days,
                    # Of the configuration sent with now: config/ is read again (fresh).
                    hooks=lambda clinic_id: _current().catalog.hooks(clinic_id),
                ),
                catalog=catalog,
                renderer=Renderer(catalog.templates_dir),
            )
        return _context


def _current() -> Context:
    assert _context is not None  # made before its store is used
    return _context


def senders() -> Lanes:
    """Return this process's senders (one thread pool per channel)."""
    from .dispatch import lanes

    return lanes(context(), on_idle=_ask_for_more)


def _ask_for_more(channel: Channel) -> None:
    """A channel's senders ran dry: run the pump now, unless its queue still holds work; and
    give the memory their sends freed back (`release_free_memory`: well under a millisecond,
    at most once per channel per run dry)."""
    try:
        client = context().store.redis
        if client.llen(queue_key(send_queue(channel))):
            return
        key = f"{context().settings.key_prefix}:send:nudge:{channel}"
        if client.set(key, "1", nx=True, px=NUDGE_DEBOUNCE_MS):
            nudge_pump()
    finally:
        release_free_memory()


def _warm_up() -> None:
    """Load config, templates, Apprise and Redis before the first task needs them, and
    start the senders of the channels this worker takes (the pump counts their threads).

    Of Apprise's ~180 plugins, only those of the clinics' channel URLs (worker/
    apprise_plugins.py): each process holds what it sends through, not every provider.
    """
    from .delivery import warm_up

    ctx = context()
    warm_up(url for clinic in ctx.catalog.clinics.values() for url in clinic.channels.values())
    lanes = senders()
    for channel in _channels_taken():
        lanes.open(channel)
    if _takes_events():
        event_senders()  # registered at once: the pump counts their threads


def _queues_taken() -> set[str]:
    """The queues this worker consumes (`-Q`; all of WORKER_QUEUES if not narrowed)."""
    # Selected in the main process before the pool processes were forked.
    selected = app.amqp.queues.consume_from
    return set(selected) if selected else set(WORKER_QUEUES.split(","))


def _channels_taken() -> list[Channel]:
    """The channels whose send queues this worker consumes (`-Q`; all if not narrowed)."""
    from .models import CHANNELS

    names = _queues_taken()
    return [channel for channel in CHANNELS if SEND_QUEUES[channel] in names]


def _takes_events() -> bool:
    """Whether this worker consumes the clinic events' queue (`-Q`; all if not narrowed)."""
    selected = app.amqp.queues.consume_from
    return not selected or EVENTS_QUEUE in set(selected)


def _others_waiting(channel: Channel) -> Callable[[], bool]:
    """Return whether a message of another queue this worker takes (the other channel's
    batches, the clinic events) waits in the broker: one pipeline of LLENs. Then a
    hand-over for `channel` does not hold its pool process (worker/dispatch.py
    `hand_over`). Redis unreachable: nothing known to wait (the hold lasts as before).

    Not the pump's queue: a tick waiting there behind a hold runs once the hold ends, as
    before. Holds ended for ticks and nudges too cost SMS alone 6.9-7.2 ms of worker CPU a
    message against 5.2-5.7 in three alternating burst_probe pairs (without: noise)."""
    skip = {send_queue(channel), PUMP_QUEUE}
    keys = [queue_key(queue) for queue in sorted(_queues_taken()) if queue not in skip]

    def waiting() -> bool:
        if not keys:
            return False
        try:
            read = context().store.redis.pipeline(transaction=False)
            for key in keys:
                read.llen(key)
            return any(read.execute())
        except redis.RedisError:
            return False

    return waiting


@worker_process_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _warm_up_pool_process(**_: object) -> None:
    _warm_up()
    quiet_gc()
    release_free_memory()


# Young collections every 10,000 allocations, not CPython's 700; the older ones in step.
SENDER_GC = (10_000, 10, 10)


def quiet_gc() -> None:
    """Set aside what the warm-up made and collect young garbage less often (a pool
    process, once warmed up; as worker/batch.py's `quiet_gc` does for a batch).

    The warm-up leaves the process's long-lived objects (modules, Apprise's plugins, the
    catalog, templates, Babel's data): each full collection walked them all, about 70 ms
    holding every sender thread, about once per 1,000 messages. Frozen, a collection walks
    only what the sends made since. A send makes few cyclic objects (about a dozen) and
    frees the rest as it goes, whatever the thresholds: with SENDER_GC a 1,000-message
    burst spent about 0.04 s of a pool process's CPU collecting, against 0.15-0.18 s
    (gc callbacks in the pool processes during `python -m benchmarks.burst_probe`).
    What the warm-up made and later drops is freed as ever unless it is in a cycle, which
    then stays (a catalog replaced after a config edit, if any of it is cyclic).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SENDER_GC)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`; elsewhere a no-op).

    The warm-up's imports leave freed blocks in the heap that stay resident (about 4 MB per
    pool process), and so do a burst's sends in the sender threads' heaps (about 4 MB per
    pool process after 1,000 messages), measured with benchmarks/rss_probe.py. Nothing
    else is touched; ctypes lets the other threads run meanwhile.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return
    trim(0)


@worker_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _refuse_a_broken_config(**_: object) -> None:
    """Exit (os.EX_CONFIG) before consuming anything if config/ does not load, as `reminders
    run` refuses to start. A running worker keeps the configuration it loaded when an edit
    breaks it (worker/catalog.py); a worker started meanwhile (a restart, a deploy, a
    scale-up) has none: it would take send batches off the queues only to fail them, each
    claim then waiting out its lease while the other workers could have sent it.

    Loaded in a child Python (a few tenths of a second at start): this main process only
    routes messages, and the catalog's imports (phonenumbers, email-validator: about 4 MB)
    would stay in it, and in the memory of the worker at rest, for nothing."""
    problem = _config_problem()
    if problem is not None:
        log.critical("configuration does not load: %s; this worker does not start (workers "
                     "already running keep the configuration they loaded; `reminders check` "
                     "names the problem)", problem)
        raise SystemExit(os.EX_CONFIG)


# The child's check: exit 0 if config/ loads; 3 if it does not, saying why on stdout (the
# catalog's warnings go to stderr); any other end: it could not tell.
_CHECK = """
import sys
from worker.catalog import Catalog
from worker.errors import ConfigError
from worker.settings import get_settings
try:
    Catalog.load(get_settings())
except ConfigError as exc:
    sys.stdout.write(str(exc))
    sys.exit(3)
"""
CHECK_TIMEOUT_SECONDS = 30.0


def config_in_child() -> tuple[bool | None, str]:
    """Load config/ in a child Python; return whether it loads (None: the child could not
    tell: killed, timed out, a bug) and, if it does not, why. This process keeps none of
    the catalog's imports (used at start, `_refuse_a_broken_config`, and by the worker's
    `reminders_config_loads` gauge)."""
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)  # where `worker` is imported from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    try:
        done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True,
                              timeout=CHECK_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    loads = {0: True, 3: False}.get(done.returncode)
    return loads, done.stdout.decode("utf-8", "replace") if loads is False else ""


def _config_problem() -> str | None:
    """What keeps config/ from loading (None: it loads), found in a child Python; a child
    that could not tell: loaded here, as before."""
    loads, why = config_in_child()
    if loads is not None:
        return None if loads else why
    from .catalog import Catalog
    from .errors import ConfigError

    try:
        Catalog.load(get_settings())
    except ConfigError as exc:
        return str(exc)
    return None


@worker_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _no_celery_heartbeat(sender: Any = None, **_: object) -> None:
    """Run the worker without Celery's own heartbeat (as `--without-heartbeat`), however it
    is started: nothing here reads it (task events are off, no gossip, no mingle; the
    service's liveness is the pump's heartbeat in Redis, worker/health.py), and it hung the
    worker's main loop whenever the broker went away unnoticed (frozen, a network cut): the
    heartbeat's publish, every 2 s on that loop, retries its connection until the broker is
    back (kombu's `ensure`, no limit), so a SIGTERM (`docker stop`) was never acted on and
    the container was SIGKILLed at its stop grace period, its senders never drained.
    (Before the blueprint is built: the consumer reads its steps' options then.)"""
    options = getattr(sender, "options", None)
    if isinstance(options, dict):
        options["without_heartbeat"] = True


@worker_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _warm_up_single_process(sender: Any = None, **_: object) -> None:
    # Tasks run in the main process with the solo and threads pools (no pool processes).
    pool = getattr(sender, "pool_cls", None)
    if pool is not None and "prefork" not in f"{getattr(pool, '__module__', pool)}":
        _warm_up()


@worker_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _warn_of_redis_settings(**_: object) -> None:
    """Log a warning per Redis setting that can lose or evict the schedule (AOF off, an
    evicting maxmemory-policy, a replica: worker/durability.py), once, at start: ops who
    never run `reminders check --redis` see it too. Never stops the worker."""
    from .connections import PROBE, client
    from .durability import findings_of
    from .errors import ConfigError

    try:
        probe = client(get_settings(), PROBE, decode=False)
    except ConfigError:
        return  # no Redis to ask: the worker says so itself as it connects
    try:
        for finding in findings_of(probe):
            log.warning("Redis %s (README \"Redis requirements\")", finding.problem)
    finally:
        probe.close()


@worker_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _serve_metrics(**_: object) -> None:
    """The worker's Prometheus port (worker/metrics.py), set up before the pool forks."""
    settings = get_settings()
    if not settings.metrics_port:
        # Off (start_worker_metrics would do nothing): prometheus-client stays out of the
        # main process and so of the pool processes, which then keep no histograms
        # (worker/observe.py: nothing could show them).
        return
    from .connections import PROBE, client
    from .metrics import ConfigCollector, start_worker_metrics

    # Scrapes give up quickly (a scrape must not hang); the client follows Sentinel too.
    start_worker_metrics(client(settings, PROBE, decode=False), settings.key_prefix,
                         settings.data_dir,
                         settings.metrics_host, settings.metrics_port,
                         config=ConfigCollector(settings, loads=_config_loads))


def _config_loads() -> float | None:
    """`reminders_config_loads` for the worker's port, found in a child Python."""
    loads = config_in_child()[0]
    return None if loads is None else float(loads)


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]  # celery is untyped
@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _drain(**_: object) -> None:
    """Warm shutdown: no new pump run; hand back claims not begun and give the sends under
    way the grace period (worker/dispatch.py `Lanes.close`), at once, even while a pump run
    is under way; then let that run finish (it is short: it claims only what the senders
    can take), until the grace period (PUMP_RUN_MIN_WAIT_SECONDS at least, and
    PUMP_RUN_WAIT_SECONDS at most) after the shutdown began. A run caught by a Redis
    outage waits out the client's retries; the stop, for it, no longer than its grace
    (it waited 10 s whatever the grace: past a short one): what that run claimed and
    could not publish waits for its lease, as after a SIGKILL.

    Waiting for the run first held the senders open meanwhile: their threads began the
    claims waiting for them instead of handing them back, and the shutdown took the wait
    and the grace one after the other. A process that never imported the senders (the
    prefork pool's main process) has none to close: the send path is not imported then.
    """
    global _stopping
    with _turn:
        _stopping = True
        _wake.set()  # a pump thread waiting for the next due instant ends now
    began = time.monotonic()
    grace = get_settings().shutdown_grace_seconds
    # Clinic events not begun go back at once too; those under way share the grace period.
    closing = None
    if _EVENT_SENDERS in sys.modules:
        from .event_senders import stop_event_senders

        closing = stop_event_senders()
    if _DISPATCH in sys.modules:
        from .dispatch import close_lanes

        close_lanes(grace)
    if closing is not None:
        closing.wait(max(0.0, began + grace - time.monotonic()))
    wait = min(PUMP_RUN_WAIT_SECONDS, max(grace, PUMP_RUN_MIN_WAIT_SECONDS))
    if _pumping.acquire(timeout=max(0.0, began + wait - time.monotonic())):
        _pumping.release()


def _publish_all(batches: Sequence[Batch]) -> None:
    """Publish a pump run's batches, one `reminders.send_batch` task each on its channel's
    queue, in one pipelined round trip to the broker.

    Each task is built and routed as `apply_async` always did (Celery's message, headers
    and id; kombu's envelope, its queue's Redis list, a priority's list if one were set),
    inside kombu's batch publish (`Producer.batch`, kombu 5.7): the Redis transport
    buffers each message's LPUSH in one non-transactional pipeline and runs it once as the
    batch ends. The broker's client does not retry that pipeline (kombu batches only while
    its connection has no retries; otherwise it publishes each message at once, as before,
    one round trip each). Should the pipeline fail (Redis refusing writes part-way, the
    connection lost), kombu raises BatchPublishError: which tasks went out is not known,
    and the pump hands every claim of the batches back (worker/pump.py `_hand_out`)."""
    with app.producer_or_acquire() as producer, producer.batch():
        for batch in batches:
            send_batch.apply_async(
                args=([[c.ref, c.version, c.claim] for c in batch.claims], batch.claimed_at),
                queue=send_queue(batch.channel),
                producer=producer,
            )


@app.task(name="reminders.pump", ignore_result=True)  # type: ignore[untyped-decorator]  # celery
def pump_task() -> str:
    """Start a pump run beside this pool process's senders, and return.

    The run claims due reminders, as many as each channel's senders can take, and publishes
    them. It runs in a thread so that the pool process is free again at once: the batches it
    publishes then go to whichever pool process is free, not all to the others while this
    one pumps. A run already under way in this process runs again once done, for this tick
    (it may have claimed before what the tick is for was written); one in another process
    is found by the pump's own lock, and runs again likewise (worker/pump.py). This
    process's pump thread waiting for the next due instant (`_pump_run`) is woken: it runs
    the pump now.
    """
    if _stopping:
        return "this process is stopping: no pump run"
    global _again
    with _turn:
        if _waiting:
            _wake.set()
            return "woke this process's pump thread: it runs now"
        if not _pumping.acquire(blocking=False):
            # It may have claimed before what this tick or nudge is for was written (a
            # booking due at its own `now`): it runs again once done (`_pump_run`).
            _again = True
            return "a pump run is under way in this process: it runs again after"
    try:
        threading.Thread(target=_pump_run, name="pump", daemon=True).start()
    except BaseException:
        _pumping.release()
        raise
    return "pump run started"


_pumping = threading.Lock()  # held by this process's pump run (not while it waits)
_stopping = False  # set by a warm shutdown: no new pump run starts
_waiting = False  # this process's pump thread waits for the next due instant
_again = False  # a tick or nudge came while the pump thread ran: it runs again at once
_wake = threading.Event()  # ... until this is set (a tick, a nudge, a warm shutdown)
_turn = threading.Lock()  # `_waiting`, and `_pumping` taken or given up with it


def _pump_run() -> None:
    """Run the pump (the thread holds `_pumping`); then, while something falls due before
    beat's next tick would come (`_follow_up`), wait for it and run again.

    The wait holds no lock: a warm shutdown waits for none of it (it wakes the thread, which
    ends), and a tick or a nudge meanwhile wakes it to run at once, so a process has one
    pump thread. A tick or a nudge during a run has it run again at once (`_again`): the
    run may have claimed before what it was sent for was written. A run that found another
    process's run under way (the pump's own lock, worker/pump.py) waits for nothing: that
    one looks ahead after its run, and runs again for it (`Run.again`). So the processes
    waiting for the same instant (a tick went to another meanwhile) are one again after it,
    and one run at a time claims, as ever.
    """
    global _waiting, _again
    from .pump import asked_again

    while True:
        started = time.monotonic()
        wait = None
        waits = False
        try:
            wait = _follow_up(pump_now(), started)
        except Exception as exc:  # the next tick tries again (what it claimed goes back)
            if asked_again(exc):  # a run was asked of it meanwhile: that one runs now
                log.exception("pump: run failed; a run was asked for meanwhile: again now")
                wait = max(0.0, started + FOLLOW_UP_GAP_SECONDS - time.monotonic())
            else:
                log.exception("pump: run failed")
        finally:
            with _turn:
                if _again:  # a tick or nudge came meanwhile (`pump_task`): again at once
                    _again = False
                    soon = max(0.0, started + FOLLOW_UP_GAP_SECONDS - time.monotonic())
                    wait = soon if wait is None else min(wait, soon)
                _pumping.release()
                waits = _waiting = wait is not None and not _stopping
                _wake.clear()
        if not waits:
            return
        _wake.wait(wait)
        with _turn:
            _waiting = False
            if _stopping or not _pumping.acquire(blocking=False):
                return  # stopping; or another run in this process (a test's) looks on


def _follow_up(run: Run, started: float) -> float | None:
    """Return how long to wait before running the pump again, or None: leave it to beat.

    Again when a reminder falls due (or a lease runs out) after `run` began and before beat's
    next tick would come (`pump_interval_seconds` from now, at the latest), at that instant
    on Redis's clock, and no sooner than FOLLOW_UP_GAP_SECONDS after `started` (this run's
    start, on this host's monotonic clock). One read (worker/pump.py `next_due`), whatever
    is due: with nothing due within the interval, a run costs no more than that.

    And again FOLLOW_UP_GAP_SECONDS after `started` while a channel whose latency is not
    measured yet has no room left and more due (`Run.measuring`: a fresh store's first
    burst): its window is a guess of two claims a thread until its senders' first attempts
    are measured, and then the next run hands out what their latency allows, without waiting
    for the senders to run dry and ask (`_ask_for_more`, a nudge through the broker).

    Clinic events (worker/webhooks.py `pump_events`) are not looked at: an event is due at
    once when it is written (nothing to wait for: the next run takes it, a follow-up's too),
    its retries back off by seconds to minutes, which a tick more does not change, and no
    patient waits on it; a read of their schedule in every run would buy nothing.
    """
    if run.began is None:
        return None  # another run held the lock: it looks ahead itself
    gap = max(0.0, started + FOLLOW_UP_GAP_SECONDS - time.monotonic())
    if run.again:
        # A run was asked for while this one was under way (a nudge for a booking written
        # after this run claimed, its reminder due before this run began): it found the
        # lock held and left it to this one. Again now, not at beat's next tick.
        return gap
    if run.measuring:
        # A channel not measured yet (a fresh store) had its first window, two claims a
        # thread, and more is due: again soon, so that once its senders' first attempts are
        # measured the window follows them, not when the senders run dry (their nudge).
        return gap
    ctx = context()
    from .pump import next_due

    try:
        now, at = next_due(ctx.store, run.began)
    except redis.RedisError as exc:  # the run went well; the next tick runs the pump again
        log.warning("pump: could not read when the next reminder falls due: %s", exc)
        return None
    if at is None or at - now >= ctx.settings.pump_interval_seconds:
        return None
    return max(at - now, gap)


def pump_now() -> Run:
    """Claim due reminders and clinic events and publish them; return the run (`Run`: the
    reminders published, when it began)."""
    from .pump import Capacity, pump_run

    ctx = context()
    settings = ctx.settings
    capacity = Capacity(
        lease_seconds=settings.lease_seconds,
        batch_size=settings.send_batch_size,
        # A channel no live worker sends (no process registered its threads) gets nothing:
        # its reminders stay due (overdue, for the alerts) until one comes (worker/pump.py).
        threads=0,
        backlog_seconds=settings.send_backlog_seconds,
        # A claim counts as outstanding until it must have begun, plus the slowest send.
        hold_seconds=settings.send_max_wait_seconds + 2 * settings.send_timeout_seconds + 1,
    )
    from .health import pump_beat
    from .observe import observe_pump
    from .webhooks import pump_events, webhook_urls

    started = time.monotonic()
    run = pump_run(ctx.store, None, publish_all=_publish_all, capacity=capacity,
                   claim_round=settings.pump_batch)
    # The clinic's webhooks and alerts, on their own queue. Their lease outlasts one attempt
    # (the task's hard limit ends it first); an event whose worker died is claimed again.
    # At most what the event senders take at once (worker/event_senders.py).
    # Told the clinics' webhook URLs as config/ reads now: a URL edited while its endpoint
    # rested is tried at once (worker/webhooks.py).
    catalog = ctx.catalog.fresh(settings)
    if catalog is not ctx.catalog:
        ctx.catalog = catalog
    pump_events(_events(), _publish_event, batch=settings.pump_batch,
                lease_seconds=settings.lease_seconds, capacity=settings.webhook_threads,
                endpoints=webhook_urls(catalog.clinics))
    # The run's evidence for `reminders health` and /healthz (worker/health.py).
    took = time.monotonic() - started
    pump_beat(ctx.store.redis, settings.key_prefix, took)
    observe_pump(took)
    return run


def _events() -> Events:
    from .webhooks import Events

    ctx = context()
    return Events(ctx.store.redis, ctx.settings.key_prefix,
                  retention_days=ctx.settings.retention_days)


def _publish_event(event_id: str, claim: str) -> None:
    clinic_event.apply_async(args=(event_id, claim), queue=EVENTS_QUEUE)


@app.task(  # type: ignore[untyped-decorator]  # celery is untyped
    name="reminders.clinic_event",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=get_settings().lease_seconds - 3,
    time_limit=get_settings().lease_seconds - 1,
)
def clinic_event(event_id: str, claim: str) -> str:
    """Hand one claimed clinic event to this process's event senders, and return: a dead
    clinic endpoint holds one of their threads, never this pool process (the pump's runs
    and the send batches go on). A process that is stopping hands it back to the schedule."""
    if _stopping:
        outcome = _events().release(event_id, claim)
        log.info("clinic event %s: the worker is stopping; handed back (%s)", event_id, outcome)
        return f"handed back: the worker is stopping ({outcome})"
    return event_senders().submit(event_id, claim)


def event_senders() -> EventSenders:
    """Return this process's event senders (worker/event_senders.py)."""
    from .event_senders import event_senders as make

    settings = context().settings
    return make(_events, deliver_clinic_event, settings.webhook_threads,
                lease_seconds=settings.lease_seconds)


def deliver_clinic_event(event_id: str, claim: str, wait_at_most: float | None = None) -> str:
    """Deliver one claimed clinic event now, in this thread (a signed webhook, or the held
    alert by email), each network wait at most `wait_at_most` seconds."""
    from .webhooks import deliver_event

    ctx = context()
    # config/ edited: read again (worker/catalog.py), as a send attempt does; a worker with
    # nothing to send would else tell the clinic at its address and URL as at its start.
    seen = ctx.catalog
    catalog = seen.fresh(ctx.settings)
    if catalog is not seen:
        ctx.catalog = catalog
    from .catalog import config_stamp

    return deliver_event(_events(), event_id, claim, clinics=catalog.clinics,
                         renderer=ctx.renderer, settings=ctx.settings,
                         unsettled=lambda: bool(catalog.stamp)
                         and config_stamp(ctx.settings) != catalog.stamp,
                         timeout=wait_at_most)


# The limits of the tasks themselves (a batch task only hands its claims over; the single
# send runs its attempt in the task). No attempt outlives its ledger entry either way: the
# senders' watchdog ends the process first (worker/dispatch.py).
_SOFT_LIMIT, _HARD_LIMIT = get_settings().send_time_limit


@app.task(  # type: ignore[untyped-decorator]  # celery is untyped
    name="reminders.send_batch",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=_SOFT_LIMIT,
    time_limit=_HARD_LIMIT,
)
def send_batch(claims: list[list[str]], claimed_at: float) -> str:
    """Hand claimed reminders of one channel to this process's senders; they send each once."""
    from .dispatch import hand_over
    from .pump import channel_of

    by_channel: dict[Channel, list[list[str]]] = {}
    for claim in claims:
        by_channel.setdefault(channel_of(claim[0]), []).append(claim)
    lanes = senders()
    return "; ".join(hand_over(context(), lanes, channel, batch, claimed_at,
                               others_waiting=_others_waiting(channel))
                     for channel, batch in by_channel.items())


@app.task(  # type: ignore[untyped-decorator]  # celery is untyped
    name="reminders.send",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=_SOFT_LIMIT,
    time_limit=_HARD_LIMIT,
)
def send_reminder(ref: str, version: str, claim: str) -> str:
    """Send one claimed reminder once (fenced by version and claim, guarded by the ledger)."""
    from .dispatch import send_claimed

    return send_claimed(context(), ref, version, claim)


__all__ = ["PUMP_QUEUE", "clinic_event", "context", "deliver_clinic_event", "event_senders",
           "pump_now", "pump_task", "send_batch", "send_reminder", "senders"]
