"""A message sent again for a new date after a move (`again-<step>`, `repause`: worker/notices.py)
follows the plan's step as the clinic changes the booking afterwards without moving it (real
Redis, real Apprise, a real HTTP SMS gateway; the rig of tests/test_notices_sms.py).

The store adds these reminders at the move, and the reconcile never sees them: a later
re-submission that withdraws the patient's SMS consent (channels ["email"]) left the again
SMS scheduled, and the send path sent it by SMS (the begin checks opt-outs, not the channels),
beside the plan's own day-before, now by email: twice, once on a channel withdrawn. And a
booking held after the move and then released put back only the plan's reminders."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests import test_notices_sms as ns
from worker.models import parse_booking
from worker.planner import plan

DAY_BEFORE = ns.DAY_BEFORE
gate = ns.gate  # fixtures
rig = ns.rig


def test_sms_withdrawn_after_a_move_cancels_the_again_sms(rig):
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12, channels=both))
    assert rig.reminders()["again-day-before#1:sms"]["status"] == "scheduled"
    rig.book(rig.doc(12, channels=("email",)))  # the same date: no move, SMS withdrawn
    shown = rig.reminders()
    again = shown["again-day-before#1:sms"]
    assert (again["status"], again["reason"]) == ("cancelled",
                                                  "no longer in the plan after a change")
    assert rig.store.redis.zscore(rig.store.due_key, "sk/M-1/again-day-before#1:sms") is None
    # The plan's own day-before carries the step for the new date, by email.
    assert shown["day-before:email"]["status"] == "scheduled"
    assert shown["day-before:email"]["due_at"] == ns.madrid(rig.doc(12)["starts_at"], -1, 10)
    # Even made due by hand, it is not claimed: nothing goes by SMS.
    rig.store.redis.zadd(rig.store.due_key, {"sk/M-1/again-day-before#1:sms": 0})
    assert "sk/M-1/again-day-before#1:sms" not in [
        c.ref for c in rig.store.claim_due(100, rig.ctx.settings.lease_seconds)]


def test_an_unrelated_change_keeps_the_again_sms(rig):
    """A re-submission that keeps the step on SMS (the patient's name corrected) leaves it."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12, channels=both))
    doc = rig.doc(12, channels=both)
    doc["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(doc)
    assert rig.reminders()["again-day-before#1:sms"]["status"] == "scheduled"
    assert rig.send("sk/M-1/again-day-before#1:sms") == "sent"


def test_released_from_a_hold_the_notice_and_the_again_sms_go(rig):
    """After the move, the clinic enters a recent isotretinoin dose: held. The notice and the
    again SMS fall due during the hold (their begin drops them: "booking held", out of the
    schedule). The clinic releases it: before, the reconcile put back only the plan's
    reminders, and these two stayed "scheduled" for ever, never sent."""
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    moved = rig.doc(12)
    rig.book(moved)
    held = rig.doc(12)
    held["medications"]["isotretinoin_last_dose"] = (
        datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    rig.book(held)
    refs = ["sk/M-1/rescheduled#1:sms", "sk/M-1/again-day-before#1:sms"]
    for ref in refs:
        assert rig.send(ref) == "dropped: booking held"
    booking = parse_booking(held, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["microneedling"],
                                   rig.catalog.clinics["sk"], now), now, release=True)
    shown = rig.reminders()
    for ref in refs:
        key = ref.rsplit("/", 1)[1]
        assert shown[key]["status"] == "scheduled"
        assert rig.store.redis.zscore(rig.store.due_key, ref) == datetime.fromisoformat(
            shown[key]["due_at"]).timestamp(), ref
    before = len(rig.texts())
    assert rig.send(refs[1]) == "sent"
    (text,) = rig.texts()[before:]
    assert ns.names(text, moved["starts_at"]), text
