"""The SMS cap as it was before its redundant work was cut (`cap_sms`, `sms_fits` and
`_moved_reason` at 48a17c3, verbatim): tests/test_cap_sms_before.py checks the cap gives
exactly what this gave. Not used by the application."""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from worker.clinics import SendWindow, SmsSettings
from worker.planner import (
    _LATE, BEYOND_CAP, HOLD_NOTICE_STEP, WEEK_DAYS, PlannedReminder, _all_fit, _changed,
    _order, _wall, cap_words, local_day, next_opening,
)
from worker.status import Status


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
    to a day with room that came free."""
    sms = [r for r in reminders if r.channel == "sms" and r.status == Status.SCHEDULED
           and r.key not in history]
    taken = list(taken)
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
    if _all_fit(counts, [local_day(r.due_at, tz) for r in sms], per_day,
                per_week):
        return reminders

    # The same counts without the others' SMS beyond the cap, for the SMS held (`held`).
    within = dict(counts)
    for t in beyond:
        day = local_day(t, tz)
        within[day] = within.get(day, 0) - 1
    held = held or {}

    def fits(day: int) -> bool:
        return sms_fits(counts, day, per_day, per_week)

    def count(day: int) -> None:
        counts[day] = counts.get(day, 0) + 1
        within[day] = within.get(day, 0) + 1

    def keeps(r: PlannedReminder, due: datetime, reason: str) -> bool:
        """Whether `r` is held as (due, reason) and fits on that day within the cap."""
        stored = held.get(r.key)
        return (stored is not None and stored == (due.timestamp(), reason)
                and sms_fits(within, local_day(due, tz), per_day, per_week))

    emailed = {(r.step, r.occurrence) for r in reminders
               if r.channel == "email" and r.status == Status.SCHEDULED}
    over_cap: set[str] = set()
    kept: dict[str, PlannedReminder] = {}
    changed = False

    def place(r: PlannedReminder) -> PlannedReminder:
        """`r` (an SMS to go) as the cap leaves it, its day counted if it stays an SMS."""
        nonlocal changed
        day = local_day(r.due_at, tz)
        if r.key in kept:
            changed = changed or kept[r.key] is not r
            return kept[r.key]
        if r.step in protected:
            if r.key not in over_cap:
                return r
        elif fits(day):
            count(day)
            return r
        changed = True
        local = r.due_at.astimezone(tz)
        over = f"{cap_words(caps)} is reached on {local:%Y-%m-%d}"
        if r.step in protected and not email:
            return _changed(r, reason=f"{r.reason}; sent although {over}{BEYOND_CAP}")
        if email and (r.step, r.occurrence) in emailed:
            return _changed(r, status=Status.SKIPPED,
                            reason=f"not sent by SMS: {over}; its email goes")
        if email:
            return _changed(r, key=r.key[: -len("sms")] + "email", channel="email",
                            reason=f"{r.reason}; by email: {over}")
        moved = None
        late = window is not None and _LATE in r.reason
        for n in range(1, WEEK_DAYS * 2):
            if late:
                assert window is not None
                later = next_opening(_wall(local.date() + timedelta(days=n), 0, 0, tz),
                                     window, tz)
            else:
                later = _wall(local.date() + timedelta(days=n), local.hour, local.minute, tz)
            if r.expires_at is not None and later >= r.expires_at:
                break
            shown = later.astimezone(tz)
            if not late and (shown.hour, shown.minute) != (local.hour, local.minute):
                continue  # not on that day's clock (a DST gap): maybe outside the window
            if fits(shown.toordinal()):
                moved = later
                break
        if moved is None:
            return _changed(r, status=Status.SKIPPED, reason=(
                f"not sent: {over}, the patient takes no email, and no later day has room "
                "before it expires"))
        count(local_day(moved, tz))
        return _changed(r, due_at=moved, reason=_moved_reason(r, moved, caps, tz))

    # A held booking's hold notice first: the one message that goes while it is held, its
    # other SMS (held back until the clinic's release, then capped again) give way to it.
    # The patient's other bookings' SMS (`taken`) still count.
    first: dict[str, PlannedReminder] = {}
    for r in sms:
        if r.step == HOLD_NOTICE_STEP:
            if keeps(r, r.due_at, r.reason):  # held as it is: it keeps its day
                kept[r.key] = r
                count(local_day(r.due_at, tz))
            first[r.key] = place(r)
    # Care-critical SMS next, at their time; the others give way. One that does not fit
    # (the patient's other bookings took the days) goes by email when the patient takes
    # email, as any other; else it goes all the same, beyond the cap.
    for r in sms:
        if r.step in protected and r.key not in first:
            day = local_day(r.due_at, tz)
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
        if r.channel != "sms" or r.status != Status.SCHEDULED or r.key in history:
            out.append(r)
        else:
            out.append(first[r.key] if r.key in first else place(r))
    if not changed:
        return reminders
    out.sort(key=_order)
    return out


def _moved_reason(r: PlannedReminder, moved: datetime, caps: SmsSettings, tz: ZoneInfo) -> str:
    """The reason of `r` moved by the cap to `moved` (the patient takes no email)."""
    return (f"{r.reason}; moved to {moved.astimezone(tz):%Y-%m-%d}: {cap_words(caps)} is "
            f"reached on {r.due_at.astimezone(tz):%Y-%m-%d} and the patient takes no email")
