"""Where a reminder's time is decided: booking + protocol + clinic + now -> reminders.

Pure: no I/O and no clock reads; `now` is a parameter. Every due instant is UTC.

Rules, in order, for each step that applies to the patient:
1. Nominal time: at booking (`now`); `offset` from the start; or `day` + `time` in
   the patient's timezone (DST-safe: a clock time that does not exist that day moves
   to the next valid minute, an ambiguous one takes its first occurrence).
2. Send window (patient-local): a time outside it moves to the next opening. A step
   meant for before the appointment that would then land after it moves back to the
   last allowed moment before the appointment. One that would then land at or after its
   expiry (a 19:30 night text of a weekday series with a window closing at 18:00: the
   next opening is on another day) is skipped, saying why: it could never be sent.
3. Late: if the result is already past when the booking arrives, the step's late
   policy decides: `skip`, or `send` at the next opening (no later than `late_until`
   relative to the start; before the appointment for a pre-appointment step).
4. Gate: an isotretinoin dose inside the washout holds the whole booking.
5. SMS frequency cap (the clinic's `[sms] max_per_day`, `max_per_week`; patient-local
   days, a week being any 7 consecutive days), over this plan's SMS and the patient's
   other SMS at the clinic (`taken`, which the store reads from its other bookings:
   `cap_sms`). The SMS of care-critical steps (`care_critical = true`: the safety messages
   and the "you may resume" message that pairs with a pause) are never moved or dropped by
   the cap: they are counted first, at their time, and the other SMS give way. One that
   still does not fit (the patient's other bookings took the days) goes by email when the
   patient takes email, as any other, else by SMS all the same, beyond the cap, saying so.
   An email of a care-critical step that goes by SMS (the store caps a patient who lists
   email but unsubscribed from it: the step's own SMS does not carry it) counts with
   them, as an SMS on its day.
   Before them a held booking's hold notice: its other SMS do not go while it is held
   (its release caps them again), so they give way to it.
   Then, in due order, another SMS that does not
   fit goes by email when the patient takes email (or is dropped when the step already
   emails), else moves to the next day with room at the same local time (a late step,
   planned for the booking's own instant, at that day's send-window opening, so that a
   re-submission plans it the same), before it expires; else it is skipped. Each says why.
   A re-submission of a stored booking is capped again by the store (`cap_plan`) from the
   plan as it was before the cap: its SMS already sent count where they went, and its
   steps already sent are history, neither counted nor changed (a message that goes again
   for a new date, worker/notices.py, is capped as a new SMS).

A booking is refused (BookingRejected naming the field) when its dates make no sense as
seen at `now`: an appointment in the past or more than `MAX_DAYS_AHEAD` days ahead, an
isotretinoin last dose after the patient's today.

Speed (intake plans thousands of bookings a second): what depends only on a protocol's
step (its words, its days) is prepared once per step, and what depends only on the
protocol is worked out once for it (its pause rule, its care-critical steps), or once per
set of channels a patient takes (each step's channels and the words its reasons end
with); the clock arithmetic that depends only on (local day, clock time, zone) or
(instant, send window, zone) — shared by every booking on the same day in the same zone —
is memoised by those full inputs (bounded caches of pure functions: a wall-clock step's
occurrences per visit day, zone and window, looked up once a booking for all its steps;
the patient-local day of a UTC instant, which the SMS cap counts by); a local time is
resolved with two `utcoffset` calls, not a round trip per minute. A reminder that says
only how its time was derived takes those words as they are, not joined again. The SMS
cap first counts every SMS on its planned day: when all fit (most plans), nothing is
moved and nothing more is counted (`_all_fit`; a test checks the cap gives the same with
and without it); otherwise each 7-day count slides one day at a time, each SMS's local day
is the one worked out for that check, the days its reasons name are written once per day
(strftime is slow; `_ymd`) and the later days an SMS may move to are looked up per (local
day, clock time, zone) (`_later_wall`; tests/test_cap_sms_before.py compares the cap with
its copy from before these). tests/
planner_reference.py keeps the straightforward version, and tests check that both give
equal plans; tests/test_check_fixture.py checks that a varied set of bookings is checked
(validated, planned, recorded) as the code before these memos checked it.

A plan travels from `reminders book`'s check to its store as plain values (`plan_record`)
and back (`plan_from_record`); there, a plan the SMS cap left alone is decoded lazily: its
reminders are made from the record when first read (the store writes a new booking from
the record itself and never reads them; tests/test_intake_fast.py compares the two).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from .clinics import MINUTES_PER_DAY, Clinic, SendWindow, SmsSettings
from .errors import BookingRejected
from .models import MAX_DAYS_AHEAD, Booking, Channel
from .protocols import HOLD_NOTICE_STEP, WEEKDAYS, Protocol, Step, format_duration
from .status import Status

ONE_MINUTE = timedelta(minutes=1)
# A DST gap is at most a couple of hours; search a day to be safe and still bounded.
_MAX_GAP_MINUTES = MINUTES_PER_DAY

# The statuses a plan or a planned reminder can have, as members of `Status` (which
# compare equal to their names: "held" == Status.HELD).
PlanStatus = Literal[Status.SCHEDULED, Status.HELD]
ReminderStatus = Literal[Status.SCHEDULED, Status.SKIPPED]
_SCHEDULED = Status.SCHEDULED  # (a local name: reading it from the enum takes longer)


@dataclass(frozen=True)
class PlannedReminder:
    """One message to one channel, with the instant it is due and why."""

    key: str  # unique within a booking: "<step>[#<occurrence>]:<channel>"
    step: str
    channel: Channel
    template: str
    occurrence: int
    due_at: datetime  # UTC; for a skipped reminder, when it would have been due
    status: ReminderStatus
    reason: str
    at_booking: bool = False  # due "when the booking arrives": a re-submission keeps its time
    # The instant after which it must not be sent at all (a pre-visit step once the visit
    # has begun; `late_until` after the start), and in words; None: it never expires.
    expires_at: datetime | None = None
    expires_note: str = ""


@dataclass(frozen=True)
class Plan:
    """The whole plan for a booking; `held` means no reminder may be sent yet."""

    status: PlanStatus
    reminders: list[PlannedReminder]
    hold_reason: str | None = None
    window: SendWindow | None = None  # the clinic's send window it was planned under
    # The protocol's pause and invite steps (`Protocol.notice_steps()`): the store keeps
    # them with the booking for the change notices (worker/notices.py).
    notice_steps: str = ""
    caps: SmsSettings | None = None  # the clinic's SMS frequency caps it was planned under
    # The booking came too late for the protocol's minimum retinoid pause: why, else None
    # (`late_pause`); and the rule it was found by: (pause step id, minimum days).
    late_pause: str | None = None
    pause_rule: tuple[str, int] | None = None
    # The protocol's care-critical step ids (`care_critical = true`, the resume message among
    # them): the SMS cap never drops, moves or converts their SMS (`cap_sms`).
    protected: frozenset[str] = frozenset()
    # The reminders as planned before the SMS cap, when the cap changed them (None: as
    # `reminders`): a re-submission is capped again from these (`cap_plan`), its steps
    # already sent being history, not SMS to count again.
    # Not part of what the plan says: left out of its equality and repr.
    uncapped: list[PlannedReminder] | None = field(default=None, compare=False, repr=False)

    if not TYPE_CHECKING:  # (hidden from mypy: it would take any name for a Plan's)

        def __getattr__(self, name: str) -> Any:
            """A plan decoded lazily (`plan_from_record(lazy=True)`) makes its reminders
            from its record when they are first read (then a plain field); any other
            missing attribute is missing as usual."""
            if name == "reminders":
                record = self.__dict__.get("_record")
                if record is not None:
                    _make_reminders(self, record)
                    return self.__dict__[name]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# --- clock arithmetic in the patient's timezone ----------------------------------------


def wall_clock(day: date, at: time, tz: ZoneInfo) -> datetime:
    """Return the UTC instant of `day` `at` in `tz`, DST-safe (see module docstring)."""
    return _wall(day, at.hour, at.minute, tz)


@lru_cache(maxsize=16384)
def _wall(day: date, hour: int, minute: int, tz: ZoneInfo) -> datetime:
    naive = datetime(day.year, day.month, day.day, hour, minute)
    before = tz.utcoffset(naive)  # fold=0: the offset before a transition
    after = tz.utcoffset(naive.replace(fold=1))
    if before is not None and after is not None and before >= after:
        # Not in a gap: the time exists once, or twice (fall back) and fold=0 is the first.
        return (naive - before).replace(tzinfo=UTC)
    return _wall_in_gap(naive, tz)


def _wall_in_gap(naive: datetime, tz: ZoneInfo) -> datetime:
    """The first valid minute at or after `naive` (which a spring-forward skipped)."""
    for _ in range(_MAX_GAP_MINUTES):
        aware = naive.replace(tzinfo=tz, fold=0)  # fold=0: the first of two occurrences
        if aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive:
            return aware.astimezone(UTC)
        naive += ONE_MINUTE  # this minute does not exist here (spring forward)
    raise ValueError(f"no valid local time near {naive} in {tz.key}")


def _minute_wall(day: date, minute: int, tz: ZoneInfo) -> datetime:
    """Return the UTC instant of `minute` after local midnight of `day` (1440 = next day)."""
    extra_days, minute = divmod(minute, MINUTES_PER_DAY)
    return _wall(day + timedelta(days=extra_days) if extra_days else day, minute // 60,
                 minute % 60, tz)


def _local_minute(instant: datetime, tz: ZoneInfo) -> tuple[date, float]:
    local = instant.astimezone(tz)
    return local.date(), local.hour * 60 + local.minute + local.second / 60


def _both_occurrences(instant: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """Return (first, second) UTC instants showing `instant`'s local clock time.

    They differ only in a repeated (fall-back) hour; elsewhere both are `instant`.
    """
    local = instant.astimezone(tz)
    return (local.replace(fold=0).astimezone(UTC), local.replace(fold=1).astimezone(UTC))


# A window can vanish on a DST day (02:00-02:30 on a spring-forward night), never on two
# days in a row: a few days of search always find the next or previous opening.
_WINDOW_SEARCH_DAYS = 4


def next_opening(instant: datetime, window: SendWindow, tz: ZoneInfo) -> datetime:
    """Return `instant` if it is inside the window, else the window's next opening."""
    return _next_opening(instant, window.start, window.end, tz)


def last_opening_before(instant: datetime, window: SendWindow, tz: ZoneInfo) -> datetime:
    """Return the last whole minute inside the window strictly before `instant`."""
    return _last_opening_before(instant, window.start, window.end, tz)


def _inside(minute: float, start: int, end: int) -> bool:
    return start <= minute < end


def _describe(start: int, end: int) -> str:
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def _next_opening(instant: datetime, start: int, end: int, tz: ZoneInfo) -> datetime:
    if start <= _local_minute(instant, tz)[1] < end:
        return instant
    return _opening_after(instant, start, end, tz)


# Memoised by the instant (equal instants in any offset are one key: the result, a UTC
# instant, depends only on the instant), the window and the zone.
@lru_cache(maxsize=65536)
def _opening_after(instant: datetime, start: int, end: int, tz: ZoneInfo) -> datetime:
    day, _ = _local_minute(instant, tz)
    for n in range(_WINDOW_SEARCH_DAYS):
        opening = _minute_wall(day + timedelta(days=n), start, tz)
        # An opening in a DST gap moved to the next valid minute, which may be past the
        # window's end: then the window does not exist that day.
        for candidate in _both_occurrences(opening, tz):
            if candidate >= instant and _inside(_local_minute(candidate, tz)[1], start, end):
                return candidate
    raise ValueError(f"no opening of the send window {_describe(start, end)} near {instant}")


@lru_cache(maxsize=16384)
def _last_opening_before(instant: datetime, start: int, end: int, tz: ZoneInfo) -> datetime:
    instant = instant.astimezone(UTC)  # equal instants share a key: answer in UTC
    day, _ = _local_minute(instant, tz)
    for n in range(_WINDOW_SEARCH_DAYS):
        close = _minute_wall(day - timedelta(days=n), end, tz)
        for closing in reversed(_both_occurrences(close, tz)):  # the later one first
            last = min(instant, closing) - timedelta(microseconds=1)
            last = last.replace(second=0, microsecond=0)
            if _inside(_local_minute(last, tz)[1], start, end):
                return last
    raise ValueError(
        f"no opening of the send window {_describe(start, end)} before {instant}")


# --- the plan --------------------------------------------------------------------------


def _occurrences(
    step: Step, start: datetime, tz: ZoneInfo, now: datetime
) -> Iterator[tuple[int, datetime, str]]:
    """Yield (occurrence number, nominal UTC instant, how it was derived) for a step."""
    if step.at == "booking":
        yield 1, now, "when the booking arrives"
        return
    if step.offset is not None:
        side = "before" if step.offset < timedelta(0) else "after"
        yield 1, start + step.offset, f"{format_duration(abs(step.offset))} {side} the start"
        return
    assert step.time is not None
    visit_day = start.astimezone(tz).date()
    n = 0
    for offset in step.day_offsets():
        day = visit_day + timedelta(days=offset)
        if (
            step.repeat
            and step.repeat.weekdays
            and WEEKDAYS[day.weekday()] not in step.repeat.weekdays
        ):
            continue
        n += 1
        rel = (
            "on the day"
            if offset == 0
            else (
                f"{-offset} day{'s' if offset != -1 else ''} before"
                if offset < 0
                else f"{offset} day{'s' if offset != 1 else ''} after"
            )
        )
        yield n, wall_clock(day, step.time, tz), f"{rel}, {step.time:%H:%M} patient-local"


def first_nominal(step: Step, start: datetime, tz: ZoneInfo, now: datetime) -> datetime:
    """Return the nominal instant of a step's first occurrence for an appointment at `start`
    (before the send window; `now` for a step due at booking)."""
    return next(_occurrences(step, start, tz, now))[1]


def _place(
    step: Step,
    nominal: datetime,
    start: datetime,
    now: datetime,
    window: SendWindow,
    tz: ZoneInfo,
) -> tuple[ReminderStatus, datetime, str]:
    """Apply the send window and the late policy to one nominal instant."""
    before_visit = nominal < start
    due = next_opening(nominal, window, tz)
    note = "" if due == nominal else f"; moved into the send window {window.describe()}"
    if before_visit and due >= start:
        due = last_opening_before(start, window, tz)
        note = f"; moved to the last moment of the send window {window.describe()} before the visit"
    if due >= now:
        return Status.SCHEDULED, due, note
    # Already past when the booking arrived: the step's late policy decides.
    if step.late == "skip":
        return Status.SKIPPED, nominal, "its time had passed when the booking arrived"
    due = next_opening(now, window, tz)
    deadline = start + step.late_until if step.late_until is not None else None
    if before_visit:  # whatever late_until says, a pre-appointment step goes before it
        deadline = start if deadline is None else min(deadline, start)
    if deadline is not None and due >= deadline:
        return Status.SKIPPED, nominal, "its time had passed and it is too late to send it now"
    return (
        Status.SCHEDULED,
        due,
        "; late: its time had passed when the booking arrived, sent at the next opening",
    )


# A step after the visit with no `late_until` is about its own day ("apply SPF this
# morning", "day 3: peeling is normal"): a day after its planned time its words are stale.
STALE_AFTER = timedelta(days=1)
# A weekday series ("tretinoin tonight" on Mon/Wed/Fri nights) is about its own night: once
# that day has ended (patient-local) it must not go on another night, not even the next one.
DAY_OVER = "it was meant for that day of a weekday series, which has ended"


def day_end(nominal: datetime, tz: ZoneInfo) -> datetime:
    """The patient-local midnight that ends `nominal`'s day (DST-safe)."""
    return _wall(nominal.astimezone(tz).date() + timedelta(days=1), 0, 0, tz)


def expiry(
    step: Step, nominal: datetime, start: datetime, tz: ZoneInfo | None = None
) -> tuple[datetime, str]:
    """Return the instant after which this occurrence must not be sent, and why.

    The same rule as a late booking's (`_place`), applied again at send time: a step meant
    for before the visit never goes once it has begun; `late_until` bounds any step; an
    occurrence of a weekday series goes no later than the end of its own day (in `tz`, the
    patient's); any other step goes no later than a day after its planned time.
    """
    deadline = start + step.late_until if step.late_until is not None else None
    if nominal < start and (deadline is None or deadline >= start):
        return start, "it was meant for before the appointment, which has begun"
    if deadline is not None:
        side = "before" if deadline < start else "after"
        gap = format_duration(abs(deadline - start))
        return deadline, f"it could be sent only until {gap} {side} the start"
    if tz is not None and step.repeat is not None and step.repeat.weekdays:
        return day_end(nominal, tz), DAY_OVER
    return nominal + STALE_AFTER, "it is more than a day past its planned time"


@dataclass(frozen=True)
class SendTime:
    """What the send-time rules say about sending now: send, defer until `at`, or skip."""

    action: Literal["send", "defer", "skip"]
    at: datetime | None = None
    reason: str = ""


def at_send_time(
    now: datetime,
    window: SendWindow,
    tz: ZoneInfo,
    expires_at: datetime | None,
    expires_note: str = "",
) -> SendTime:
    """Re-check a reminder's time rules at the moment of sending (retries, replay, backlog).

    Past its expiry: skip. Outside the patient's send window: defer to the next opening,
    unless that opening is past the expiry (then skip).
    """
    if expires_at is not None and now >= expires_at:
        return SendTime("skip", reason=f"not sent: {expires_note or 'past its expiry'}")
    opening = next_opening(now, window, tz)
    if opening == now:
        return SendTime("send")
    local = opening.astimezone(tz)
    if expires_at is not None and opening >= expires_at:
        return SendTime(
            "skip",
            reason=f"not sent: outside the send window {window.describe()} until "
            f"{local:%Y-%m-%d %H:%M %Z}, and {expires_note or 'it expires before that'}",
        )
    return SendTime(
        "defer",
        at=opening,
        reason=f"outside the send window {window.describe()} (patient-local): "
        f"waits for {local:%Y-%m-%d %H:%M %Z}",
    )


def _channels(step: Step, offered: list[Channel]) -> tuple[list[Channel], str]:
    """Return the channels to use: the step's that the patient takes, else the patient's first."""
    chosen = [c for c in step.channels if c in offered]
    if chosen:
        return chosen, ""
    return [
        offered[0]
    ], f"; by {offered[0]} because the patient does not take {'/'.join(step.channels)}"


def isotretinoin_hold(booking: Booking, protocol: Protocol, clinic: Clinic) -> str | None:
    """Return why the booking must be held for the clinic's review, or None."""
    last_dose = booking.medications.isotretinoin_last_dose
    if last_dose is None:
        return None  # no last dose: nothing to wait for
    if protocol.isotretinoin_washout_days is None:
        return None  # this treatment has no isotretinoin gate; a clinic override only sets days
    washout = clinic.isotretinoin_washout_days
    if washout is None:
        washout = protocol.isotretinoin_washout_days
    if washout is None:
        return None
    visit_day = booking.starts_at.astimezone(ZoneInfo(booking.patient.timezone)).date()
    gap = (visit_day - last_dose).days
    if gap >= washout:
        return None
    return HOLD_REASON.format(last_dose=last_dose.isoformat(), gap=gap, treatment=protocol.id,
                              washout=washout)


# The reasons a clinic is alerted with (a hold, a late pause): English on the timeline and in
# the webhooks; `reason_facts` reads their values back for an alert in the clinic's language.
HOLD_REASON = ("isotretinoin last taken {last_dose}, {gap} days before the appointment; "
               "the washout for {treatment} is {washout} days: the clinic must review")
NO_PAUSE_REASON = ("the message to pause retinoids cannot go before the appointment; the "
                   "protocol's minimum pause is {days} days: call the patient")
SHORT_PAUSE_REASON = ("the message to pause retinoids goes {gap} days before the appointment, "
                      "less than the protocol's minimum pause of {days} days: the patient is "
                      "asked to call")
_REASON_KINDS = {"isotretinoin": HOLD_REASON, "no_pause": NO_PAUSE_REASON,
                 "short_pause": SHORT_PAUSE_REASON}


def _reason_pattern(form: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", form)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^,;:]+?)"
                              for i, p in enumerate(parts)) + r"\Z")


_REASON_PATTERNS = {kind: _reason_pattern(form) for kind, form in _REASON_KINDS.items()}


def reason_facts(reason: str) -> dict[str, str]:
    """The values of a hold or late-pause reason, with its `kind` ("isotretinoin",
    "no_pause", "short_pause"); {} for any other text (an event stored by an older
    version: the alert then quotes it as it is)."""
    for kind, pattern in _REASON_PATTERNS.items():
        if found := pattern.match(reason):
            return {"kind": kind, **found.groupdict()}
    return {}


_MAX_AHEAD = timedelta(days=MAX_DAYS_AHEAD)


def check_dates(booking: Booking, now: datetime, tz: ZoneInfo) -> None:
    """Refuse dates that make no sense at `now` (UTC), naming each field."""
    errors = []
    start = booking.starts_at.astimezone(UTC)
    latest = now + _MAX_AHEAD
    if start <= now:
        errors.append(("starts_at", "the appointment is in the past"))
    elif start > latest:
        errors.append((
            "starts_at",
            f"is more than {MAX_DAYS_AHEAD} days ahead (the latest accepted is "
            f"{latest:%Y-%m-%d}): appointments are booked at most two years ahead",
        ))
    dose = booking.medications.isotretinoin_last_dose
    if dose is not None:
        today = now.astimezone(tz).date()
        if dose > today:
            errors.append((
                "medications.isotretinoin_last_dose",
                f"is in the future (the patient's today is {today.isoformat()}): give the "
                "last dose taken so far, today's date if the patient still takes it",
            ))
    if errors:
        raise BookingRejected(errors)


# --- plan(): the same rules as _occurrences/_place/expiry above, prepared per step -------


@dataclass(frozen=True, eq=False)
class _Prepared:
    """What `plan` needs of one step, worked out once for the step object."""

    ident: int  # unique among prepared steps: the first one keys its protocol's memos
    id: str
    kind: Literal["booking", "offset", "wall"]
    at_booking: bool  # kind "booking"
    channels: tuple[Channel, ...]
    flags: tuple[str, ...]  # only_if_any
    uses: str  # "; the patient uses tretinoin or retinol", or ""
    derived: str  # how its time is derived (at booking, offset)
    offset: timedelta
    days: tuple[tuple[int, str], ...]  # wall clock: (day offset, how its time is derived)
    weekdays: frozenset[int] | None  # a weekday series: the weekdays it keeps
    hour: int
    minute: int
    numbered: bool  # a series: its keys always carry "#<occurrence>"
    keys: dict[str, str]  # channel -> key, when not numbered
    template: str
    late_skip: bool
    late_until: timedelta | None
    until_not_before: bool  # no late_until, or one not before the start
    until_note: str  # expiry words when late_until bounds it


def _prepare(step: Step) -> _Prepared:
    hour = minute = 0
    days: tuple[tuple[int, str], ...] = ()
    derived = ""
    offset = timedelta(0)
    if step.at == "booking":
        kind: Literal["booking", "offset", "wall"] = "booking"
        derived = "when the booking arrives"
    elif step.offset is not None:
        kind, offset = "offset", step.offset
        side = "before" if step.offset < timedelta(0) else "after"
        derived = f"{format_duration(abs(step.offset))} {side} the start"
    else:
        assert step.time is not None
        kind, hour, minute = "wall", step.time.hour, step.time.minute
        clock = f"{step.time:%H:%M} patient-local"
        days = tuple((d, f"{_relative_day(d)}, {clock}") for d in step.day_offsets())
    weekdays = None
    if step.repeat is not None and step.repeat.weekdays:
        weekdays = frozenset(WEEKDAYS.index(w) for w in step.repeat.weekdays)
    until_note = ""
    if step.late_until is not None:
        side = "before" if step.late_until < timedelta(0) else "after"
        until_note = (
            f"it could be sent only until {format_duration(abs(step.late_until))} {side} "
            "the start"
        )
    return _Prepared(
        ident=next(_IDENTS),
        id=step.id,
        kind=kind,
        at_booking=kind == "booking",
        channels=tuple(step.channels),
        flags=tuple(step.only_if_any),
        uses=f"; the patient uses {' or '.join(step.only_if_any)}" if step.only_if_any else "",
        derived=derived,
        offset=offset,
        days=days,
        weekdays=weekdays,
        hour=hour,
        minute=minute,
        numbered=step.repeat is not None,
        keys={c: f"{step.id}:{c}" for c in ("email", "sms")},
        template=step.template,
        late_skip=step.late == "skip",
        late_until=step.late_until,
        until_not_before=step.late_until is None or step.late_until >= timedelta(0),
        until_note=until_note,
    )


_IDENTS = itertools.count()


def _relative_day(offset: int) -> str:
    if offset == 0:
        return "on the day"
    if offset < 0:
        return f"{-offset} day{'s' if offset != -1 else ''} before"
    return f"{offset} day{'s' if offset != 1 else ''} after"


# Prepared steps per protocol object (kept with the object: an id is reused only after it).
_PREPARED: dict[int, tuple[Protocol, tuple[_Prepared, ...], str]] = {}


def _prepared(protocol: Protocol) -> tuple[tuple[_Prepared, ...], str]:
    """Return the protocol's prepared steps and its notice steps."""
    hit = _PREPARED.get(id(protocol))
    if hit is not None and hit[0] is protocol:
        return hit[1], hit[2]
    steps = tuple(_prepare(step) for step in protocol.steps)
    if len(_PREPARED) >= 256:  # tests build many protocols; the service has a handful
        _PREPARED.clear()
    notice_steps = protocol.notice_steps()
    _PREPARED[id(protocol)] = (protocol, steps, notice_steps)
    return steps, notice_steps


# A wall-clock step's occurrences for a visit day, zone and send window:
# (number, nominal instant, derived words, first opening at or after it, its note, stale expiry)
_Occurrence = tuple[int, datetime, str, datetime, bool, datetime]


def _wall_occurrences(
    step: _Prepared, visit_day: date, tz: ZoneInfo, start: int, end: int
) -> tuple[_Occurrence, ...]:
    """Kept per protocol, visit day, zone and window (`_walls`): every booking on that day
    in that zone shares it."""
    out: list[_Occurrence] = []
    for offset, derived in step.days:
        day = visit_day + timedelta(days=offset)
        if step.weekdays is not None and day.weekday() not in step.weekdays:
            continue
        nominal = _wall(day, step.hour, step.minute, tz)
        opening = _next_opening(nominal, start, end, tz)
        stale = nominal + STALE_AFTER if step.weekdays is None else day_end(nominal, tz)
        out.append((len(out) + 1, nominal, derived, opening, opening != nominal, stale))
    return tuple(out)


# Per protocol (its prepared steps' first ident) and the channels a patient takes: each
# step's channels and the words its reasons end with (`_Prepared.uses`, the channel note).
_CHOICES: dict[tuple[int, tuple[Channel, ...]], tuple[tuple[tuple[Channel, ...], str], ...]] = {}


def _choices(prepared: tuple[_Prepared, ...], ident: int,
             offered: tuple[Channel, ...]) -> tuple[tuple[tuple[Channel, ...], str], ...]:
    out = []
    for step in prepared:
        channels, channel_note = _channel_choice(step.channels, offered)
        out.append((channels, step.uses + channel_note))
    if len(_CHOICES) >= 1024:
        _CHOICES.clear()
    _CHOICES[(ident, offered)] = result = tuple(out)
    return result


# Per protocol, visit day, zone and send window: its wall-clock steps' occurrences, each
# worked out (`_wall_occurrences`) when a booking first needs it (None until then).
_WALLS: dict[tuple[int, date, ZoneInfo, int, int], list[tuple[_Occurrence, ...] | None]] = {}


def _walls(prepared: tuple[_Prepared, ...], ident: int, visit_day: date, tz: ZoneInfo,
           start: int, end: int) -> list[tuple[_Occurrence, ...] | None]:
    key = (ident, visit_day, tz, start, end)
    walls = _WALLS.get(key)
    if walls is None:
        if len(_WALLS) >= 4096:  # a few hundred a day of visits in a few zones
            _WALLS.clear()
        walls = _WALLS[key] = [None] * len(prepared)
    return walls


@lru_cache(maxsize=64)
def _channel_choice(
    step_channels: tuple[Channel, ...], offered: tuple[Channel, ...]
) -> tuple[tuple[Channel, ...], str]:
    chosen = tuple(c for c in step_channels if c in offered)
    if chosen:
        return chosen, ""
    first = offered[0]
    return (first,), f"; by {first} because the patient does not take {'/'.join(step_channels)}"


@lru_cache(maxsize=64)
def _window_notes(start: int, end: int) -> tuple[str, str, str]:
    window = _describe(start, end)
    return (
        f"; moved into the send window {window}",
        f"; moved to the last moment of the send window {window} before the visit",
        f"outside the send window {window} until after it expires: ",
    )


_LATE = "; late: its time had passed when the booking arrived, sent at the next opening"
_PASSED = "its time had passed when the booking arrived"
_TOO_LATE = "its time had passed and it is too late to send it now"
_BEGUN = "it was meant for before the appointment, which has begun"
_STALE = "it is more than a day past its planned time"
# The planner's words are few and repeated in every booking: one string object each.
_WORDS: dict[str, str] = {}


def _word(text: str) -> str:
    shared = _WORDS.get(text)
    if shared is None:
        if len(_WORDS) >= 4096:
            _WORDS.clear()
        _WORDS[text] = shared = text
    return shared


_new_reminder = _new_plan = object.__new__


def plan(booking: Booking, protocol: Protocol, clinic: Clinic, now: datetime) -> Plan:
    """Return the reminders for `booking` as seen at `now` (an aware datetime)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    start = booking.starts_at.astimezone(UTC)
    tz = ZoneInfo(booking.patient.timezone)
    check_dates(booking, now, tz)
    window = clinic.send_window
    w_start, w_end = window.start, window.end
    moved, moved_back, unsendable = _window_notes(w_start, w_end)
    medications = booking.medications
    offered = tuple(booking.patient.channels)
    visit_day: date | None = None
    reminders: list[PlannedReminder] = []
    add = reminders.append
    new_reminder, set_fields = _new_reminder, object.__setattr__
    prepared, notice_steps = _prepared(protocol)
    ident = prepared[0].ident if prepared else -1
    choices = _CHOICES.get((ident, offered))
    if choices is None:
        choices = _choices(prepared, ident, offered)
    walls: list[tuple[_Occurrence, ...] | None] | None = None
    for i, step in enumerate(prepared):
        if step.flags:  # only for a patient who uses one of them
            for flag in step.flags:
                if getattr(medications, flag):
                    break
            else:
                continue
        channels, suffix = choices[i]
        occurrences: tuple[_Occurrence, ...] | None
        if step.kind == "wall":
            if visit_day is None:
                visit_day = start.astimezone(tz).date()
            if walls is None:
                walls = _walls(prepared, ident, visit_day, tz, w_start, w_end)
            occurrences = walls[i]
            if occurrences is None:
                occurrences = walls[i] = _wall_occurrences(step, visit_day, tz, w_start, w_end)
        else:
            nominal = now if step.kind == "booking" else start + step.offset
            opening = _next_opening(nominal, w_start, w_end, tz)
            occurrences = ((1, nominal, step.derived, opening, opening != nominal,
                            nominal + STALE_AFTER),)
        numbered = step.numbered or len(occurrences) > 1
        for number, nominal, derived, due, outside, stale in occurrences:
            # The send window, then the late policy (as `_place`).
            before_visit = nominal < start
            note = moved if outside else ""
            if before_visit and due >= start:
                due = _last_opening_before(start, w_start, w_end, tz)
                note = moved_back
            status: ReminderStatus = Status.SCHEDULED
            if due < now:
                if step.late_skip:
                    status, due, note = Status.SKIPPED, nominal, _PASSED
                else:
                    due = _next_opening(now, w_start, w_end, tz)
                    deadline = start + step.late_until if step.late_until is not None else None
                    if before_visit:
                        deadline = start if deadline is None else min(deadline, start)
                    if deadline is not None and due >= deadline:
                        status, due, note = Status.SKIPPED, nominal, _TOO_LATE
                    else:
                        note = _LATE
            # When it must no longer be sent (as `expiry`).
            until = step.late_until
            if before_visit and step.until_not_before:
                expires_at, expires_note = start, _BEGUN
            elif until is not None:
                expires_at, expires_note = start + until, step.until_note
            else:
                expires_at, expires_note = stale, _STALE if step.weekdays is None else DAY_OVER
            if status == Status.SCHEDULED and due >= expires_at:
                # The window opens only once it has expired (a night text at 19:30, a window
                # closing at 18:00): it could never be sent; nor does it take an SMS slot.
                status, due, note = Status.SKIPPED, nominal, _word(unsendable + expires_note)
            if status == Status.SCHEDULED:
                # Most reminders say only how their time was derived: no words to join.
                reason = (derived if not note and not suffix
                          else _word(derived + note + suffix))
            else:
                reason = note
            for channel in channels:
                # A PlannedReminder as `PlannedReminder(...)` makes it (its fields in order),
                # without its per-field frozen `__setattr__`: ten per booking.
                reminder = new_reminder(PlannedReminder)
                set_fields(reminder, "__dict__", {
                    "key": f"{step.id}#{number}:{channel}" if numbered else step.keys[channel],
                    "step": step.id,
                    "channel": channel,
                    "template": step.template,
                    "occurrence": number,
                    "due_at": due,
                    "status": status,
                    "reason": reason,
                    "at_booking": step.at_booking,
                    "expires_at": expires_at,
                    "expires_note": expires_note,
                })
                add(reminder)
    hold = isotretinoin_hold(booking, protocol, clinic)
    if hold and protocol.hold_template:
        reminders.append(hold_notice(protocol.hold_template, offered, now, start, window, tz))
    reminders.sort(key=_order)
    protected = protected_steps(protocol)
    uncapped = reminders
    reminders = cap_sms(reminders, clinic.sms, tz, email="email" in offered,
                        protected=protected, window=window)
    rule = pause_rule(protocol, booking)
    if rule and visit_day is None:
        visit_day = start.astimezone(tz).date()
    # A Plan as `Plan(...)` makes it (its fields in order), without its per-field frozen
    # `__setattr__`.
    planned: Plan = _new_plan(Plan)
    set_fields(planned, "__dict__", {
        "status": Status.HELD if hold else Status.SCHEDULED,
        "reminders": reminders,
        "hold_reason": hold,
        "window": window,
        "notice_steps": notice_steps,
        "caps": clinic.sms,
        "late_pause": _late_pause(reminders, rule, visit_day, tz)
        if rule and visit_day is not None else None,
        "pause_rule": rule,
        "protected": protected,
        "uncapped": None if reminders is uncapped else uncapped,
    })
    return planned


_PROTECTED: dict[int, tuple[Protocol, frozenset[str]]] = {}


def protected_steps(protocol: Protocol) -> frozenset[str]:
    """The protocol's care-critical step ids: the SMS cap never drops their SMS."""
    hit = _PROTECTED.get(id(protocol))
    if hit is not None and hit[0] is protocol:
        return hit[1]
    if len(_PROTECTED) >= 256:
        _PROTECTED.clear()
    ids = frozenset(s.id for s in protocol.steps if s.care_critical)
    _PROTECTED[id(protocol)] = (protocol, ids)
    return ids


# --- the message of a held booking ------------------------------------------------------------

def is_hold_notice(key: str) -> bool:
    """Return whether a reminder key is a held booking's notice (sent despite the hold)."""
    return key.split(":", 1)[0] == HOLD_NOTICE_STEP


def hold_notice(
    template: str, offered: tuple[Channel, ...], now: datetime, start: datetime,
    window: SendWindow, tz: ZoneInfo,
) -> PlannedReminder:
    """The one message a held booking sends: at booking (the window's next opening), on SMS
    if the patient takes it, else email; never once the visit has begun."""
    channel: Channel = "sms" if "sms" in offered else offered[0]
    due = next_opening(now, window, tz)
    skipped = due >= start
    return PlannedReminder(
        key=f"{HOLD_NOTICE_STEP}:{channel}", step=HOLD_NOTICE_STEP, channel=channel,
        template=template, occurrence=1, due_at=due,
        status=Status.SKIPPED if skipped else Status.SCHEDULED,
        reason=(_TOO_LATE if skipped else
                "the booking is held for the clinic's review: the patient is told the clinic "
                "will call before the visit"),
        at_booking=True, expires_at=start, expires_note=_BEGUN)


# --- a booking too late for the full retinoid pause ------------------------------------------

def pause_rule(protocol: Protocol, booking: Booking) -> tuple[str, int] | None:
    """(pause step id, minimum pause in days) when the protocol's pause step applies to the
    patient and the protocol states the minimum (`[advice] retinoid_pause_min_days`)."""
    found = _pause_of(protocol)
    if found is None:
        return None
    rule, flags = found
    medications = booking.medications
    if flags and not any(getattr(medications, f) for f in flags):  # `Step.applies_to`
        return None
    return rule


_PAUSES: dict[int, tuple[Protocol, tuple[tuple[str, int], tuple[str, ...]] | None]] = {}


def _pause_of(protocol: Protocol) -> tuple[tuple[str, int], tuple[str, ...]] | None:
    """The protocol's pause rule and the medications its pause step is for (any of them;
    none: every patient), or None without a pause step or a minimum: worked out once."""
    hit = _PAUSES.get(id(protocol))
    if hit is not None and hit[0] is protocol:
        return hit[1]
    if len(_PAUSES) >= 256:
        _PAUSES.clear()
    step = protocol.pause_step()
    days = protocol.advice.get("retinoid_pause_min_days")
    found = None
    if step is not None and not isinstance(days, bool) and isinstance(days, int | float):
        found = (step.id, int(days)), tuple(step.only_if_any)
    _PAUSES[id(protocol)] = (protocol, found)
    return found


def late_pause(
    reminders: list[PlannedReminder], rule: tuple[str, int], booking: Booking
) -> str | None:
    """Why the booking is too late for the full pause, or None.

    Too late: the pause message goes (patient-local calendar days, as the template counts
    `days_until`) fewer than the minimum days before the appointment, or not at all. The
    message then asks the patient to call the clinic; the clinic is told (`late_pause` on
    the timeline, the `booking.late_pause` event).
    """
    tz = ZoneInfo(booking.patient.timezone)
    return _late_pause(reminders, rule, booking.starts_at.astimezone(tz).date(), tz)


def _late_pause(reminders: list[PlannedReminder], rule: tuple[str, int], visit_day: date,
                tz: ZoneInfo) -> str | None:
    """`late_pause` for an appointment on the patient-local day `visit_day`."""
    step, days = rule
    going = [r.due_at for r in reminders if r.step == step and r.status == Status.SCHEDULED]
    if not going:
        return NO_PAUSE_REASON.format(days=days)
    gap = visit_day.toordinal() - local_day(min(going), tz)
    if gap >= days:
        return None
    return SHORT_PAUSE_REASON.format(gap=gap, days=days)


# --- the SMS frequency cap -----------------------------------------------------------------

WEEK_DAYS = 7
_WEEK = timedelta(days=WEEK_DAYS - 1)


def cap_words(caps: SmsSettings) -> str:
    return _cap_words(caps.max_per_day, caps.max_per_week)


@lru_cache(maxsize=64)
def _cap_words(per_day: int, per_week: int) -> str:
    return (f"the patient's SMS limit at this clinic ({per_day} a day, "
            f"{per_week} in any {WEEK_DAYS} days)")


# The end of the reason of a care-critical SMS that goes beyond the cap (`cap_sms`).
BEYOND_CAP = ": care-critical, the other SMS give way"


# A patient-local day (ordinal) as the cap's reasons write it, `f"{day:%Y-%m-%d}"`
# (strftime, about 2.5 µs): memoised, at most _YMD_MAX days (then all are forgotten).
_YMD: dict[int, str] = {}
_YMD_MAX = 4096


def _ymd(day: int) -> str:
    text = _YMD.get(day)
    if text is None:
        if len(_YMD) >= _YMD_MAX:
            _YMD.clear()
        text = _YMD[day] = f"{date.fromordinal(day):%Y-%m-%d}"
    return text


# The later days an SMS the cap moves may go (`cap_sms`): per (local day as an ordinal,
# hour, minute, zone), `_wall` of them and its local day, or None for the day when that
# clock time does not show there (a DST gap moved it). At most _LATER_MAX (then all are
# forgotten).
_LATER: dict[tuple[int, int, int, ZoneInfo], tuple[datetime, int | None]] = {}
_LATER_MAX = 16384


def _later_wall(day: int, hour: int, minute: int, tz: ZoneInfo) -> tuple[datetime, int | None]:
    key = (day, hour, minute, tz)
    found = _LATER.get(key)
    if found is None:
        if len(_LATER) >= _LATER_MAX:
            _LATER.clear()
        later = _wall(date.fromordinal(day), hour, minute, tz)
        shown = later.astimezone(tz)
        found = _LATER[key] = (later, shown.toordinal() if (shown.hour, shown.minute)
                               == (hour, minute) else None)
    return found


# Per zone, the patient-local day (ordinal) of each UTC instant met (the planner's instants
# are UTC): a booking's SMS fall on the days of its neighbours' in the same zone.
# At most _DAYS_MAX instants in all zones together (then all are forgotten).
_DAYS: dict[ZoneInfo, dict[datetime, int]] = {}
_DAYS_MAX = 65536
_days_held = 0


def local_day(instant: datetime, tz: ZoneInfo) -> int:
    """`instant.astimezone(tz).toordinal()`, memoised for a UTC instant (one in another zone
    is worked out: two wall times of a repeated hour there compare equal)."""
    global _days_held
    if instant.tzinfo is not UTC:
        return instant.astimezone(tz).toordinal()
    days = _DAYS.get(tz)
    if days is not None:
        day = days.get(instant)
        if day is not None:
            return day
    if _days_held >= _DAYS_MAX:
        _DAYS.clear()
        _days_held = 0
        days = None
    if days is None:
        days = _DAYS[tz] = {}
    day = days[instant] = instant.astimezone(tz).toordinal()
    _days_held += 1
    return day


def sms_fits(counts: dict[int, int], day: int, per_day: int, per_week: int) -> bool:
    """Whether one more SMS on `day` keeps within `per_day` that day and `per_week` in every
    7 consecutive days holding it; `counts`: SMS per day (ordinals), only days with some.

    A plan's SMS fall on a few days: their counts are walked, not the 13 days around.
    """
    if counts.get(day, 0) >= per_day:
        return False
    # The 13 days around `day` (index 6 is `day`), the others' counts on them.
    near = [0] * (2 * WEEK_DAYS - 1)
    total = 0
    for d, n in counts.items():
        k = d - day
        if -WEEK_DAYS < k < WEEK_DAYS:
            near[k + WEEK_DAYS - 1] += n
            total += n
    if total < per_week:
        return True  # all 13 days together hold fewer: so does every 7 of them
    # Every 7 consecutive days holding `day` (days -6..0 first, then one later at a time).
    window = sum(near[:WEEK_DAYS])
    if window >= per_week:
        return False
    for first in range(1, WEEK_DAYS):
        window += near[first + WEEK_DAYS - 1] - near[first - 1]
        if window >= per_week:
            return False
    return True


def _changed(r: PlannedReminder, **changes: object) -> PlannedReminder:
    """`dataclasses.replace(r, **changes)` for a PlannedReminder (its fields in the same
    order), without `__init__`'s per-field frozen `__setattr__`."""
    reminder: PlannedReminder = _new_reminder(PlannedReminder)
    fields = r.__dict__.copy()
    fields.update(changes)
    object.__setattr__(reminder, "__dict__", fields)
    return reminder


def _all_fit(counts: dict[int, int], days: list[int], per_day: int, per_week: int) -> bool:
    """Whether the SMS `counts` (per day, ordinals) and one more on each of `days` keep
    within `per_day` on every day and `per_week` in every 7 consecutive days."""
    total = dict(counts)
    for day in days:
        total[day] = total.get(day, 0) + 1
    if max(total.values()) > per_day:
        return False
    # Every 7 days holding SMS hold no more than the 7 from the first of them that has any.
    ordered = sorted(total.items())
    end = window = 0
    for day, n in ordered:
        while end < len(ordered) and ordered[end][0] < day + WEEK_DAYS:
            window += ordered[end][1]
            end += 1
        if window > per_week:
            return False
        window -= n
    return True


def cap_sms(
    reminders: list[PlannedReminder],
    caps: SmsSettings,
    tz: ZoneInfo,
    *,
    email: bool,
    taken: Iterable[datetime] = (),
    protected: frozenset[str] = frozenset(),
    window: SendWindow | None = None,
    history: frozenset[str] = frozenset(),
    held: Mapping[str, tuple[float, str]] | None = None,
    beyond: Iterable[datetime] = (),
    by_sms: bool = False,
) -> list[PlannedReminder]:
    """Return `reminders` (in due order) with their SMS kept within `caps` (module docstring,
    rule 5). `history`: keys of reminders already sent that do not go again (a
    re-submission's; their SMS are in `taken` at the time they went): neither counted nor
    changed here. `taken`: when the patient's other SMS at the clinic go (or went); `email`:
    whether the patient takes email; `protected`: the care-critical step ids, whose SMS the
    cap never drops (counted first; by email, or beyond the cap without email). `window`:
    the send window; a late step (planned for the booking's own instant) that moves to a
    later day goes at that day's opening, not at the booking's clock time, so the same
    booking submitted again later plans it at the same instant.

    `held`: a stored booking capped again (a re-submission without a move): its SMS still
    to go as the cap left them, key -> (epoch, reason). `beyond`: those of `taken` that
    went beyond the cap (`BEYOND_CAP`: care-critical, written after the days were full). An
    SMS that this cap would leave as it is held (the same instant and reason) keeps its day
    if it fits counting the others' SMS within the cap: one that went beyond it later (it
    found this one's day taken) takes nothing from it, so an unchanged booking keeps its
    decisions whatever its cap-mates did since; it is counted before the ones not held (a
    day freed by a cap-mate, a new step). A moved SMS held on a later day moves back only
    to a day with room that came free.

    `by_sms`: the patient listed email but unsubscribed from it, so each email still to go
    of a care-critical step whose own SMS does not carry it goes by SMS (worker/store.py
    `_BEGIN_SEND`, "ok sms"): counted as an SMS on its day, first, as a care-critical SMS
    is (never moved: it is an email to the plan), and the other SMS give way to it."""
    scheduled = _SCHEDULED
    sms = [r for r in reminders if r.channel == "sms" and r.status == scheduled
           and r.key not in history]
    taken = list(taken)
    if by_sms:
        carried = {(r.step, r.occurrence) for r in sms}
        taken += [r.due_at for r in reminders
                  if r.channel == "email" and r.status == scheduled and r.key not in history
                  and r.step in protected and (r.step, r.occurrence) not in carried]
    if len(sms) + len(taken) <= 1:
        return reminders  # nothing to count against
    # Patient-local days as ordinals: how many SMS each.
    counts: dict[int, int] = {}
    for t in taken:
        day = local_day(t, tz)
        counts[day] = counts.get(day, 0) + 1
    per_day, per_week = caps.max_per_day, caps.max_per_week
    # Every SMS counted on its planned day: when that keeps within the caps on every day
    # and in every 7 consecutive days, each SMS fits below as it comes (the counts then
    # hold only some of these), so nothing changes (most plans).
    days = [local_day(r.due_at, tz) for r in sms]
    if _all_fit(counts, days, per_day, per_week):
        return reminders
    # Each SMS's planned local day, worked out once (by its identity: `sms` holds them).
    day_of = dict(zip(map(id, sms), days, strict=True))

    # The same counts without the others' SMS beyond the cap, for the SMS held (`held`):
    # kept only when some are held (`keeps` reads them for those alone).
    held = held or {}
    within = dict(counts)
    for t in beyond:
        day = local_day(t, tz)
        within[day] = within.get(day, 0) - 1

    def fits(day: int) -> bool:
        return sms_fits(counts, day, per_day, per_week)

    def count(day: int) -> None:
        counts[day] = counts.get(day, 0) + 1
        if held:
            within[day] = within.get(day, 0) + 1

    def keeps(r: PlannedReminder, due: datetime, reason: str) -> bool:
        """Whether `r` is held as (due, reason) and fits on that day within the cap."""
        stored = held.get(r.key)
        return (stored is not None and stored == (due.timestamp(), reason)
                and sms_fits(within, local_day(due, tz), per_day, per_week))

    emailed = {(r.step, r.occurrence) for r in reminders
               if r.channel == "email" and r.status == scheduled} if email else set()
    over_cap: set[str] = set()
    kept: dict[str, PlannedReminder] = {}
    changed = False

    def place(r: PlannedReminder) -> PlannedReminder:
        """`r` (an SMS to go) as the cap leaves it, its day counted if it stays an SMS."""
        nonlocal changed
        day = day_of[id(r)]
        if kept and r.key in kept:
            changed = changed or kept[r.key] is not r
            return kept[r.key]
        if r.step in protected:
            if r.key not in over_cap:
                return r
        elif fits(day):
            count(day)
            return r
        changed = True
        over = f"{_cap_words(per_day, per_week)} is reached on {_ymd(day)}"
        if r.step in protected and not email:
            return _changed(r, reason=f"{r.reason}; sent although {over}{BEYOND_CAP}")
        if email and (r.step, r.occurrence) in emailed:
            return _changed(r, status=Status.SKIPPED,
                            reason=f"not sent by SMS: {over}; its email goes")
        if email:
            return _changed(r, key=r.key[: -len("sms")] + "email", channel="email",
                            reason=f"{r.reason}; by email: {over}")
        moved = moved_day = None
        expires = r.expires_at
        if window is not None and _LATE in r.reason:
            # A late step: at a later day's opening.
            local = r.due_at.astimezone(tz)
            for n in range(1, WEEK_DAYS * 2):
                later = next_opening(_wall(local.date() + timedelta(days=n), 0, 0, tz),
                                     window, tz)
                if expires is not None and later >= expires:
                    break
                opens_day = later.astimezone(tz).toordinal()
                if fits(opens_day):
                    moved, moved_day = later, opens_day
                    break
        else:
            # At the same local time a later day (`_later_wall`: the instant, and its local
            # day unless a DST gap moved it off that clock time, maybe outside the window).
            local = r.due_at.astimezone(tz)
            hour, minute = local.hour, local.minute
            for n in range(1, WEEK_DAYS * 2):
                later, shown_day = _later_wall(day + n, hour, minute, tz)
                if expires is not None and later >= expires:
                    break
                # (A day already holding `per_day` SMS is full: `sms_fits`'s first test.)
                if (shown_day is not None and counts.get(shown_day, 0) < per_day
                        and fits(shown_day)):
                    moved, moved_day = later, shown_day
                    break
        if moved is None or moved_day is None:
            return _changed(r, status=Status.SKIPPED, reason=(
                f"not sent: {over}, the patient takes no email, and no later day has room "
                "before it expires"))
        count(moved_day)
        return _changed(r, due_at=moved, reason=(
            f"{r.reason}; moved to {_ymd(moved_day)}: {_cap_words(per_day, per_week)} is "
            f"reached on {_ymd(day)} and the patient takes no email"))

    # A held booking's hold notice first: the one message that goes while it is held, its
    # other SMS (held back until the clinic's release, then capped again) give way to it.
    # The patient's other bookings' SMS (`taken`) still count.
    first: dict[str, PlannedReminder] = {}
    for r in sms:
        if r.step == HOLD_NOTICE_STEP:
            if keeps(r, r.due_at, r.reason):  # held as it is: it keeps its day
                kept[r.key] = r
                count(day_of[id(r)])
            first[r.key] = place(r)
    # Care-critical SMS next, at their time; the others give way. One that does not fit
    # (the patient's other bookings took the days) goes by email when the patient takes
    # email, as any other; else it goes all the same, beyond the cap.
    for r in sms:
        if r.step in protected and r.key not in first:
            day = day_of[id(r)]
            if not fits(day) and not keeps(r, r.due_at, r.reason):
                over_cap.add(r.key)
                if email:
                    continue
            count(day)
    # Then the others held: each keeps its day if it fits within the cap, unless a moved
    # one finds room (counting every SMS) on a day before it.
    for r in sms:
        if r.step in protected or r.key not in held or r.key in first:
            continue
        local = r.due_at.astimezone(tz)
        if keeps(r, r.due_at, r.reason):
            kept[r.key] = r
            count(local.toordinal())
            continue
        if email:
            continue
        stored_at = datetime.fromtimestamp(held[r.key][0], UTC)
        if stored_at <= r.due_at or (r.expires_at is not None and stored_at >= r.expires_at):
            continue
        stored_day = stored_at.astimezone(tz).toordinal()
        if any(fits(day) for day in range(local.toordinal(), stored_day)):
            continue  # room came free before it: moved there below
        again = _changed(r, due_at=stored_at, reason=_moved_reason(r, stored_at, caps, tz))
        if keeps(r, stored_at, again.reason):
            kept[r.key] = again
            count(stored_day)
    out: list[PlannedReminder] = []
    for r in reminders:
        if r.channel != "sms" or r.status != scheduled or r.key in history:
            out.append(r)
        else:
            out.append(first[r.key] if first and r.key in first else place(r))
    if not changed:
        return reminders
    out.sort(key=_order)
    return out


def _moved_reason(r: PlannedReminder, moved: datetime, caps: SmsSettings, tz: ZoneInfo) -> str:
    """The reason of `r` moved by the cap to `moved` (the patient takes no email), as
    `cap_sms`'s moves word it."""
    return (f"{r.reason}; moved to {_ymd(local_day(moved, tz))}: {cap_words(caps)} is "
            f"reached on {_ymd(local_day(r.due_at, tz))} and the patient takes no email")


def cap_plan(
    p: Plan, booking: Booking, taken: Iterable[datetime], history: frozenset[str] = frozenset(),
    own: Iterable[datetime] = (), *, email: bool | None = None,
    held: Mapping[str, tuple[float, str]] | None = None, beyond: Iterable[datetime] = (),
) -> Plan:
    """`p` with its SMS capped again, counting the patient's other SMS `taken` (the store
    reads them from the patient's other bookings at the clinic). A re-submission of a stored
    booking gives its own SMS already sent (and its store-added ones still to go) as `own`,
    and the keys of its reminders already sent that do not go again as `history`: the plan
    is then capped again from its reminders as planned before the cap (`Plan.uncapped`),
    those being history, not SMS to count again (`cap_sms`). `email`: whether the patient
    takes email (False: listed, but unsubscribed from it; default: listed), by which an SMS
    that does not fit may go instead; the plan itself assumed it could. `held`, `beyond`: a
    stored booking's SMS as the cap left them, and those of `taken` beyond the cap
    (`cap_sms`)."""
    taken = list(taken)
    own = list(own)
    takes_email = "email" in booking.patient.channels if email is None else email
    # Listed, but unsubscribed from it: its care-critical emails go by SMS (`cap_sms`'s
    # `by_sms`), counted as SMS.
    by_sms = not takes_email and "email" in booking.patient.channels \
        and booking.patient.email is not None
    # Capped again from the plan before its own cap when that cap may have sent an SMS by
    # an email the patient no longer takes.
    unsubscribed = not takes_email and p.uncapped is not None
    if p.caps is None or not (taken or own or history or unsubscribed or by_sms):
        return p
    base = p.reminders
    if own or history or unsubscribed:
        base = p.uncapped if p.uncapped is not None else p.reminders
        taken += own
    reminders = cap_sms(base, p.caps, ZoneInfo(booking.patient.timezone),
                        email=takes_email, taken=taken,
                        protected=p.protected, window=p.window, history=history,
                        held=held, beyond=beyond, by_sms=by_sms)
    if reminders is p.reminders:
        return p
    return replace(p, reminders=reminders,
                   late_pause=late_pause(reminders, p.pause_rule, booking)
                   if p.pause_rule else None)


def cap_at_send(
    reminder: PlannedReminder,
    caps: SmsSettings,
    tz: ZoneInfo,
    *,
    email: bool,
    emailed: bool,
    taken: Iterable[datetime],
    protected: frozenset[str],
) -> PlannedReminder:
    """An SMS whose time moved at send time (a defer to the send window's next opening, a
    retry's backoff) to `reminder.due_at`, capped by `cap_sms`'s rules against the patient's
    other SMS at the clinic `taken`: returned as it is (it fits, or a care-critical SMS goes
    beyond the cap, saying so), moved to a later day, skipped with the reason (its step's
    email goes, `emailed`; or no day with room before it expires), or as an email (key and
    channel changed: the patient takes email and the step has no email copy)."""
    reminders = [reminder]
    if emailed:
        reminders.append(replace(reminder, key=reminder.key[: -len("sms")] + "email",
                                 channel="email"))
    capped = cap_sms(reminders, caps, tz, email=email, taken=taken, protected=protected)
    (out,) = [r for r in capped if r.step == reminder.step
              and r.occurrence == reminder.occurrence
              and (r.channel == "sms" or not emailed)]
    return out


def _order(reminder: PlannedReminder) -> tuple[datetime, str]:
    return reminder.due_at, reminder.key


# --- a plan as plain values (a batch keeps or hands over many plans compactly) -------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A reminder as plain values: what it says apart from its instants (`ReminderStatic`: the
# same few dozen for every booking of a protocol, one shared tuple each, which pickle writes
# once per dump and refers to after), its due instant and its expiry, instants as exact
# microseconds since the epoch.
ReminderStatic = tuple[str, str, str, str, int, str, str, bool, str]
ReminderRecord = tuple[ReminderStatic, int, int | None]
PlanRecord = tuple[str, str | None, tuple[ReminderRecord, ...], str, str | None,
                   tuple[str, int] | None, tuple[str, ...], tuple[ReminderRecord, ...] | None]
# Instants repeat across the bookings of a batch (the same days, zones and steps).
_MICROS: dict[datetime, int] = {}
_INSTANTS: dict[int, datetime] = {}
_STATUS = {str(s): s for s in Status}
_STATUS_NAME = {s: str(s) for s in Status}
# Shared static parts (`_reminder_records`), and the dict a reminder is built from for each
# static part met (`_from_records`), by the static tuple's id (the entry keeps it alive).
_STATICS: dict[ReminderStatic, ReminderStatic] = {}
_SHAPES: dict[int, tuple[ReminderStatic, dict[str, object]]] = {}


def _micros(instant: datetime) -> int:
    micros = _MICROS.get(instant)
    if micros is None:
        if len(_MICROS) >= 65536:
            _MICROS.clear()
        micros = _MICROS[instant] = (instant - _EPOCH) // _MICROSECOND
    return micros


def _instant(micros: int) -> datetime:
    instant = _INSTANTS.get(micros)
    if instant is None:
        if len(_INSTANTS) >= 65536:
            _INSTANTS.clear()
        instant = _INSTANTS[micros] = _EPOCH + micros * _MICROSECOND
    return instant


def plan_record(p: Plan) -> PlanRecord:
    """The plan as strings, numbers and tuples (instants in exact microseconds)."""
    # The cap leaves most reminders as they were planned: those are recorded once.
    done: dict[int, ReminderRecord] | None = None
    uncapped = None
    if p.uncapped is not None:
        done = {}
        uncapped = _reminder_records(p.uncapped, done)
    return (
        str(p.status),
        p.hold_reason,
        _reminder_records(p.reminders, done),
        p.notice_steps,
        p.late_pause,
        p.pause_rule,
        tuple(sorted(p.protected)),
        uncapped,
    )


def _reminder_records(
    reminders: list[PlannedReminder], done: dict[int, ReminderRecord] | None
) -> tuple[ReminderRecord, ...]:
    """The records of `reminders`; `done`: those of reminders recorded already, by id, and
    where to note these (None: no other list shares them)."""
    statics, micros = _STATICS, _MICROS
    out = []
    for r in reminders:
        if done is not None:
            record = done.get(id(r))
            if record is not None:
                out.append(record)
                continue
        static = (r.key, r.step, r.channel, r.template, r.occurrence, _STATUS_NAME[r.status],
                  r.reason, r.at_booking, r.expires_note)
        shared = statics.get(static)
        if shared is None:
            if len(statics) >= 4096:
                statics.clear()
            shared = statics[static] = static
        due = micros.get(r.due_at)
        if due is None:
            due = _micros(r.due_at)
        expires = r.expires_at
        if expires is None:
            record = (shared, due, None)
        else:
            expires_micros = micros.get(expires)
            record = (shared, due,
                      expires_micros if expires_micros is not None else _micros(expires))
        if done is not None:
            done[id(r)] = record
        out.append(record)
    return tuple(out)


def plan_from_record(
    record: PlanRecord, window: SendWindow | None, caps: SmsSettings | None = None, *,
    lazy: bool = False,
) -> Plan:
    """The plan `plan_record` was made of (its window and caps are the clinic's, given here).

    `lazy`: for a plan the SMS cap left as planned (most), its reminders are made from
    the record only when first read (`Plan.__getattr__`), the same then as made at once:
    `reminders book` stores a new booking from its record (`Store._prepare_new`) and reads
    them only for what the record cannot say (`scheduled_sms` says whether the SMS cap has
    anything to read). A plan the cap changed is made at once (its `uncapped` too)."""
    status, hold_reason, records, notice_steps, late, rule, protected, uncapped = record
    plan = _new_plan(Plan)
    # Plan's own fields, as `Plan(...)` sets them, without its per-field frozen `__setattr__`.
    fields: dict[str, Any] = {
        "status": Status.HELD if status == Status.HELD else Status.SCHEDULED,
        "hold_reason": hold_reason,
        "window": window,
        "notice_steps": notice_steps,
        "caps": caps,
        "late_pause": late,
        "pause_rule": rule,
        "protected": frozenset(protected),
    }
    if lazy and uncapped is None:
        # Only a plan the cap left as planned (`uncapped` None, the field's class default,
        # which a missing field would read as, and so never made from the record).
        fields["uncapped"] = None
        fields["_record"] = record
        object.__setattr__(plan, "__dict__", fields)
    else:
        object.__setattr__(plan, "__dict__", fields)
        _make_reminders(plan, record)
    return plan


def _make_reminders(plan: Plan, record: PlanRecord) -> None:
    """Give `plan` its reminders and `uncapped` as `record` holds them (its fields then in
    `Plan`'s own order, the record no longer kept)."""
    records, uncapped = record[2], record[7]
    # A record met twice (in both lists: the cap left it as planned) is one reminder, as
    # planned; a plan the cap did not change has one list (`done` None: no record is met
    # twice, nothing to note).
    done: dict[int, PlannedReminder] | None = None
    unchanged = None
    if uncapped is not None:
        done = {}
        unchanged = _from_records(uncapped, done)
    given = plan.__dict__
    object.__setattr__(plan, "__dict__", {
        "status": given["status"],
        "reminders": _from_records(records, done),
        "hold_reason": given["hold_reason"],
        "window": given["window"],
        "notice_steps": given["notice_steps"],
        "caps": given["caps"],
        "late_pause": given["late_pause"],
        "pause_rule": given["pause_rule"],
        "protected": given["protected"],
        "uncapped": unchanged,
    })


def decoded_from(plan: Plan, record: PlanRecord | None) -> bool:
    """Whether `plan` is `record` decoded lazily, its reminders not made yet."""
    return record is not None and plan.__dict__.get("_record") is record


def scheduled_sms(plan: Plan) -> bool:
    """Whether the plan as planned before the SMS cap (`uncapped`, else its reminders) has
    an SMS scheduled; from the record of a plan decoded lazily, its reminders not made."""
    record = plan.__dict__.get("_record")
    if record is not None:
        entries = record[7] if record[7] is not None else record[2]
        scheduled = _STATUS_NAME[Status.SCHEDULED]
        return any(static[2] == "sms" and static[5] == scheduled for static, _, _ in entries)
    return any(r.channel == "sms" and r.status == Status.SCHEDULED
               for r in (plan.uncapped if plan.uncapped is not None else plan.reminders))


def critical_email(plan: Plan, booking: Booking) -> bool:
    """Whether the plan has an email of a care-critical step scheduled for a patient who
    lists email (it goes by SMS should they unsubscribe from it)."""
    return bool(plan.protected) and "email" in booking.patient.channels \
        and booking.patient.email is not None and any(
            r.channel == "email" and r.status == Status.SCHEDULED and r.step in plan.protected
            for r in plan.reminders)


def reminder_from_record(entry: ReminderRecord) -> PlannedReminder:
    """The reminder one record of `plan_record` holds (as its plan decoded has it)."""
    return _from_records((entry,), None)[0]



def _shape(static: ReminderStatic) -> dict[str, object]:
    """The fields of a reminder with the static part `static`, its instants still None."""
    key, step, channel, template, occurrence, status, reason, at_booking, note = static
    if len(_SHAPES) >= 4096:
        _SHAPES.clear()
    # The fields in `PlannedReminder`'s own order.
    shape: dict[str, object] = {
        "key": key, "step": step, "channel": channel, "template": template,
        "occurrence": occurrence, "due_at": None, "status": _STATUS[status],
        "reason": reason, "at_booking": at_booking, "expires_at": None,
        "expires_note": note}
    _SHAPES[id(static)] = (static, shape)
    return shape


def _from_records(
    records: tuple[ReminderRecord, ...], done: dict[int, PlannedReminder] | None
) -> list[PlannedReminder]:
    """The reminders of `records`; `done`: those made already, by their record's id, and
    where to note these (None: no other list shares them)."""
    reminders = []
    instants, shapes, new, setter = _INSTANTS, _SHAPES, _new_reminder, object.__setattr__
    for record in records:
        if done is not None:
            reminder = done.get(id(record))
            if reminder is not None:
                reminders.append(reminder)
                continue
        static, due, expires = record
        hit = shapes.get(id(static))
        fields = (hit[1] if hit is not None and hit[0] is static else _shape(static)).copy()
        instant = instants.get(due)
        fields["due_at"] = instant if instant is not None else _instant(due)
        if expires is not None:
            instant = instants.get(expires)
            fields["expires_at"] = instant if instant is not None else _instant(expires)
        reminder = new(PlannedReminder)
        setter(reminder, "__dict__", fields)
        if done is not None:
            done[id(record)] = reminder
        reminders.append(reminder)
    return reminders
