"""Celery tasks, thin: build the context once per process, then call plain functions."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_process_init

from .catalog import Catalog
from .celery_app import SEND_QUEUE, app
from .delivery import warm_up
from .dispatch import Context, send_claimed
from .embedded import redis_url
from .pump import pump
from .rendering import Renderer
from .settings import get_settings
from .store import Claim, Store, connect
from .webhooks import hooks_for

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def context() -> Context:
    settings = get_settings()
    catalog = Catalog.load(settings)
    return Context(
        settings=settings,
        store=Store(
            connect(redis_url(settings)),
            settings.key_prefix,
            retention_days=settings.retention_days,
            hooks=hooks_for(catalog.clinics),
        ),
        catalog=catalog,
        renderer=Renderer(catalog.templates_dir),
    )


@worker_process_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _warm_up(**_: object) -> None:
    """Load config, templates, Apprise and Redis before the first task needs them."""
    context()
    warm_up()


def _publish(claim: Claim) -> None:
    send_reminder.apply_async(args=(claim.ref, claim.version, claim.claim), queue=SEND_QUEUE)


@app.task(name="reminders.pump", ignore_result=True)  # type: ignore[untyped-decorator]  # celery
def pump_task() -> int:
    """Claim due reminders and publish a send task for each."""
    ctx = context()
    return pump(
        ctx.store, _publish, batch=ctx.settings.pump_batch, lease_seconds=ctx.settings.lease_seconds
    )


# No attempt may outlive its send-ledger entry: the hard time limit ends it first (the soft
# one lets it record the outcome as unknown). Time limits need the prefork pool.
_SOFT_LIMIT, _HARD_LIMIT = get_settings().send_time_limit


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
    return send_claimed(context(), ref, version, claim)
