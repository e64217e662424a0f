"""Send one claimed reminder: fence, ledger, render, deliver, classify, record.

The Celery task in tasks.py only calls `send_claimed`. Fencing and the ledger make a
redelivered or duplicated task a no-op; a transient failure goes back into the
schedule with backoff (never a Celery countdown); a permanent one is dead-lettered.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from .catalog import Catalog
from .delivery import Envelope, deliver
from .errors import ConfigError, DeliveryError
from .models import Booking
from .rendering import Renderer
from .settings import Settings
from .store import Store, split_ref

log = logging.getLogger(__name__)
IN_FLIGHT_MARGIN = 1.0  # seconds past an in-flight attempt's ledger expiry before trying again


@dataclass
class Context:
    """What a send needs, built once per worker process."""

    settings: Settings
    store: Store
    catalog: Catalog
    renderer: Renderer


def compute_backoff(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Return seconds to wait before attempt `attempt + 1`: exponential, capped, jittered.

    Full jitter over the upper half keeps retries spread out without ever retrying
    sooner than half the nominal delay.
    """
    nominal = min(cap, base * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(nominal / 2, nominal)


def send_claimed(ctx: Context, ref: str, version: str, claim: str) -> str:
    """Send the reminder `ref` if this task still owns it; return what happened."""
    settings, store = ctx.settings, ctx.store
    token = uuid.uuid4().hex
    ledger_ms = settings.lease_seconds * 1000
    verdict = store.begin_send(ref, version, claim, token, ledger_ms)
    if verdict == "in flight":
        # A previous attempt whose lease ran out may still be talking to the provider.
        # Try again just after that attempt's ledger entry expires (or it finishes first).
        retry_at = datetime.now(UTC) + timedelta(seconds=store.ledger_ttl(ref) + IN_FLIGHT_MARGIN)
        if store.requeue(ref, retry_at, "another attempt is in flight", claim=claim):
            log.info("send %s: another attempt is in flight; requeued", ref)
            return "requeued"
        log.info("send %s: the attempt in flight finished meanwhile; dropped", ref)
        return "dropped: finished meanwhile"
    if verdict != "ok":
        log.info("send %s: dropped (%s)", ref, verdict)
        return f"dropped: {verdict}"

    record = store.record(ref)
    attempt = int(record.get("attempts", 1))
    started = time.monotonic()
    now = datetime.now(UTC)
    try:
        detail = _deliver(ctx, ref, record, now)
    except DeliveryError as exc:
        outcome = _failed(ctx, ref, token, attempt, exc)
        store.log_attempt(
            ref,
            {
                "at": now.isoformat(),
                "attempt": attempt,
                "outcome": outcome,
                "error": exc.reason,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return outcome
    sent_at = datetime.now(UTC)
    if not store.finish_sent(ref, token, sent_at):
        log.warning(
            "send %s: delivered after its ledger entry expired (a send slower than the "
            "lease); recorded as sent",
            ref,
        )
    store.log_attempt(
        ref,
        {
            "at": now.isoformat(),
            "attempt": attempt,
            "outcome": "sent",
            "detail": detail,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    log.info("send %s: sent (attempt %d, %s)", ref, attempt, record.get("channel"))
    return "sent"


def _deliver(ctx: Context, ref: str, record: dict[str, str], now: datetime) -> str:
    """Render and deliver; every problem becomes a DeliveryError."""
    clinic_id, booking_id, _ = split_ref(ref)
    try:
        booking = Booking.model_validate(ctx.store.booking_doc(clinic_id, booking_id))
    except ValidationError as exc:
        raise DeliveryError(
            f"stored booking no longer valid: {exc.error_count()} error(s)", permanent=True
        ) from None
    clinic = ctx.catalog.clinics.get(clinic_id)
    protocol = ctx.catalog.protocols.get(booking.treatment)
    if clinic is None or protocol is None:
        raise DeliveryError("clinic or protocol no longer configured", permanent=True)
    channel = record["channel"]
    try:
        message = ctx.renderer.render(
            template=record["template"],
            channel=channel,
            booking=booking,
            clinic=clinic,  # type: ignore[arg-type]
            protocol=protocol,
            occurrence=int(record.get("occurrence", 1)),
            due_at=datetime.fromtimestamp(float(record["planned_epoch"]), UTC),
            plan_dates=ctx.store.plan_dates(clinic_id, booking_id),
        )
        to = booking.patient.contact(channel)  # type: ignore[arg-type]
        url = clinic.channel_url(channel, to) if channel in clinic.channels else None  # type: ignore[index]
    except ConfigError as exc:
        raise DeliveryError(str(exc), permanent=True) from None
    except KeyError:
        raise DeliveryError(f"the patient has no {channel} contact", permanent=True) from None
    except Exception as exc:  # a template that fails to render cannot succeed on retry
        raise DeliveryError(
            f"cannot render {record['template']} ({type(exc).__name__})", permanent=True
        ) from None
    envelope = Envelope(ref=ref, clinic=clinic_id, channel=channel, to=to)  # type: ignore[arg-type]
    return deliver(
        url,
        envelope,
        message,
        outbox=ctx.settings.outbox,
        timeout=ctx.settings.send_timeout_seconds,
        now=now,
    )


def _failed(ctx: Context, ref: str, token: str, attempt: int, exc: DeliveryError) -> str:
    settings, store = ctx.settings, ctx.store
    now = datetime.now(UTC)
    if exc.permanent:
        store.finish_failed(ref, token, now, f"permanent failure: {exc.reason}")
        log.warning(
            "send %s: permanent failure on attempt %d: %s; dead-lettered", ref, attempt, exc.reason
        )
        return "failed"
    if attempt >= settings.max_attempts:
        store.finish_failed(ref, token, now, f"gave up after {attempt} attempts: {exc.reason}")
        log.warning(
            "send %s: gave up after %d attempts: %s; dead-lettered", ref, attempt, exc.reason
        )
        return "failed"
    delay = compute_backoff(
        attempt, base=settings.backoff_base_seconds, cap=settings.backoff_cap_seconds
    )
    store.finish_retry(ref, token, now + timedelta(seconds=delay), exc.reason)
    log.info(
        "send %s: transient failure on attempt %d (%s); retry in %.1fs",
        ref,
        attempt,
        exc.reason,
        delay,
    )
    return "retrying"
