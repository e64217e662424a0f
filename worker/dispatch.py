"""Where a reminder is sent: fence, ledger, send-time rules, render, deliver, classify, record.

The Celery task in tasks.py only calls `send_claimed`. Fencing and the ledger make a
redelivered or duplicated task a no-op. At the moment of sending the reminder's time
rules are checked again (its expiry; the patient's send window), so retries, replays and
a backlog after an outage obey them too. Outcomes:
  sent       recorded (always, even if the clinic's change overtook the attempt)
  transient  back into the schedule with backoff, at the send window's next opening
  permanent  (or out of attempts) dead-lettered with the reason
  unknown    (a timeout, a connection broken after the hand-over) the ledger is kept
             until it expires and the reminder retried only after: never two live attempts
Every finish is fenced by version, claim and token in one Lua script (store.py).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from .catalog import Catalog
from .clinics import SendWindow
from .delivery import Envelope, deliver
from .errors import ConfigError, DeliveryError
from .models import Booking, Channel
from .planner import SendTime, at_send_time, next_opening
from .rendering import RenderedMessage, Renderer
from .settings import Settings
from .store import IN_FLIGHT_MARGIN, Attempt, Store, split_ref

log = logging.getLogger(__name__)
T = TypeVar("T")
Place = tuple[SendWindow, ZoneInfo]  # a booking's send window and the patient's timezone


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


def durably(call: Callable[[], T], deadline: float, what: str) -> T:
    """Run a Redis call until it succeeds or `deadline` (time.monotonic()) passes.

    The client already retries for about 30 s; this outlasts a longer Redis restart for
    what must not be lost (the record of a delivery that happened).
    """
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: Redis unreachable; trying again", what)
            time.sleep(1.0)


def send_claimed(ctx: Context, ref: str, version: str, claim: str) -> str:
    """Send the reminder `ref` if this task still owns it; return what happened."""
    settings, store = ctx.settings, ctx.store
    started = time.monotonic()
    # Nothing of this attempt may outlive its ledger entry (lease_seconds from here): stop
    # retrying Redis a little before the soft time limit.
    deadline = started + settings.send_time_limit[0] - 1
    attempt = Attempt(version=version, claim=claim, token=uuid.uuid4().hex)
    verdict = store.begin_send(ref, version, claim, attempt.token, settings.lease_seconds * 1000)
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

    now = datetime.now(UTC)
    entry: dict[str, Any] = {"at": now.isoformat()}
    number = 1
    place: Place | None = None  # the send window and timezone, once read
    try:  # everything before the hand-over: a failure here cannot have sent anything
        record, stored_booking = store.record_and_booking(ref)
        number = int(record.get("attempts", 1))
        entry["attempt"] = number
        attempt = replace(attempt, planned=record.get("planned_epoch", ""),
                          template=record.get("template", ""))
        booking, place = _booking(ctx, ref, stored_booking)
        rule = _send_time(record, *place, now)
        if rule.action != "send":
            return _hold_back(store, ref, attempt, rule, entry)
        url, envelope, message = _render(ctx, ref, record, booking, now)
        if not store.still_owned(ref, attempt):
            # The clinic's change landed since begin: do not hand it over at all.
            result = store.finish(ref, attempt, "abandon", at=now, entry=entry)
            log.info("send %s: overtaken before sending; dropped (%s)", ref, result)
            return "dropped: overtaken before sending"
    except DeliveryError as exc:
        return _failed(ctx, ref, attempt, number, exc, entry, started, deadline, place)
    except Exception as exc:  # Redis, a soft time limit, a bug: nothing was handed over
        problem = DeliveryError(f"could not prepare the message ({type(exc).__name__})")
        log.warning("send %s: %s", ref, problem.reason)
        return _failed(ctx, ref, attempt, number, problem, entry, started, deadline, place)
    try:
        detail = deliver(url, envelope, message, outbox=settings.outbox,
                         timeout=settings.send_timeout_seconds, now=now)
    except DeliveryError as exc:
        return _failed(ctx, ref, attempt, number, exc, entry, started, deadline, place)
    except Exception as exc:  # SoftTimeLimitExceeded or worse mid hand-over: it may have gone
        unknown = DeliveryError(f"the send was interrupted ({type(exc).__name__})", unknown=True)
        return _failed(ctx, ref, attempt, number, unknown, entry, started, deadline, place)
    result = durably(
        lambda: store.finish_sent(
            ref,
            attempt,
            datetime.now(UTC),
            entry | {"detail": detail, "seconds": round(time.monotonic() - started, 3)},
        ),
        deadline,
        f"send {ref}",
    )
    if result != "ok":
        log.warning("send %s: delivered; %s", ref, result)
    log.info("send %s: sent (attempt %d, %s)", ref, number, record.get("channel"))
    return "sent"


def _booking(ctx: Context, ref: str, stored: dict[str, str]) -> tuple[Booking, Place]:
    """Return the stored booking and its place in time: send window, patient's timezone."""
    clinic_id = split_ref(ref)[0]
    try:
        booking = Booking.model_validate_json(stored["doc"])
    except (KeyError, ValidationError) as exc:
        count = exc.error_count() if isinstance(exc, ValidationError) else 1
        raise DeliveryError(
            f"stored booking no longer valid: {count} error(s)", permanent=True
        ) from None
    start, _, end = stored.get("window", "").partition("-")
    clinic = ctx.catalog.clinics.get(clinic_id)
    if start and end:
        window = SendWindow.model_construct(start=int(start), end=int(end))
    elif clinic is not None:
        window = clinic.send_window
    else:
        raise DeliveryError("clinic no longer configured", permanent=True)
    return booking, (window, ZoneInfo(booking.patient.timezone))


def _send_time(record: dict[str, str], window: SendWindow, tz: ZoneInfo, now: datetime) -> SendTime:
    expires = record.get("expires_epoch")
    return at_send_time(
        now,
        window,
        tz,
        datetime.fromtimestamp(float(expires), UTC) if expires else None,
        record.get("expires_note", ""),
    )


def _hold_back(
    store: Store, ref: str, attempt: Attempt, rule: SendTime, entry: dict[str, Any]
) -> str:
    """Defer to the window's next opening, or skip an expired reminder; nothing is sent."""
    if rule.action == "defer":
        assert rule.at is not None
        result = store.finish_defer(ref, attempt, rule.at, rule.reason, entry)
        log.info("send %s: deferred to the send window's next opening (%s)", ref, result)
        return "deferred"
    result = store.finish_skip(ref, attempt, rule.reason, entry)
    log.info("send %s: skipped at send time: %s (%s)", ref, rule.reason, result)
    return "skipped"


def _render(
    ctx: Context, ref: str, record: dict[str, str], booking: Booking, now: datetime
) -> tuple[str | None, Envelope, RenderedMessage]:
    """Return (Apprise URL or None for the outbox, envelope, message); problems of the
    configuration or the templates are permanent DeliveryErrors."""
    clinic_id, booking_id, _ = split_ref(ref)
    clinic = ctx.catalog.clinics.get(clinic_id)
    protocol = ctx.catalog.protocols.get(booking.treatment)
    if clinic is None or protocol is None:
        raise DeliveryError("clinic or protocol no longer configured", permanent=True)
    channel = cast(Channel, record["channel"])
    plan_dates = ctx.store.plan_dates(clinic_id, booking_id)  # Redis errors are transient
    try:
        message = ctx.renderer.render(
            template=record["template"],
            channel=channel,
            booking=booking,
            clinic=clinic,
            protocol=protocol,
            occurrence=int(record.get("occurrence", 1)),
            due_at=datetime.fromtimestamp(float(record["planned_epoch"]), UTC),
            plan_dates=plan_dates,
            now=now,
        )
        to = booking.patient.contact(channel)
        url = clinic.delivery_url(channel, to)
    except ConfigError as exc:
        raise DeliveryError(str(exc), permanent=True) from None
    except KeyError:
        raise DeliveryError(f"the patient has no {channel} contact", permanent=True) from None
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # a template that fails to render cannot succeed on retry
        raise DeliveryError(
            f"cannot render {record['template']} ({type(exc).__name__})", permanent=True
        ) from None
    return url, Envelope(ref=ref, clinic=clinic_id, channel=channel, to=to), message


def _failed(
    ctx: Context,
    ref: str,
    attempt: Attempt,
    number: int,
    exc: DeliveryError,
    entry: dict[str, Any],
    started: float,
    deadline: float,
    place: Place | None,
) -> str:
    settings, store = ctx.settings, ctx.store
    entry = entry | {"error": exc.reason, "seconds": round(time.monotonic() - started, 3)}
    now = datetime.now(UTC)
    if exc.unknown and number < settings.max_attempts:
        result = durably(
            lambda: store.finish_unknown(ref, attempt, exc.reason, entry), deadline, ref
        )
        log.warning("send %s: outcome unknown on attempt %d (%s); %s", ref, number, exc.reason,
                    "retried after its ledger expires" if result == "ok" else result)
        return "unknown"
    if exc.permanent or number >= settings.max_attempts:
        if exc.permanent:
            reason = f"permanent failure: {exc.reason}"
        elif exc.unknown:  # never an endless series of possible duplicates
            reason = (f"gave up after {number} attempts, the last of unknown outcome (it may "
                      f"have been delivered): {exc.reason}")
        else:
            reason = f"gave up after {number} attempts: {exc.reason}"
        result = durably(lambda: store.finish_failed(ref, attempt, reason, entry), deadline, ref)
        log.warning("send %s: %s; %s", ref, reason,
                    "dead-lettered" if result == "ok" else f"not dead-lettered ({result})")
        return "failed"
    delay = compute_backoff(
        number, base=settings.backoff_base_seconds, cap=settings.backoff_cap_seconds
    )
    retry_at = now + timedelta(seconds=delay)
    if place is not None:  # a retry waits for the patient's send window like any other send
        retry_at = next_opening(retry_at, *place)
    result = durably(
        lambda: store.finish_retry(ref, attempt, retry_at, exc.reason, entry), deadline, ref
    )
    log.info(
        "send %s: transient failure on attempt %d (%s); retry at %s (%s)",
        ref, number, exc.reason, retry_at.isoformat(timespec="seconds"), result,
    )
    return "retrying"
