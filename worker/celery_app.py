"""The Celery application: wiring only (`celery -A worker.celery_app worker|beat`).

Celery carries only work that is due now: the pump task (beat, every second) and the
send tasks it publishes. No task has an ETA or countdown, so the broker's visibility
timeout can be minutes and nothing waits in worker memory.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue  # kombu.Queue; kombu/__init__ does not export it to mypy

from .embedded import redis_url
from .settings import get_settings

PUMP_QUEUE = "reminders.pump"
SEND_QUEUE = "reminders.send"

settings = get_settings()
app = Celery("reminders", broker=redis_url(settings), include=["worker.tasks"])
app.conf.update(
    task_queues=(
        # kombu's Queue is unannotated.
        Queue(SEND_QUEUE, routing_key=SEND_QUEUE),  # type: ignore[no-untyped-call]
        Queue(PUMP_QUEUE, routing_key=PUMP_QUEUE),  # type: ignore[no-untyped-call]
    ),
    task_default_queue=SEND_QUEUE,
    task_routes={"reminders.pump": {"queue": PUMP_QUEUE}, "reminders.send": {"queue": SEND_QUEUE}},
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A task is acknowledged after it ran; a worker lost mid-task gives it back.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        "global_keyprefix": f"{settings.key_prefix}:celery:",
    },
    # kombu's Redis transport with a narrow fix for a channel used after its connection
    # closed, as happens when Redis restarts under the worker: see worker/broker.py.
    broker_transport="worker.broker:Transport",
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
    beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
)


def nudge_pump() -> None:
    """Ask for a pump run now (after a booking with something due at once); beat would anyway."""
    app.send_task("reminders.pump", queue=PUMP_QUEUE, expires=30)
