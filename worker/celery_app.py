"""The Celery application: wiring only (`celery -A worker.celery_app worker|beat`).

Celery carries only work that is due now: the pump task (beat, every second) and the
send tasks it publishes. No task has an ETA or countdown, so the broker's visibility
timeout can be minutes and nothing waits in worker memory.

Queues: `reminders.pump`, and one send queue per channel (`reminders.send.email`,
`reminders.send.sms`), so a slow email provider never holds SMS back in the broker, and
`reminders.events` for the clinic's webhooks and alerts (worker/webhooks.py), so a slow
clinic endpoint never delays a patient's reminder. A worker started with `-Q`
WORKER_QUEUES takes all of them; a worker per channel
(`-Q reminders.send.sms`) isolates the channels in separate processes too.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery
from celery.beat import PersistentScheduler
from celery.utils.time import maybe_make_aware
from kombu.entity import Queue  # kombu.Queue; kombu/__init__ does not export it to mypy

from .connections import broker, broker_transport_options
from .health import beat_alive, beat_client, install_beat_heartbeat
from .logs import setup_celery
from .nudge import EXPIRES_SECONDS, PUMP_TASK
from .nudge import PUMP_QUEUE as PUMP_QUEUE  # re-exported: tasks and tests take it from here
from .nudge import TICKS_WAITING_MAX as TICKS_WAITING_MAX  # beat adds no tick to this many
from .settings import get_settings

log = logging.getLogger(__name__)
CHANNELS = ("email", "sms")  # worker/models.py's, without importing the models here
SEND_QUEUES = {channel: f"reminders.send.{channel}" for channel in CHANNELS}
EVENTS_QUEUE = "reminders.events"
WORKER_QUEUES = ",".join([*SEND_QUEUES.values(), PUMP_QUEUE, EVENTS_QUEUE])  # `-Q` for all


def send_queue(ref_or_channel: str) -> str:
    """Return the send queue of a channel, or of a reminder ref ("...:<channel>")."""
    channel = ref_or_channel.rpartition(":")[2]
    return SEND_QUEUES.get(channel, SEND_QUEUES[CHANNELS[0]])


def _route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
           **_: Any) -> dict[str, str] | None:
    """Route a task published without a queue (e.g. `celery call`) by its reminder's channel."""
    try:
        if name == "reminders.send":
            return {"queue": send_queue(str(args[0]))}
        if name == "reminders.send_batch":
            return {"queue": send_queue(str(args[0][0][0]))}
    except (IndexError, KeyError, TypeError):
        pass
    if name == "reminders.clinic_event":
        return {"queue": EVENTS_QUEUE}
    return {"queue": PUMP_QUEUE} if name == "reminders.pump" else None


class PumpScheduler(PersistentScheduler):  # type: ignore[misc]  # celery is untyped
    """Celery beat's scheduler, which a host clock stepped back does not stop.

    Beat runs an interval entry once `last_run_at + interval` has passed by the wall clock,
    and keeps its entries in a heap by that instant. After the host's clock steps back N
    seconds (an NTP step, a VM restored from a snapshot, a clock set by hand), or when beat
    starts with a schedule file written while the clock was ahead, `last_run_at` lies in
    the future: beat published no pump tick for N seconds, and what fell due meanwhile
    (nothing nudging the pump) waited for them. An entry last run later than now is taken
    as run now, and the heap built again: it runs again an interval later.
    """

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Publish the pump tick, unless TICKS_WAITING_MAX pump tasks already wait unrun.

        Then no worker consumes the pump queue (workers down, or crash-looping): each tick
        more was one more message in its Redis list (~1 KB, 86 MB a day at a tick a second,
        under `noeviction`), and a worker coming back discarded every expired one, in
        order, before it ran the pump at all (minutes, for a day's ticks): what waits runs
        the pump as well. Beat's heartbeat is stamped all the same: beat is alive, and
        `reminders health --role worker` says the pump is not running. Redis unreachable:
        published as ever (the publish says what fails)."""
        if entry.task == PUMP_TASK:
            try:
                waiting = int(beat_client().llen(queue_key(PUMP_QUEUE)))
            except redis.RedisError:
                waiting = 0
            if waiting >= TICKS_WAITING_MAX:
                beat_alive()
                log.debug("beat: %d pump task(s) wait unrun: no tick added", waiting)
                return
        super().apply_entry(entry, producer=producer)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = maybe_make_aware(self.app.now())
        stepped = [entry for entry in self.schedule.values()
                   if maybe_make_aware(entry.last_run_at) > now]
        if stepped:
            for entry in stepped:
                entry.last_run_at = now
            self._heap = None  # built again by this tick (`populate_heap`)
        return super().tick(*args, **kwargs)  # type: ignore[no-any-return]


settings = get_settings()
# Celery's logging (banner and warnings too) in REMINDERS_LOG_FORMAT: worker/logs.py.
setup_celery(settings.log_format, settings.log_level)


def queue_key(queue: str) -> str:
    """Return the broker's Redis list of `queue` (keys carry the global_keyprefix below)."""
    return f"{settings.key_prefix}:celery:{queue}"


# One Redis (REMINDERS_REDIS_URL), or the master the Sentinels name (REMINDERS_REDIS_SENTINELS:
# kombu's sentinel:// transport follows a failover); see worker/connections.py.
BROKER_URL, BROKER_TRANSPORT, BROKER_OPTIONS = broker(settings)
app = Celery("reminders", broker=BROKER_URL, include=["worker.tasks"])
app.conf.update(
    task_queues=tuple(
        # kombu's Queue is unannotated.
        Queue(queue, routing_key=queue)  # type: ignore[no-untyped-call]
        for queue in [*SEND_QUEUES.values(), PUMP_QUEUE, EVENTS_QUEUE]
    ),
    task_default_queue=PUMP_QUEUE,
    task_routes=(_route,),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A task is acknowledged after it ran; a worker lost mid-task gives it back.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options=broker_transport_options(settings, BROKER_OPTIONS),
    # kombu's Redis (or Sentinel) transport with a narrow fix for a channel used after its
    # connection closed, as happens when Redis restarts under the worker or fails over:
    # see worker/broker.py.
    broker_transport=BROKER_TRANSPORT,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    beat_schedule={
        "pump": {
            "task": "reminders.pump",
            "schedule": settings.pump_interval_seconds,
            # A pump tick nobody ran in time is worthless: the next one does the same work.
            "options": {"expires": max(5.0, 5 * settings.pump_interval_seconds)},
        },
    },
    beat_scheduler=f"{__name__}:PumpScheduler",
    beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
)


# Beat's own liveness evidence: a heartbeat after each pump tick it publishes (beat only).
install_beat_heartbeat()


def nudge_pump() -> None:
    """Ask for a pump run now (after a booking with something due at once); beat would anyway."""
    app.send_task(PUMP_TASK, queue=PUMP_QUEUE, expires=EXPIRES_SECONDS)
