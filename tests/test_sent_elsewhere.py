"""A step that went out on one channel does not go again on another because the clinic
changed the patient's channels afterwards (real Redis, real Apprise, a real HTTP SMS gateway;
the rig of tests/test_notices_sms.py, a send window open all day).

The confirmation went by email; the clinic then re-submitted with the patient's channels
["sms"] (email withdrawn), with or without a move. The reconcile saw `booking-confirmation:sms`
as a new key and scheduled it: the patient got the confirmation a second time, by SMS, and
that SMS took a slot of the SMS cap (one a day at this clinic), pushing the day-before SMS out
("no later day has room"). It is recorded as skipped, saying when it went by email, and the
cap does not count it. The store's own messages again for a new date still go
(tests/test_notices_sms.py, tests/test_again_channels.py)."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests import test_notices_sms as ns
from worker.models import parse_booking
from worker.planner import plan

gate = ns.gate  # fixtures
rig = ns.rig
BOTH = ("sms", "email")
SMS_CONFIRMATION = "sk/M-1/booking-confirmation:sms"


def _confirmed_by_email(rig) -> str:
    rig.book(rig.doc(5, channels=BOTH))
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    sent_at = rig.reminders()["booking-confirmation:email"]["sent_at"]
    return datetime.fromisoformat(sent_at).astimezone(ns.TZ).date().isoformat()


def _assert_not_again_by_sms(rig, day: str) -> None:
    shown = rig.reminders()
    conf = shown["booking-confirmation:sms"]
    assert conf["status"] == "skipped", conf
    assert conf["reason"] == f"not sent: already sent by email on {day}", conf
    assert shown["booking-confirmation:email"]["status"] == "sent"
    assert rig.store.redis.zscore(rig.store.due_key, SMS_CONFIRMATION) is None
    # The SMS cap gave it no slot: every SMS still to go is one of another step.
    for key, r in shown.items():
        if r["channel"] == "sms" and r["status"] in ("scheduled", "retrying"):
            assert not key.startswith("booking-confirmation"), (key, r)
            assert "already sent" not in (r["reason"] or ""), (key, r)


def test_email_withdrawn_without_a_move_no_confirmation_by_sms(rig):
    day = _confirmed_by_email(rig)
    before = len(rig.gate.bodies)
    rig.book(rig.doc(5, channels=("sms",)))
    _assert_not_again_by_sms(rig, day)
    # The day-before SMS keeps its day (nothing took its slot).
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"
    # The same booking again changes nothing.
    version = rig.store.timeline("sk", "M-1")["version"]
    rig.book(rig.doc(5, channels=("sms",)))
    assert rig.store.timeline("sk", "M-1")["version"] == version
    assert rig.send(ns.DAY_BEFORE) == "sent"
    (text,) = [b["message"] for b in rig.gate.bodies[before:]]  # only the day-before
    assert "14:30" in text or "2:30" in text, text


def test_moved_then_email_withdrawn_no_confirmation_by_sms_and_the_day_before_stays(rig):
    day = _confirmed_by_email(rig)
    rig.book(rig.doc(4, channels=BOTH))  # moved: the notice goes by email (the invite's)
    rig.book(rig.doc(4, channels=("sms",)))
    _assert_not_again_by_sms(rig, day)
    shown = rig.reminders()
    assert shown["day-before:sms"]["status"] == "scheduled", shown["day-before:sms"]
    assert shown["rescheduled#1:sms"]["status"] == "scheduled"
    # At most one SMS a day (the clinic's cap), the confirmation not among them.
    days: dict[object, list[str]] = {}
    for key, r in shown.items():
        if r["channel"] == "sms" and r["status"] in ("scheduled", "retrying", "sent"):
            when = datetime.fromisoformat(r["due_at"]).astimezone(ns.TZ).date()
            days.setdefault(when, []).append(key)
    assert all(len(keys) == 1 for keys in days.values()), days



def test_a_step_planned_on_both_channels_keeps_its_sms_once_its_email_went(rig):
    """"Stop tretinoin tonight" goes by SMS and by email (the protocol plans both). Its email
    went at its time; its SMS is still to go (the gateway answered 503 and it waits for its
    retry). The clinic sends the same booking again (a sync) ten minutes later: the SMS is
    still one the plan sends, not "already sent by email"."""
    doc = rig.doc(10, channels=BOTH)
    doc["medications"] = {"tretinoin": True, "retinol": False}
    rig.book(doc)
    assert rig.send("sk/M-1/stop-retinoids:email") == "sent"
    due = datetime.fromisoformat(rig.reminders()["stop-retinoids:sms"]["due_at"])
    later = due + timedelta(minutes=10)  # past its time, the SMS not sent yet
    booking = parse_booking(doc, rig.catalog)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["microneedling"],
                                   rig.catalog.clinics["sk"], later), later)
    sms = rig.reminders()["stop-retinoids:sms"]
    assert sms["status"] == "scheduled", sms["reason"]
    assert "already sent" not in (sms["reason"] or ""), sms
    before = len(rig.gate.bodies)
    assert rig.send("sk/M-1/stop-retinoids:sms") == "sent"
    (text,) = [b["message"] for b in rig.gate.bodies[before:]]
    assert "tretinoin" in text.lower(), text
