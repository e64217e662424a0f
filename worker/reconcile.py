"""The reconcile rule: stored reminders + a new plan + now -> what to change. Pure.

A re-submitted booking is reconciled, never replaced: unchanged reminders keep their
time, attempts and any retry; moved ones are rescheduled; obsolete ones cancelled (and
leave the dead letters); sent ones stay as history. `Store.upsert` applies the result
atomically (under WATCH of every key it read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from .planner import Plan, PlannedReminder, is_hold_notice
from .status import PENDING, Status

OPTED_OUT = "opted_out: "  # the reason of a reminder the patient's opt-out skipped
# The reason of one the opt-out skipped that the same booking, planned again, no longer has
# (`reconcile_one`): still skipped for the opt-out ("not sent: <why>; ..."), but no longer
# the opt-out's to put back (worker/store.py `opt_in` resumes only "opted_out: ").
NOT_SENT = "not sent: "
NO_LONGER_PLANNED = "no longer in the plan since"
# Why a reminder still to go is cancelled when the new plan no longer has it: the clinic's
# change of the booking (the default), or the caller's words for what changed the plan
# (worker/store.py `Store.recap`: the patient's email unsubscribe).
AFTER_A_CHANGE = "no longer in the plan after a change"
# What happens to a reminder's place in the schedule:
#   due     in the due set at its due_epoch (and out of the lease and dead letters)
#   remove  out of the due set, the lease and the dead letters
#   hold    out of the due set only (the booking is held; the plan is kept)
#   keep    where it is
Schedule = Literal["due", "remove", "hold", "keep"]
Record = Mapping[str, str]


@dataclass(frozen=True)
class Change:
    """One reminder to change: fields to write (None: keep the record) and its schedule.

    `bump`: the write takes the booking's new version, so an attempt in flight for the
    old one becomes stale (its outcome no longer changes the reminder's state).
    """

    key: str
    fields: dict[str, str] | None
    schedule: Schedule
    due_epoch: float | None = None
    bump: bool = True


@dataclass(frozen=True)
class Reconciled:
    """The booking's new status and the changes; nothing to do when `changed` is False."""

    status: str
    hold_reason: str
    released_for: str
    changes: list[Change] = field(default_factory=list)
    booking_changed: bool = False

    @property
    def changed(self) -> bool:
        """Whether the booking takes a new version (an expiry-only update does not)."""
        return self.booking_changed or any(c.fields is not None and c.bump for c in self.changes)


def reconcile(
    stored_booking: Record,
    stored: Mapping[str, Record],
    plan: Plan,
    *,
    doc: str,
    medications: str,
    release: bool,
    now: datetime,
    gone: str = AFTER_A_CHANGE,
) -> Reconciled:
    """Return what to change so the stored booking follows `plan` (see the module docstring).

    `stored` maps every reminder key stored for the booking (and every planned key) to its
    record ({} if none). `release` is the clinic's review of a held booking: the hold is
    waived for as long as the medications stay as reviewed. `gone`: the reason of one
    cancelled because the plan no longer has it (`reconcile_one`).
    """
    released_for = medications if release else stored_booking.get("released_for", "")
    status = plan.status
    if status == Status.HELD and released_for == medications:
        status = Status.SCHEDULED  # the clinic reviewed exactly these medications
    hold_reason = (plan.hold_reason or "") if status == Status.HELD else ""
    doc_changed = stored_booking.get("doc") != doc
    was_held = stored_booking.get("status") == Status.HELD
    # Booked again after a cancel: a re-open plans afresh, even the opt-out's skipped SMS
    # (the patient may have opted in meanwhile: START puts nothing back in a cancelled one).
    reopen = stored_booking.get("status") == Status.CANCELLED
    # A held booking's notice goes despite the hold, and only while it is held.
    planned = {r.key: r for r in plan.reminders
               if status == Status.HELD or not is_hold_notice(r.key)}
    written = written_epoch(stored_booking)
    changes: list[Change] = []
    for key in sorted(set(stored) | set(planned)):
        record = stored.get(key, {})
        one = reconcile_one(record, planned.get(key), doc_changed=doc_changed or reopen,
                            now=now, released=was_held and status != Status.HELD,
                            written=written, gone=gone)
        if one is not None and one[1] != "keep":
            fields, schedule = one
            if schedule == "due" and status == Status.HELD and not is_hold_notice(key):
                schedule = "hold"
            due = float(fields["due_epoch"]) if "due_epoch" in fields else None
            changes.append(Change(key, fields, schedule, due))
            continue
        expiry = one[0] if one is not None else None  # the same reminder, a new expiry
        schedule = "keep"
        if record.get("status") in (Status.SCHEDULED, Status.RETRYING) and not is_hold_notice(
                key):
            # Unchanged and waiting: a hold takes it out of the due set, a release puts it back.
            if status == Status.HELD:
                schedule = "hold"
            elif was_held:
                schedule = "due"
        if expiry is not None or schedule != "keep":
            due = float(record["due_epoch"]) if schedule == "due" else None
            changes.append(Change(key, expiry, schedule, due, bump=False))
    booking_changed = (
        doc_changed
        or stored_booking.get("status") != status
        or stored_booking.get("hold_reason", "") != hold_reason
        or stored_booking.get("released_for", "") != released_for
    )
    return Reconciled(status, hold_reason, released_for, changes, booking_changed)


def written_epoch(stored_booking: Record) -> float:
    """When the stored booking was last written (its `updated_at`, as an epoch; -inf if
    never). A plan made at a `now` before it (a PUT of the same document landing between
    this write's planning and its apply) finds that write's late steps, planned for its
    own "now", due at a time after this `now`: they are due now in both plans all the
    same (`reconcile_one`)."""
    try:
        return datetime.fromisoformat(
            stored_booking.get("updated_at", "").replace("Z", "+00:00")).timestamp()
    except ValueError:  # none (never written), or not an instant
        return float("-inf")


def reconcile_one(
    stored: Record, new: PlannedReminder | None, *, doc_changed: bool, now: datetime,
    released: bool = False, written: float = float("-inf"), gone: str = AFTER_A_CHANGE,
) -> tuple[dict[str, str], Schedule] | None:
    """Return (fields to write, schedule) for one reminder, or None if it stays as it is.
    `released`: the booking's hold ends; an SMS at booking held back for a time still ahead
    keeps it only if the plan does (the store capped it there again, counting what
    went while it was held), not for being at booking. `written`: when the stored booking
    was last written (`written_epoch`): a stored reminder due by then, or by `now`, came
    due (a plan made before that write is older than it, not a move). `gone`: the reason of
    one cancelled because `new` is None."""
    old_status = stored.get("status")
    if old_status == Status.SENT:
        return None  # history: never sent again, whatever the new plan says
    if old_status == Status.FAILED and new is not None and not doc_changed:
        return None  # dead letter: the same booking again changes nothing; replay does
    if new is None:
        # A reminder the patient's opt-out skipped (worker/store.py `opt_in` puts those back
        # when the patient opts in again) is no longer the opt-out's to put back either. The
        # same booking planned again (a clinic's sync, the email unsubscribe's
        # `Store.recap`: the cap now sends the step by SMS, say): nothing the clinic changed
        # took it out of the plan, so it stays skipped for the opt-out, saying so. After a
        # change of the booking, it is cancelled as the rest of what the change took out.
        if (old_status == Status.SKIPPED and not doc_changed
                and stored.get("reason", "").startswith(OPTED_OUT)):
            why = stored["reason"][len(OPTED_OUT):]
            return ({"status": Status.SKIPPED,
                     "reason": f"{NOT_SENT}{why}; {NO_LONGER_PLANNED}"}, "remove")
        if old_status in PENDING or old_status == Status.FAILED or (
                old_status == Status.SKIPPED
                and stored.get("reason", "").startswith(OPTED_OUT)):
            reason = gone
            if old_status == Status.FAILED:  # a dead letter leaves; why it failed stays
                reason += f"; it had failed before: {stored.get('reason', '')}"
            return {"status": Status.CANCELLED, "reason": reason}, "remove"
        return None
    if new.status == Status.SKIPPED:
        if old_status == Status.SKIPPED and stored.get("reason") == new.reason:
            return None
        return _made(stored, record_fields(new, Status.SKIPPED, new.reason)), "remove"
    planned_epoch = repr(new.due_at.timestamp())
    came_due = (
        float(stored.get("planned_epoch") or "inf") <= max(now.timestamp(), written)
        and new.due_at <= now
    )
    if (old_status == Status.SKIPPED and not doc_changed
            and stored.get("reason", "").startswith(OPTED_OUT)
            and (stored.get("planned_epoch") == planned_epoch
                 or (new.at_booking and stored.get("at_booking") == "1") or came_due)):
        # The same booking again (a clinic's sync, the email unsubscribe's `Store.recap`)
        # while the patient is opted out: still the opt-out's, unchanged (worker/store.py
        # `opt_in` puts it back at START); a step at booking or one due now in both plans
        # too, as one still to go keeps its time (below), not scheduled again to be
        # skipped again at its begin.
        return None
    if old_status in PENDING and (
        stored.get("planned_epoch") == planned_epoch
        or (new.at_booking and stored.get("at_booking") == "1" and not (
            released and new.channel == "sms" and old_status == Status.SCHEDULED
            and float(stored.get("planned_epoch") or "-inf") > now.timestamp()))
        or came_due
    ):
        # Unchanged, or due now in both plans (a late step is planned for "now", which
        # moves with every submission, and may be a moment after this plan's `now` when
        # written by a submission landing between this one's planning and its write):
        # keep its time, attempts and any retry. Its expiry
        # follows the new plan (the appointment may have moved).
        expiry = _expiry_fields(new)
        if all(stored.get(k, "") == v for k, v in expiry.items()):
            return None
        return expiry, "keep"
    fields = record_fields(new, Status.SCHEDULED, new.reason)
    if old_status in PENDING:
        fields["reason"] = f"rescheduled: {new.reason}"
    if old_status == Status.SENDING:
        # Its attempt in flight counts: should it have reached the provider and its worker
        # died, the attempt log shows no line for it, and only this count tells it began.
        fields["attempts"] = stored.get("attempts", "0")
    if old_status == Status.FAILED:  # the clinic corrected the booking: try afresh
        fields["reason"] = f"booking changed, sending again: {new.reason}"
    return _made(stored, fields), "due"


def _made(stored: Record, fields: dict[str, str]) -> dict[str, str]:
    """`fields` with the attempts made so far kept as `earlier` when they start the attempts
    afresh (a fresh budget of max_attempts): the clinic is shown every attempt made, never a
    count that goes back to 0 (worker/store.py `attempts_made`)."""
    if fields.get("attempts") == "0":
        made = int(stored.get("attempts") or 0) + int(stored.get("earlier") or 0)
        if made:
            fields["earlier"] = str(made)
    return fields


def _expiry_fields(r: PlannedReminder) -> dict[str, str]:
    return {
        "expires_epoch": repr(r.expires_at.timestamp()) if r.expires_at else "",
        "expires_note": r.expires_note,
    }


def record_fields(r: PlannedReminder, status: str, reason: str) -> dict[str, str]:
    """Return the stored fields of a planned reminder."""
    epoch = repr(r.due_at.timestamp())
    return {
        "step": r.step,
        "channel": r.channel,
        "template": r.template,
        "occurrence": str(r.occurrence),
        "planned_epoch": epoch,
        "due_epoch": epoch,
        "status": status,
        "reason": reason,
        "at_booking": "1" if r.at_booking else "0",
        "attempts": "0",  # a new or moved reminder starts its attempts afresh
    } | _expiry_fields(r)
