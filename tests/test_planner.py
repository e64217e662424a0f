"""The pure planner: booking + protocol + clinic + now -> reminders (DESIGN.md "The flow", 2).

Every expected instant here is written out by hand (patient-local wall time and UTC),
never computed with the planner's own helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from worker.clinics import Clinic, SendWindow
from worker.errors import BookingRejected
from worker.models import Booking, parse_booking
from worker.planner import (
    Plan,
    PlannedReminder,
    at_send_time,
    last_opening_before,
    next_opening,
    plan,
    wall_clock,
)
from worker.protocols import Protocol, Repeat, Step

ROOT = Path(__file__).resolve().parent.parent
MADRID = ZoneInfo("Europe/Madrid")
NEW_YORK = ZoneInfo("America/New_York")
SYDNEY = ZoneInfo("Australia/Sydney")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- helpers: small bookings, clinics and protocols built in the test ------------------


def make_booking(
    starts_at: str,
    timezone: str = "Europe/Madrid",
    *,
    tretinoin: bool = False,
    retinol: bool = False,
    isotretinoin_last_dose: str | None = None,
    channels: tuple[str, ...] = ("sms", "email"),
    treatment: str = "custom",
) -> Booking:
    """A booking validated by the model itself (no catalog: any treatment/clinic id)."""
    return Booking.model_validate({
        "clinic": "test",
        "booking_id": "T-1",
        "treatment": treatment,
        "starts_at": starts_at,
        "patient": {
            "name": "Pat Test",
            "email": "pat@example.com",
            "phone": "+34600111222",
            "timezone": timezone,
            "locale": "en",
            "channels": list(channels),
        },
        "medications": {"tretinoin": tretinoin, "retinol": retinol,
                        "isotretinoin_last_dose": isotretinoin_last_dose},
    })


def make_clinic(start: str = "09:00", end: str = "20:00", *, washout: int | None = None,
                timezone: str = "Europe/Madrid") -> Clinic:
    return Clinic(id="test", name="Test Clinic", phone="+34910000000", timezone=timezone,
                  send_window=SendWindow(start=start, end=end),
                  isotretinoin_washout_days=washout)


ALL_DAY = make_clinic("00:00", "24:00")


def one_step(washout: int | None = None, **fields: Any) -> Protocol:
    """A protocol with a single step `s` (sms unless `channels` is given)."""
    fields.setdefault("channels", ["sms"])
    return Protocol(id="custom", name="Custom", isotretinoin_washout_days=washout,
                    steps=[Step(id="s", template="t", **fields)])


def by_key(p: Plan) -> dict[str, PlannedReminder]:
    keys = [r.key for r in p.reminders]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return {r.key: r for r in p.reminders}


def only(p: Plan) -> PlannedReminder:
    assert len(p.reminders) == 1, p.reminders
    return p.reminders[0]


def local(instant: datetime, tz: ZoneInfo) -> tuple[datetime, timedelta]:
    """Return (naive patient-local wall time, UTC offset) of an instant."""
    at = instant.astimezone(tz)
    return at.replace(tzinfo=None), at.utcoffset()


# --- DOMAIN.md "Default microneedling protocol" against config/protocols/microneedling.toml


# Sat 21 Nov 2026, 13:00 in Madrid; the visit is Sat 5 Dec 14:30 CET
EXAMPLE_NOW = utc(2026, 11, 21, 12, 0)

# step, channels, patient-local wall time (Madrid, CET = UTC+1 in Nov/Dec), UTC instant
MICRONEEDLING_TABLE = [
    # at booking: the confirmation goes when the booking arrives (13:00 local, in the window)
    ("booking-confirmation", {"email"}, datetime(2026, 11, 21, 13, 0), utc(2026, 11, 21, 12, 0)),
    # 7 days before, 18:00: stop tretinoin / retinol tonight (sms + email)
    ("stop-retinoids", {"sms", "email"}, datetime(2026, 11, 28, 18, 0), utc(2026, 11, 28, 17, 0)),
    # 3 days before, 10:00: prep email
    ("prep", {"email"}, datetime(2026, 12, 2, 10, 0), utc(2026, 12, 2, 9, 0)),
    # 1 day before, 10:00: see you tomorrow (sms)
    ("day-before", {"sms"}, datetime(2026, 12, 4, 10, 0), utc(2026, 12, 4, 9, 0)),
    # same day, 3 h after the 14:30 start: aftercare email
    ("aftercare", {"email"}, datetime(2026, 12, 5, 17, 30), utc(2026, 12, 5, 16, 30)),
    # 1 day after, 09:00: SPF (sms)
    ("spf", {"sms"}, datetime(2026, 12, 6, 9, 0), utc(2026, 12, 6, 8, 0)),
    # 2 days after, 10:00: redness email
    ("redness-check", {"email"}, datetime(2026, 12, 7, 10, 0), utc(2026, 12, 7, 9, 0)),
    # 3 days after, 18:00: you may resume tretinoin (sms)
    ("resume-retinoids", {"sms"}, datetime(2026, 12, 8, 18, 0), utc(2026, 12, 8, 17, 0)),
    # 7 days after, 10:00: still red? call the clinic (sms)
    ("week-check", {"sms"}, datetime(2026, 12, 12, 10, 0), utc(2026, 12, 12, 9, 0)),
]
RETINOID_ONLY = {"stop-retinoids", "resume-retinoids"}


@pytest.fixture
def example_plan(catalog, booking_doc) -> Plan:
    booking = parse_booking(booking_doc, catalog)  # tretinoin: true
    return plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)


@pytest.mark.parametrize(("step", "channels", "wall", "instant"), MICRONEEDLING_TABLE,
                         ids=[row[0] for row in MICRONEEDLING_TABLE])
def test_microneedling_table_row(example_plan, step, channels, wall, instant):
    rows = [r for r in example_plan.reminders if r.step == step]
    assert {r.channel for r in rows} == channels
    assert len(rows) == len(channels)
    for r in rows:
        assert r.status == "scheduled", r.reason
        assert r.due_at == instant
        assert r.due_at.utcoffset() == timedelta(0)
        assert local(r.due_at, MADRID) == (wall, timedelta(hours=1))
        assert r.key == f"{step}:{r.channel}"
        assert r.reason


def test_microneedling_plan_has_exactly_the_table(example_plan):
    assert example_plan.status == "scheduled"
    assert example_plan.hold_reason is None
    expected = {f"{step}:{c}" for step, chans, _, _ in MICRONEEDLING_TABLE for c in chans}
    assert set(by_key(example_plan)) == expected
    # sorted by due time
    dues = [r.due_at for r in example_plan.reminders]
    assert dues == sorted(dues)


def test_microneedling_retinoid_rows_say_why(example_plan):
    for r in example_plan.reminders:
        if r.step in RETINOID_ONLY:
            assert "tretinoin" in r.reason


@pytest.mark.parametrize(("tretinoin", "retinol", "retinoid_rows"), [
    (True, False, True), (False, True, True), (True, True, True), (False, False, False),
])
def test_microneedling_retinoid_rows_only_for_retinoid_users(
        catalog, booking_doc, tretinoin, retinol, retinoid_rows):
    booking_doc["medications"] = {"tretinoin": tretinoin, "retinol": retinol}
    booking = parse_booking(booking_doc, catalog)
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)
    steps = {r.step for r in p.reminders}
    all_steps = {row[0] for row in MICRONEEDLING_TABLE}
    assert steps == (all_steps if retinoid_rows else all_steps - RETINOID_ONLY)
    # The other rows do not move when the retinoid rows disappear.
    expected = {step: instant for step, _, _, instant in MICRONEEDLING_TABLE}
    for r in p.reminders:
        assert r.due_at == expected[r.step]


def test_microneedling_around_the_autumn_dst_change(catalog, booking_doc):
    """Visit Wed 28 Oct 2026 14:30 CET; Madrid left summer time on Sun 25 Oct."""
    booking_doc["starts_at"] = "2026-10-28T14:30:00+01:00"
    booking = parse_booking(booking_doc, catalog)
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"],
             utc(2026, 10, 1, 10, 0))
    got = {r.key: local(r.due_at, MADRID) for r in p.reminders}
    cest, cet = timedelta(hours=2), timedelta(hours=1)
    assert got["stop-retinoids:sms"] == (datetime(2026, 10, 21, 18, 0), cest)
    assert by_key(p)["stop-retinoids:sms"].due_at == utc(2026, 10, 21, 16, 0)
    assert got["prep:email"] == (datetime(2026, 10, 25, 10, 0), cet)  # the change day itself
    assert by_key(p)["prep:email"].due_at == utc(2026, 10, 25, 9, 0)
    assert by_key(p)["day-before:sms"].due_at == utc(2026, 10, 27, 9, 0)
    assert by_key(p)["aftercare:email"].due_at == utc(2026, 10, 28, 16, 30)


def test_channel_the_patient_does_not_take_falls_back_to_their_first(catalog, booking_doc):
    del booking_doc["patient"]["phone"]
    booking_doc["patient"]["channels"] = ["email"]
    booking = parse_booking(booking_doc, catalog)
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)
    assert {r.channel for r in p.reminders} == {"email"}
    day_before = by_key(p)["day-before:email"]
    assert day_before.due_at == utc(2026, 12, 4, 9, 0)
    assert "by email because the patient does not take sms" in day_before.reason
    # stop-retinoids is sms + email: only the email one, no duplicate
    assert [r.key for r in p.reminders if r.step == "stop-retinoids"] == ["stop-retinoids:email"]


# --- DST: spring forward (a gap) and fall back (an ambiguous hour), both hemispheres ---

# (zone, the step's day relative to the visit, clock time, visit, expected local, expected UTC)
SPRING_GAP = [
    # Madrid: Sun 29 Mar 2026 02:00 CET -> 03:00 CEST
    pytest.param("Europe/Madrid", "02:30", "2026-03-30T12:00:00+02:00",
                 datetime(2026, 3, 29, 3, 0), utc(2026, 3, 29, 1, 0), id="madrid-02:30"),
    pytest.param("Europe/Madrid", "02:00", "2026-03-30T12:00:00+02:00",
                 datetime(2026, 3, 29, 3, 0), utc(2026, 3, 29, 1, 0), id="madrid-02:00"),
    pytest.param("Europe/Madrid", "02:59", "2026-03-30T12:00:00+02:00",
                 datetime(2026, 3, 29, 3, 0), utc(2026, 3, 29, 1, 0), id="madrid-02:59"),
    pytest.param("Europe/Madrid", "01:59", "2026-03-30T12:00:00+02:00",
                 datetime(2026, 3, 29, 1, 59), utc(2026, 3, 29, 0, 59), id="madrid-01:59-exists"),
    pytest.param("Europe/Madrid", "03:00", "2026-03-30T12:00:00+02:00",
                 datetime(2026, 3, 29, 3, 0), utc(2026, 3, 29, 1, 0), id="madrid-03:00-exists"),
    # New York: Sun 8 Mar 2026 02:00 EST -> 03:00 EDT
    pytest.param("America/New_York", "02:30", "2026-03-09T12:00:00-04:00",
                 datetime(2026, 3, 8, 3, 0), utc(2026, 3, 8, 7, 0), id="new-york-02:30"),
    # Sydney (southern hemisphere, October): Sun 4 Oct 2026 02:00 AEST -> 03:00 AEDT
    pytest.param("Australia/Sydney", "02:30", "2026-10-05T12:00:00+11:00",
                 datetime(2026, 10, 4, 3, 0), utc(2026, 10, 3, 16, 0), id="sydney-02:30"),
    # Adelaide (half-hour offset): Sun 4 Oct 2026 02:00 ACST (+9:30) -> 03:00 ACDT (+10:30)
    pytest.param("Australia/Adelaide", "02:15", "2026-10-05T12:00:00+10:30",
                 datetime(2026, 10, 4, 3, 0), utc(2026, 10, 3, 16, 30), id="adelaide-02:15"),
]


@pytest.mark.parametrize(("zone", "clock", "visit", "wall", "instant"), SPRING_GAP)
def test_spring_forward_moves_a_missing_clock_time_to_the_next_valid_minute(
        zone, clock, visit, wall, instant):
    booking = make_booking(visit, zone)
    p = plan(booking, one_step(day=-1, time=clock), ALL_DAY, utc(2026, 1, 1))
    r = only(p)
    assert r.status == "scheduled"
    assert r.due_at == instant
    assert local(r.due_at, ZoneInfo(zone))[0] == wall


FALL_BACK = [
    # Madrid: Sun 25 Oct 2026 03:00 CEST -> 02:00 CET; 02:30 happens twice, first is CEST (+2)
    pytest.param("Europe/Madrid", "02:30", "2026-10-26T12:00:00+01:00",
                 utc(2026, 10, 25, 0, 30), timedelta(hours=2), id="madrid"),
    # New York: Sun 1 Nov 2026 02:00 EDT -> 01:00 EST; 01:30 twice, first is EDT (-4)
    pytest.param("America/New_York", "01:30", "2026-11-02T12:00:00-05:00",
                 utc(2026, 11, 1, 5, 30), timedelta(hours=-4), id="new-york"),
    # Sydney (April): Sun 5 Apr 2026 03:00 AEDT -> 02:00 AEST; 02:30 twice, first is AEDT (+11)
    pytest.param("Australia/Sydney", "02:30", "2026-04-06T12:00:00+10:00",
                 utc(2026, 4, 4, 15, 30), timedelta(hours=11), id="sydney"),
]


@pytest.mark.parametrize(("zone", "clock", "visit", "instant", "offset"), FALL_BACK)
def test_fall_back_takes_the_first_occurrence_of_an_ambiguous_clock_time(
        zone, clock, visit, instant, offset):
    booking = make_booking(visit, zone)
    r = only(plan(booking, one_step(day=-1, time=clock), ALL_DAY, utc(2026, 1, 1)))
    assert r.due_at == instant
    wall, got_offset = local(r.due_at, ZoneInfo(zone))
    assert wall.strftime("%H:%M") == clock
    assert got_offset == offset


# (zone, visit, expected local wall time of "7 days before, 18:00", its UTC instant,
#  the reminder's UTC offset, the appointment's UTC offset)
SEVEN_DAYS_ACROSS_DST = [
    pytest.param("Europe/Madrid", "2026-04-01T14:30:00+02:00",
                 datetime(2026, 3, 25, 18, 0), utc(2026, 3, 25, 17, 0), 1, 2, id="madrid-spring"),
    pytest.param("Europe/Madrid", "2026-10-28T14:30:00+01:00",
                 datetime(2026, 10, 21, 18, 0), utc(2026, 10, 21, 16, 0), 2, 1, id="madrid-autumn"),
    pytest.param("America/New_York", "2026-03-10T14:30:00-04:00",
                 datetime(2026, 3, 3, 18, 0), utc(2026, 3, 3, 23, 0), -5, -4, id="new-york-spring"),
    pytest.param("America/New_York", "2026-11-04T14:30:00-05:00",
                 datetime(2026, 10, 28, 18, 0), utc(2026, 10, 28, 22, 0), -4, -5,
                 id="new-york-autumn"),
    pytest.param("Australia/Sydney", "2026-04-08T14:30:00+10:00",
                 datetime(2026, 4, 1, 18, 0), utc(2026, 4, 1, 7, 0), 11, 10, id="sydney-april"),
    pytest.param("Australia/Sydney", "2026-10-07T14:30:00+11:00",
                 datetime(2026, 9, 30, 18, 0), utc(2026, 9, 30, 8, 0), 10, 11, id="sydney-october"),
]


@pytest.mark.parametrize(("zone", "visit", "wall", "instant", "hours", "visit_hours"),
                         SEVEN_DAYS_ACROSS_DST)
def test_seven_days_before_at_18_stays_at_18_local_across_a_dst_change(
        zone, visit, wall, instant, hours, visit_hours):
    booking = make_booking(visit, zone, tretinoin=True)
    r = only(plan(booking, one_step(day=-7, time="18:00"), make_clinic(), utc(2026, 1, 1)))
    assert r.status == "scheduled"
    assert r.due_at == instant
    assert local(r.due_at, ZoneInfo(zone)) == (wall, timedelta(hours=hours))
    assert booking.starts_at.utcoffset() == timedelta(hours=visit_hours)
    assert r.due_at.astimezone(ZoneInfo(zone)).utcoffset() != booking.starts_at.utcoffset()


def test_seven_days_after_at_10_stays_at_10_local_across_spring_forward():
    booking = make_booking("2026-03-25T14:30:00+01:00")  # Wed, CET
    r = only(plan(booking, one_step(day=7, time="10:00"), make_clinic(), utc(2026, 3, 1)))
    assert r.due_at == utc(2026, 4, 1, 8, 0)  # 10:00 CEST
    assert local(r.due_at, MADRID) == (datetime(2026, 4, 1, 10, 0), timedelta(hours=2))


def test_an_offset_step_is_a_duration_not_a_clock_time_across_dst():
    """`offset = "-1d"` is 24 elapsed hours: across spring forward the local clock moves."""
    booking = make_booking("2026-03-29T12:00:00+02:00")  # Sunday, first day of CEST
    r = only(plan(booking, one_step(offset="-1d"), ALL_DAY, utc(2026, 3, 1)))
    assert r.due_at == utc(2026, 3, 28, 10, 0)
    assert local(r.due_at, MADRID) == (datetime(2026, 3, 28, 11, 0), timedelta(hours=1))


def test_send_window_opening_on_the_spring_forward_day():
    # A 07:00 step on Sun 29 Mar 2026 (Madrid) waits for the 09:00 CEST opening = 07:00 UTC.
    booking = make_booking("2026-03-30T12:00:00+02:00")
    r = only(plan(booking, one_step(day=-1, time="07:00"), make_clinic(), utc(2026, 3, 1)))
    assert r.due_at == utc(2026, 3, 29, 7, 0)


def test_window_opening_inside_a_dst_gap_moves_to_the_next_valid_minute():
    window = SendWindow(start="02:30", end="20:00")
    # 01:30 CET on the spring-forward night: the 02:30 opening does not exist -> 03:00 CEST
    assert next_opening(utc(2026, 3, 29, 0, 30), window, MADRID) == utc(2026, 3, 29, 1, 0)


def test_window_that_does_not_exist_on_a_dst_day_defers_to_the_next_day():
    # 02:00-02:30 does not exist on Sun 29 Mar 2026 in Madrid: the next opening is Monday's.
    window = SendWindow(start="02:00", end="02:30")
    got = next_opening(utc(2026, 3, 29, 0, 30), window, MADRID)  # 01:30 CET
    assert got == utc(2026, 3, 30, 0, 0)  # Mon 02:00 CEST
    minute = got.astimezone(MADRID).hour * 60 + got.astimezone(MADRID).minute
    assert window.contains(minute)


def test_window_opening_inside_a_repeated_hour_is_not_in_the_past():
    # Sun 25 Oct 2026, Madrid: 02:00-03:00 happens twice. At 02:10 CET (the second time,
    # 01:10 UTC) the 02:15 opening of the first pass (00:15 UTC) is already over: the next
    # opening is 02:15 CET, 01:15 UTC.
    window = SendWindow(start="02:15", end="20:00")
    assert next_opening(utc(2026, 10, 25, 1, 10), window, MADRID) == utc(2026, 10, 25, 1, 15)
    # and during the first pass, 02:10 CEST, it is 02:15 CEST
    assert next_opening(utc(2026, 10, 25, 0, 10), window, MADRID) == utc(2026, 10, 25, 0, 15)


def test_last_opening_before_a_window_closing_in_a_repeated_hour():
    # Window 00:00-02:30; the last allowed minute of Sun 25 Oct 2026 is 02:29 CET (01:29 UTC),
    # the second pass of the repeated hour.
    window = SendWindow(start="00:00", end="02:30")
    assert last_opening_before(utc(2026, 10, 25, 9, 0), window, MADRID) == utc(2026, 10, 25, 1, 29)


def test_last_opening_before_skips_a_day_on_which_the_window_does_not_exist():
    # 02:00-02:30 does not exist on Sun 29 Mar 2026: before Mon 01:00 CEST the last allowed
    # minute is Sat 28 Mar 02:29 CET (01:29 UTC).
    window = SendWindow(start="02:00", end="02:30")
    assert last_opening_before(utc(2026, 3, 29, 23, 0), window, MADRID) == utc(2026, 3, 28, 1, 29)
    # and a pre-visit step moved there by the planner is inside the window
    booking = make_booking("2026-03-30T01:00:00+02:00")
    r = only(plan(booking, one_step(offset="-1h"), make_clinic("02:00", "02:30"),
                  utc(2026, 3, 1)))
    assert r.due_at == utc(2026, 3, 28, 1, 29)


def test_wall_clock_helper_matches_hand_values():
    from datetime import time
    assert wall_clock(date(2026, 3, 29), time(2, 30), MADRID) == utc(2026, 3, 29, 1, 0)
    assert wall_clock(date(2026, 10, 25), time(2, 30), MADRID) == utc(2026, 10, 25, 0, 30)
    assert wall_clock(date(2026, 7, 1), time(18, 0), MADRID) == utc(2026, 7, 1, 16, 0)
    assert wall_clock(date(2026, 7, 1), time(18, 0), ZoneInfo("Asia/Kolkata")) == \
        utc(2026, 7, 1, 12, 30)


# --- send window: both ends of the day, in the patient's timezone ----------------------


@pytest.mark.parametrize(("clock", "wall", "reason_moved"), [
    ("07:00", datetime(2026, 12, 6, 9, 0), True),     # before opening -> same day's opening
    ("00:00", datetime(2026, 12, 6, 9, 0), True),
    ("08:59", datetime(2026, 12, 6, 9, 0), True),
    ("09:00", datetime(2026, 12, 6, 9, 0), False),    # the opening itself is allowed
    ("19:59", datetime(2026, 12, 6, 19, 59), False),  # last minute of [09:00, 20:00)
    ("20:00", datetime(2026, 12, 7, 9, 0), True),     # the closing is not allowed -> next day
    ("21:30", datetime(2026, 12, 7, 9, 0), True),     # after closing -> next day's opening
    ("23:59", datetime(2026, 12, 7, 9, 0), True),
])
def test_send_window_defers_to_the_next_opening(clock, wall, reason_moved):
    booking = make_booking("2026-12-05T14:30:00+01:00")
    r = only(plan(booking, one_step(day=1, time=clock), make_clinic(), EXAMPLE_NOW))
    assert r.status == "scheduled"
    assert local(r.due_at, MADRID) == (wall, timedelta(hours=1))
    assert ("moved into the send window 09:00-20:00" in r.reason) is reason_moved


def test_send_window_is_the_patients_local_time_not_the_clinics():
    # The clinic is in Madrid, the patient in New York: the window is read in New York time.
    booking = make_booking("2026-12-05T14:30:00-05:00", "America/New_York")
    clinic = make_clinic(timezone="Europe/Madrid")
    r = only(plan(booking, one_step(offset="7h"), clinic, EXAMPLE_NOW))  # 21:30 in New York
    assert r.due_at == utc(2026, 12, 6, 14, 0)  # Sun 09:00 EST (Madrid's 09:00 would be 08:00Z)
    assert local(r.due_at, NEW_YORK) == (datetime(2026, 12, 6, 9, 0), timedelta(hours=-5))
    # and a 07:00 New York step is deferred to 09:00 New York (13:00 in Madrid, in its window)
    r = only(plan(booking, one_step(day=1, time="07:00"), clinic, EXAMPLE_NOW))
    assert r.due_at == utc(2026, 12, 6, 14, 0)


def test_send_window_with_a_half_hour_offset():
    booking = make_booking("2026-12-05T14:30:00+05:30", "Asia/Kolkata")
    r = only(plan(booking, one_step(day=1, time="06:00"), make_clinic(), EXAMPLE_NOW))
    assert r.due_at == utc(2026, 12, 6, 3, 30)  # 09:00 IST


@pytest.mark.parametrize(("visit", "step", "wall", "instant"), [
    # 08:30 visit, 2 h before = 06:30, outside the window; the next opening (09:00) is after
    # the visit, so it moves to the last allowed minute before it: the evening before, 19:59.
    pytest.param("2026-12-05T08:30:00+01:00", {"offset": "-2h"},
                 datetime(2026, 12, 4, 19, 59), utc(2026, 12, 4, 18, 59), id="08:30-minus-2h"),
    pytest.param("2026-12-05T08:30:00+01:00", {"day": 0, "time": "07:00"},
                 datetime(2026, 12, 4, 19, 59), utc(2026, 12, 4, 18, 59), id="same-day-07:00"),
    pytest.param("2026-12-05T09:00:00+01:00", {"offset": "-30m"},
                 datetime(2026, 12, 4, 19, 59), utc(2026, 12, 4, 18, 59), id="09:00-minus-30m"),
    # "the evening before at 21:00" would become Saturday 09:00, after the 08:30 visit
    pytest.param("2026-12-05T08:30:00+01:00", {"day": -1, "time": "21:00"},
                 datetime(2026, 12, 4, 19, 59), utc(2026, 12, 4, 18, 59), id="day-before-21:00"),
    # 09:20 visit, 20 min before = 09:00: inside the window and before the visit: unchanged
    pytest.param("2026-12-05T09:20:00+01:00", {"offset": "-20m"},
                 datetime(2026, 12, 5, 9, 0), utc(2026, 12, 5, 8, 0), id="in-window"),
    # 09:20 visit, 1 h before = 08:20 -> 09:00 opening, still before the visit
    pytest.param("2026-12-05T09:20:00+01:00", {"offset": "-1h"},
                 datetime(2026, 12, 5, 9, 0), utc(2026, 12, 5, 8, 0), id="opening-before-visit"),
])
def test_pre_appointment_step_never_lands_after_the_appointment(visit, step, wall, instant):
    booking = make_booking(visit)
    r = only(plan(booking, one_step(**step), make_clinic(), EXAMPLE_NOW))
    assert r.status == "scheduled"
    assert r.due_at == instant
    assert local(r.due_at, MADRID)[0] == wall
    assert r.due_at < booking.starts_at


def test_pre_appointment_move_says_why():
    booking = make_booking("2026-12-05T08:30:00+01:00")
    r = only(plan(booking, one_step(offset="-2h"), make_clinic(), EXAMPLE_NOW))
    assert "last moment of the send window 09:00-20:00 before the visit" in r.reason


def test_window_helpers_by_hand():
    window = SendWindow(start="09:00", end="20:00")
    # 07:00 CET -> 09:00 CET same day; 21:00 CET -> 09:00 next day; 12:00 stays
    assert next_opening(utc(2026, 12, 4, 6, 0), window, MADRID) == utc(2026, 12, 4, 8, 0)
    assert next_opening(utc(2026, 12, 4, 20, 0), window, MADRID) == utc(2026, 12, 5, 8, 0)
    assert next_opening(utc(2026, 12, 4, 11, 0), window, MADRID) == utc(2026, 12, 4, 11, 0)
    # last whole minute inside the window strictly before 14:30 -> 14:29; before 08:30 -> 19:59
    assert last_opening_before(utc(2026, 12, 5, 13, 30), window, MADRID) == utc(2026, 12, 5, 13, 29)
    assert last_opening_before(utc(2026, 12, 5, 7, 30), window, MADRID) == utc(2026, 12, 4, 18, 59)
    assert last_opening_before(utc(2026, 12, 5, 21, 0), window, MADRID) == utc(2026, 12, 5, 18, 59)


# --- late bookings -----------------------------------------------------------------------


def test_visit_in_three_days_still_sends_stop_retinoids_at_the_next_opening(catalog, booking_doc):
    booking = parse_booking(booking_doc, catalog)  # Sat 5 Dec 14:30 CET
    now = utc(2026, 12, 2, 6, 0)  # Wed 07:00 CET, before the window opens
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], now)
    got = by_key(p)
    for channel in ("sms", "email"):
        r = got[f"stop-retinoids:{channel}"]
        assert r.status == "scheduled"
        assert r.due_at == utc(2026, 12, 2, 8, 0)  # Wed 09:00 CET, the next opening
        assert "late" in r.reason
    # the confirmation also waits for the opening; prep (Wed 10:00) is on time
    assert got["booking-confirmation:email"].due_at == utc(2026, 12, 2, 8, 0)
    assert got["prep:email"].due_at == utc(2026, 12, 2, 9, 0)
    assert "late" not in got["prep:email"].reason
    assert all(r.status == "scheduled" for r in p.reminders)


def test_visit_in_two_hours_skips_the_day_before_step_with_a_reason(catalog, booking_doc):
    booking = parse_booking(booking_doc, catalog)  # 13:30 UTC
    now = utc(2026, 12, 5, 11, 30)
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], now)
    got = by_key(p)
    day_before = got["day-before:sms"]
    assert day_before.status == "skipped"
    assert "too late" in day_before.reason
    assert day_before.due_at == utc(2026, 12, 4, 9, 0)  # when it would have been due
    for key in ("stop-retinoids:sms", "stop-retinoids:email", "prep:email"):
        assert got[key].status == "skipped" and got[key].reason
    # the confirmation goes now; aftercare and later steps are unaffected
    assert got["booking-confirmation:email"].status == "scheduled"
    assert got["booking-confirmation:email"].due_at == now
    assert got["aftercare:email"].due_at == utc(2026, 12, 5, 16, 30)
    assert got["week-check:sms"].due_at == utc(2026, 12, 12, 9, 0)


def test_late_skip_policy_skips_with_a_reason():
    booking = make_booking("2026-12-05T14:30:00+01:00")
    r = only(plan(booking, one_step(day=-7, time="18:00", late="skip"), make_clinic(),
                  utc(2026, 12, 1, 12, 0)))
    assert r.status == "skipped"
    assert "passed" in r.reason
    assert r.due_at == utc(2026, 11, 28, 17, 0)


def test_late_until_deadline_decides():
    booking = make_booking("2026-12-05T14:30:00+01:00")  # 13:30 UTC
    step = one_step(day=-7, time="18:00", late="send", late_until="-6h")  # deadline 07:30 UTC
    # Fri 19:00 CET, inside the window: sent now
    r = only(plan(booking, step, make_clinic(), utc(2026, 12, 4, 18, 0)))
    assert (r.status, r.due_at) == ("scheduled", utc(2026, 12, 4, 18, 0))
    # Sat 02:30 CET: the next opening (09:00 CET = 08:00 UTC) is past the deadline
    r = only(plan(booking, step, make_clinic(), utc(2026, 12, 5, 1, 30)))
    assert r.status == "skipped" and "too late" in r.reason
    # Sat 10:30 CET: 4 h before the visit, past the deadline
    r = only(plan(booking, step, make_clinic(), utc(2026, 12, 5, 9, 30)))
    assert r.status == "skipped" and "too late" in r.reason
    # with an all-day window, 02:30 CET is before the deadline: sent at once
    r = only(plan(booking, step, ALL_DAY, utc(2026, 12, 5, 1, 30)))
    assert (r.status, r.due_at) == ("scheduled", utc(2026, 12, 5, 1, 30))


def test_late_pre_appointment_step_never_lands_after_the_visit_even_with_a_positive_late_until():
    """late_until = "+1h" must not let a pre-visit step be sent after the visit."""
    booking = make_booking("2026-12-05T08:30:00+01:00")
    step = one_step(day=-1, time="10:00", late="send", late_until="1h")
    now = utc(2026, 12, 5, 6, 0)  # 07:00 CET: the next opening (09:00) is after the 08:30 visit
    r = only(plan(booking, step, make_clinic(), now))
    assert r.status == "skipped"
    assert r.reason


@pytest.mark.parametrize("starts_at", [
    "2026-11-21T12:00:00Z",          # exactly now
    "2026-11-20T10:00:00+01:00",     # yesterday
    "2020-01-01T10:00:00+01:00",
])
def test_visit_in_the_past_is_rejected_naming_starts_at(catalog, booking_doc, starts_at):
    booking_doc["starts_at"] = starts_at
    booking = parse_booking(booking_doc, catalog)
    with pytest.raises(BookingRejected) as exc:
        plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)
    assert [field for field, _ in exc.value.errors] == ["starts_at"]
    assert "past" in exc.value.errors[0][1]


@pytest.mark.parametrize(("starts_at", "accepted"), [
    ("2028-11-20T12:00:00Z", True),           # 730 days after EXAMPLE_NOW
    ("2028-11-20T12:00:01Z", False),          # one second more
    ("2999-12-31T23:00:00-05:00", False),     # the last instant the model takes
])
def test_visit_more_than_two_years_ahead_is_rejected(catalog, booking_doc, starts_at, accepted):
    booking_doc["starts_at"] = starts_at
    booking = parse_booking(booking_doc, catalog)
    args = (booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)
    if accepted:
        assert plan(*args).reminders
        return
    with pytest.raises(BookingRejected) as exc:
        plan(*args)
    assert exc.value.errors == [("starts_at", "is more than 730 days ahead (the latest accepted "
                                 "is 2028-11-20): appointments are booked at most two years ahead")]


@pytest.mark.parametrize(("now", "accepted"), [
    (utc(2026, 11, 21, 22, 59), False),  # 23:59 on 21 Nov in Madrid: the 22nd is tomorrow
    (utc(2026, 11, 21, 23, 0), True),    # 00:00 on 22 Nov in Madrid: the dose was today
])
def test_a_last_dose_after_the_patients_today_is_rejected(catalog, booking_doc, now, accepted):
    booking_doc["medications"]["isotretinoin_last_dose"] = "2026-11-22"
    booking = parse_booking(booking_doc, catalog)
    args = (booking, catalog.protocols["microneedling"], catalog.clinics["glow"], now)
    if accepted:
        assert plan(*args).status == "held"
        return
    with pytest.raises(BookingRejected) as exc:
        plan(*args)
    assert [f for f, _ in exc.value.errors] == ["medications.isotretinoin_last_dose"]
    assert "in the future (the patient's today is 2026-11-21)" in exc.value.errors[0][1]


def test_every_date_problem_is_reported_at_once(catalog, booking_doc):
    booking_doc["starts_at"] = "2020-01-01T10:00:00+01:00"
    booking_doc["medications"]["isotretinoin_last_dose"] = "2027-01-01"
    booking = parse_booking(booking_doc, catalog)
    with pytest.raises(BookingRejected) as exc:
        plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], EXAMPLE_NOW)
    assert [f for f, _ in exc.value.errors] == ["starts_at", "medications.isotretinoin_last_dose"]


def test_now_must_be_aware(catalog, booking_doc):
    booking = parse_booking(booking_doc, catalog)
    with pytest.raises(ValueError, match="aware"):
        plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"],
             datetime(2026, 11, 21, 12, 0))


def test_now_in_any_offset_means_the_same_instant(catalog, booking_doc):
    booking = parse_booking(booking_doc, catalog)
    args = (booking, catalog.protocols["microneedling"], catalog.clinics["glow"])
    in_utc = plan(*args, EXAMPLE_NOW)
    in_tokyo = plan(*args, EXAMPLE_NOW.astimezone(ZoneInfo("Asia/Tokyo")))
    assert in_utc == in_tokyo
    assert all(r.due_at.utcoffset() == timedelta(0) for r in in_tokyo.reminders)


# --- conditions ------------------------------------------------------------------------


@pytest.mark.parametrize(("only_if_any", "tretinoin", "retinol", "present"), [
    ([], False, False, True),
    (["tretinoin"], True, False, True),
    (["tretinoin"], False, True, False),
    (["retinol"], False, True, True),
    (["retinol"], True, False, False),
    (["tretinoin", "retinol"], False, True, True),
    (["tretinoin", "retinol"], True, True, True),
    (["tretinoin", "retinol"], False, False, False),
])
def test_only_if_any(only_if_any, tretinoin, retinol, present):
    booking = make_booking("2026-12-05T14:30:00+01:00", tretinoin=tretinoin, retinol=retinol)
    p = plan(booking, one_step(day=-2, time="10:00", only_if_any=only_if_any), make_clinic(),
             EXAMPLE_NOW)
    assert [r.key for r in p.reminders] == (["s:sms"] if present else [])
    if present:
        assert p.reminders[0].due_at == utc(2026, 12, 3, 9, 0)


# --- series: config/protocols/tretinoin-start.toml ---------------------------------------


def tretinoin_start(catalog, booking_doc, starts_at: str, now: datetime) -> Plan:
    booking_doc["treatment"] = "tretinoin-start"
    booking_doc["starts_at"] = starts_at
    booking = parse_booking(booking_doc, catalog)
    # The shipped clinic and its 09:00-20:00 window: the 19:30 nights fit inside it.
    return plan(booking, catalog.protocols["tretinoin-start"], catalog.clinics["glow"], now)


def test_tretinoin_start_application_nights_mon_wed_fri_for_two_weeks(catalog, booking_doc):
    # Start consultation Tue 1 Dec 2026 10:00 CET; days 0..13 = Tue 1 .. Mon 14 Dec.
    p = tretinoin_start(catalog, booking_doc, "2026-12-01T10:00:00+01:00", EXAMPLE_NOW)
    nights = [r for r in p.reminders if r.step == "application-night"]
    expected_days = [2, 4, 7, 9, 11, 14]  # Wed, Fri, Mon, Wed, Fri, Mon
    assert len(nights) == 6
    assert [r.due_at for r in nights] == [utc(2026, 12, d, 18, 30) for d in expected_days]
    assert [r.due_at.astimezone(MADRID).strftime("%a %H:%M") for r in nights] == [
        "Wed 19:30", "Fri 19:30", "Mon 19:30", "Wed 19:30", "Fri 19:30", "Mon 19:30"]
    assert [r.key for r in nights] == [f"application-night#{n}:sms" for n in range(1, 7)]
    assert [r.occurrence for r in nights] == list(range(1, 7))
    assert all(r.status == "scheduled" for r in nights)


def test_tretinoin_start_weekly_step_up_and_weekly_spf(catalog, booking_doc):
    p = tretinoin_start(catalog, booking_doc, "2026-12-01T10:00:00+01:00", EXAMPLE_NOW)
    step_up = [r for r in p.reminders if r.step == "step-up"]
    # days 16, 23, 30, 37 at 19:00 CET
    assert [r.due_at for r in step_up] == [
        utc(2026, 12, 17, 18, 0), utc(2026, 12, 24, 18, 0), utc(2026, 12, 31, 18, 0),
        utc(2027, 1, 7, 18, 0)]
    assert [r.key for r in step_up] == [f"step-up#{n}:email" for n in range(1, 5)]
    spf = [r for r in p.reminders if r.step == "morning-spf"]
    # Every 7 days from day 19 to day 40 (after the night texts, 3 days after each
    # step-up), 09:00 CET
    assert [r.due_at for r in spf] == [
        utc(2026, 12, 20, 8, 0), utc(2026, 12, 27, 8, 0), utc(2027, 1, 3, 8, 0),
        utc(2027, 1, 10, 8, 0)]
    singles = {r.key: r.due_at for r in p.reminders
               if r.step in ("welcome", "six-week-review")}
    assert singles == {
        "welcome:email": EXAMPLE_NOW,
        "six-week-review:email": utc(2027, 1, 12, 9, 0),   # day 42, 10:00 CET
    }
    keys = [r.key for r in p.reminders]
    assert len(keys) == len(set(keys)) == 1 + 6 + 4 + 4 + 1


def test_tretinoin_start_series_across_spring_forward_stays_at_1930_local(catalog, booking_doc):
    # Start Mon 23 Mar 2026 10:00 CET; Madrid springs forward on Sun 29 Mar.
    p = tretinoin_start(catalog, booking_doc, "2026-03-23T10:00:00+01:00", utc(2026, 3, 1))
    nights = [r.due_at for r in p.reminders if r.step == "application-night"]
    assert nights == [
        utc(2026, 3, 23, 18, 30), utc(2026, 3, 25, 18, 30), utc(2026, 3, 27, 18, 30),  # CET
        utc(2026, 3, 30, 17, 30), utc(2026, 4, 1, 17, 30), utc(2026, 4, 3, 17, 30),    # CEST
    ]


def test_series_booked_late_skips_the_past_occurrences_and_keeps_the_rest():
    # A daily series on days -3..-1 at 10:00, booked on day -2 after 10:00.
    booking = make_booking("2026-12-05T14:30:00+01:00")
    step = one_step(day=-3, time="10:00", late="skip", repeat=Repeat(through_day=-1, every_days=1))
    p = plan(booking, step, make_clinic(), utc(2026, 12, 3, 12, 0))  # Thu 13:00 CET
    assert [(r.key, r.status) for r in p.reminders] == [
        ("s#1:sms", "skipped"),     # Wed 2 Dec 10:00: passed
        ("s#2:sms", "skipped"),     # Thu 3 Dec 10:00: passed
        ("s#3:sms", "scheduled"),   # Fri 4 Dec 10:00
    ]
    assert by_key(p)["s#3:sms"].due_at == utc(2026, 12, 4, 9, 0)


# --- the isotretinoin gate ----------------------------------------------------------------


VISIT_MORNING = utc(2026, 12, 5, 8, 0)  # 09:00 in Madrid on the day of the 14:30 visit


def after_the_dose(last_dose: str | None) -> datetime:
    """EXAMPLE_NOW, or the visit's morning for a dose after it (a dose is never in the future)."""
    if last_dose is not None and date.fromisoformat(last_dose) > EXAMPLE_NOW.date():
        return VISIT_MORNING
    return EXAMPLE_NOW


@pytest.mark.parametrize(("last_dose", "status"), [
    (None, "scheduled"),
    ("2026-12-04", "held"),      # yesterday
    ("2026-06-07", "held"),      # 181 days before Sat 5 Dec 2026
    ("2026-06-06", "scheduled"), # 182 days before: the washout is over
    ("2025-01-01", "scheduled"),
])
def test_isotretinoin_gate(catalog, booking_doc, last_dose, status):
    booking_doc["medications"]["isotretinoin_last_dose"] = last_dose
    booking = parse_booking(booking_doc, catalog)
    p = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"],
             after_the_dose(last_dose))
    assert p.status == status
    if status == "held":
        assert "isotretinoin" in p.hold_reason
        assert last_dose in p.hold_reason
        assert "182 days" in p.hold_reason
    else:
        assert p.hold_reason is None
    assert p.reminders  # the plan still shows what would be sent once released


@pytest.mark.parametrize(("washout", "last_dose", "status"), [
    (365, "2026-03-01", "held"),       # 279 days: inside the clinic's stricter 365
    (365, "2025-12-04", "scheduled"),  # 366 days
    (30, "2026-10-01", "scheduled"),   # 65 days: the protocol's 182 would hold it
    (30, "2026-11-10", "held"),        # 25 days
    (0, "2026-12-04", "scheduled"),    # a clinic that does not gate at all
])
def test_clinic_overrides_the_isotretinoin_washout(catalog, booking_doc, washout, last_dose,
                                                   status):
    booking_doc["medications"]["isotretinoin_last_dose"] = last_dose
    booking = parse_booking(booking_doc, catalog)
    clinic = catalog.clinics["glow"].model_copy(update={"isotretinoin_washout_days": washout})
    p = plan(booking, catalog.protocols["microneedling"], clinic, after_the_dose(last_dose))
    assert p.status == status
    if status == "held":
        assert f"{washout} days" in p.hold_reason


def test_isotretinoin_gate_counts_days_in_the_patients_timezone():
    # 00:30 on 1 Jul in Sydney is still 30 Jun in UTC; the visit day is 1 Jul (local).
    booking = make_booking("2026-07-01T00:30:00+10:00", "Australia/Sydney",
                           isotretinoin_last_dose="2026-01-01")  # 181 days before 1 Jul
    p = plan(booking, one_step(washout=181, day=1, time="10:00"), make_clinic(),
             utc(2026, 6, 1))
    assert p.status == "scheduled"
    p = plan(booking, one_step(washout=182, day=1, time="10:00"), make_clinic(),
             utc(2026, 6, 1))
    assert p.status == "held"


def test_protocol_without_a_washout_is_never_held(catalog, booking_doc):
    booking_doc["treatment"] = "tretinoin-start"
    booking_doc["medications"]["isotretinoin_last_dose"] = "2026-11-01"
    booking = parse_booking(booking_doc, catalog)
    p = plan(booking, catalog.protocols["tretinoin-start"], catalog.clinics["glow"], EXAMPLE_NOW)
    assert p.status == "scheduled"


# --- `reminders plan`, as a user runs it --------------------------------------------------


def reminders(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "reminders"
    assert script.exists(), script
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["REMINDERS_CONFIG_DIR"] = str(ROOT / "config")
    env["REMINDERS_TEMPLATES_DIR"] = str(ROOT / "templates")
    return subprocess.run([str(script), *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


NOW_ARG = ("--now", "2026-11-21T12:00:00Z")


def test_cli_plan_prints_the_table():
    done = reminders("plan", *NOW_ARG, "examples/booking.json")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "glow/A-1042" in out and "status=scheduled" in out
    assert "DUE" in out and "STEP" in out and "CHANNEL" in out
    # patient-local times in the table
    assert "Sat 2026-11-28 18:00 CET" in out
    assert "stop-retinoids:sms" in out and "stop-retinoids:email" in out
    assert "Sat 2026-12-12 10:00 CET" in out and "week-check:sms" in out
    assert len([line for line in out.splitlines() if " scheduled " in line]) == 10


def test_cli_plan_json_is_the_design_timeline():
    done = reminders("plan", *NOW_ARG, "--json", "examples/booking.json")
    assert done.returncode == 0, done.stderr
    timeline = json.loads(done.stdout)
    assert {"clinic", "booking_id", "status", "version", "reminders"} <= set(timeline)
    assert (timeline["clinic"], timeline["booking_id"], timeline["status"]) == (
        "glow", "A-1042", "scheduled")
    assert isinstance(timeline["version"], int)
    assert len(timeline["reminders"]) == 10
    for r in timeline["reminders"]:
        assert {"step", "channel", "due_at", "status", "attempts", "sent_at", "reason"} <= set(r)
        assert r["due_at"].endswith("Z")
        assert r["status"] == "scheduled" and r["attempts"] == 0 and r["sent_at"] is None
    stop = [r for r in timeline["reminders"] if r["step"] == "stop-retinoids"]
    assert {(r["channel"], r["due_at"]) for r in stop} == {
        ("sms", "2026-11-28T17:00:00Z"), ("email", "2026-11-28T17:00:00Z")}


def test_cli_plan_refuses_an_invalid_booking_naming_every_bad_field(tmp_path, booking_doc):
    booking_doc["patient"]["phone"] = "600111222"
    booking_doc["patient"]["timezone"] = "Europe/Atlantis"
    booking_doc["starts_at"] = "2026-12-05T14:30:00"
    booking_doc["notes"] = "VIP"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(booking_doc), encoding="utf-8")
    done = reminders("plan", *NOW_ARG, str(path))
    assert done.returncode != 0
    for field in ("patient.phone", "patient.timezone", "starts_at", "notes"):
        assert field in done.stderr
    assert "A-1042" in done.stderr
    assert "stop-retinoids" not in done.stdout


def test_cli_plan_json_of_one_refused_booking_prints_no_timeline(tmp_path, booking_doc):
    # One booking in, refused: `plan --json` printed `[]`, a list where the one booking's
    # timeline is an object (`jq .reminders` fails on it, a script reads "planned nothing").
    # As `book --json`: nothing on stdout, the refusal on stderr, exit 1 (review).
    booking_doc["patient"]["phone"] = "600111222"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(booking_doc), encoding="utf-8")
    done = reminders("plan", *NOW_ARG, "--json", str(path))
    assert done.returncode == 1, done.stderr
    assert "patient.phone" in done.stderr
    assert done.stdout == "", done.stdout


def test_cli_plan_refuses_a_visit_in_the_past():
    done = reminders("plan", "--now", "2027-01-01T00:00:00Z", "examples/booking.json")
    assert done.returncode != 0
    assert "starts_at" in done.stderr


def test_cli_plan_reads_stdin():
    text = (ROOT / "examples" / "booking.json").read_text(encoding="utf-8")
    done = reminders("plan", *NOW_ARG, "--json", "-", stdin=text)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["booking_id"] == "A-1042"


def two_bookings(booking_doc: dict[str, Any]) -> list[dict[str, Any]]:
    second = json.loads(json.dumps(booking_doc))
    second["booking_id"] = "A-1043"
    second["medications"] = {"tretinoin": False, "retinol": False}
    return [booking_doc, second]


@pytest.mark.parametrize("form", ["array", "lines"])
def test_cli_plan_two_bookings(tmp_path, booking_doc, form):
    docs = two_bookings(booking_doc)
    text = json.dumps(docs) if form == "array" else "\n".join(json.dumps(d) for d in docs) + "\n"
    path = tmp_path / "bookings.json"
    path.write_text(text, encoding="utf-8")
    done = reminders("plan", *NOW_ARG, "--json", str(path))
    assert done.returncode == 0, done.stderr
    timelines = json.loads(done.stdout)
    assert [t["booking_id"] for t in timelines] == ["A-1042", "A-1043"]
    assert len(timelines[0]["reminders"]) == 10
    assert len(timelines[1]["reminders"]) == 7  # no retinoid rows
    # and the table form, from stdin
    done = reminders("plan", *NOW_ARG, "-", stdin=text)
    assert done.returncode == 0, done.stderr
    assert "glow/A-1042" in done.stdout and "glow/A-1043" in done.stdout


def test_cli_plan_mixed_good_and_bad_bookings(tmp_path, booking_doc):
    good, bad = two_bookings(booking_doc)
    bad["patient"]["email"] = "not-an-email"
    path = tmp_path / "bookings.json"
    path.write_text(json.dumps([good, bad]), encoding="utf-8")
    done = reminders("plan", *NOW_ARG, str(path))
    assert done.returncode == 1
    assert "glow/A-1042" in done.stdout
    assert "A-1043" in done.stderr and "patient.email" in done.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("", "no booking"),
    ("{not json\n", "not JSON"),
])
def test_cli_plan_unreadable_input(text, message):
    done = reminders("plan", *NOW_ARG, "-", stdin=text)
    assert done.returncode == 2
    assert message in done.stderr


def test_cli_plan_clinic_mismatch():
    done = reminders("plan", *NOW_ARG, "--clinic", "other", "examples/booking.json")
    assert done.returncode == 1
    assert "clinic" in done.stderr


# --- the send-time rules (re-checked at the moment of sending) ------------------------------

def test_at_send_time_sends_inside_the_window_before_expiry():
    tz = ZoneInfo("Europe/Madrid")
    now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)  # 11:00 in Madrid
    window = SendWindow(start="09:00", end="20:00")
    assert at_send_time(now, window, tz, None).action == "send"
    assert at_send_time(now, window, tz, now + timedelta(minutes=1)).action == "send"


def test_at_send_time_defers_outside_the_window_to_the_next_opening():
    tz = ZoneInfo("Europe/Madrid")
    now = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)  # 03:00 in Madrid
    rule = at_send_time(now, SendWindow(start="09:00", end="20:00"), tz, None)
    assert rule.action == "defer" and rule.at == datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
    assert rule.reason == ("outside the send window 09:00-20:00 (patient-local): waits for "
                           "2026-11-21 09:00 CET")


def test_at_send_time_skips_past_expiry_or_when_the_next_opening_is_too_late():
    tz = ZoneInfo("Europe/Madrid")
    window = SendWindow(start="09:00", end="20:00")
    now = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)
    past = at_send_time(now, window, tz, now - timedelta(seconds=1), "the visit has begun")
    assert (past.action, past.reason) == ("skip", "not sent: the visit has begun")
    visit = datetime(2026, 11, 21, 7, 30, tzinfo=UTC)  # 08:30, before the window opens
    late = at_send_time(now, window, tz, visit, "the visit has begun")
    assert late.action == "skip" and "outside the send window 09:00-20:00" in late.reason


def test_every_planned_reminder_carries_its_expiry(catalog, booking_doc):
    booking = parse_booking(booking_doc, catalog)
    planned = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"],
                   EXAMPLE_NOW)
    start = booking.starts_at.astimezone(UTC)
    for r in planned.reminders:
        assert r.expires_at is not None and r.expires_note, r
        if r.due_at < start:
            assert r.expires_at <= start, r
        else:  # after the visit: its words are about its own day
            assert r.expires_at == r.due_at + timedelta(days=1), r
