"""The naive approach, for comparison only: one Celery task per reminder, sent with an ETA.

This is what DESIGN.md ("Why not apply_async(eta=...)") argues against. It uses the
same broker and the same Celery settings as worker/celery_app.py (JSON, acks late,
reject on worker lost, prefetch 1, the same broker transport options) and differs only
in how a reminder waits: here it waits as an ETA task inside the worker.

Run by the harness as `celery -A benchmarks.naive_app worker -Q naive.send`, configured
by environment variables:
  BENCH_REDIS_URL           the broker (and where sends are recorded)
  BENCH_TRANSPORT_OPTIONS   JSON broker transport options (visibility timeout, ...)

Each execution of the task is one "send": it appends [reminder id, due epoch, now epoch]
as a JSON line to the Redis list SENDS_KEY.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Celery
from kombu import Queue

QUEUE = "naive.send"
TASK = "naive.send"
SENDS_KEY = "bench:naive:sends"


def make_app(broker_url: str, transport_options: dict[str, Any]) -> Celery:
    """Return the naive Celery app on `broker_url` (the harness publishes with it too)."""
    app = Celery("naive", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_queues=(Queue(QUEUE, routing_key=QUEUE),),
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=dict(transport_options),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@lru_cache(maxsize=1)
def _sink() -> redis.Redis:
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
               json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS", "{}")))


@app.task(name=TASK, ignore_result=True)
def send(reminder_id: str, due_epoch: float) -> None:
    """"Send" a reminder: record that this execution happened, and when."""
    _sink().rpush(SENDS_KEY, json.dumps([reminder_id, due_epoch, time.time()]))
