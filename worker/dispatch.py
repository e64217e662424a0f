"""Where a reminder is sent: fence, ledger, send-time rules, render, deliver, classify, record.

One attempt (`attempt`) is what it always was. Fencing and the ledger make a redelivered or
duplicated task a no-op. At the moment of sending the reminder's time rules are checked
again (its expiry; the patient's send window), so retries, replays and a backlog after an
outage obey them too. Outcomes:
  sent       recorded (always, even if the clinic's change overtook the attempt)
  transient  back into the schedule with backoff, at the send window's next opening
             (skipped at once if that is at or after its expiry)
  permanent  (or out of attempts) dead-lettered with the reason
  unknown    (a timeout, a connection broken after the hand-over) the ledger is kept
             until it expires and the reminder retried only after: never two live attempts
             (out of attempts: dead-lettered, the ledger kept all the same: a replay waits)
Every finish is fenced by version, claim and token in one Lua script (store.py).

The SMS cap at send time (`_capped`). An SMS whose time moves at send time onto another
patient-local day (deferred to the window's next opening, a retry's backoff, or found after
its day had passed: a backlog, a replay, `_late_sms`) is capped
there as the planner caps (worker/planner.py `cap_at_send`, `cap_sms`'s rules): kept (it
fits; a care-critical SMS beyond the cap, saying so), moved to the next day with room before
it expires, skipped for its step's email, sent by an email of its step instead (added to the
booking), or skipped, each with the reason. It counts the patient's SMS at the clinic, this
booking's and the other bookings' (`Store.send_caps_read`, read in Python: the patient's
timezone is needed); the finish script writes the decision only if every one of those SMS
is still what was read (else "caps changed": read and decide again); a late SMS that goes
at once is first counted on its new day by a script with the same check (`Store.restamp`).
Residual: none between the read and the write; an upsert of another booking that read this
SMS before it moved sees the move through the booking's `smsv` (its apply checks it beside
the version). An email going by SMS (flag "s") is capped as an SMS. Not capped: a move
within the same patient-local day (it was counted on that day already; but a dead SMS
replayed, flag "r", was counted on no day: capped even on its own), and a change notice
(never capped, as when planned: a missing "your visit moved" sends the patient on the
wrong day). The pause message again for a new date
(`repause`) and a step again (`again-<step>`) are care-critical when their step is.
An email the cap sent instead of its step's SMS that its begin skips for the patient's
email unsubscribe (its attempt at work when the patient unsubscribed, which the
unsubscribe's re-cap left to it, did not deliver it) caps the patient's bookings again
(`_recap_stand_in`, `Store.recap`): the step goes by SMS on a day with room, or says why not.

Batches (`hand_over`). The pump hands claims to a send task in batches, one queue per
channel (worker/pump.py). The task hands its claims to this process's senders for the
claims' channel (`Lanes`: a bounded thread pool per channel, `send_threads` threads) and
returns; its message is acknowledged then (acks late: a worker lost before that gives the
batch back to the broker). From then on each claim is guarded like any attempt in flight:
by its lease (a worker killed before the claim's outcome is recorded loses nothing: the
pump claims it again once the lease runs out) and by its ledger (nothing is sent twice).
Before queueing them the senders note the batch's claims as held by this process
(`Lanes.hold`, one round trip): should the process go without a word (SIGKILL, its
container removed, the OOM killer) or stall past its registration's lapse (REGISTER_TTL),
the pump stops counting them against the channel and hands back, fenced by their claim,
those not begun (worker/pump.py `_LAPSED`): the other workers send them within seconds of
the lapse, not a lease later, and are not kept idle meanwhile.
The task does not wait for the sends, so a slow provider holds only its own channel's
threads: never a Celery pool process, never the other channel, never the pump; and, once
measured slow, no more than its share of them (`Lanes`, "One provider's share"): never
another clinic's provider. (Only when
this process's senders for the channel have more than a round of claims waiting does the
task wait, at most BACKPRESSURE_SECONDS, so that Celery gives the next batches to another
pool process: the pump hands out no more than all senders take, but Celery would give
them all to whichever pool process is free first. The wait ends as soon as a message of
another queue the worker takes waits in the broker, `others_waiting`: the pool processes
are all the worker has to take messages with, and a channel whose batches held them in
turn let the other channel's batches in only one between two of its holds, so that the
two drained in lockstep, at the pace of the busier one.)

Why threads, and why this is safe with them: a send waits on the network almost all the
time. Nothing shared changes during a send: the Redis client is thread-safe (a connection
pool), the catalog is read-only, the Jinja2 environment's template cache is locked, each
message gets its own Apprise object, and delivery.py classifies each send from what that
call observed only (its own captured lines and HTTP statuses, per context).

When a claim may begin. A claim is begun only while its lease leaves time for a send:
before `claimed_at + min(lease_seconds - send_timeout_seconds - 1, send_max_wait_seconds)`.
A claim still waiting for a free thread after that is handed back to the schedule at once
(`Store.requeue`, due now): never left to sit until its lease runs out and be claimed again
behind a stale task. The pump sizes batches so that this is rare. `claimed_at` is an
instant on Redis's clock (the pump reads it there), so the deadline is compared with this
process's reading of Redis's clock (`CLOCK`, worker/clock.py: read when the senders start
and every few seconds after), never with this host's own: a host whose clock runs
ahead of the pump's still begins its claims.

A claim Redis cut off before it began. With Redis unreachable past the client's retries
(half a minute or more) and the claim's start-by, or refusing writes (or busy running a
script: BUSY) until then, the begin gives up: nothing was handed to a provider, and the
hand-back fails too. The senders remember the claim
(`Lanes.owe`) and hand it back, due now, as soon as Redis takes it (`hand_back_owed`,
tried every OWED_RETRY_SECONDS by the senders' reporting thread, and once more at a warm
shutdown), then nudge the pump: after a Redis restart of a minute the reminder goes within
seconds, not once its lease runs out (5 minutes by default). The hand-back is fenced as any
(`Store.requeue`): only while the reminder is still `sending` under that claim and no
attempt of that claim holds the ledger, so a cancel or opt-out, a copy of the same task
that began meanwhile (or whose begin ran but whose answer was lost), and the pump's claim
again once the lease ran out each win over it. Kept until the claim's lease ends, then
left to the pump. (The single-reminder task has no senders to remember it: its lease.)

No attempt outlives its ledger entry. The entry lives `lease_seconds` from the attempt's
start; a send's sockets time out long before (`lease_seconds > 2 x send_timeout_seconds +
1`, checked by the settings), and Redis retries (`durably`) stop 4 s before it. Should a
send hang anyway (a provider trickling bytes under every socket timeout), a watchdog ends
this process 1 s before that attempt's entry would expire, as the prefork pool's hard time
limit ended the single-reminder task before: the Celery parent replaces the process. Just
before, the claims its senders have not begun (any clinic's, waiting behind the overrunning
provider's sends) go back to the schedule, due now (`Lanes.abandon`); the lease brings back
the attempts that were under way.

Warm shutdown (SIGTERM to the Celery worker, as `docker stop` sends; `Lanes.close`). The
pool process learns it within about a second (its pool is closed; worker/tasks.py `_drain`):
no new pump run starts in it, its senders leave the pump's count, claims waiting for a
thread go back to the schedule at once (due now, fenced by their claim), and an attempt
that has not handed its message over yet goes back too (the fenced "abandon" finish):
another worker sends them within seconds, not a lease later. Sends talking to their
provider get `shutdown_grace_seconds` to finish and be recorded; one still talking then may
have been delivered, so it is recorded as of unknown outcome (its ledger kept: tried again
once the ledger expires, never twice at once) and the process ends, closing its sockets;
should its provider accept it before the process has ended, that delivery is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from .catalog import Catalog, changed_lately, config_stamp
from .clinics import SendWindow
from .clock import RedisClock
from .delivery import Envelope, deliver, smtp_sessions
from .errors import ConfigError, DeliveryError
from .health import not_run
from .invites import content_key, sequence_of, with_sequence
from .logs import about_reminder
from .models import CHANNELS, Booking, Channel
from .notices import as_told, as_told_fields, base_step, notice_and_invite, sent
from .observe import observe_lateness, observe_send
from .optout import UNSUBSCRIBE_SECRET, contact_hash, make_token, unsubscribe_key
from .planner import (
    PlannedReminder,
    SendTime,
    at_send_time,
    cap_at_send,
    next_opening,
    protected_steps,
)
from .protocols import HOLD_NOTICE_STEP, NOTICE_STEPS, REPAUSE_STEP
from .pump import HAND_BACK_MIN, Keys, channel_of, process_node, sender_member
from .rendering import TEMPLATE_NOT_FOUND, RenderedMessage, Renderer
from .settings import Settings
from .status import Status
from .store import (
    IN_FLIGHT_MARGIN,
    IN_FLIGHT_REQUEUED,
    Attempt,
    Begun,
    SendCapped,
    Store,
    attempt_token,
    key_parts,
    split_ref,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Redis's clock as this process sees it: start-by deadlines, the senders' registrations and
# every due instant a send writes back relative to now (a retry's backoff, a hand-back) are
# instants on it. (`time.time` looked up at each call: this module's clock.)
CLOCK = RedisClock(lambda: time.time())
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
    what must not be lost (the record of a delivery that happened). So does a Redis that
    refuses writes for a while (NOREPLICAS: a master with `min-replicas-to-write` whose
    replica lags; OOM, MISCONF, READONLY), or that is busy running a Lua script past
    `busy-reply-threshold` (BUSY: anyone's script on the same Redis, until it ends or SCRIPT
    KILL): nothing was run, so trying again is safe, and a delivery given up then was sent
    again once its ledger expired.
    """
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: Redis unreachable; trying again", what)
        except redis.ResponseError as exc:
            why = not_run(exc)
            if why is None or time.monotonic() >= deadline:
                raise
            log.warning("%s: Redis %s (%s); trying again", what,
                        "is busy running a script" if why == "BUSY" else "refuses writes", why)
        time.sleep(1.0)


def send_claimed(ctx: Context, ref: str, version: str, claim: str) -> str:
    """Send the reminder `ref` now, in this thread, if this task still owns it; return what
    happened. (The single-reminder task; batches go through `hand_over`.)"""
    try:
        return attempt(ctx, ref, version, claim, watchdog=watchdog())
    except NotBegun as exc:  # no senders here to hand it back later: its lease brings it back
        log.warning("send %s: not begun (%s); its lease brings it back", ref, exc.why)
        return "not begun: Redis unreachable or refusing writes"


class NotBegun(redis.ConnectionError):
    """An attempt that never began (nothing was handed to a provider) whose claim Redis
    could not take back: unreachable past the client's retries, or refusing writes. Its
    senders hand it back as soon as Redis takes it (`Lanes.owe`), not a lease later."""

    def __init__(self, ref: str, claim: str, reason: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__} before the attempt began")
        self.ref, self.claim, self.reason = ref, claim, reason
        self.why = type(cause).__name__


@about_reminder  # every line of an attempt carries its ids (worker/logs.py)
def attempt(
    ctx: Context,
    ref: str,
    version: str,
    claim: str,
    *,
    start_by: float | None = None,
    begun: Callable[[], None] | None = None,
    watchdog: Watchdog | None = None,
    guard: Lanes | None = None,
) -> str:
    """One attempt at a claimed reminder; return what happened.

    `start_by` (Redis's clock, `CLOCK`): past it the claim is handed back to the schedule instead of
    begun. `begun` is called once the attempt has taken its ledger, or knows it will not.
    `watchdog` ends the process should the attempt outlive its ledger entry. `guard` (the
    senders running it) says when the process is stopping: an attempt not yet handed to
    the provider then goes back to the schedule, and one handing over may be cut.
    """
    settings, store = ctx.settings, ctx.store
    seen = ctx.catalog
    catalog = seen.fresh(settings)  # config/ edited: read again
    if catalog is not seen:
        # Only a catalog just read is put in `ctx`: one that read `ctx.catalog` before
        # another thread's fresh gets the old catalog back, which must not replace the new.
        ctx.catalog = catalog
    # This attempt reads that catalog throughout (fenced, ruled and rendered with one
    # configuration), though another sender thread may put a newer one in `ctx` meanwhile.
    ctx = replace(ctx, catalog=catalog)
    if start_by is not None and CLOCK.now() > start_by:
        if begun:
            begun()
        stopping = guard is not None and guard.stopping()
        reason = STOPPING_NOT_BEGUN if stopping else NOT_STARTED
        try:
            handed = store.requeue(ref, CLOCK.now_utc(), reason, claim=claim)
        except redis.RedisError as exc:
            raise NotBegun(ref, claim, reason, exc) from exc
        if handed:
            log.info("send %s: %s; handed back to the schedule", ref,
                     "the worker is stopping" if stopping else "not started in time")
            return "handed back"
        log.info("send %s: not started in time; dropped (finished or claimed again)", ref)
        return "dropped: finished meanwhile"
    started = time.monotonic()
    # Nothing of this attempt may outlive its ledger entry (lease_seconds from here): stop
    # retrying Redis a little before the watchdog would end the process.
    soft, hard = settings.send_time_limit
    deadline = started + soft - 1
    token = attempt_token(claim)
    # An email's begin also reads the unsubscribe links' secret as stored (no round trip
    # of its own), unless the settings give it.
    secret = UNSUBSCRIBE_SECRET if (settings.unsubscribe_secret is None
                                    and channel_of(ref) == "email") else None
    # A begin refused by Redis (a replica lagging behind `min-replicas-to-write`: NOREPLICAS;
    # OOM, MISCONF, READONLY; BUSY, another script running) wrote nothing: tried again while
    # the claim may still begin (its start-by), not left `sending` until its lease runs out.
    begin_by = started + (max(0.0, start_by - CLOCK.now()) if start_by is not None
                          else min(settings.send_max_wait_seconds, soft - 1))
    try:
        verdict = durably(
            lambda: store.begin_send(ref, version, claim, token, settings.lease_seconds * 1000,
                                     critical=ctx.catalog.critical_steps, secret=secret),
            begin_by, f"send {ref}")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Unreachable past the client's retries and the claim's start-by: not begun (or
        # begun with its answer lost: its ledger then keeps the hand-back off).
        raise NotBegun(ref, claim, UNREACHABLE_NOT_BEGUN, exc) from exc
    except redis.ResponseError as exc:
        why = not_run(exc)
        if why is None:
            raise
        return _refused_at_begin(store, ref, claim, why)
    finally:
        if begun:
            begun()
    if verdict == "in flight":
        # A previous attempt whose lease ran out may still be talking to the provider.
        # Try again just after that attempt's ledger entry expires (or it finishes first).
        # Due on the pump's clock (Redis's): the ledger's TTL is Redis's too.
        retry_at = CLOCK.now_utc() + timedelta(seconds=store.ledger_ttl(ref) + IN_FLIGHT_MARGIN)
        if store.requeue(ref, retry_at, IN_FLIGHT_REQUEUED, claim=claim):
            log.info("send %s: another attempt is in flight; requeued", ref)
            return "requeued"
        log.info("send %s: the attempt in flight finished meanwhile; dropped", ref)
        return "dropped: finished meanwhile"
    if verdict not in ("ok", "ok sms"):
        log.info("send %s: dropped (%s)", ref, verdict)
        if verdict == "opted out" and channel_of(ref) == "email":
            _recap_stand_in(ctx, ref)
        return f"dropped: {verdict}"
    watch = watchdog.watch(ref, started + hard) if watchdog else contextlib.nullcontext()
    with watch:
        return _send(ctx, ref, Attempt(version=version, claim=claim, token=token), started,
                     deadline, guard, via_sms=verdict == "ok sms",
                     begun=verdict if isinstance(verdict, Begun) else Begun(str(verdict)))


def _recap_stand_in(ctx: Context, ref: str) -> None:
    """An email its begin just skipped for the patient's email unsubscribe, of a step that
    goes by SMS (its protocol's channels) with no SMS of it to go or gone, of a patient who
    allows SMS for the booking: an email the SMS cap sent instead of the step's SMS. The
    unsubscribe caps the patient's bookings again so that such a step goes by SMS on a day
    with room (`Store.recap`), but leaves an email at its provider then to its attempt; one
    that did not deliver (answered "try later", deferred, of unknown outcome) reaches this
    begin, and its step would be lost. Cap the patient's bookings again now, as the
    unsubscribe does. Best effort: the skip is recorded already; should Redis fail here, a
    re-submission of the booking caps it again as well."""
    store = ctx.store
    clinic, booking_id, key = split_ref(ref)
    try:
        own = store.record(f"{clinic}/{booking_id}/{key[: -len('email')]}sms")
        if own.get("status") in (Status.SCHEDULED, Status.SENDING, Status.RETRYING,
                                 Status.SENT):
            return  # the step's own SMS carries it
        doc = store.booking_doc(clinic, booking_id)
        patient = doc.get("patient") or {}
        protocol = ctx.catalog.protocols.get(str(doc.get("treatment")))
        spec = {s.id: s for s in protocol.steps}.get(
            base_step(key_parts(key)[0], None)) if protocol else None
        if spec is None or "sms" not in spec.channels or not patient.get("email") \
                or not patient.get("phone") or "sms" not in (patient.get("channels") or []):
            return
        changed = store.recap(clinic, patient["email"], ctx.catalog.replan)
    except Exception as exc:  # noqa: BLE001 - Redis, a booking gone, a bug: the skip stands
        log.warning("send %s: skipped for the email unsubscribe; the patient's bookings not "
                    "capped again (%s)", ref, type(exc).__name__)
        log.debug("send %s: the re-cap's error", ref, exc_info=True)
        return
    if changed:
        log.info("send %s: skipped for the email unsubscribe; capped again: %s", ref,
                 " ".join(changed))


def _refused_at_begin(store: Store, ref: str, claim: str, why: str) -> str:
    """Redis refused the begin's writes until the claim's start-by: nothing was begun (the
    begin writes nothing when refused). Hand the reminder back to the schedule, due now, if
    Redis takes that (out of memory it does: the hand-back's script begins with a write that
    grows nothing, removing the lease, and Redis refuses only a script's first write), so
    that it goes as soon as Redis takes writes again, not once its lease runs out; else
    (MISCONF, READONLY, NOREPLICAS, MASTERDOWN refuse it too, and BUSY runs nothing)
    `NotBegun`: its senders hand it back as soon as Redis takes it."""
    reason = REFUSED_NOT_BEGUN.format(why=why)
    try:
        handed = store.requeue(ref, CLOCK.now_utc(), reason, claim=claim)
    except redis.RedisError as exc:
        raise NotBegun(ref, claim, reason, exc) from exc
    if handed:
        log.warning("send %s: Redis refused writes (%s) until its start-by; handed back to "
                    "the schedule", ref, why)
        return "handed back"
    log.info("send %s: Redis refused writes (%s); dropped (finished or claimed again)", ref, why)
    return "dropped: finished meanwhile"


def _send(ctx: Context, ref: str, attempt: Attempt, started: float, deadline: float,
          guard: Lanes | None = None, *, via_sms: bool = False,
          begun: Begun | None = None) -> str:
    """The rest of an attempt that holds the ledger: rules, render, deliver, record.

    `begun`: the begin's answer; what it read with its fence (the booking's hash and
    document, the unsubscribe secret) is not read again."""
    settings, store = ctx.settings, ctx.store
    begun = begun if begun is not None else Begun("ok")
    now = datetime.now(UTC)
    entry: dict[str, Any] = {"at": now.isoformat()}
    number = 1
    place: Place | None = None  # the send window and timezone, once read
    moving: _Moving | None = None  # what the SMS cap needs should a retry move it
    try:  # everything before the hand-over: a failure here cannot have sent anything
        record, stored_booking = store.begun_record(ref, begun)
        number = int(record.get("attempts", 1))  # of its budget (afresh after a move, a replay)
        entry["attempt"] = number + int(record.get("earlier") or 0)  # of all made at it
        attempt = replace(attempt, planned=record.get("planned_epoch", ""),
                          template=record.get("template", ""),
                          booking=stored_booking.get("version", ""))
        booking, place = _booking(ctx, ref, stored_booking)
        moving = _Moving(record, booking, place[1], via_sms, stored_booking.get("ns", ""))
        rule = _send_time(record, *place, now)
        if rule.action != "send":
            return _hold_back(ctx, ref, attempt, rule, entry, moving)
        late = _late_sms(ctx, ref, attempt, entry, moving, now)
        if late is not None:
            return late
        wait = _told_in_flight(store, ref, record, begun)
        if wait is not None:
            # A message sent before the change is at its provider: this notice must not
            # arrive before it, and may name what it told. Once its outcome is known.
            # (Deferred as to the window's opening: an SMS is capped where it lands.)
            # (The wait is a TTL in Redis: counted from the pump's clock, not this host's.)
            at = CLOCK.now_utc() + timedelta(seconds=wait + IN_FLIGHT_MARGIN)
            log.info("send %s: an earlier message of the booking is being sent", ref)
            return _hold_back(ctx, ref, attempt, SendTime("defer", at, TOLD_IN_FLIGHT), entry,
                              moving)
        with store.reading(ref, begun):
            url, envelope, message, headers, link = _render(
                ctx, ref, record, booking, now, stored_booking, via_sms=via_sms,
                secret=begun.secret, window=place[0])
        if via_sms:
            entry["via"] = "sms: the patient unsubscribed from email; a care-critical step"
        if not store.still_owned(ref, attempt, send_to=(envelope.channel, envelope.to),
                                 link=link):
            # The clinic's change landed since begin: do not hand it over at all.
            result = store.finish(ref, attempt, "abandon", at=CLOCK.now_utc(), entry=entry)
            log.info("send %s: overtaken before sending; dropped (%s)", ref, result)
            return "dropped: overtaken before sending"
        if guard is not None and guard.stopping():
            # Nothing handed over yet: back to the schedule now, for another worker.
            result = store.finish(ref, attempt, "abandon",
                                  at=CLOCK.now_utc(),
                                  fields={"reason": STOPPED_BEFORE_SENDING}, entry=entry)
            log.info("send %s: the worker is stopping; handed back before sending (%s)",
                     ref, result)
            return "handed back"
        # The time rules again, now: the fence's round trip may have waited out a Redis
        # restart (the client retries for about half a minute) past the reminder's expiry
        # or the end of the send window.
        later = datetime.now(UTC)
        rule = _send_time(record, *place, later)
        if rule.action != "send":
            return _hold_back(ctx, ref, attempt, rule, entry, moving)
        # And the SMS cap's day: an SMS begun before the patient's midnight and handed over
        # after it goes on a day it was not counted on (that day may hold another SMS):
        # capped there as a late SMS (moved to the next slot the cap allows).
        if later.astimezone(place[1]).date() != now.astimezone(place[1]).date():
            late = _late_sms(ctx, ref, attempt, entry, moving, later)
            if late is not None:
                return late
        # And its words: written at `now` ("see you tomorrow", "you may resume as before"),
        # they may be wrong once the patient-local day changed or the visit began: handed
        # back at once (fenced), the next attempt writes them again.
        if (later.astimezone(place[1]).date() != now.astimezone(place[1]).date()
                or now < booking.starts_at <= later):
            result = store.finish(ref, attempt, "abandon",
                                  at=CLOCK.now_utc(),
                                  fields={"reason": WRITTEN_FOR_EARLIER}, entry=entry)
            log.info("send %s: written for an earlier moment; handed back to be written "
                     "again (%s)", ref, result)
            return "handed back"
    except DeliveryError as exc:
        return _failed(ctx, ref, attempt, number, exc, entry, started, deadline, place,
                           moving)
    except Exception as exc:  # Redis, a soft time limit, a bug: nothing was handed over
        problem = DeliveryError(f"could not prepare the message ({type(exc).__name__})")
        log.warning("send %s: %s", ref, problem.reason)
        return _failed(ctx, ref, attempt, number, problem, entry, started, deadline, place,
                           moving)
    handing = guard.handing_over(ref, attempt, entry, started) if guard else None
    channel, delivered, handed = str(record.get("channel")), "failed", time.monotonic()
    try:
        detail = deliver(url, envelope, message, headers=headers, outbox=settings.outbox,
                         timeout=settings.send_timeout_seconds, now=now)
        delivered = "sent"
    except DeliveryError as exc:
        if handing is not None and not handing.settle():
            return CUT
        return _failed(ctx, ref, attempt, number, exc, entry, started, deadline, place,
                           moving)
    except Exception as exc:  # SoftTimeLimitExceeded or worse mid hand-over: it may have gone
        if handing is not None and not handing.settle():
            return CUT
        unknown = DeliveryError(f"the send was interrupted ({type(exc).__name__})", unknown=True)
        return _failed(ctx, ref, attempt, number, unknown, entry, started, deadline, place,
                           moving)
    finally:
        observe_send(channel, delivered, time.monotonic() - handed)
    if handing is not None and not handing.settle():
        # Cut by the shutdown meanwhile and recorded as of unknown outcome, but it went out:
        # record the delivery over that (once, fenced by this attempt's token), or it would
        # be sent again once its ledger expires. The process is ending: tried again (Redis
        # refusing writes for a moment) only while the senders wait for it (CUT_WAIT_SECONDS).
        try:
            result = durably(lambda: store.finish_sent(ref, attempt, datetime.now(UTC), entry | {
                "detail": detail, "seconds": round(time.monotonic() - started, 3)}),
                time.monotonic() + CUT_WAIT_SECONDS - 1, f"send {ref}")
        except redis.RedisError:
            result = "not recorded (Redis unreachable)"
        log.warning("send %s: the provider accepted it after the worker's grace period, "
                    "once recorded as of unknown outcome: delivered (%s)", ref, result)
        return CUT
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
    observe_lateness(channel, time.time() - float(record.get("due_epoch") or time.time()))
    if result != "ok":
        log.warning("send %s: delivered; %s", ref, result)
    log.info("send %s: sent (attempt %d, %s)", ref, number, record.get("channel"))
    return "sent"


def _booking(ctx: Context, ref: str, stored: dict[str, str]) -> tuple[Booking, Place]:
    """Return the stored booking and its place in time: send window, patient's timezone.

    The send window is the clinic's as configured now: a clinic that narrows its window (a
    complaint; a window in US quiet hours corrected) stops texting in the old hours at
    once, for the bookings it stored before too. The window the booking was planned under
    (kept with it) only when the clinic's file is missing (its sends then fail as "not
    configured" all the same, `_render`)."""
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
    if clinic is not None:
        window = clinic.send_window
    elif start and end:
        window = SendWindow.model_construct(start=int(start), end=int(end))
    else:
        raise _unconfigured(ctx, ref, booking.treatment)
    return booking, (window, ZoneInfo(booking.patient.timezone))


def _unconfigured(ctx: Context, ref: str, treatment: str) -> DeliveryError:
    """The error of a reminder whose clinic or protocol file is missing from config/ as read
    now: transient (retried with backoff; given up only after max_attempts), logged as a
    WARNING naming the file. A file deleted by mistake, or missing while a deploy rewrites
    config/ (a git checkout, an rsync), must not dead-letter every due reminder of it, nor
    send it with words the configuration no longer has: once the file is back, the retry
    is sent with the configuration then."""
    settings = ctx.settings
    clinic_id = split_ref(ref)[0]
    if clinic_id not in ctx.catalog.clinics:
        path = settings.clinics_dir / f"{clinic_id}.toml"
    else:
        path = settings.protocols_dir / f"{treatment}.toml"
    log.warning("send %s: %s is not in config/ as read now (deleted, or being rewritten); "
                "retried later", ref, path)
    return DeliveryError(f"not configured: {path} is missing; retried later")


def _told_in_flight(store: Store, ref: str, record: dict[str, str],
                    begun: Begun) -> float | None:
    """For a change notice, return the seconds left to the longest attempt in flight of
    another message of its booking (its ledger holds a token: at its provider, or of
    unknown outcome), or None if there is none.

    A notice must not arrive before a message sent before the change ("see you tomorrow"
    after "your visit moved", "stop tretinoin tonight" after "cancelled: you may resume"),
    and what it names may depend on whether that message went (`untold`, worker/notices.py
    `as_told_fields`). The notices of its own change (same `<kind>#<seq>`) go together."""
    if record.get("step") not in (*NOTICE_STEPS, HOLD_NOTICE_STEP):
        # (The hold message names the date told before the hold, `held_from`, kept while a
        # message may have told it: it waits to know whether that message went.)
        return None
    clinic_id, booking_id, key = split_ref(ref)
    own = key.split(":", 1)[0]
    names: list[str] = list(begun.fields) if begun.read else cast(
        list[str], store.redis.hkeys(store.booking_key(clinic_id, booking_id)))
    refs = [f"{clinic_id}/{booking_id}/{name[:-1]}" for name in names
            if name.endswith("+") and ":" in name and name.split(":", 1)[0] != own]
    if not refs:
        return None
    pipe = store.redis.pipeline(transaction=False)
    for other in refs:
        pipe.get(store.ledger_key(other))
        pipe.pttl(store.ledger_key(other))
    found = pipe.execute()
    waits = [max(0, int(ttl)) / 1000 for ledger, ttl in zip(found[::2], found[1::2], strict=True)
             if ledger is not None and ledger != "sent"]
    return max(waits) if waits else None


def _went(store: Store, clinic_id: str, booking_id: str, prefixes: str) -> bool:
    """Whether one of the messages `untold` names went out (worker/notices.py
    `as_told_fields`): a store's own by its key prefix, on either channel; a plan's own
    ("<key>@<version>", store.py `_told_prefixes`) on its channel only, sent for that
    version or a later one."""
    for prefix in prefixes.split():
        key, at, version = prefix.partition("@")
        if not at:
            if any(sent(store.record(f"{clinic_id}/{booking_id}/{prefix}:{c}"))
                   for c in CHANNELS):
                return True
            continue
        record = store.record(f"{clinic_id}/{booking_id}/{key}")
        if sent(record) and int(record.get("sent_version") or 0) >= int(version or 0):
            return True
    return False


def _send_time(record: dict[str, str], window: SendWindow, tz: ZoneInfo, now: datetime) -> SendTime:
    expires = record.get("expires_epoch")
    return at_send_time(
        now,
        window,
        tz,
        datetime.fromtimestamp(float(expires), UTC) if expires else None,
        record.get("expires_note", ""),
    )


@dataclass(frozen=True)
class _Moving:
    """What the SMS cap needs of an attempt whose reminder's time moves at send time."""

    record: dict[str, str]
    booking: Booking
    tz: ZoneInfo
    # An email going by SMS (the patient unsubscribed from email; a care-critical step):
    # counted as an SMS (flag "s"), so capped as one.
    via_sms: bool = False
    # The booking's stored plan's pause and invite steps (its "ns" text id): a repause
    # stands for that pause step, as the store's scripts read it (`is_critical`).
    ns: str = ""


# Times the SMS cap's decision is made again when what it read changed before its finish.
CAP_TRIES = 5


def _capped(
    ctx: Context, ref: str, moving: _Moving | None, at: datetime, reason: str,
    finish: Callable[[PlannedReminder | None, SendCapped | None], str], *, tried: bool = False,
) -> str:
    """Finish an attempt whose reminder's time moves to `at` (a defer to the send window's
    next opening; a retry's backoff) through `finish(capped reminder, decision)`: for an SMS
    landing on another patient-local day, with the SMS cap applied there as the planner
    applies it (worker/planner.py `cap_at_send`), against the patient's other SMS at the
    clinic (this booking's and the others', `Store.send_caps_read`). The finish script checks
    that nothing of what was read changed ("caps changed": read and decide again, CAP_TRIES
    times; then decided once more and written without the check, logged). `finish(None,
    None)`: nothing to cap (not an SMS, the same day, no phone or clinic)."""
    phone = moving.booking.patient.phone if moving is not None else None
    if moving is None or phone is None or (moving.record.get("channel") != "sms"
                                           and not moving.via_sms):
        return finish(None, None)
    record, booking, tz = moving.record, moving.booking, moving.tz
    step = record.get("step", "")
    if step in NOTICE_STEPS:  # never capped, as when planned (worker/notices.py)
        return finish(None, None)
    clinic = ctx.catalog.clinics.get(split_ref(ref)[0])
    protocol = ctx.catalog.protocols.get(booking.treatment)
    was = datetime.fromtimestamp(float(record.get("due_epoch") or at.timestamp()), UTC)
    if clinic is None or protocol is None or (
            at.astimezone(tz).date() <= was.astimezone(tz).date()
            and record.get("replayed") != "1"):  # a dead SMS was counted on no day
        return finish(None, None)  # counted on that day already (or an early send: a test's)
    expires = record.get("expires_epoch")
    sms = PlannedReminder(
        key=split_ref(ref)[2], step=record["step"], channel="sms", template=record["template"],
        occurrence=int(record.get("occurrence", 1)), due_at=at, status=Status.SCHEDULED,
        reason=reason, expires_at=datetime.fromtimestamp(float(expires), UTC) if expires
        else None, expires_note=record.get("expires_note", ""))
    # By email only to a patient who takes email and has not unsubscribed from it (read here,
    # unfenced: an unsubscribe landing after this read skips that email at its begin).
    email = "email" in booking.patient.channels and booking.patient.email is not None \
        and not moving.via_sms \
        and ctx.store.opted_out(split_ref(ref)[0], "email", booking.patient.email) is None
    protected = protected_steps(protocol)
    # The pause message or a step again for a new date: care-critical as its step; the
    # pause message again as the pause step of the booking's own stored plan, as the store
    # reads it (`is_critical`), not of the protocol as configured now.
    pause = ctx.store.pause_step(moving.ns) if step == REPAUSE_STEP else None
    if base_step(step, pause) in protected:
        protected = protected | {step}
    for n in range(CAP_TRIES + 1):
        read = ctx.store.send_caps_read(ref, phone, at)
        if n == CAP_TRIES:
            log.warning("send %s: the patient's other SMS kept changing; the SMS cap decides "
                        "from the last read without checking it again", ref)
            read = replace(read, guard=[])
        out = cap_at_send(sms, clinic.sms, tz, email=email,
                          emailed=read.emailed and not moving.via_sms,
                          taken=read.taken, protected=protected)
        capped = SendCapped(read, tried=tried)
        if out.channel == "email":
            # The step's email copy may go after all when the finish runs: then this.
            goes = cap_at_send(sms, clinic.sms, tz, email=email, emailed=True,
                               taken=read.taken, protected=protected)
            over = out.reason.rsplit("; by email: ", 1)[-1]
            capped = replace(capped, by_email=out.due_at, email_reason=out.reason.lstrip("; "),
                             email_goes=goes.reason)
            out = replace(sms, status=Status.SKIPPED,
                          reason=f"not sent by SMS: {over}; by email instead")
        result = finish(out, capped)
        if result != "caps changed":
            return result
    raise AssertionError("unreachable: the last try is not checked")


LATE_DAY = "found after its patient-local day had passed (a backlog, a replay)"


def _late_sms(ctx: Context, ref: str, attempt: Attempt, entry: dict[str, Any],
              moving: _Moving, now: datetime) -> str | None:
    """An SMS (or an email going by SMS) about to go on a later patient-local day than the
    one it was counted on (a backlog after an outage, a replay, a re-opened SMS, a retry
    after an unknown outcome), or replayed from the dead letters (counted on no day): capped
    on today (`_capped`); None when it goes now, once counted on today (`Store.restamp`,
    fenced as a finish is)."""
    done: list[str] = []

    def finish(out: PlannedReminder | None, capped: SendCapped | None) -> str:
        done[:] = []
        if out is None or (out.status == Status.SCHEDULED and out.due_at == now):
            result = "ok" if capped is None else ctx.store.restamp(ref, attempt, now, capped)
            done.append("send" if result == "ok" else "dropped")
            return result
        if out.status == Status.SCHEDULED:
            done.append("deferred")
            return ctx.store.finish_defer(ref, attempt, out.due_at, out.reason, entry,
                                          capped=capped)
        done.append("skipped")
        return ctx.store.finish_skip(ref, attempt, out.reason, entry, capped=capped)

    result = _capped(ctx, ref, moving, now, LATE_DAY, finish)
    if done == ["send"]:
        return None
    if done == ["dropped"]:  # the clinic's change or another claim overtook it
        result = ctx.store.finish(ref, attempt, "abandon", at=CLOCK.now_utc(), entry=entry)
        log.info("send %s: overtaken before sending; dropped (%s)", ref, result)
        return "dropped: overtaken before sending"
    log.info("send %s: late onto a day at the SMS cap: %s (%s)", ref, done[0], result)
    return done[0]


def _hold_back(
    ctx: Context, ref: str, attempt: Attempt, rule: SendTime, entry: dict[str, Any],
    moving: _Moving | None = None,
) -> str:
    """Defer to the window's next opening, or skip an expired reminder; nothing is sent.
    A deferred SMS is capped where it lands (`_capped`): moved on, by email, or skipped."""
    store = ctx.store
    if rule.action == "defer":
        assert rule.at is not None
        at = rule.at
        done: list[str] = []

        def finish(out: PlannedReminder | None, capped: SendCapped | None) -> str:
            done[:] = []
            if out is None or out.status == Status.SCHEDULED:
                done.append("deferred")
                return store.finish_defer(ref, attempt, out.due_at if out else at,
                                          out.reason if out else rule.reason, entry,
                                          capped=capped)
            done.append("skipped")
            return store.finish_skip(ref, attempt, out.reason, entry, capped=capped)

        result = _capped(ctx, ref, moving, at, rule.reason, finish)
        log.info("send %s: %s at send time (%s)", ref,
                 "deferred to the send window's next opening" if done == ["deferred"]
                 else "not sent by SMS: the SMS cap", result)
        return done[0]
    result = store.finish_skip(ref, attempt, rule.reason, entry)
    log.info("send %s: skipped at send time: %s (%s)", ref, rule.reason, result)
    return "skipped"


def _render(
    ctx: Context, ref: str, record: dict[str, str], booking: Booking, now: datetime,
    stored: dict[str, str] | None = None, *, via_sms: bool = False, secret: str | None = None,
    window: SendWindow | None = None,
) -> tuple[str | None, Envelope, RenderedMessage, dict[str, str], str | None]:
    """Return (Apprise URL or None for the outbox, envelope, message, extra headers, the id
    of the unsubscribe link it carries); problems of the configuration or the templates
    are permanent DeliveryErrors. `stored`: the booking's fields (the calendar invite's
    sequence, what a change notice says).

    `via_sms`: an email reminder of a care-critical step goes by SMS (the patient
    unsubscribed from email). An email carries its unsubscribe link in the footer and in
    the List-Unsubscribe headers (RFC 2369, RFC 8058 one-click); the caller notes the
    address behind the link's id (`Store.still_owned`). `secret`: the stored unsubscribe
    secret as the begin read it (None: read here). `window`: the send window the send path
    keeps to (`_booking`; None: the clinic's as configured now), where a move's notice places
    the pause message again, as its own attempt will find it.
    """
    clinic_id, booking_id, _ = split_ref(ref)
    clinic = ctx.catalog.clinics.get(clinic_id)
    protocol = ctx.catalog.protocols.get(booking.treatment)
    if clinic is None or protocol is None:
        raise _unconfigured(ctx, ref, booking.treatment)
    channel = "sms" if via_sms else cast(Channel, record["channel"])
    # Read-only from here: the booking's own fields unless a notice names another date.
    fields = as_told_fields(record, stored or {},
                            lambda prefixes: _went(ctx.store, clinic_id, booking_id, prefixes))
    booking = as_told(record, booking, fields)
    # The steps the email at booking (the confirmation, the welcome: the templates that
    # list `plan_dates`) names with their dates: not those going only by SMS to a patient
    # who texted STOP (their begin skips them; "we send you a reminder of the time" would
    # promise what never comes). Read for those emails only: any other attempt keeps to its
    # three round trips. Redis errors are transient.
    phone = booking.patient.phone
    silent = frozenset({"sms"}) if (
        channel == "email" and record.get("at_booking") == "1" and phone
        and ctx.store.opted_out(clinic_id, "sms", phone) is not None) else frozenset()
    plan_dates = ctx.store.plan_dates(clinic_id, booking_id, silent)
    # A move's notice names the day the pause message goes again as stored (the SMS cap may
    # have moved it a day on), not as the protocol would place it.
    repause_at = ctx.store.repause_due(clinic_id, booking_id,
                                       int(record.get("occurrence") or 1)) \
        if record.get("step") == "rescheduled" else None
    headers: dict[str, str] = {}
    unsubscribe: str | None = None
    link: str | None = None
    try:
        to = booking.patient.contact(channel)
        if channel == "email":
            key = unsubscribe_key(ctx.settings, ctx.store.redis, ctx.store.prefix,
                                  stored=secret)
            link = contact_hash(key, "email", to)
            unsubscribe = unsubscribe_url(ctx, key, clinic_id, to)
            headers = unsubscribe_headers(unsubscribe)
        def render(template: str) -> RenderedMessage:
            return ctx.renderer.render(
                template=template,
                channel=channel,
                booking=booking,
                clinic=clinic,
                protocol=protocol,
                occurrence=int(record.get("occurrence", 1)),
                due_at=datetime.fromtimestamp(float(record["planned_epoch"]), UTC),
                plan_dates=plan_dates,
                now=now,
                **notice_and_invite(record, channel, booking, protocol, fields, now,
                                    window=window or clinic.send_window,
                                    repause_at=repause_at),
                unsubscribe_url=unsubscribe,
            )

        try:
            message = render(record["template"])
        except ConfigError as exc:
            # The template the reminder was planned with is gone: renamed with the step
            # that names it (edited together while it waited). Its step's template now: the
            # step a message again for a new date stands for (`base_step`: again-<step>; the
            # repause the pause step of the booking's stored plan, as `_capped` reads it); a
            # held booking's message the protocol's hold_template.
            step = record.get("step", "")
            pause = ctx.store.pause_step((stored or {}).get("ns", "")) \
                if step == REPAUSE_STEP else None
            now_named = [s.template for s in protocol.steps if s.id == base_step(step, pause)]
            if step == HOLD_NOTICE_STEP:  # a held booking's message: the protocol's own
                now_named = [protocol.hold_template] if protocol.hold_template else []
            renamed = next((t for t in now_named if t != record["template"]), None)
            if exc.problem != TEMPLATE_NOT_FOUND or renamed is None:
                raise
            message = render(renamed)
        if message.attachments:
            message = _revised(ctx.store, clinic_id, booking_id, message)
        url = clinic.delivery_url(channel, to)
    except ConfigError as exc:
        raise DeliveryError(str(exc), permanent=not _being_read(ctx, ref)) from None
    except KeyError:
        raise DeliveryError(f"the patient has no {channel} contact", permanent=True) from None
    except SoftTimeLimitExceeded:
        raise
    except redis.RedisError:
        raise
    except Exception as exc:  # a template that fails to render cannot succeed on retry
        raise DeliveryError(
            f"cannot render {record['template']} ({type(exc).__name__})",
            permanent=not _being_read(ctx, ref)) from None
    envelope = Envelope(ref=ref, clinic=clinic_id, channel=channel, to=to)
    return url, envelope, message, headers, link


def _revised(store: Store, clinic: str, booking_id: str,
             message: RenderedMessage) -> RenderedMessage:
    """Return `message` with its calendar invite at the SEQUENCE the store gives it
    (`Store.invite_sequence`, worker/invites.py): one above the last invite made for the
    booking when its event differs from that one's (the treatment, the visit's length, the
    address changed since: else calendars ignore the update), the same when it is the same
    event again. One round trip, for the emails that carry an invite only."""
    invite, *rest = message.attachments
    built = sequence_of(invite)
    sequence = store.invite_sequence(clinic, booking_id, built, content_key(invite.data))
    if sequence == built:
        return message
    return replace(message, attachments=(with_sequence(invite, sequence), *rest))


def _being_read(ctx: Context, ref: str) -> bool:
    """Whether config/ changed since the attempt's catalog was read (not read yet: it has
    not held still for a look, worker/catalog.py), or templates/ changed within the last
    CONFIG_STILL_SECONDS. A render failing then may be the new templates (read again within
    a second) meeting the old protocol, or a template file a deploy is rewriting (a git
    checkout unlinks it and writes it again): retried (transient), not dead-lettered; once
    the edit is read it renders, or fails for good then."""
    if ctx.catalog.stamp and config_stamp(ctx.settings) != ctx.catalog.stamp:
        log.warning("send %s: cannot render while config/ is being read again; retried", ref)
        return True
    if _changing(ctx.renderer.templates_dir):
        log.warning("send %s: cannot render while templates/ is being changed; retried", ref)
        return True
    return False


def _changing(folder: Path) -> bool:
    """Whether anything in `folder` (a file written, added, removed) changed within the last
    CONFIG_STILL_SECONDS (worker/catalog.py `changed_lately`)."""
    try:
        paths = [folder, *folder.rglob("*")]
    except OSError:
        return True
    return changed_lately(paths)


def unsubscribe_link(ctx: Context, clinic: str, to: str) -> str:
    """Return the unsubscribe URL of `to` at `clinic` (its id noted in Redis for the route)."""
    secret = unsubscribe_key(ctx.settings, ctx.store.redis, ctx.store.prefix)
    ctx.store.remember_unsubscribe(clinic, contact_hash(secret, "email", to), "email", to)
    return unsubscribe_url(ctx, secret, clinic, to)


def unsubscribe_url(ctx: Context, secret: bytes, clinic: str, to: str) -> str:
    """Return the unsubscribe URL of `to` at `clinic`, signed with `secret` (nothing noted)."""
    token = make_token(secret, clinic, "email", to)
    return f"{ctx.settings.public_base_url}/v1/unsubscribe/{token}"


def unsubscribe_headers(url: str) -> dict[str, str]:
    """RFC 2369 List-Unsubscribe and RFC 8058 one-click List-Unsubscribe-Post."""
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


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
    moving: _Moving | None = None,
) -> str:
    settings, store = ctx.settings, ctx.store
    entry = entry | {"error": exc.reason, "seconds": round(time.monotonic() - started, 3)}
    # A retry is due on Redis's clock (as this process reads it, `CLOCK`): the pump claims by
    # it, so a host whose clock is off neither skips the backoff nor stretches it.
    now = CLOCK.now_utc()
    if exc.unknown and number < settings.max_attempts:
        result = durably(
            lambda: store.finish_unknown(ref, attempt, exc.reason, entry), deadline, ref
        )
        log.warning("send %s: outcome unknown on attempt %d (%s); %s", ref, number, exc.reason,
                    "retried after its ledger expires" if result == "ok" else result)
        return "unknown"
    if exc.permanent or number >= settings.max_attempts:
        # The count the clinic is shown is every attempt made (the log's numbers): one moved
        # or replayed says how many of those its fresh budget was.
        made = entry.get("attempt", number)
        tries = (f"{number} attempts" if made == number else
                 f"{number} attempts since it was rescheduled or replayed ({made} in all)")
        if exc.permanent:
            reason = f"permanent failure: {exc.reason}"
        elif exc.unknown:  # never an endless series of possible duplicates
            reason = (f"gave up after {tries}, the last of unknown outcome (it may "
                      f"have been delivered): {exc.reason}")
        else:
            reason = f"gave up after {tries}: {exc.reason}"
        # Fenced by the booking version it was sent from (a correction landing meanwhile
        # puts it back), unless it may have been delivered: its ledger must stay then.
        final = replace(attempt, booking="") if exc.unknown else attempt
        result = durably(lambda: store.finish_failed(ref, final, reason, entry,
                                                     maybe_sent=exc.unknown), deadline, ref)
        log.warning("send %s: %s; %s", ref, reason,
                    "dead-lettered" if result == "ok" else f"not dead-lettered ({result})")
        return "failed"
    delay = compute_backoff(
        number, base=settings.backoff_base_seconds, cap=settings.backoff_cap_seconds
    )
    retry_at = now + timedelta(seconds=delay)
    if place is not None and moving is not None:
        # A retry waits for the patient's send window like any other send (the window is
        # the host's clock, NTP-synced; the instant it is given is Redis's), and goes no
        # later than the reminder's expiry: one that could only come after it is skipped
        # now, saying why, as a deferral would be (not left `retrying` until then, its SMS
        # holding a day of the patient's SMS cap).
        skip = None
        expires = moving.record.get("expires_epoch")
        if expires and retry_at.timestamp() >= float(expires):
            note = moving.record.get("expires_note") or "past its expiry"
            skip = (f"not sent: its retry after a transient failure ({exc.reason}) would come "
                    f"after it expires: {note}")
        else:
            rule = _send_time(moving.record, *place, retry_at)
            if rule.action == "skip":
                skip = f"{rule.reason}; not tried again after a transient failure ({exc.reason})"
            elif rule.at is not None:
                retry_at = rule.at
        if skip is not None:
            reason = skip
            result = durably(lambda: store.finish_skip(ref, attempt, reason, entry,
                                                       extra={"last_error": exc.reason},
                                                       tried=True),
                             deadline, ref)
            log.info("send %s: transient failure on attempt %d (%s); its retry could only "
                     "come after it expires: skipped (%s)", ref, number, exc.reason, result)
            return "skipped"
    elif place is not None:
        retry_at = next_opening(retry_at, *place)
    done: list[str] = []

    def finish(out: PlannedReminder | None, capped: SendCapped | None) -> str:
        # A retry landing on another patient-local day is capped there (`_capped`).
        done[:] = []
        if out is not None and out.status != Status.SCHEDULED:
            done.append("skipped")
            return store.finish_skip(ref, attempt, f"{out.reason} (after a transient "
                                     f"failure: {exc.reason})", entry, capped=capped,
                                     extra={"last_error": exc.reason})
        done.append("retrying")
        return store.finish_retry(ref, attempt, out.due_at if out else retry_at, exc.reason,
                                  entry, capped=capped, note=out.reason if out else "")

    result = durably(lambda: _capped(ctx, ref, moving, retry_at, "", finish, tried=True),
                     deadline, ref)
    log.info(
        "send %s: transient failure on attempt %d (%s); %s (%s)",
        ref, number, exc.reason, f"retry at {retry_at.isoformat(timespec='seconds')}"
        if done == ["retrying"] else "not sent by SMS: the SMS cap", result,
    )
    return done[0]


# --- batches: this process's senders ----------------------------------------------------

NOT_STARTED = "not started in time (the senders were busy): handed back to the schedule"
STOPPING_NOT_BEGUN = "the worker was stopping: handed back to the schedule before it began"
TOLD_IN_FLIGHT = ("a message sent before the change is still at its provider: the notice "
                  "waits for its outcome, so as never to arrive before it")
REFUSED_NOT_BEGUN = ("Redis refused writes ({why}) before it began: handed back to the "
                     "schedule")
UNREACHABLE_NOT_BEGUN = ("Redis was unreachable before it began: handed back to the schedule "
                         "once Redis answered")
OWED_RETRY_SECONDS = 1.0  # between two tries at the hand-backs Redis could not take
STOPPED_BEFORE_SENDING = "the worker was stopping: handed back to the schedule before sending"
WRITTEN_FOR_EARLIER = ("written before the patient's day changed or the visit began: handed "
                       "back to the schedule to be written again")
CUT_REASON = ("the worker stopped before the provider answered (its shutdown grace period "
              "ran out)")
CUT = "cut: outcome unknown"
# A warm shutdown's hand-back of the claims not begun runs during the grace period, not
# before it; it is given the grace, and at least this long (a grace of 0).
HAND_BACK_WAIT_SECONDS = 3.0
CUT_WAIT_SECONDS = 2.0  # after a cut, how long to wait for attempts recording their outcome
LAST_REPORT_WAIT_SECONDS = 1.0  # a stop's last report to the pump, once its grace is spent
WATCH_INTERVAL = 0.25  # seconds between the watchdog's looks
LAST_WORDS_SECONDS = 0.25  # what runs before the watchdog ends the process: at most this long
FLUSH_INTERVAL = 0.1  # seconds between reports of settled claims to the pump's counts
REGISTER_EVERY = 2.0  # seconds between refreshes of this process's senders for the pump
BACKPRESSURE_SECONDS = 0.5  # longest a hand-over waits for its senders to have room
ROOM_POLL_SECONDS = 0.01
OTHERS_POLL_SECONDS = 0.05  # ... for another queue's messages in the broker (~0.13 ms CPU a look)
# Seconds after which the pump forgets a process that stopped refreshing, and hands back
# the claims it held and had not begun (worker/pump.py `_LAPSED`).
REGISTER_TTL = 10.0
NUDGE_AFTER = 0.05  # a channel's senders idle this long after settling: ask for more work
# One clinic's provider never holds every sender of a channel (`Lanes`, "One provider's
# share"): a provider whose sends take SLOW_SEND_SECONDS or more has at most PROVIDER_SHARE
# of a channel's threads in this process, and the slow ones together no more than that.
PROVIDER_SHARE = 0.5
# Not less: a clinic alone with a mail server taking a second a message keeps every thread.
SLOW_SEND_SECONDS = 2.0
PROVIDER_WEIGHT = 0.3  # how far one send's time moves its provider's measured send time
PROVIDER_BUSY = ("its clinic's {channel} provider is slow and has its share of the senders: "
                 "handed back to the schedule")


class Watchdog:
    """Ends this process before any attempt it watches outlives its ledger entry.

    `watch(ref, end_at)` (time.monotonic()) registers an attempt; a thread looks every
    WATCH_INTERVAL and, if one is still running at `end_at`, logs it and kills the process
    (`kill`, by default SIGKILL to itself): its sockets close, so the attempt cannot go on.
    Just before, what was registered with `before_kill` runs, for LAST_WORDS_SECONDS at
    most (the senders hand back the claims they have not begun: `Lanes.abandon`).
    """

    def __init__(self, kill: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kill = kill or (lambda: os.kill(os.getpid(), signal.SIGKILL))
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, float]] = {}
        self._what: dict[int, str] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._last_words: list[Callable[[], None]] = []

    def before_kill(self, call: Callable[[], None]) -> None:
        """Have `call` run just before this watchdog ends the process (see the class)."""
        with self._lock:
            self._last_words.append(call)

    def forget(self, call: Callable[[], None]) -> None:
        """Undo `before_kill(call)`."""
        with self._lock:
            if call in self._last_words:
                self._last_words.remove(call)

    def _say_last_words(self) -> None:
        with self._lock:
            calls = list(self._last_words)
        if not calls:
            return

        def run() -> None:
            for call in calls:
                try:
                    call()
                except Exception:
                    log.exception("watchdog: what was to run before ending the process failed")

        # In a thread of its own: Redis unreachable must not keep the process past its
        # attempt's ledger (the kill comes within LAST_WORDS_SECONDS whatever it does).
        last = threading.Thread(target=run, name="send-watchdog-last", daemon=True)
        last.start()
        last.join(LAST_WORDS_SECONDS)

    @contextlib.contextmanager
    def watch(self, ref: str, end_at: float, what: str = "send") -> Iterator[None]:
        """Watch one attempt (`what`: "send", or "clinic event" for worker/event_senders.py)."""
        with self._lock:
            self._next += 1
            key = self._next
            self._running[key] = (ref, end_at)
            self._what[key] = what
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="send-watchdog",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                del self._running[key]
                del self._what[key]

    def overdue(self) -> list[str]:
        """Return the refs of attempts past their end (checked by the thread)."""
        return [ref for _, ref in self._late()]

    def _late(self) -> list[tuple[str, str]]:
        now = self._clock()
        with self._lock:
            return [(self._what[key], ref) for key, (ref, end_at) in self._running.items()
                    if now >= end_at]

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            late = self._late()
            if late:
                what, ref = late[0]
                log.critical(
                    "%s %s: still running when its %s is about to expire; ending this "
                    "worker process so that no attempt outlives it (%d running)", what, ref,
                    "send ledger entry" if what == "send" else "lease", len(late))
                self._say_last_words()
                for handler in logging.getLogger().handlers:
                    handler.flush()
                self._kill()
                return


@dataclass
class _Provider:
    """One provider of a channel, as this process's senders know it (`Lanes`)."""

    running: int = 0  # its attempts under way here
    latency: float | None = None  # its send time, a moving average (None: not measured)
    back_at: float = 0.0  # Redis's clock: when the last claim handed back for it is due
    # When each of its attempts under way began (time.monotonic()), by the senders' key.
    since: dict[int, float] = field(default_factory=dict)

    def slow(self, now: float) -> bool:
        """Whether its sends take SLOW_SEND_SECONDS or more: measured so, or one under way
        has run that long already (a hung provider, before any send of it has ended)."""
        if self.latency is not None and self.latency >= SLOW_SEND_SECONDS:
            return True
        return bool(self.since) and now - min(self.since.values()) >= SLOW_SEND_SECONDS


class Lanes:
    """This process's senders: a bounded thread pool per channel, and their bookkeeping.

    For the pump (worker/pump.py), one Redis pipeline every FLUSH_INTERVAL reports the
    claims settled (off the outstanding set and this process's held set, `hold`), how many
    began and how long they took (the channel's latency), and this process's sender threads
    per channel (refreshed every REGISTER_EVERY, forgotten REGISTER_TTL after the process
    stops: then the pump hands back the claims it held and had not begun). Once a channel's
    senders have nothing waiting, `on_idle(channel)` is called so that the pump can hand
    out more at once instead of at its next tick.

    One provider's share. All clinics' claims of a channel share its threads, and a send
    holds its thread until its provider answers (or the send timeout): a clinic whose
    gateway answers in seconds, or hangs, took every thread with a burst of its claims,
    and the other clinics' claims, behind them in the due set, waited for the whole burst
    at that provider's pace (minutes). So each provider (a clinic's Apprise URL for the
    channel as configured; clinics giving the very same URL share one) is measured here
    (the moving average of its sends' time), and one that is slow (SLOW_SEND_SECONDS or
    more, or one of its sends under way has run that long already: hung) has at most
    PROVIDER_SHARE of the channel's threads under way; the slow ones
    together no more than that either, so the other providers always have the rest. A
    claim beyond that is not begun: the thread taking it hands it back to the schedule
    (`Store.requeue`, fenced by its claim as any hand-back; no attempt is counted), due
    once its provider should have room (one at the provider's pace after the one handed
    back before, within a send timeout), behind what is due before then; the pump hands
    out the claims behind it meanwhile. A provider measured fast, or not measured yet in this
    process, is held to no share (a burst of one clinic uses every thread): one slow from
    the start, or turning slow, is found once one of its sends has run SLOW_SEND_SECONDS,
    so a burst of its claims arriving at once may hold every thread for one of its sends
    (the send timeout at most), not for its whole burst. All of it in memory, under the
    senders' lock: no round trip on the way to a send.
    """

    def __init__(self, ctx: Context, *, on_idle: Callable[[Channel], None] | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.ctx = ctx
        self.threads = ctx.settings.send_threads
        self.keys = Keys(ctx.store.prefix)
        self.node = sender_member(process_node(), self.threads)
        self.watchdog = watchdog or Watchdog()
        self._on_idle = on_idle
        self._lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._waiting: dict[str, int] = {}  # handed over, not begun yet
        self._settled: dict[str, list[str]] = {}  # outstanding members to report
        self._drained: dict[str, int] = {}  # of which reached the provider
        self._busy: dict[str, float] = {}  # ... and the seconds they took
        # Per sender thread: whether its current attempt reached the provider (`_one`).
        self._reached = threading.local()
        # The channel's providers (`_Provider`): (channel, provider) -> what is known of it;
        # and per channel, the attempts under way of those slow (their share together).
        self.share = max(1, int(self.threads * PROVIDER_SHARE))
        self._providers: dict[tuple[str, str], _Provider] = {}
        self._slow_running: dict[str, int] = {}
        self._idle_since: dict[str, float] = {}  # channels that ran dry, to nudge
        self._registered_at = 0.0
        self._announced: set[str] = set()  # channels registered once at least (`hold`)
        self._closing = False
        self._stopping = threading.Event()  # set once close() begins
        # Set once close() found Redis unreachable (past the client's retries): no more
        # tries at this shutdown, each another wait through those retries (`close`).
        self._unreachable = threading.Event()
        # Claims not taken by a thread yet: key -> (future, channel, ref, claim).
        self._queued: dict[int, tuple[Future[str], Channel, str, str]] = {}
        self._next_key = 0
        self._futures: set[Future[str]] = set()  # not settled
        self._handing: dict[int, HandingOver] = {}  # attempts talking to their provider
        # Claims not begun that Redis could not take back (`owe`): member -> (ref, claim,
        # reason, the end of its lease on Redis's clock); tried every OWED_RETRY_SECONDS.
        self._owed: dict[str, tuple[str, str, str, float]] = {}
        self._owed_next = 0.0  # time.monotonic() of the next try
        self._owing = threading.Lock()  # the flusher's tries one at a time (`close`'s: any time)
        self._flusher: threading.Thread | None = None
        self._recording: threading.Thread | None = None  # the cut sends' records (`_cut`)
        self._stop = threading.Event()
        self.watchdog.before_kill(self.abandon)

    def stopping(self) -> bool:
        """Return whether these senders are closing (nothing new is handed to a provider)."""
        return self._stopping.is_set()

    def handing_over(self, ref: str, attempt: Attempt, entry: dict[str, Any],
                     started: float) -> HandingOver:
        """Register an attempt about to hand its message to the provider (see `close`)."""
        handing = HandingOver(self, ref, attempt, entry, started)
        self._reached.provider = True  # a send: its time counts in the pump's latency
        self._reached.at = time.monotonic()  # ... and from here, in its provider's (`_Provider`)
        with self._lock:
            self._handing[id(handing)] = handing
        return handing

    def open(self, channel: Channel) -> ThreadPoolExecutor:
        """Return this channel's thread pool, made (and its threads registered) on first use."""
        CLOCK.refresh(self.ctx.store.redis)  # measured before the first claim is compared
        with self._lock:
            if self._closing:
                raise RuntimeError("the senders are shutting down")
            pool = self._pools.get(channel)
            if pool is None:
                pool = self._pools[channel] = ThreadPoolExecutor(
                    self.threads, thread_name_prefix=f"send-{channel}")
                self._registered_at = 0.0  # register the new channel at the next flush
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="send-flush",
                                                 daemon=True)
                self._flusher.start()
            return pool

    def submit(self, channel: Channel, ref: str, version: str, claim: str,
               start_by: float) -> Future[str]:
        """Queue one claim for this channel's senders; return the future of its outcome."""
        pool = self.open(channel)
        with self._lock:
            if self._closing:
                raise RuntimeError("the senders are shutting down")
            self._waiting[channel] = self._waiting.get(channel, 0) + 1
            self._idle_since.pop(channel, None)
            self._next_key += 1
            key = self._next_key
            future = pool.submit(self._one, key, channel, ref, version, claim, start_by)
            self._queued[key] = (future, channel, ref, claim)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[str]) -> None:
        with self._lock:
            self._futures.discard(future)

    def provider(self, channel: Channel, ref: str) -> str:
        """Return the provider `ref` goes through: its clinic's Apprise URL for `channel` as
        configured (with its ${NAME}s, not their values: never logged), or the clinic's own
        name for the outbox or an unknown clinic."""
        clinic_id = ref.partition("/")[0]
        clinic = self.ctx.catalog.clinics.get(clinic_id)
        url = clinic.channels.get(channel) if clinic is not None else None
        return url if url is not None else f"{clinic_id}:{channel}"

    def _take_provider(self, channel: Channel, ref: str,
                       key: int) -> tuple[_Provider, bool] | None:
        """Count an attempt of `ref` under way at its provider and return (the provider,
        whether it counts among the slow); None if its provider is slow and has its share,
        or the slow ones together have it (then it must not begin). Called under `_lock`."""
        name = (channel, self.provider(channel, ref))
        found = self._providers.get(name)
        if found is None:
            found = self._providers[name] = _Provider()
        now = time.monotonic()
        slow = found.slow(now)
        if slow and not self._closing and (
                found.running >= self.share or self._slow_running.get(channel, 0) >= self.share):
            return None
        found.running += 1
        found.since[key] = now
        if slow:
            self._slow_running[channel] = self._slow_running.get(channel, 0) + 1
        return found, slow

    def _hand_back_busy(self, channel: Channel, ref: str, claim: str, start_by: float) -> str:
        """Hand a claim whose provider has its share back to the schedule (not begun), due
        once the provider should have room: one at its pace (its send time over its share,
        HAND_BACK_MIN at least) after the claim handed back before, and within a send
        timeout (by then one of its sends has ended: a provider that recovered meanwhile
        finds its claims due, not spread over the time its slowness would have taken)."""
        name = (channel, self.provider(channel, ref))
        now = CLOCK.now()
        with self._lock:
            found = self._providers.setdefault(name, _Provider())
            pace = (found.latency or 0.0) / self.share
            at = min(max(now + max(HAND_BACK_MIN, pace), found.back_at + pace),
                     now + max(HAND_BACK_MIN, self.ctx.settings.send_timeout_seconds))
            found.back_at = at
        reason = PROVIDER_BUSY.format(channel=channel)
        try:
            handed = self.ctx.store.requeue(ref, datetime.fromtimestamp(at, UTC), reason,
                                            claim=claim)
        except redis.RedisError as exc:
            self.owe(NotBegun(ref, claim, reason, exc), start_by)
            return "not begun: handed back once Redis takes it"
        if handed:
            log.info("send %s: its clinic's %s provider is slow and has its share of the "
                     "senders; handed back to the schedule (due in %.1fs)", ref, channel,
                     at - now)
            return "handed back"
        log.info("send %s: its provider is busy; dropped (finished or claimed again)", ref)
        return "dropped: finished meanwhile"

    def _one(self, key: int, channel: Channel, ref: str, version: str, claim: str,
             start_by: float) -> str:
        begun = False
        with self._lock:  # taken by a thread: no longer the closer's to hand back
            self._queued.pop(key, None)
            taken = self._take_provider(channel, ref, key)

        def on_begun() -> None:
            nonlocal begun
            if not begun:
                begun = True
                with self._lock:
                    self._waiting[channel] -= 1

        outcome = "not completed"
        started = time.monotonic()
        # On shutdown, what has not begun goes straight back to the schedule.
        deadline = 0.0 if self._closing else start_by
        self._reached.provider = False  # set by `handing_over`
        try:
            if taken is None:
                outcome = self._hand_back_busy(channel, ref, claim, start_by)
            else:
                outcome = attempt(self.ctx, ref, version, claim, start_by=deadline,
                                  begun=on_begun, watchdog=self.watchdog, guard=self)
        except NotBegun as exc:  # handed back as soon as Redis takes it, not a lease later
            self.owe(exc, start_by)
            outcome = "not begun: handed back once Redis takes it"
        except Exception as exc:  # Redis down past its retries, a bug: the lease brings it back
            log.warning("send %s: attempt not completed (%s); its lease will bring it back",
                        ref, type(exc).__name__)
        finally:
            on_begun()
            # Only an attempt that reached the provider (sent, or failed there) says how
            # long a send takes: one ending in a round trip or two (handed back or dropped
            # unbegun, skipped as expired, deferred by the send window, dropped because the
            # booking moved, requeued) counted as one, and a backlog of them drained after
            # an outage shrank the pump's measured latency to milliseconds, and its window
            # to the whole backlog.
            ended = time.monotonic()
            took = ended - started if self._reached.provider else None
            if taken is not None:  # the provider's own time: from the hand-over on
                self._leave_provider(channel, *taken,
                                     ended - self._reached.at if took is not None else None, key)
            self._settle(channel, f"{claim}@{ref}", took)
        return outcome

    def _leave_provider(self, channel: Channel, provider: _Provider, slow: bool,
                        took: float | None, key: int) -> None:
        """An attempt counted by `_take_provider` ended (`took`: how long its provider took
        from the hand-over, if it reached the provider; not the round trips to Redis
        before, which a Redis outage would make every provider's)."""
        with self._lock:
            provider.running -= 1
            provider.since.pop(key, None)
            if slow:
                self._slow_running[channel] -= 1
            if took is not None:
                provider.latency = took if provider.latency is None else (
                    provider.latency + (took - provider.latency) * PROVIDER_WEIGHT)

    def _settle(self, channel: Channel, done: str, took: float | None) -> None:
        with self._lock:
            self._settled.setdefault(channel, []).append(done)
            if took is not None:
                self._drained[channel] = self._drained.get(channel, 0) + 1
                self._busy[channel] = self._busy.get(channel, 0.0) + took
            if self._waiting.get(channel, 0) == 0:
                self._idle_since.setdefault(channel, time.monotonic())

    def hold(self, channel: Channel, claims: Sequence[tuple[str, str]],
             claimed_at: float) -> None:
        """Note, before they are queued, the claims ((ref, claim), ...) handed to these
        senders, for the pump: should this process go without a word (SIGKILL, its container
        removed) or stall past its registration's lapse, the pump takes them off the
        channel's count and hands back those not begun (worker/pump.py `_LAPSED`), rather
        than count them until their hold and leave them leased until their lease. One round
        trip (the held set, its holder, and this process's registration if not made yet).
        Settled claims leave the set with the senders' next report (`flush`); each member is
        scored by its lease's end, and the set expires a lease after the last hand-over.
        Redis unreachable: not noted (the claims then count until their hold, as they did)."""
        if not claims:
            return
        settings = self.ctx.settings
        now = CLOCK.now()
        with self._lock:
            if self._closing:
                return  # `submit` refuses: they go back at once (`hand_over`)
            register = channel not in self._announced
        held = self.keys.held(channel, self.node)
        try:
            pipe = self.ctx.store.redis.pipeline(transaction=False)
            if register:
                pipe.zadd(self.keys.senders(channel), {self.node: now + REGISTER_TTL})
            pipe.zremrangebyscore(held, "-inf", now)  # settled and never reported
            pipe.zadd(held, {f"{claim}@{ref}": claimed_at + settings.lease_seconds
                             for ref, claim in claims})
            pipe.expire(held, settings.lease_seconds + 60)
            pipe.sadd(self.keys.holders(channel), self.node)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("senders: could not note %d %s claim(s) as held here (%s): should this "
                        "process go, they count until their hold", len(claims), channel,
                        type(exc).__name__)
            return
        if register:
            with self._lock:
                self._announced.add(channel)

    def waiting(self, channel: Channel) -> int:
        """Return how many claims handed to this channel's senders have not begun."""
        with self._lock:
            return self._waiting.get(channel, 0)

    def wait_for_room(self, channel: Channel, seconds: float,
                      others_waiting: Callable[[], bool] | None = None) -> None:
        """Wait (at most `seconds`) until no more than a round of claims waits to begin, or
        until `others_waiting()` (asked every OTHERS_POLL_SECONDS) says other work waits
        for this process."""
        deadline = time.monotonic() + seconds
        look_at = 0.0
        while self.waiting(channel) > self.threads:
            now = time.monotonic()
            if now >= deadline:
                return
            if others_waiting is not None and now >= look_at:
                if others_waiting():
                    return
                look_at = now + OTHERS_POLL_SECONDS
            time.sleep(ROOM_POLL_SECONDS)

    def flush(self) -> bool:
        """Report to the pump now; call `on_idle` for channels that ran dry. Return False if
        Redis could not be reached (past the client's retries)."""
        now = time.monotonic()
        with self._lock:
            settled, self._settled = self._settled, {}
            drained, self._drained = self._drained, {}
            busy, self._busy = self._busy, {}
            idle = [c for c, since in self._idle_since.items() if now - since >= NUDGE_AFTER]
            for channel in idle:
                del self._idle_since[channel]
            register = [] if self._closing or now - self._registered_at < REGISTER_EVERY \
                else list(self._pools)
            if register:
                self._registered_at = now
        reachable = True
        if settled or register:
            try:
                pipe = self.ctx.store.redis.pipeline(transaction=False)
                for channel, members in settled.items():
                    pipe.zrem(self.keys.outstanding(channel), *members)
                    pipe.zrem(self.keys.held(channel, self.node), *members)
                    if drained.get(channel):
                        pipe.incrby(self.keys.drained(channel), drained[channel])
                        pipe.incrbyfloat(self.keys.busy(channel), busy[channel])
                for channel in register:
                    pipe.zadd(self.keys.senders(channel), {self.node: CLOCK.now() + REGISTER_TTL})
                pipe.execute()
                if register:
                    with self._lock:
                        self._announced.update(register)
            except redis.RedisError as exc:
                # The pump's counts only: its members expire on their own.
                log.warning("senders: could not report %d settled claim(s) to the pump",
                            sum(len(m) for m in settled.values()))
                reachable = not isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
        for channel in idle:
            if self._on_idle is not None:
                try:
                    self._on_idle(cast(Channel, channel))
                except Exception as exc:
                    log.warning("senders: could not ask the pump for more %s work (%s)",
                                channel, type(exc).__name__)
        return reachable

    def owe(self, not_begun: NotBegun, start_by: float) -> None:
        """Remember a claim not begun that Redis could not take back: handed back (fenced
        by its claim, as ever) as soon as Redis takes it (`hand_back_owed`), until its lease
        runs out (then the pump claims it again itself). `start_by`: the claim's, from
        which its lease's end is known (`hand_over`)."""
        settings = self.ctx.settings
        claimed_at = start_by - start_margin(settings)
        with self._lock:
            self._owed[f"{not_begun.claim}@{not_begun.ref}"] = (
                not_begun.ref, not_begun.claim, not_begun.reason,
                claimed_at + settings.lease_seconds)
        log.warning("send %s: not begun, and Redis could not take it back (%s); handed back "
                    "as soon as Redis takes it", not_begun.ref, not_begun.why)

    def hand_back_owed(self, *, last: bool = False) -> None:
        """Hand back the claims owed (`owe`) if Redis takes them now: each due now, only
        while it is still the claim's and no attempt of it began (`Store.requeue`: a cancel,
        an opt-out, another copy of the task at work, or the pump's claim again, whichever
        came first, wins); kept for the next try while Redis still cannot take them.

        `last`: the warm shutdown's try (`close`), made now whatever the reporting thread is
        doing: that thread may be in the middle of its own try (asleep in the Redis client's
        retry backoff, or just failed), and the process ends once its senders are closed,
        cutting that try short. Two tries at once are safe: each hand-back is fenced by its
        claim, and a second one of the same claim finds it no longer `sending`."""
        owning = self._owing.acquire(blocking=False)
        if not owning and not last:
            return  # another thread is at it (the flusher's try)
        handed: set[str] = set()
        try:
            with self._lock:
                owed = list(self._owed.items())
            if not owed or (not last and time.monotonic() < self._owed_next):
                return
            for key, (ref, claim, reason, lease_end) in owed:
                if CLOCK.now() >= lease_end:
                    outcome = "its lease ran out first: the pump claims it again"
                else:
                    try:
                        back = self.ctx.store.requeue(ref, CLOCK.now_utc(), reason, claim=claim)
                    except redis.RedisError:
                        self._owed_next = time.monotonic() + OWED_RETRY_SECONDS
                        break  # still out of reach: the rest at the next try
                    if back:
                        handed.add(channel_of(ref))
                    outcome = "handed back to the schedule" if back else (
                        "not handed back: finished, cancelled, begun or claimed again meanwhile")
                with self._lock:
                    self._owed.pop(key, None)
                log.info("send %s: not begun during a Redis outage; %s", ref, outcome)
        finally:
            if owning:
                self._owing.release()
        on_idle = self._on_idle
        if on_idle is None:
            return
        for channel in handed:
            try:  # due now: the pump hands it out at once, not at its next tick
                on_idle(cast(Channel, channel))
            except Exception as exc:
                log.warning("senders: could not ask the pump for more %s work (%s)",
                            channel, type(exc).__name__)

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
                self.hand_back_owed()
                smtp_sessions.sweep()
                CLOCK.refresh(self.ctx.store.redis)
            except Exception:  # a bug here must not stop the reports for good
                log.exception("senders: reporting to the pump failed")

    def abandon(self) -> None:
        """The watchdog is ending this process (an attempt about to outlive its ledger): hand
        the claims no thread has taken back to the schedule now (due now, fenced by their
        claim, one round trip), and have the attempts not handed over yet go back too (as
        at a warm shutdown), rather than leave them all to their lease: they are any
        clinic's, waiting behind the sends of the provider that overran."""
        with self._lock:
            if self._closing:  # a warm shutdown hands them back itself
                return
            self._closing = True
            self._on_idle = None
            pools = dict(self._pools)
        self._stopping.set()
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._hand_back_queued(pools)

    def close(self, grace: float | None = None) -> None:
        """Stop (a warm shutdown): hand back at once what has not begun, give the sends under
        way `grace` seconds (None: as long as they take), cut those still handing over then,
        and report.

        Claims waiting for a thread go back to the schedule now (due now, fenced by their
        claim), and so does an attempt that has not handed its message over yet (fenced by
        version, claim and token): another worker sends them within seconds. An attempt
        still talking to its provider when the grace period ends may have been delivered:
        it is recorded as of unknown outcome (its ledger kept, so it is tried again only
        once the ledger expires, never twice at once), and the process must end right
        after (the pool child does), closing its sockets.

        Redis unreachable at this shutdown (past the client's retries, ~45 s with the
        worker's profile): found so once, at the hand-back of the queued claims (one round
        trip, tried during the grace period, given the grace or HAND_BACK_WAIT_SECONDS,
        whichever is longer) or at a cut's record, and not tried again one claim or cut
        after the other; Redis gone during the stop (after the hand-back found it up): the
        records of the sends cut are given CUT_WAIT_SECONDS (in a thread of their own), the
        last report to the pump (and the owed hand-backs) what is left of the grace or
        LAST_REPORT_WAIT_SECONDS. So the stop ends within the grace, CUT_WAIT_SECONDS and
        LAST_REPORT_WAIT_SECONDS: what could not be handed back or recorded is brought back
        by its lease (and ledger), as after a SIGKILL, which a stop taking minutes would
        have ended in anyway.
        """
        self.watchdog.forget(self.abandon)
        with self._lock:
            self._closing = True
            self._on_idle = None
            pools = dict(self._pools)
            futures = set(self._futures)
        self._stopping.set()
        # First, with no round trip: no thread takes a queued claim from here on.
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        # The pump stops counting these senders, and the queued claims go back, at once, in
        # a thread of its own: with Redis unreachable that try waits out the client's
        # retries, and the sends under way get their grace period meanwhile, not after it.
        began = time.monotonic()
        backing = threading.Thread(target=self._hand_back_queued, args=(pools,),
                                   name="send-handback", daemon=True)
        backing.start()
        # (A cancelled future never counts as done for `wait`: leave those out.)
        _, running = wait([f for f in futures if not f.cancelled()], timeout=grace)
        backing.join(None if grace is None
                     else max(0.0, began + max(grace, HAND_BACK_WAIT_SECONDS) - time.monotonic()))
        if backing.is_alive():  # still waiting through the retries: left to their lease
            self._unreachable.set()
            log.warning("senders: stopping with Redis unreachable: the claims not begun are "
                        "left to their lease")
        if running:
            cut_began = time.monotonic()
            cut = self._cut()
            _, running = wait(running, timeout=CUT_WAIT_SECONDS)
            recording = self._recording
            if recording is not None:
                recording.join(max(0.0, cut_began + CUT_WAIT_SECONDS - time.monotonic()))
                if recording.is_alive():  # waiting through the client's retries
                    self._unreachable.set()
                    log.warning("senders: stopping with Redis unreachable: the sends cut are "
                                "left to their lease and ledger")
            log.warning("senders: stopped after the %gs grace period: %d send(s) cut while "
                        "handing over (recorded as of unknown outcome: tried again once their "
                        "ledger expires)%s", grace or 0, cut,
                        f"; {len(running)} still recording" if running else "")
        self._stop.set()
        # The last report, the owed hand-backs and leaving the pump's count: in a thread of
        # its own, given what is left of the grace period or LAST_REPORT_WAIT_SECONDS,
        # whichever is longer. Redis may have died during the stop, after the hand-back
        # above found it up (a fault drill killed it seconds into the stop): each of
        # these then waits out the client's retries (~45 s with the worker's profile), past
        # the container's stop grace period (then SIGKILL mid-drain). What it could not do
        # is left as after a SIGKILL: the claims owed to their lease, the pump's counts
        # and this registration expire on their own (REGISTER_TTL).
        last = threading.Thread(target=self._last_report, args=(pools,), name="send-report",
                                daemon=True)
        last.start()
        last.join(None if grace is None else
                  max(LAST_REPORT_WAIT_SECONDS, began + grace - time.monotonic()))
        if last.is_alive():
            self._unreachable.set()
            log.warning("senders: stopping with Redis unreachable: the last report to the "
                        "pump not made; the claims not begun that it owes (%d) are left to "
                        "their lease", len(self._owed))
        if not running:
            smtp_sessions.close()

    def _last_report(self, pools: dict[str, ThreadPoolExecutor]) -> None:
        """Report to the pump, hand back the claims owed, and leave the pump's count (`close`).
        Redis found unreachable (past the client's retries) at this shutdown: not tried, each
        try another wait through those retries."""
        if not self._unreachable.is_set() and not self.flush():
            self._unreachable.set()
        if not self._unreachable.is_set():
            self.hand_back_owed(last=True)  # once more, if Redis answers now
            self._deregister(pools)
        elif self._owed:
            log.warning("senders: stopping with Redis unreachable: %d claim(s) not begun "
                        "left to their lease", len(self._owed))

    def _leave(self, pipe: Any, pools: dict[str, ThreadPoolExecutor]) -> None:
        """Add to `pipe` what leaves the pump's count: this process's registration and the
        claims it notes as held (`hold`), which a stop hands back or settles itself."""
        for channel in pools:
            pipe.zrem(self.keys.senders(channel), self.node)
            pipe.srem(self.keys.holders(channel), self.node)
            pipe.delete(self.keys.held(channel, self.node))

    def _deregister(self, pools: dict[str, ThreadPoolExecutor]) -> None:
        with contextlib.suppress(redis.RedisError):
            pipe = self.ctx.store.redis.pipeline(transaction=False)
            self._leave(pipe, pools)
            pipe.execute()

    def _hand_back_queued(self, pools: dict[str, ThreadPoolExecutor]) -> None:
        """Deregister these senders and hand back the claims no thread took (their futures
        were cancelled), in one round trip, each hand-back fenced by its claim (`requeue`).
        Redis unreachable (past the client's retries): the claims are left to their lease,
        all of them at once, not one wait per claim, and the shutdown tries Redis no more."""
        with self._lock:
            cancelled = [(key, item) for key, item in self._queued.items() if item[0].cancelled()]
            for key, _ in cancelled:
                del self._queued[key]
        items = [(ref, claim) for _, (_, _, ref, claim) in cancelled]
        answers: list[Any] = []
        try:
            pipe = self.ctx.store.redis.pipeline(transaction=False)
            self._leave(pipe, pools)
            left = len(pipe)  # the hand-backs' answers come after `_leave`'s
            if items:
                self.ctx.store.requeue_in(pipe, items, CLOCK.now_utc(),  # due now: Redis's clock
                                          STOPPING_NOT_BEGUN)
            answers = pipe.execute(raise_on_error=False)[left:]
        except (redis.ConnectionError, redis.TimeoutError):
            self._unreachable.set()
            log.warning("senders: stopping with Redis unreachable: %d claim(s) not begun left "
                        "to their lease", len(items))
        except redis.RedisError as exc:
            log.warning("senders: stopping: could not hand back %d claim(s) not begun (%s): "
                        "their lease brings them back", len(items), type(exc).__name__)
        handed = 0
        for index, (_, (_, channel, ref, claim)) in enumerate(cancelled):
            back = index < len(answers) and answers[index] == 1
            handed += back
            log.info("send %s: the worker is stopping; %s", ref,
                     "handed back to the schedule" if back else "not handed back (finished "
                     "or claimed again meanwhile, or Redis unreachable: its lease brings it back)")
            with self._lock:
                self._waiting[channel] -= 1
            self._settle(channel, f"{claim}@{ref}", None)
        if cancelled:
            log.info("senders: stopping: %d of %d claim(s) not begun handed back to the "
                     "schedule", handed, len(cancelled))

    def _cut(self) -> int:
        """Cut the attempts still handing over, and record them as of unknown outcome in a
        thread of its own, one after the other; return how many. Redis gone during the stop
        (after the hand-back found it up): the first record waits out the client's retries
        (~45 s), past the container's stop grace; the caller's wait for the recording
        (CUT_WAIT_SECONDS) bounds it, and what is not recorded then is brought back by its
        lease and ledger, as after a SIGKILL."""
        with self._lock:
            handing = list(self._handing.values())
        cut = [h for h in handing if h.mark_cut()]
        if cut:
            self._recording = threading.Thread(target=self._record_cuts, args=(cut,),
                                               name="send-cut", daemon=True)
            self._recording.start()
        return len(cut)

    def _record_cuts(self, cut: list[HandingOver]) -> None:
        for handing in cut:
            handing.record_cut()


class HandingOver:
    """An attempt talking to its provider, as its senders know it: settled by the attempt
    (it got an answer, or an error) or cut by the shutdown, whichever comes first."""

    def __init__(self, lanes: Lanes, ref: str, attempt: Attempt, entry: dict[str, Any],
                 started: float) -> None:
        self.lanes, self.ref, self.attempt, self.entry = lanes, ref, attempt, entry
        self.started = started
        self._lock = threading.Lock()
        self._state = "handing over"

    def _leave(self) -> None:
        with self.lanes._lock:
            self.lanes._handing.pop(id(self), None)

    def settle(self) -> bool:
        """The attempt has its answer: return False if the shutdown cut it first (then it
        records nothing: its outcome was recorded as unknown)."""
        with self._lock:
            if self._state == "cut":
                return False
            self._state = "settled"
        self._leave()
        return True

    def mark_cut(self) -> bool:
        """Cut the attempt unless it has settled (no round trip); `record_cut` records it."""
        with self._lock:
            if self._state != "handing over":
                return False
            self._state = "cut"
        self._leave()
        return True

    def record_cut(self) -> None:
        """Record the attempt cut (`mark_cut`) as of unknown outcome."""
        entry = self.entry | {"error": CUT_REASON,
                              "seconds": round(time.monotonic() - self.started, 3)}
        unreachable = self.lanes._unreachable
        result = "not recorded (Redis unreachable): its lease and ledger bring it back"
        # Found unreachable at this shutdown: no try (each a wait through the client's
        # retries, one cut after the other, past the container's stop grace period).
        if not unreachable.is_set():
            try:
                result = self.lanes.ctx.store.finish_unknown(self.ref, self.attempt,
                                                             CUT_REASON, entry)
            except (redis.ConnectionError, redis.TimeoutError):
                unreachable.set()
            except redis.RedisError as exc:
                result = f"not recorded ({type(exc).__name__}): its lease and ledger bring it back"
        log.warning("send %s: %s; outcome unknown, tried again once its ledger expires (%s)",
                    self.ref, CUT_REASON, result)
        # Settled for the pump's count too (the attempt's thread never reports it).
        self.lanes._settle(channel_of(self.ref), f"{self.attempt.claim}@{self.ref}", None)


def start_margin(settings: Settings) -> float:
    """Seconds from a claim to its start-by (`hand_over`): room left in its lease for the
    send's timeout, and no longer than the senders may keep it waiting."""
    return min(settings.lease_seconds - settings.send_timeout_seconds - 1,
               settings.send_max_wait_seconds)


def hand_over(ctx: Context, lanes: Lanes, channel: Channel,
              claims: Sequence[Sequence[str]], claimed_at: float, *,
              others_waiting: Callable[[], bool] | None = None) -> str:
    """Give a batch of claims ([ref, version, claim], ...) to this process's senders.

    `others_waiting()`: whether work of another queue waits for a pool process (then the
    hand-over does not hold this one for its senders' room)."""
    start_by = claimed_at + start_margin(ctx.settings)
    lanes.hold(channel, [(ref, claim) for ref, _, claim in claims], claimed_at)
    for index, (ref, version, claim) in enumerate(claims):
        try:
            lanes.submit(channel, ref, version, claim, start_by)
        except RuntimeError:  # shutting down: back to the schedule now, not a lease later
            now = CLOCK.now_utc()  # the pump's clock: Redis's
            for ref, _, claim in claims[index:]:
                ctx.store.requeue(ref, now, "the worker was stopping", claim=claim)
            return f"{index} claim(s) handed to the {channel} senders; the rest handed back"
    # Celery gives the next batch to a pool process that is free, and a hand-over frees
    # it at once, however busy its senders are: one process could take every batch. A
    # process whose senders have more than a round waiting stays busy a little (at most
    # BACKPRESSURE_SECONDS), so the next batches go to another; never while a message of
    # another queue waits for a pool process (another channel's batch, a clinic event).
    lanes.wait_for_room(channel, BACKPRESSURE_SECONDS, others_waiting)
    return f"{len(claims)} claim(s) handed to the {channel} senders"


_process_lanes: Lanes | None = None
_process_watchdog: Watchdog | None = None
_lanes_lock = threading.Lock()


def watchdog() -> Watchdog:
    """Return this process's watchdog."""
    global _process_watchdog
    with _lanes_lock:
        if _process_watchdog is None:
            _process_watchdog = Watchdog()
        return _process_watchdog


def lanes(ctx: Context, on_idle: Callable[[Channel], None] | None = None) -> Lanes:
    """Return this process's senders (made on first use, after a fork)."""
    global _process_lanes
    dog = watchdog()
    with _lanes_lock:
        if _process_lanes is None:
            _process_lanes = Lanes(ctx, on_idle=on_idle, watchdog=dog)
        return _process_lanes


def close_lanes(grace: float | None = None) -> None:
    """Drain this process's senders, if it has any (a warm shutdown; see `Lanes.close`)."""
    global _process_lanes
    with _lanes_lock:
        current, _process_lanes = _process_lanes, None
    if current is not None:
        current.close(grace)


def _forget_after_fork() -> None:
    # A pool child starts with no senders and no watchdog thread of its own yet.
    global _process_lanes, _process_watchdog, _lanes_lock
    _process_lanes = None
    _process_watchdog = None
    _lanes_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
