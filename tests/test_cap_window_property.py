"""The SMS cap never moves an SMS into quiet hours or past its expiry, and a booking planned
again a few minutes later (the same side of the send window's close) gets the moved SMS at
the same instants: every shipped protocol, patient zones, visit times and other bookings'
SMS days (review of `cap_sms(window=...)`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_caps_care import SHIPPED, ZONES, sms_only
from worker.models import parse_booking
from worker.planner import cap_plan, plan

NOW = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)


def capped(catalog, doc, now, taken):
    booking = parse_booking(doc, catalog)
    p = plan(booking, catalog.protocols[booking.treatment], catalog.clinics[booking.clinic], now)
    return cap_plan(p, booking, taken)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(treatment=st.sampled_from(SHIPPED), zone=st.sampled_from(ZONES),
       now_minutes=st.integers(0, 3 * 24 * 60),
       ahead_minutes=st.one_of(st.integers(60, 6 * 24 * 60), st.integers(60, 20 * 24 * 60)),
       taken_days=st.lists(st.integers(-6, 20), max_size=6),
       later=st.integers(1, 30), email=st.booleans(), retinoids=st.booleans())
def test_a_capped_sms_stays_in_the_window_before_its_expiry_and_is_planned_again_the_same(
        catalog, booking_doc, treatment, zone, now_minutes, ahead_minutes, taken_days, later,
        email, retinoids):
    now = NOW + timedelta(minutes=now_minutes)
    tz = ZoneInfo(zone)
    starts = (now + timedelta(minutes=ahead_minutes)).astimezone(tz).replace(second=0,
                                                                            microsecond=0)
    doc = sms_only(booking_doc, treatment, starts, zone)
    if not retinoids:
        doc.pop("medications")
    if email:
        doc["patient"]["email"] = "ana@example.com"
        doc["patient"]["channels"] = ["sms", "email"]
    window = catalog.clinics["glow"].send_window
    # Other bookings' SMS at 11:00 patient-local on these days from the visit.
    taken = [datetime.combine(starts.date() + timedelta(days=d), datetime.min.time(), tz)
             + timedelta(hours=11) for d in taken_days]
    first = capped(catalog, doc, now, taken)
    for r in first.reminders:
        if r.channel != "sms" or r.status != "scheduled" or "moved to" not in r.reason:
            continue
        local = r.due_at.astimezone(tz)
        assert window.start <= local.hour * 60 + local.minute < window.end, (r.key, local)
        assert r.expires_at is None or r.due_at < r.expires_at, (r.key, r.due_at)
    again_at = now + timedelta(minutes=later)

    def minute(at: datetime) -> float:
        local = at.astimezone(tz)
        return local.hour * 60 + local.minute + local.second / 60

    def inside(at: datetime) -> bool:
        return window.start <= minute(at) < window.end

    if inside(now) != inside(again_at) or now.astimezone(tz).date() != again_at.astimezone(
            tz).date():
        return  # the window opened or closed in between: a late step's time moves
    again = capped(catalog, doc, again_at, taken)
    moved = {r.key: r.due_at for r in first.reminders
             if "moved to" in r.reason and not r.at_booking}
    assert moved == {r.key: r.due_at for r in again.reminders
                     if "moved to" in r.reason and not r.at_booking}
