"""A change notice the patient's STOP skipped, then superseded by a later change, is
`cancelled` like the rest of what the change took out (real Redis, the real send path to a
real HTTP SMS gateway; the rig of tests/test_notices_sms.py, STOP through `Store.opt_out`
as the inbound SMS route calls it).

An SMS-only patient told the first date; the clinic moves the visit (notice #1 and the
day-before again); the patient texts STOP (both skipped, `opted_out: …`); the clinic moves
it again. The plan's own SMS the STOP had skipped and the change took out say `cancelled`,
"no longer in the plan after a change" (worker/reconcile.py); a notice or message again
not yet sent that a later change replaces says `cancelled`, "superseded by a later change".
But the skipped notice #1 stayed `skipped` "opted_out: …" beside them, as if START could
still bring it back, while START brings back only the latest change's (README): it is
superseded, and the timeline says so.
"""

from __future__ import annotations

from tests import test_notices_sms as ns

gate = ns.gate  # fixtures
rig = ns.rig
PHONE = "+34600111222"


def test_a_notice_skipped_by_stop_then_replaced_by_a_later_move_is_cancelled(rig):
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"  # "see you on <date>": a move must be told
    rig.book(rig.doc(12))
    moved = ns.notices(rig.reminders())
    assert moved["rescheduled#1:sms"]["status"] == "scheduled", moved
    sent_before = len(rig.texts())
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    skipped = rig.reminders()
    assert skipped["rescheduled#1:sms"]["status"] == "skipped"
    assert skipped["rescheduled#1:sms"]["reason"].startswith("opted_out: ")

    rig.book(rig.doc(19))
    after = rig.reminders()
    first = after["rescheduled#1:sms"]
    assert first["status"] == "cancelled", first
    assert first["reason"] == "superseded by a later change", first
    # Its siblings: every store-added message of the first move reads the same.
    for key, r in after.items():
        if "#1:" in key:
            assert (r["status"], r["reason"]) == ("cancelled", "superseded by a later change"), r
    assert rig.store.redis.zscore(rig.store.due_key, "sk/M-1/rescheduled#1:sms") is None
    assert len(rig.texts()) == sent_before  # nothing sent to an opted-out number
