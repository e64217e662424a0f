"""Review of the planner against a clinic's send window (cold review, revplan).

A step placed by the send window at or after its own expiry can never be sent: the
send-time rules skip it when it comes due (worker/planner.py `at_send_time`). A clinic whose
window closes before a tretinoin night text's 19:30 (09:00-18:00, say) had every "tretinoin
tonight" planned as scheduled for the next morning, past the end of its own night: the
timeline showed messages that would never go, and the SMS cap counted each of them on that
next day against the patient's other bookings, whose SMS then went by email or moved.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from worker.clinics import SendWindow
from worker.models import parse_booking
from worker.planner import cap_plan, plan
from worker.status import Status

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
MADRID = ZoneInfo("Europe/Madrid")


def _closing_early(catalog):
    return catalog.clinics["glow"].model_copy(
        update={"send_window": SendWindow(start="10:00", end="18:00")})


def _tretinoin_start(catalog, booking_doc):
    # Consultation on Monday 30 Nov 2026, 11:00 Madrid: nights Mon/Wed/Fri, 30 Nov - 11 Dec.
    doc = {**booking_doc, "treatment": "tretinoin-start", "booking_id": "T-1",
           "starts_at": "2026-11-30T11:00:00+01:00"}
    return parse_booking(doc, catalog)


def test_a_night_text_the_window_cannot_hold_that_night_is_not_planned_for_the_next_morning(
        catalog, booking_doc):
    clinic = _closing_early(catalog)
    planned = plan(_tretinoin_start(catalog, booking_doc),
                   catalog.protocols["tretinoin-start"], clinic, NOW)
    for r in planned.reminders:
        if r.status == Status.SCHEDULED:
            assert r.expires_at is None or r.due_at < r.expires_at, (
                f"{r.key} scheduled {r.due_at.astimezone(MADRID):%a %d %H:%M}, never sendable: "
                f"it expires {r.expires_at.astimezone(MADRID):%a %d %H:%M} ({r.expires_note})")
    nights = [r for r in planned.reminders if r.step == "application-night"]
    assert len(nights) == 6
    for r in nights:
        assert r.status == Status.SKIPPED, r
        assert "10:00-18:00" in r.reason and "weekday series" in r.reason, r.reason
        # Skipped at the night it was meant for (what the timeline shows as its time).
        assert r.due_at.astimezone(MADRID).strftime("%a %H:%M") in (
            "Mon 19:30", "Wed 19:30", "Fri 19:30"), r
    # The rest of the plan is untouched: the welcome, step-ups, SPF texts and review go.
    assert [r.key for r in planned.reminders if r.status == Status.SCHEDULED] == [
        "welcome:email", "step-up#1:email", "morning-spf#1:sms", "step-up#2:email",
        "morning-spf#2:sms", "step-up#3:email", "morning-spf#3:sms", "step-up#4:email",
        "morning-spf#4:sms", "six-week-review:email"]


def test_the_default_window_still_sends_every_night_text_on_its_night(catalog, booking_doc):
    planned = plan(_tretinoin_start(catalog, booking_doc),
                   catalog.protocols["tretinoin-start"], catalog.clinics["glow"], NOW)
    nights = [r for r in planned.reminders if r.step == "application-night"]
    assert [(r.status, r.due_at.astimezone(MADRID).strftime("%a %d %H:%M")) for r in nights] == [
        (Status.SCHEDULED, d) for d in ("Mon 30 19:30", "Wed 02 19:30", "Fri 04 19:30",
                                        "Mon 07 19:30", "Wed 09 19:30", "Fri 11 19:30")]


def test_a_night_text_that_cannot_go_takes_no_sms_slot_from_the_patients_other_booking(
        catalog, booking_doc):
    """The same patient's microneedling on Wednesday 2 Dec: its day-before SMS (Tuesday 1 Dec,
    10:00) must stay an SMS; a never-sent Monday night text must not take Tuesday's slot."""
    clinic = _closing_early(catalog)
    start = plan(_tretinoin_start(catalog, booking_doc),
                 catalog.protocols["tretinoin-start"], clinic, NOW)
    taken = [r.due_at for r in start.reminders
             if r.channel == "sms" and r.status == Status.SCHEDULED]
    doc = {**booking_doc, "booking_id": "M-1", "starts_at": "2026-12-02T14:30:00+01:00",
           "medications": {"tretinoin": False, "retinol": False,
                           "isotretinoin_last_dose": None}}
    booking = parse_booking(doc, catalog)
    needling = cap_plan(plan(booking, catalog.protocols["microneedling"], clinic, NOW),
                        booking, taken)
    (day_before,) = [r for r in needling.reminders if r.step == "day-before"]
    assert (day_before.channel, day_before.status) == ("sms", Status.SCHEDULED), day_before
    assert day_before.due_at.astimezone(MADRID).strftime("%a %d %H:%M") == "Tue 01 10:00"
