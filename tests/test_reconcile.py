"""The reconcile rule as a pure function: stored records + a new plan + now -> changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.planner import Plan, PlannedReminder
from worker.reconcile import reconcile, reconcile_one, record_fields

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
START = NOW + timedelta(days=7)


def planned(key="prep:sms", due=NOW + timedelta(days=6), **kw) -> PlannedReminder:
    return PlannedReminder(key=key, step=key.split(":")[0], channel="sms", template="day-before",
                           occurrence=1, due_at=due, status=kw.pop("status", "scheduled"),
                           reason=kw.pop("reason", "1 day before"), expires_at=START,
                           expires_note="before the visit", **kw)


def stored(r: PlannedReminder, status="scheduled", **extra) -> dict[str, str]:
    return record_fields(r, status, r.reason) | {"version": "1"} | extra


def run(records, reminders, *, booking=None, status="scheduled", doc="d", now=NOW):
    booking = {"doc": "d", "status": "scheduled", "version": "1"} if booking is None else booking
    return reconcile(booking, records, Plan(status=status, reminders=reminders), doc=doc,
                     medications="m", release=False, now=now)


def test_the_same_plan_changes_nothing():
    r = planned()
    result = run({r.key: stored(r)}, [r])
    assert result.changes == [] and not result.changed


def test_a_moved_reminder_is_rescheduled_with_a_new_version():
    r = planned()
    moved = planned(due=r.due_at + timedelta(days=3))
    (change,) = run({r.key: stored(r)}, [moved], doc="d2").changes
    assert change.schedule == "due" and change.bump
    assert change.due_epoch == moved.due_at.timestamp()
    assert change.fields["reason"].startswith("rescheduled")


def test_a_step_that_leaves_the_plan_is_cancelled_and_leaves_the_dead_letters():
    r = planned()
    for status in ("scheduled", "sending", "retrying", "failed"):
        before = stored(r, status)
        (change,) = run({r.key: before}, [], doc="d2").changes
        # A dead letter's reason keeps why it failed (tests/api/test_cancel_after_failure.py).
        why = f"; it had failed before: {before['reason']}" if status == "failed" else ""
        assert change.fields == {"status": "cancelled",
                                 "reason": f"no longer in the plan after a change{why}"}
        assert change.schedule == "remove"  # out of due, lease and dead letters


def test_a_step_the_opt_out_skipped_keeps_saying_so_when_the_same_booking_drops_it():
    """The same document planned again (a clinic's sync, the email unsubscribe's re-cap)
    without a step the patient's opt-out skipped: the clinic changed nothing, so it stays
    skipped for the opt-out, saying so, and is no longer the opt-out's to put back (its
    reason no longer "opted_out: "); written once. After a change of the document it is
    cancelled with the rest of what the change took out."""
    r = planned()
    before = stored(r, "skipped", reason="opted_out: the patient replied STOP at 10:00")
    (change,) = run({r.key: before}, []).changes
    assert change.fields == {"status": "skipped", "reason": (
        "not sent: the patient replied STOP at 10:00; no longer in the plan since")}
    assert change.schedule == "remove"
    assert run({r.key: before | change.fields}, []).changes == []
    (change,) = run({r.key: before}, [], doc="d2").changes
    assert change.fields == {"status": "cancelled",
                             "reason": "no longer in the plan after a change"}


def test_the_caller_names_what_took_a_reminder_still_to_go_out_of_the_plan():
    r = planned()
    result = reconcile({"doc": "d", "status": "scheduled", "version": "1"}, {r.key: stored(r)},
                       Plan(status="scheduled", reminders=[]), doc="d", medications="m",
                       release=False, now=NOW, gone="no longer in the plan once X")
    (change,) = result.changes
    assert change.fields == {"status": "cancelled", "reason": "no longer in the plan once X"}


def test_sent_is_history_whatever_the_new_plan_says():
    r = planned()
    assert reconcile_one(stored(r, "sent"), None, doc_changed=True, now=NOW) is None
    moved = planned(due=r.due_at + timedelta(days=1))
    assert reconcile_one(stored(r, "sent"), moved, doc_changed=True, now=NOW) is None


def test_a_new_expiry_alone_is_written_without_a_new_version():
    """The visit moves an hour; a day-and-time step keeps its time but not its expiry."""
    r = planned()
    later = PlannedReminder(**{**r.__dict__, "expires_at": START + timedelta(hours=1)})
    (change,) = run({r.key: stored(r, "sending")}, [later], doc="d2").changes
    assert change.bump is False and change.schedule == "keep"  # an attempt in flight stays valid
    assert change.fields == {"expires_epoch": repr((START + timedelta(hours=1)).timestamp()),
                             "expires_note": "before the visit"}


def test_a_hold_takes_waiting_reminders_out_of_the_due_set_and_a_release_puts_them_back():
    r = planned()
    held = run({r.key: stored(r)}, [r], status="held")
    assert held.status == "held" and [c.schedule for c in held.changes] == ["hold"]
    back = run({r.key: stored(r)}, [r], booking={"doc": "d", "status": "held"})
    (change,) = back.changes
    assert (change.schedule, change.due_epoch, change.fields) == ("due", r.due_at.timestamp(),
                                                                  None)


def test_a_corrected_booking_tries_a_dead_letter_afresh():
    r = planned()
    (change,) = run({r.key: stored(r, "failed", attempts="3")}, [r], doc="d2").changes
    assert change.fields["attempts"] == "0" and change.schedule == "due"
    assert change.fields["reason"].startswith("booking changed, sending again")
    assert run({r.key: stored(r, "failed")}, [r]).changes == []  # the same booking: no


def test_a_late_step_written_by_a_later_submission_is_due_now_in_an_older_plan_too():
    """A late step is planned for "now" by each submission. One made a moment before the
    stored write (a PUT of the same booking landed between its planning and its apply)
    finds the stored step due a moment after its own `now`: due now in both, kept; a step
    the stored write planned for later than it was written is still a move."""
    written = NOW + timedelta(seconds=0.3)
    late = planned(due=written, reason="late: sent at the next opening")
    mine = planned(due=NOW, reason="late: sent at the next opening")
    booking = {"doc": "d", "status": "scheduled", "version": "1",
               "updated_at": written.isoformat().replace("+00:00", "Z")}
    result = run({late.key: stored(late)}, [mine], booking=booking)
    assert result.changes == [] and not result.changed
    # Without the write's instant (or written before this plan's now): rescheduled as before.
    (change,) = run({late.key: stored(late)}, [mine]).changes
    assert change.fields is not None and change.fields["reason"].startswith("rescheduled")
    ahead = planned(due=written + timedelta(seconds=1))
    (change,) = run({ahead.key: stored(ahead)}, [mine], booking=booking).changes
    assert change.schedule == "due" and change.due_epoch == NOW.timestamp()
