"""Each shipped protocol's own plan keeps to the SMS limits its comments claim: at most one
SMS a patient-local day and three in any 7 consecutive days (DOMAIN.md messaging rules,
FCC 2015 order), for a patient with both channels, on whichever weekday the appointment
falls, across a DST change too.

A patient without email gets the email steps by SMS (the planner's fallback): the clinic's
frequency cap (`[sms] max_per_day`, `max_per_week`, worker/planner.py `cap_sms`) then moves
or skips what does not fit, saying why; a patient with email gets it by email instead. The
cap counts the patient's SMS across all of their bookings at the clinic
(tests/test_store_caps.py).
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from worker.catalog import Catalog
from worker.clinics import Clinic, SmsSettings
from worker.models import Booking
from worker.planner import plan

MAX_PER_DAY, MAX_PER_WEEK = 1, 3
# Every weekday (Mon 7 .. Sun 13 Dec 2026), and weeks around Madrid's spring-forward
# (29 Mar 2026) and fall-back (25 Oct 2026).
APPOINTMENT_DAYS = ([date(2026, 12, 7) + timedelta(days=n) for n in range(7)]
                    + [date(2026, 3, 25), date(2026, 3, 29), date(2026, 10, 22),
                       date(2026, 10, 25)])
PATIENT_PROTOCOLS = ["chemical-peel", "microneedling", "tretinoin-start"]  # not the demo


def sms_days(catalog: Catalog, booking_doc: dict[str, Any], treatment: str, day: date,
             channels: list[str], clinics: dict[str, Clinic] | None = None) -> list[date]:
    """Return the patient-local date of every SMS planned for a booking made 30 days ahead."""
    tz = ZoneInfo(booking_doc["patient"]["timezone"])
    doc = {**booking_doc, "treatment": treatment,
           "starts_at": datetime.combine(day, time(14, 30), tzinfo=tz),
           "medications": {"tretinoin": True, "retinol": True}}
    doc["patient"] = {**doc["patient"], "channels": channels}
    booking = Booking.model_validate(doc, context={"catalog": catalog})
    planned = plan(booking, catalog.protocols[treatment], (clinics or catalog.clinics)["glow"],
                   booking.starts_at - timedelta(days=30))
    return [r.due_at.astimezone(tz).date() for r in planned.reminders
            if r.channel == "sms" and r.status == "scheduled"]


def busiest_week(days: list[date]) -> int:
    """Return the most SMS in any 7 consecutive days."""
    return max((sum(1 for d in days if start <= d < start + timedelta(days=7))
                for start in days), default=0)


@pytest.mark.parametrize("day", APPOINTMENT_DAYS, ids=lambda d: f"{d:%a-%Y-%m-%d}")
@pytest.mark.parametrize("treatment", PATIENT_PROTOCOLS)
def test_one_sms_a_day_and_three_a_week(catalog: Catalog, booking_doc: dict[str, Any],
                                        treatment: str, day: date) -> None:
    days = sms_days(catalog, booking_doc, treatment, day, ["sms", "email"])
    assert days, "the protocol sends SMS at all"
    per_day = Counter(days)
    assert max(per_day.values()) <= MAX_PER_DAY, sorted(per_day.items())
    assert busiest_week(days) <= MAX_PER_WEEK, sorted(days)


@pytest.mark.parametrize("day", APPOINTMENT_DAYS, ids=lambda d: f"{d:%a-%Y-%m-%d}")
@pytest.mark.parametrize("treatment", PATIENT_PROTOCOLS)
def test_sms_only_patients_still_get_one_a_day_and_three_a_week(
        catalog: Catalog, booking_doc: dict[str, Any], treatment: str, day: date) -> None:
    booking_doc["patient"].pop("email")
    days = sms_days(catalog, booking_doc, treatment, day, ["sms"])
    assert max(Counter(days).values()) <= MAX_PER_DAY, sorted(days)
    assert busiest_week(days) <= MAX_PER_WEEK, sorted(days)


def test_the_count_can_fail(catalog: Catalog, booking_doc: dict[str, Any]) -> None:
    """The weekly count is not vacuous: microneedling without email is over it without the
    cap (a clinic allowing 70 a week), and the old tretinoin plan (nights + Monday SPF + day-4
    text) was too."""
    booking_doc["patient"].pop("email")
    loose = {"glow": catalog.clinics["glow"].model_copy(
        update={"sms": SmsSettings(max_per_day=10, max_per_week=70)})}
    days = sms_days(catalog, booking_doc, "microneedling", date(2026, 12, 9), ["sms"],
                    clinics=loose)
    assert busiest_week(days) > MAX_PER_WEEK
    old_plan = [date(2026, 12, d) for d in (7, 7, 9, 11, 11, 14, 14)]  # Mon night + Mon SPF
    assert max(Counter(old_plan).values()) == 2 and busiest_week(old_plan) == 5
