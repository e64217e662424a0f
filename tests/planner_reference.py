"""The planner as it was before it was made fast: the reference the fast one must equal.

A verbatim copy of worker/planner.py's `plan` and its helpers before the per-step
preparation and the memoised clock arithmetic (only the imports differ).
tests/test_planner_fast.py checks that `worker.planner.plan` returns equal plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from worker.clinics import MINUTES_PER_DAY, Clinic, SendWindow
from worker.errors import BookingRejected
from worker.models import MAX_DAYS_AHEAD, Booking, Channel
from worker.planner import (
    Plan,
    PlannedReminder,
    SendTime,
    cap_sms,
    hold_notice,
    late_pause,
    pause_rule,
)
from worker.protocols import WEEKDAYS, Protocol, Step, format_duration
from worker.status import Status

ONE_MINUTE = timedelta(minutes=1)
# A DST gap is at most a couple of hours; search a day to be safe and still bounded.
_MAX_GAP_MINUTES = MINUTES_PER_DAY

# The statuses a plan or a planned reminder can have, as members of `Status` (which
# compare equal to their names: "held" == Status.HELD).
PlanStatus = Literal[Status.SCHEDULED, Status.HELD]
ReminderStatus = Literal[Status.SCHEDULED, Status.SKIPPED]


# --- clock arithmetic in the patient's timezone ----------------------------------------


def wall_clock(day: date, at: time, tz: ZoneInfo) -> datetime:
    """Return the UTC instant of `day` `at` in `tz`, DST-safe (see module docstring)."""
    naive = datetime.combine(day, at.replace(second=0, microsecond=0, tzinfo=None))
    for _ in range(_MAX_GAP_MINUTES):
        aware = naive.replace(tzinfo=tz, fold=0)  # fold=0: the first of two occurrences
        if aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive:
            return aware.astimezone(UTC)
        naive += ONE_MINUTE  # this minute does not exist here (spring forward)
    raise ValueError(f"no valid local time near {day} {at} in {tz.key}")


def _minute_wall(day: date, minute: int, tz: ZoneInfo) -> datetime:
    """Return the UTC instant of `minute` after local midnight of `day` (1440 = next day)."""
    extra_days, minute = divmod(minute, MINUTES_PER_DAY)
    return wall_clock(day + timedelta(days=extra_days), time(minute // 60, minute % 60), tz)


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
    day, minute = _local_minute(instant, tz)
    if window.contains(minute):
        return instant
    for n in range(_WINDOW_SEARCH_DAYS):
        opening = _minute_wall(day + timedelta(days=n), window.start, tz)
        # An opening in a DST gap moved to the next valid minute, which may be past the
        # window's end: then the window does not exist that day.
        for candidate in _both_occurrences(opening, tz):
            if candidate >= instant and window.contains(_local_minute(candidate, tz)[1]):
                return candidate
    raise ValueError(f"no opening of the send window {window.describe()} near {instant}")


def last_opening_before(instant: datetime, window: SendWindow, tz: ZoneInfo) -> datetime:
    """Return the last whole minute inside the window strictly before `instant`."""
    day, _ = _local_minute(instant, tz)
    for n in range(_WINDOW_SEARCH_DAYS):
        close = _minute_wall(day - timedelta(days=n), window.end, tz)
        for closing in reversed(_both_occurrences(close, tz)):  # the later one first
            last = min(instant, closing) - timedelta(microseconds=1)
            last = last.replace(second=0, microsecond=0)
            if window.contains(_local_minute(last, tz)[1]):
                return last
    raise ValueError(f"no opening of the send window {window.describe()} before {instant}")


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


def expiry(step: Step, nominal: datetime, start: datetime, tz: ZoneInfo) -> tuple[datetime, str]:
    """Return the instant after which this occurrence must not be sent, and why.

    The same rule as a late booking's (`_place`), applied again at send time: a step meant
    for before the visit never goes once it has begun; `late_until` bounds any step; any
    other step goes no later than a day after its planned time.
    """
    deadline = start + step.late_until if step.late_until is not None else None
    if nominal < start and (deadline is None or deadline >= start):
        return start, "it was meant for before the appointment, which has begun"
    if deadline is not None:
        side = "before" if deadline < start else "after"
        gap = format_duration(abs(deadline - start))
        return deadline, f"it could be sent only until {gap} {side} the start"
    if step.repeat is not None and step.repeat.weekdays:
        # A weekday series ("tretinoin tonight"): until the end of its own local day.
        day = nominal.astimezone(tz).date() + timedelta(days=1)
        return wall_clock(day, time(0, 0), tz), (
            "it was meant for that day of a weekday series, which has ended")
    return nominal + STALE_AFTER, "it is more than a day past its planned time"


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
    if protocol.isotretinoin_washout_days is None:
        return None  # this treatment has no isotretinoin gate; a clinic override only sets days
    washout = clinic.isotretinoin_washout_days
    if washout is None:
        washout = protocol.isotretinoin_washout_days
    last_dose = booking.medications.isotretinoin_last_dose
    if washout is None or last_dose is None:
        return None
    visit_day = booking.starts_at.astimezone(ZoneInfo(booking.patient.timezone)).date()
    gap = (visit_day - last_dose).days
    if gap >= washout:
        return None
    return (
        f"isotretinoin last taken {last_dose.isoformat()}, {gap} days before the appointment; "
        f"the washout for {protocol.id} is {washout} days: the clinic must review"
    )


def check_dates(booking: Booking, now: datetime, tz: ZoneInfo) -> None:
    """Refuse dates that make no sense at `now` (UTC), naming each field."""
    errors = []
    start = booking.starts_at.astimezone(UTC)
    latest = now + timedelta(days=MAX_DAYS_AHEAD)
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


def plan(booking: Booking, protocol: Protocol, clinic: Clinic, now: datetime) -> Plan:
    """Return the reminders for `booking` as seen at `now` (an aware datetime)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    start = booking.starts_at.astimezone(UTC)
    tz = ZoneInfo(booking.patient.timezone)
    check_dates(booking, now, tz)
    window = clinic.send_window
    reminders: list[PlannedReminder] = []
    for step in protocol.steps:
        if not step.applies_to(booking.medications):
            continue
        channels, channel_note = _channels(step, booking.patient.channels)
        occurrences = list(_occurrences(step, start, tz, now))
        for number, nominal, derived in occurrences:
            status, due, note = _place(step, nominal, start, now, window, tz)
            expires_at, expires_note = expiry(step, nominal, start, tz)
            if status == Status.SCHEDULED and due >= expires_at:
                # The window opens only once it has expired: it could never be sent.
                status, due, note = Status.SKIPPED, nominal, (
                    f"outside the send window {window.describe()} until after it expires: "
                    f"{expires_note}")
            reason = derived + note if status == Status.SCHEDULED else note
            if step.only_if_any and status == Status.SCHEDULED:
                reason += f"; the patient uses {' or '.join(step.only_if_any)}"
            for channel in channels:
                suffix = f"#{number}" if len(occurrences) > 1 or step.repeat else ""
                reminders.append(
                    PlannedReminder(
                        key=f"{step.id}{suffix}:{channel}",
                        step=step.id,
                        channel=channel,
                        template=step.template,
                        occurrence=number,
                        due_at=due,
                        status=status,
                        reason=reason + channel_note if status == Status.SCHEDULED else reason,
                        at_booking=step.at == "booking",
                        expires_at=expires_at,
                        expires_note=expires_note,
                    )
                )
    reminders.sort(key=lambda r: (r.due_at, r.key))
    hold = isotretinoin_hold(booking, protocol, clinic)
    # The SMS frequency cap and the late-pause finding are rules over the finished plan: the
    # planner's own.
    if hold and protocol.hold_template:
        reminders.append(hold_notice(protocol.hold_template, tuple(booking.patient.channels),
                                     now, start, window, tz))
        reminders.sort(key=lambda r: (r.due_at, r.key))
    protected = frozenset(s.id for s in protocol.steps if s.care_critical)
    capped = cap_sms(reminders, clinic.sms, tz, email="email" in booking.patient.channels,
                     protected=protected, window=window)
    rule = pause_rule(protocol, booking)
    return Plan(
        status=Status.HELD if hold else Status.SCHEDULED,
        reminders=capped,
        hold_reason=hold,
        window=window,
        notice_steps=protocol.notice_steps(),
        caps=clinic.sms,
        late_pause=late_pause(capped, rule, booking) if rule else None,
        pause_rule=rule,
        protected=protected,
    )
