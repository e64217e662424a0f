"""A change notice not yet sent follows the patient's channels as the clinic changes the
booking afterwards without moving it (real Redis, real Apprise, a real HTTP gateway; the rig
of tests/test_notices_sms.py).

The store adds the notices at the move, and the reconcile never sees them: a later
re-submission that withdraws the patient's SMS consent (channels ["email"]) cancelled the
again SMS (tests/test_again_channels.py) but left "your visit moved" scheduled by SMS, and
the send path sent it by SMS (the begin checks opt-outs, not the channels): a text after the
patient's SMS consent was withdrawn. It goes by a channel the patient still takes instead,
so the patient still hears of the move."""

from __future__ import annotations

from datetime import datetime

from tests import test_notices_sms as ns

DAY_BEFORE = ns.DAY_BEFORE
gate = ns.gate  # fixtures
rig = ns.rig
SMS_NOTICE = "sk/M-1/rescheduled#1:sms"


def test_sms_withdrawn_after_a_move_sends_the_notice_by_email_not_sms(rig):
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send(DAY_BEFORE) == "sent"  # told the date by SMS: the move is told by SMS
    moved = rig.doc(12, channels=both)
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms"}
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "scheduled"
    rig.book(rig.doc(12, channels=("email",)))  # the same date: no move, SMS withdrawn
    shown = rig.reminders()
    notice = shown["rescheduled#1:sms"]
    assert notice["status"] == "cancelled", notice
    assert rig.store.redis.zscore(rig.store.due_key, SMS_NOTICE) is None
    # Even made due by hand, it is not claimed: nothing goes by SMS.
    rig.store.redis.zadd(rig.store.due_key, {SMS_NOTICE: 0})
    assert SMS_NOTICE not in [
        c.ref for c in rig.store.claim_due(100, rig.ctx.settings.lease_seconds)]
    # The patient still hears of the move, by email, naming the new date.
    email = shown["rescheduled#1:email"]
    assert email["status"] == "scheduled", email
    before = len(rig.texts())
    assert rig.send("sk/M-1/rescheduled#1:email") == "sent"
    (text,) = rig.texts()[before:]
    assert "14:30" in text or "2:30" in text, text
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "cancelled"
    # The same booking again changes nothing more.
    version = rig.store.timeline("sk", "M-1")["version"]
    rig.book(rig.doc(12, channels=("email",)))
    assert rig.store.timeline("sk", "M-1")["version"] == version
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms", "rescheduled#1:email"}


def test_an_unrelated_change_keeps_the_sms_notice(rig):
    """A re-submission that keeps SMS (the patient's name corrected) leaves it as it was."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12, channels=both))
    doc = rig.doc(12, channels=both)
    doc["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(doc)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms"}
    assert rig.send(SMS_NOTICE) == "sent"


def test_email_withdrawn_after_a_move_sends_the_notice_by_sms_counted_by_the_cap(rig):
    """The other way: told by the confirmation's invite, the move's notice goes by email;
    the clinic then withdraws email (channels ["sms"]) without a move. The notice goes by
    SMS instead, and the SMS cap of that same re-submission counts it on its day: the
    plan's own SMS give way (one SMS a day at this clinic)."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    rig.book(rig.doc(2, channels=both))
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.book(rig.doc(2, channels=("sms",)))
    shown = rig.reminders()
    assert shown["rescheduled#1:email"]["status"] == "cancelled"
    assert shown["rescheduled#1:sms"]["status"] == "scheduled"
    days: dict[object, list[str]] = {}
    for key, r in shown.items():
        if r["channel"] == "sms" and r["status"] in ("scheduled", "retrying", "sent"):
            day = datetime.fromisoformat(r["due_at"]).astimezone(ns.TZ).date()
            days.setdefault(day, []).append(key)
    assert all(len(keys) == 1 for keys in days.values()), days


def test_channels_withdrawn_then_given_back_the_move_is_still_told(rig):
    """SMS only, the move's notice waiting by SMS; the clinic switches the patient to email
    (the notice moves to email), then back to SMS before it went: the email copy is cancelled
    as withdrawn, and the SMS copy, cancelled by the first switch (not expired, not refused),
    goes again. Both were left cancelled: the patient never heard of the move."""
    rig.book(rig.doc(5, channels=("sms",)))
    assert rig.send("sk/M-1/booking-confirmation:sms") == "sent"
    rig.book(rig.doc(4, channels=("sms",)))
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "scheduled"
    rig.book(rig.doc(4, channels=("email",)))
    assert rig.reminders()["rescheduled#1:email"]["status"] == "scheduled"
    rig.book(rig.doc(4, channels=("sms",)))
    shown = rig.reminders()
    assert shown["rescheduled#1:email"]["status"] == "cancelled", shown["rescheduled#1:email"]
    assert shown["rescheduled#1:sms"]["status"] == "scheduled", shown["rescheduled#1:sms"]
    before = len(rig.gate.bodies)
    assert rig.send(SMS_NOTICE) == "sent"
    (text,) = [b["message"] for b in rig.gate.bodies[before:]]
    assert "moved" in text.lower(), text
    version = rig.store.timeline("sk", "M-1")["version"]
    rig.book(rig.doc(4, channels=("sms",)))  # the same again: nothing changes
    assert rig.store.timeline("sk", "M-1")["version"] == version
