"""Change notices: what a patient is told when a booking moves or is cancelled. Pure.

A notice is a reminder the store adds to the booking's own schedule when the clinic's
change lands (worker/store.py: the upsert that moves the appointment, or re-opens a
cancelled booking; the cancel): due at once, at the patient's send window's next opening,
claimed, fenced and sent like any other reminder. Its key is `<kind>#<seq>:<channel>`:

  rescheduled   the appointment moved (or a cancelled booking was booked again): the new
                date and time ("moved to" it from the date told; "is on" it when there is
                no date to move from: booked again after a cancel the patient was told
                of, or at the very date they know); if the pause message ("stop
                tretinoin") had gone out, until when the product may still be used (or to
                keep pausing)
  cancelled     the booking was cancelled: if the pause message had gone out, that the
                product may be resumed

After a move, the pause message itself goes again for the new date (`repause#<seq>:<channel>`,
the pause step's template, at the new plan's time for it) when it had been sent for the old
date: the patient who was told to stop is reminded again, not left to remember.

So does any other message before the visit that went out for the old date (the reconcile
keeps a sent one as history and never sends it again): `again-<step>#<seq>:<channel>`
(worker/store.py `again_fields`), the step's template, at the new plan's own time, channel,
expiry and reason for that step, so "see you tomorrow" and the prep email come before the
new date too. The new plan's reminder decides it all (the send window, the SMS cap, which
placed it as if it were to be sent; the late rules): only one still ahead and not late (a
late one would come together with the notice, which already names the new date), of a step
planned neither at booking (the notice replaces the confirmation) nor in a series; the
pause step has its own (`repause`). Like a notice, it is fenced by the booking's version at
the move, and a later move or cancel supersedes it while not yet sent. Its step id is the
reserved "again-<step>" (no protocol step id may begin with "again-"); what it is for (the
invite an email carries, a notice's "told by SMS", the care-critical rule: an again email
goes by SMS to a patient unsubscribed from email, worker/store.py `is_critical`) is read
from `<step>`.

`seq` is the booking's calendar invite sequence after the change (one more at every move
and cancel): the notice's email carries the invite update (METHOD:REQUEST) or cancel
(METHOD:CANCEL) with that SEQUENCE, or one above the last invite made for the booking if
that is higher (`Store.invite_sequence`), and the booking's one UID (worker/invites.py).

Only when something went out: by email if an email carrying the invite went out (a
confirmation, a day-before email, an earlier notice), or the hold email (it names the date;
a booking held from the start has no invite), or the pause message went out by email, or
the patient was told the date by email: any email planned before the visit's start as it
was before the change, as for SMS below (the prep email names the date and carries no
invite: an email-only patient whose confirmation failed, told only by it, hears of the
change too); by SMS if the pause message went out by SMS, or if the patient was told the
date by SMS: any SMS planned before the visit's start as it was before the change (an
email step that went by SMS, flag "s", counts as an SMS). In the shipped protocols every
email before the visit names its date (confirmation, welcome, stop-retinoids, prep, a
day-before by email), and so does every SMS before the visit (the hold notice,
stop-retinoids, day-before; a confirmation, welcome or prep sent by SMS to a patient
without email or unsubscribed from it), so a patient who
only had "see you tomorrow at 10:00" by SMS hears of the move or cancel by SMS too. The one
that does not name it, a tretinoin night text on the consultation's own day, can precede
the visit only for a consultation after 19:30: counted all the same (a needless notice is
harmless, a missing one sends the patient on the wrong day). An SMS planned after that start
(aftercare of a visit that took place) tells no date and does not count; nor does any, for a
cancel once the visit has begun (a no-show, aftercare stopped: the date told is past). A
protocol with neither a pause nor an invite step sends no notices (`reminders check` renders
notices only for protocols that have one). A message being sent at the moment of the change
counts as gone out (it may have; a needless "you may resume" is harmless, a missing one is
not), as does one still at its provider or of unknown outcome (worker/store.py
`Store._as_sending`). Nothing went out: no notice. A later change supersedes a notice not
yet sent (the store cancels it). A move's date counts as told once its notice or a message
again for it went out (worker/store.py `_told_by`). A held booking cancelled is told as a
scheduled one, at the date told before the hold (`held_from`); booked again after that and
held, its release re-opens it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypedDict
from zoneinfo import ZoneInfo

from .clinics import SendWindow
from .models import Booking, Channel
from .planner import first_nominal, last_opening_before, next_opening
from .protocols import (
    AGAIN_PREFIX,
    HOLD_NOTICE_STEP,
    NOTICE_STEPS,
    REPAUSE_STEP,
    STORE_STEPS,
    Protocol,
    parse_notice_steps,
)
from .status import Status

Kind = Literal["rescheduled", "cancelled"]
Method = Literal["REQUEST", "CANCEL"]  # the calendar invite's
# A cancel notice ("you may resume") stays worth sending for this long after it was due.
CANCEL_NOTICE_TTL = timedelta(days=2)
Record = Mapping[str, str]


@dataclass(frozen=True)
class NoticeReminder:
    """One notice to store: its key, channel and times."""

    key: str
    step: Kind
    channel: Channel
    due_at: datetime
    expires_at: datetime
    expires_note: str
    reason: str


def is_notice(key: str) -> bool:
    """Return whether a reminder key is one the store added on a change (a notice, the
    pause message again, or a message before the visit again for a new date): the
    reconcile never sees those; a later change supersedes those not yet sent."""
    step = key.split(":", 1)[0].split("#", 1)[0]
    return step in STORE_STEPS or step.startswith(AGAIN_PREFIX)


def base_step(step: str, pause: str | None = None) -> str:
    """Return the protocol step a reminder's step stands for: "again-day-before" (the
    day-before message again for a new date) stands for "day-before", and "repause" (the
    pause message again) for the protocol's pause step `pause` when given (else it stays
    "repause", never a step's id)."""
    if step == REPAUSE_STEP and pause:
        return pause
    return step.removeprefix(AGAIN_PREFIX)


def went_out(record: Record) -> bool:
    """Return whether a reminder went out, or may have (it is being sent now)."""
    return record.get("status") in (Status.SENT, Status.SENDING) or bool(record.get("sent_at"))


def sent(record: Record) -> bool:
    """Return whether a reminder went out for certain (its delivery is recorded)."""
    return record.get("status") == Status.SENT or bool(record.get("sent_at"))


def as_told_fields(
    record: Record, stored: Mapping[str, str], went: Callable[[str], bool]
) -> Mapping[str, str]:
    """Return the booking's fields as a change notice should read them.

    A change that landed while the previous move's notice (or a message again for its date)
    was being sent stored what to name if none of them went out after all (`untold`: "<key
    prefixes, space apart>|<epoch>"); `went(prefixes)` tells whether one did (read at the
    send, when its outcome is known).
    """
    prefix, _, fallback = stored.get("untold", "").partition("|")
    step = record.get("step")
    if step not in NOTICE_STEPS or not prefix or went(prefix):
        return stored
    return {**stored, "moved_from" if step == "rescheduled" else "told_start": fallback}


def sent_by(key: str, record: Record) -> str:
    """Return the channel a reminder went (or goes) out on: its key's, except an email that
    went by SMS (flag "s", decoded as `by_sms`: the patient unsubscribed from email)."""
    channel = key.rsplit(":", 1)[-1]
    return "sms" if channel == "email" and record.get("by_sms") == "1" else channel


def what_went_out(
    records: Mapping[str, Record], notice_steps: str, before: float | None = None,
    planned_for: float | None = None,
) -> tuple[set[str], bool, bool]:
    """Return (the channels the pause message went out on, whether an email naming the visit
    went out: one carrying the invite, the hold email or any planned before the visit,
    whether an SMS naming the visit went out).

    `notice_steps`: the protocol's pause and invite steps (`Protocol.notice_steps()`);
    `before`: the visit's start (epoch seconds) as the patient may have been told it, before
    the change: an SMS or email planned before it told the date (see the module docstring).
    `planned_for`: the start of the visit the stored plan is for (the stored document's),
    when it differs from `before` (cancelled or held after a move the patient was not
    told of): a reminder not recorded as sent (being sent, or one a move rescheduled while
    it was at its provider) carries that plan's time, and was planned before the visit if
    it is before that start.
    """
    pause, invites = parse_notice_steps(notice_steps)
    invite_steps = invites | set(NOTICE_STEPS)
    paused: set[str] = set()
    invited = texted = False
    for key, record in records.items():
        if not record or not went_out(record):
            continue
        step = base_step(key.split(":", 1)[0].split("#", 1)[0])
        channel = sent_by(key, record)
        if step in (pause, REPAUSE_STEP):
            paused.add(channel)
        planned = float(record.get("planned_epoch") or "inf")
        ahead = bool(notice_steps) and (
            (before is not None and planned < before)
            or (planned_for is not None and record.get("status") != Status.SENT
                and planned < planned_for))  # planned before the visit: it named the date
        if channel == "email" and (
                step in invite_steps or (step == HOLD_NOTICE_STEP and notice_steps) or ahead):
            invited = True  # (the hold email and a prep email name the date, as an invite does)
        if channel == "sms" and notice_steps and (step in NOTICE_STEPS or ahead):
            texted = True
    return paused, invited, texted


def plan_notices(
    kind: Kind,
    records: Mapping[str, Record],
    booking: Booking,
    notice_steps: str,
    *,
    seq: int,
    now: datetime,
    window: SendWindow,
    before: datetime | None = None,
    planned_for: datetime | None = None,
) -> tuple[list[NoticeReminder], bool]:
    """Return the notices a change calls for and whether the pause had gone out.

    `records`: the booking's reminders as stored before the change; `booking`: the booking
    after it (for a cancel, as it was); `notice_steps`: `Protocol.notice_steps()`; `seq`:
    the invite sequence after the change; `before`: the visit's start before the change
    as the patient was told it (None: the booking's own, as for a cancel); `planned_for`:
    the start the stored reminders were planned for (`what_went_out`).
    """
    start = (before or booking.starts_at).timestamp()
    paused, invited, texted = what_went_out(
        records, notice_steps, start, planned_for.timestamp() if planned_for else None)
    if kind == "cancelled" and now.timestamp() >= start:
        texted = False  # the visit has begun: the date the SMS told is past, nothing to undo
    offered = booking.patient.channels
    channels: list[Channel] = []
    if "email" in offered and (invited or "email" in paused):
        channels.append("email")
    if "sms" in offered and ("sms" in paused or texted):
        channels.append("sms")
    if (paused or texted or invited) and not channels:  # the patient's channels changed:
        channels.append(offered[0])  # the first they take
    if not channels:
        return [], bool(paused)
    tz = ZoneInfo(booking.patient.timezone)
    due = next_opening(now, window, tz)
    if kind == "rescheduled":
        expires = booking.starts_at
        note = "it was meant for before the appointment, which has begun"
        if due >= expires:
            return [], bool(paused)
        reason = "the appointment moved after messages had gone out"
    else:
        expires = due + CANCEL_NOTICE_TTL
        note = "it is more than two days past its planned time"
        reason = "the booking was cancelled after messages had gone out"
    return [
        NoticeReminder(key=f"{kind}#{seq}:{channel}", step=kind, channel=channel, due_at=due,
                       expires_at=expires, expires_note=note, reason=reason)
        for channel in channels
    ], bool(paused)


def pause_from(
    booking: Booking, protocol: Protocol, now: datetime, window: SendWindow | None = None
) -> datetime | None:
    """Return when the pause begins again for the booking's appointment, if still ahead:
    when the pause message goes again, placed in the patient's send `window` as the planner
    places it (an 18:00 step with a window closing at 18:00 goes the next morning)."""
    step = protocol.pause_step()
    if step is None:
        return None
    tz = ZoneInfo(booking.patient.timezone)
    try:
        begins = first_nominal(step, booking.starts_at, tz, now)
    except StopIteration:
        return None
    if window is not None:
        placed = next_opening(begins, window, tz)
        if begins < booking.starts_at <= placed:  # a pre-visit step never goes after it
            placed = last_opening_before(booking.starts_at, window, tz)
        begins = placed
    return begins if begins > now else None


@dataclass(frozen=True)
class Notice:
    """What a change notice says (a booking moved or cancelled after messages went out)."""

    previous_start: datetime | None = None  # the appointment before a move
    paused: bool = False  # the message to pause a product had gone out
    pause_from: datetime | None = None  # after a move: when the new pause begins (if ahead)


@dataclass(frozen=True)
class Invite:
    """The calendar invite an email carries: its sequence and method."""

    sequence: int
    method: Method


class RenderExtras(TypedDict, total=False):
    """What `Renderer.render` takes besides the reminder: a notice's words, an invite."""

    notice: Notice
    invite: Invite


def as_told(record: Mapping[str, str], booking: Booking, stored: Mapping[str, str]) -> Booking:
    """Return the booking as a cancel notice names it: at the date the patient was last
    told (`told_start`, set by the cancel when the last move's notice never went out), so
    "your 12 Dec visit is cancelled" never reaches a patient who only knew of 5 Dec. The
    hold message of a booking the clinic moved as it held it names the date told before the
    hold (`held_from`): the move is told at the release, and a cancel names that date (not
    after a cancel: booked again and held, the patient knows no date but the new one). Held
    before anything went out (held from the start, its hold message still to go), no date
    was told: the hold message names the booking's start as it is when it goes."""
    held = stored.get("held_from", "")
    if record.get("step") == HOLD_NOTICE_STEP and held and not stored.get("reopened"):
        start = datetime.fromisoformat(held).astimezone(booking.starts_at.tzinfo)
        return booking.model_copy(update={"starts_at": start})
    told = stored.get("told_start", "")
    if record.get("step") != "cancelled" or not told:
        return booking
    start = datetime.fromtimestamp(float(told), UTC).astimezone(booking.starts_at.tzinfo)
    return booking.model_copy(update={"starts_at": start})


def notice_and_invite(
    record: Mapping[str, str], channel: str, booking: Booking, protocol: Protocol,
    stored: Mapping[str, str], now: datetime, window: SendWindow | None = None,
    repause_at: datetime | None = None,
) -> RenderExtras:
    """Return what a reminder's message says of a change and the invite its email carries.

    `record`: the reminder; `stored`: its booking's fields (`seq`, `moved_from`, `paused`);
    `window`: the clinic's send window, in which the pause message goes again (`pause_from`);
    `repause_at`: when the pause message again of this change goes, as stored (the SMS cap
    may have moved it a day on): named rather than worked out, when given (at the window's
    next opening from it: its attempt keeps to the window as it is then).
    A change notice's email carries the invite update or cancel with the notice's sequence;
    an email of an invite step (`invite = true`) carries the invite at the booking's
    current sequence, so a day-before email after a move has the new time and SEQUENCE.
    (The send path raises either to one above the last invite made for the booking when
    its event differs from that one's: worker/dispatch.py `_revised`.)
    """
    step = record.get("step", "")
    extras: RenderExtras = {}
    if step in NOTICE_STEPS:
        seq = int(record.get("occurrence") or 1)
        moved_from = stored.get("moved_from", "")
        paused = stored.get("paused") == "1"
        moved = step == "rescheduled"
        again: datetime | None = None
        if moved and paused:
            if repause_at is not None and window is not None:
                # Its attempt keeps to the send window as it is then (a clinic's edit since
                # it was placed may have closed it at that hour): it goes at the next opening.
                repause_at = next_opening(repause_at, window,
                                          ZoneInfo(booking.patient.timezone))
            again = pause_from(booking, protocol, now, window) if repause_at is None \
                else repause_at if repause_at > now else None
        extras["notice"] = Notice(
            previous_start=(datetime.fromtimestamp(float(moved_from), UTC)
                            if moved and moved_from else None),
            paused=paused,
            pause_from=again,
        )
        if channel == "email":
            extras["invite"] = Invite(seq, "CANCEL" if step == "cancelled" else "REQUEST")
    elif channel == "email" and base_step(step) in protocol.invite_steps():
        extras["invite"] = Invite(int(stored.get("seq") or 0), "REQUEST")
    return extras
