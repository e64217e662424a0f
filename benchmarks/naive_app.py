"""The naive peer, for comparison only: one Celery task per reminder, sent with an ETA.

This is what DESIGN.md ("Why not apply_async(eta=...)") argues against, written the way
the Celery documentation suggests: at booking time, one `send_task(..., eta=due)` per
reminder; at the due time the task formats the message and sends it through Apprise to
the same SMTP server and SMS gateway, with the same Apprise URLs, as this project's
worker. It uses the same broker kind and the same reliability settings as
worker/celery_app.py (JSON, acks late, reject on worker lost, prefetch 1) and differs in
how a reminder waits: here it waits as an ETA task inside the worker's memory.

It does less per message than the project's worker (no store, no fence, no ledger, no
send-time rules, a fixed text instead of the clinic's templates): its rates are an upper
bound for the design, not a handicap.

Run by the harness as `celery -A benchmarks.naive_app worker -Q naive.send`, configured
by environment variables:
  BENCH_REDIS_URL   the broker
  BENCH_EMAIL_URL   Apprise URL for email, `{to}` replaced by the recipient
  BENCH_SMS_URL     Apprise URL for SMS, `{to}` replaced by the recipient
"""

from __future__ import annotations

import os
from typing import Any

import apprise
from celery import Celery
from kombu import Queue

QUEUE = "naive.send"
TASK = "naive.send"

SUBJECT = "Reminder from Bench Skin Clinic: SPF 30 this morning"
EMAIL_BODY = (
    "Hello {name},\n\nYesterday's treatment leaves your skin sensitive to the sun. This "
    "morning, apply a broad-spectrum SPF 30 or higher and keep out of direct sun; reapply "
    "every two hours if you go out.\n\nSlight redness is normal for a day or two. If it "
    "gets worse, or you see blisters, call us on +34910000000.\n\nBench Skin Clinic\n"
    "(reminder {ref})"
)
SMS_TEXT = ("{name}: apply SPF 30+ this morning and avoid direct sun. Questions? Bench Skin "
            "Clinic +34910000000")


def make_app(broker_url: str, transport_options: dict[str, Any] | None = None) -> Celery:
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
        broker_transport_options=dict(transport_options or {}),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
# Load Apprise's plugins once, before the pool forks (as the project's worker warms up):
# the peer's first messages are not slowed by it.
apprise.Apprise().add("json://127.0.0.1")


@app.task(name=TASK, ignore_result=True)
def send(ref: str, channel: str, to: str, name: str, due_epoch: float) -> None:
    """Send one reminder through Apprise; raise if Apprise says it failed."""
    url = os.environ["BENCH_EMAIL_URL" if channel == "email" else "BENCH_SMS_URL"]
    notifier = apprise.Apprise()
    notifier.add(url.format(to=to))
    if channel == "email":
        ok = notifier.notify(title=SUBJECT, body=EMAIL_BODY.format(name=name, ref=ref))
    else:
        ok = notifier.notify(body=SMS_TEXT.format(name=name))
    if not ok:
        raise RuntimeError(f"{ref}: Apprise could not deliver it")
