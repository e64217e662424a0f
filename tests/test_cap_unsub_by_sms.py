"""The SMS cap counts a care-critical email step that goes by SMS to a patient unsubscribed
from email (worker/store.py `_BEGIN_SEND` "ok sms") on the day it goes, as the README says
an email sent by SMS counts, and counted first, as a care-critical SMS is: the booking's
other SMS give way to it. Counted only once it had gone, the patient unsubscribed before
the booking was stored got two SMS on one day from a clinic whose cap is one a day.

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed (tests/test_send_caps.py's rig); the unsubscribe through `Store.opt_out`, as the
unsubscribe route calls it."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from tests.test_send_caps import ADVICE, TZ, Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan

# The day after the visit: the care-critical check by email at 09:00 (by SMS to a patient
# unsubscribed from email), and a plain SMS at 19:00 that may move (late until 10 days).
PROTOCOL = """
name = "Check and evening"
[[steps]]
id = "check"
day = 1
time = "09:00"
channels = ["email"]
template = "week-check"
late = "send"
late_until = "10d"
care_critical = true
[[steps]]
id = "evening"
day = 1
time = "19:00"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
""" + ADVICE


def _deliver(rig: Rig, booking_id: str) -> None:
    """Send every reminder of the booking still to go, each at its stored due time."""
    while True:
        pending = sorted((rig.due(booking_id, r["id"]), r["id"])
                         for r in rig.store.timeline("cap", booking_id)["reminders"]
                         if r["status"] in ("scheduled", "retrying"))
        if not pending:
            return
        at, key = pending[0]
        assert rig.send(booking_id, key, at) == "sent", rig.reminder(booking_id, key)


def test_a_care_critical_email_going_by_sms_takes_its_day_from_the_other_sms(rig):
    (rig.settings.config_dir / "protocols" / "twice.toml").write_text(PROTOCOL,
                                                                      encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.book("A-1", "twice", d - timedelta(days=1), email=True)
    check = rig.reminder("A-1", "check:email")
    assert check["status"] == "scheduled" and rig.due("A-1", "check:email") == rig.local(d, 9)
    evening = rig.reminder("A-1", "evening:sms")
    # D's one SMS is the care-critical check's: the evening SMS gives way (no email: the
    # patient unsubscribed), to the next day with room, saying why.
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 19), evening
    assert "moved to" in evening["reason"] and "1 a day" in evening["reason"], evening
    _deliver(rig, "A-1")
    texts = rig.sms.snapshot()
    assert len(texts) == 2 and rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days
    assert rig.store.attempts("cap/A-1/check:email")[-1]["via"].startswith("sms:")


# Across bookings: A-1's care-critical check of D 09:00 (`critmail` of tests/test_send_caps.py:
# by email, by SMS to a patient unsubscribed from email) and A-2's plain SMS of D 19:00
# (`eve`), both visits on D-1. The cap is one SMS a day.


def _deliver_all(rig: Rig, *booking_ids: str) -> None:
    """Send every reminder of the bookings still to go, each at its stored due time, in due
    order across them."""
    while True:
        pending = sorted((rig.due(b, r["id"]), b, r["id"]) for b in booking_ids
                         for r in rig.store.timeline("cap", b)["reminders"]
                         if r["status"] in ("scheduled", "retrying"))
        if not pending:
            return
        at, booking_id, key = pending[0]
        assert rig.send(booking_id, key, at) == "sent", rig.reminder(booking_id, key)


def _one_text_a_day(rig: Rig) -> None:
    """A-1's check went by SMS on D, A-2's SMS on D+1 at 19:00: one text a day, no email."""
    d = rig.day
    assert rig.reminder("A-2", "evening:sms")["status"] == "sent"
    assert rig.due("A-2", "evening:sms") == rig.local(d + timedelta(days=1), 19)
    assert rig.reminder("A-1", "check:email")["status"] == "sent"
    assert rig.store.attempts("cap/A-1/check:email")[-1]["via"].startswith("sms:")
    assert len(rig.sms.snapshot()) == 2 and rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days


def test_another_booking_of_the_patient_counts_the_email_going_by_sms(rig):
    """Unsubscribed first: A-1 stored with its check going by SMS on D; A-2, stored after,
    finds D taken by it and moves its SMS to D+1 (no email: unsubscribed), saying why. Before,
    the check counted only once it had gone: A-2 kept D, two texts on D."""
    d = rig.day
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    evening = rig.reminder("A-2", "evening:sms")
    assert evening["status"] == "scheduled", evening
    assert "moved to" in evening["reason"] and "1 a day" in evening["reason"], evening
    _deliver_all(rig, "A-1", "A-2")
    _one_text_a_day(rig)


def test_an_unsubscribe_landing_while_another_booking_is_written_is_counted(rig, monkeypatch):
    """Forced race: A-1 stored while the patient takes email (its check by email); A-2's
    write has read the patient's SMS (D free: the check goes by email) when the patient
    unsubscribes. The unsubscribe marks the check as going by SMS in the same step (flag "s",
    `smsv` bumped): A-2's write sees A-1 changed since its read, reads again and moves its
    SMS to D+1."""
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)
    real = rig.store._caps_read
    reads: list[Any] = []

    def parked(*args: Any, **kwargs: Any) -> Any:
        read = real(*args, **kwargs)
        reads.append(read)
        if len(reads) == 1:  # between A-2's read and its write: the unsubscribe lands
            rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                              critical=rig.catalog.critical_steps)
        return read

    monkeypatch.setattr(rig.store, "_caps_read", parked)
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    assert len(reads) == 2, reads  # read again after the unsubscribe
    assert rig.reminder("A-1", "check:email")["status"] == "scheduled"
    evening = rig.reminder("A-2", "evening:sms")
    assert "moved to" in evening["reason"], evening
    _deliver_all(rig, "A-1", "A-2")
    _one_text_a_day(rig)


def test_start_counts_an_email_still_to_go_by_sms(rig):
    """A-2's SMS of D 19:00 is skipped by STOP; the patient unsubscribes from email; A-1 is
    stored then (its check goes by SMS on D). START finds D taken by the check: A-2's SMS
    stays skipped, saying why (before, START counted the check only once it had gone and
    sent A-2's SMS on D too: two texts on D)."""
    d = rig.day
    critical = rig.catalog.critical_steps
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    rig.store.opt_out("cap", "sms", "+34600111222", "STOP", critical=critical)
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed", critical=critical)
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)
    assert rig.store.opt_in("cap", "sms", "+34600111222", caps=rig.catalog.clinics["cap"].sms,
                            why="START", critical=critical)
    evening = rig.reminder("A-2", "evening:sms")
    assert evening["status"] == "skipped", evening
    assert "not resumed" in evening["reason"] and "1 a day" in evening["reason"], evening
    _deliver_all(rig, "A-1", "A-2")
    assert rig.store.attempts("cap/A-1/check:email")[-1]["via"].startswith("sms:")
    assert len(rig.sms.snapshot()) == 1 and rig.smtp.snapshot() == []
    assert rig.sent_days == [d]


def _critmail(rig: Rig, channels: list[str], *, phone: bool = True) -> None:
    """A-1 (`critmail`, visit on D-1) written for Ana with these channels, her phone given
    or not."""
    patient: dict[str, Any] = {"name": "Ana López", "email": "ana@example.com",
                               "timezone": "Europe/Madrid", "locale": "en",
                               "channels": channels}
    if phone:
        patient["phone"] = "+34600111222"
    booking = parse_booking({
        "clinic": "cap", "booking_id": "A-1", "treatment": "critmail",
        "starts_at": datetime.combine(rig.day - timedelta(days=1), time(14, 0),
                                      TZ).isoformat(),
        "patient": patient}, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["critmail"],
                                   rig.catalog.clinics["cap"], now), now)


def _a2_keeps_its_day(rig: Rig) -> None:
    """A-1's check never goes by SMS: A-2, booked now, keeps its SMS on D 19:00; the check
    is skipped at its begin (unsubscribed from email, no SMS allowed) and A-2's SMS is D's
    one text."""
    d = rig.day
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    evening = rig.reminder("A-2", "evening:sms")
    assert rig.due("A-2", "evening:sms") == rig.local(d, 19), evening
    assert "moved" not in evening["reason"], evening
    assert rig.send("A-1", "check:email", rig.local(d, 9)) == "dropped: opted out"
    assert rig.reminder("A-1", "check:email")["status"] == "skipped"
    assert rig.send("A-2", "evening:sms", rig.local(d, 19)) == "sent"
    assert rig.smtp.snapshot() == [] and rig.sent_days == [d], rig.sent_days


def test_an_email_of_a_booking_without_sms_is_not_counted_as_an_sms(rig):
    """A-1's patient allows email only for it (channels ["email"], a phone given): its
    care-critical check can never go by SMS (the begin skips it as unsubscribed). Stored
    after the unsubscribe, it was flagged and shown as going by SMS all the same: A-2's SMS
    gave D to a text that never went (moved to D+1) and the clinic read that the check
    reaches the patient by SMS."""
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps)
    _critmail(rig, ["email"])
    check = rig.reminder("A-1", "check:email")
    assert check.get("via") != "sms" and "by SMS" not in (check["reason"] or ""), check
    _a2_keeps_its_day(rig)


@pytest.mark.parametrize("phone", [True, False], ids=["sms-withdrawn", "phone-removed"])
def test_an_email_no_longer_going_by_sms_after_a_resubmission_is_not_counted(rig, phone):
    """A-1 is stored after the email unsubscribe with SMS allowed: its care-critical check
    goes by SMS on D (flag "s", `via: sms`). The clinic sends A-1 again with "sms"
    withdrawn from the patient's channels (or the phone removed too): the check can no
    longer go by SMS (its begin skips it), yet it kept its flag: still shown as going by
    SMS, and counted by the cap, so A-2's SMS of D 19:00 gave D to a text that never went
    (moved to D+1)."""
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps)
    _critmail(rig, ["sms", "email"])
    assert rig.reminder("A-1", "check:email").get("via") == "sms"
    _critmail(rig, ["email"], phone=phone)
    check = rig.reminder("A-1", "check:email")
    assert check["status"] == "scheduled", check
    assert check.get("via") != "sms" and "by SMS" not in (check["reason"] or ""), check
    _a2_keeps_its_day(rig)
