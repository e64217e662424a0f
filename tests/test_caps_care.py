"""The SMS frequency cap never drops a care-critical SMS (`care_critical = true`: the safety
messages and the "you may resume" message that ends a pause): they are counted first and
the other SMS give way (worker/planner.py `cap_sms`). The cap still holds for the rest.

The review that found it: an SMS-only microneedling patient on tretinoin lost the
redness-check (infection warning signs) and the resume message to the cap.
"""

from __future__ import annotations

import copy
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.catalog import Catalog
from worker.clinics import SmsSettings
from worker.models import Booking, parse_booking
from worker.planner import Plan, cap_sms, plan, plan_from_record, plan_record
from worker.store import Store

SHIPPED = ["chemical-peel", "demo", "microneedling", "tretinoin-start"]
ZONES = ["Europe/Madrid", "America/New_York", "Australia/Sydney", "Asia/Kathmandu", "UTC"]
LOOSE = SmsSettings(max_per_day=10, max_per_week=70)


def sms_only(booking_doc: dict[str, Any], treatment: str, starts: datetime,
             zone: str = "Europe/Madrid") -> dict[str, Any]:
    doc = copy.deepcopy(booking_doc)
    doc.update(treatment=treatment, starts_at=starts.isoformat(),
               medications={"tretinoin": True, "retinol": True})
    doc["patient"].pop("email", None)
    doc["patient"].update(channels=["sms"], timezone=zone)
    return doc


def planned(catalog: Catalog, doc: dict[str, Any], now: datetime,
            caps: SmsSettings | None = None) -> tuple[Booking, Plan]:
    booking = parse_booking(doc, catalog)
    clinic = catalog.clinics[booking.clinic]
    if caps is not None:
        clinic = clinic.model_copy(update={"sms": caps})
    return booking, plan(booking, catalog.protocols[booking.treatment], clinic, now)


def critical(catalog: Catalog, treatment: str) -> set[str]:
    return {s.id for s in catalog.protocols[treatment].steps if s.care_critical}


def check_plan(catalog: Catalog, doc: dict[str, Any], now: datetime) -> None:
    """Capped vs uncapped: every care-critical SMS is the same (kept, same time); every
    other scheduled SMS keeps within the cap in each day and 7 days holding it."""
    booking, capped = planned(catalog, doc, now)
    _, loose = planned(catalog, doc, now, LOOSE)
    crit = critical(catalog, doc["treatment"])

    def crit_sms(p: Plan) -> dict[str, tuple[datetime, str]]:
        return {r.key: (r.due_at, str(r.status)) for r in p.reminders
                if r.channel == "sms" and r.step in crit}

    assert crit_sms(capped) == crit_sms(loose)
    tz = ZoneInfo(doc["patient"]["timezone"])
    sent = [r for r in capped.reminders if r.channel == "sms" and r.status == "scheduled"]
    days = Counter(r.due_at.astimezone(tz).date() for r in sent)
    caps = capped.caps
    assert caps is not None
    for r in sent:
        if r.step in crit:
            continue
        day = r.due_at.astimezone(tz).date()
        assert days[day] <= caps.max_per_day, (r.key, sorted(days.items()))
        for first in (day - timedelta(days=k) for k in range(7)):
            week = sum(n for d, n in days.items() if first <= d < first + timedelta(days=7))
            assert week <= caps.max_per_week, (r.key, first, sorted(days.items()))
    for r in capped.reminders:  # what the cap left out says why
        if r.status == "skipped" and r.channel == "sms" and "SMS limit" in r.reason:
            assert r.step not in crit, r


def test_the_review_case_keeps_redness_check_and_resume(catalog, booking_doc):
    now = datetime(2026, 11, 22, 11, 30, tzinfo=UTC)
    starts = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)
    _, p = planned(catalog, sms_only(booking_doc, "microneedling", starts, "UTC"), now)
    by_key = {r.key: r for r in p.reminders}
    for key in ("stop-retinoids:sms", "aftercare:sms", "redness-check:sms",
                "resume-retinoids:sms"):
        assert by_key[key].status == "scheduled", by_key[key]
    assert by_key["redness-check:sms"].due_at == datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    assert by_key["resume-retinoids:sms"].due_at == datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
    # The other SMS gave way, saying why.
    assert by_key["spf:sms"].status == "skipped"
    assert "SMS limit at this clinic (1 a day, 3 in any 7 days)" in by_key["spf:sms"].reason
    check_plan(catalog, sms_only(booking_doc, "microneedling", starts, "UTC"), now)


def test_every_shipped_resume_message_is_care_critical(catalog):
    """A protocol that pauses a product says when to resume, and that message is protected."""
    for name, protocol in catalog.protocols.items():
        pause = protocol.pause_step()
        resume = [s for s in protocol.steps if s.template == "resume-retinoids"]
        if pause is not None and name != "demo":
            assert resume, name
        assert all(s.care_critical for s in resume), name


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("weekday", range(7))
@pytest.mark.parametrize("treatment", SHIPPED)
def test_every_shipped_protocol_for_an_sms_only_patient(catalog, booking_doc, treatment,
                                                        weekday, zone):
    tz = ZoneInfo(zone)
    day = date(2026, 12, 7) + timedelta(days=weekday)
    starts = datetime.combine(day, time(18, 30), tzinfo=tz)
    check_plan(catalog, sms_only(booking_doc, treatment, starts, zone),
               starts.astimezone(UTC) - timedelta(days=30))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(treatment=st.sampled_from(SHIPPED), zone=st.sampled_from(ZONES),
       start=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31)),
       lead_minutes=st.integers(60, 60 * 24 * 60))
def test_property_over_dates_and_zones(catalog, booking_doc, treatment, zone, start,
                                       lead_minutes):
    starts = start.replace(tzinfo=UTC, second=0, microsecond=0)
    now = starts - timedelta(minutes=lead_minutes)
    check_plan(catalog, sms_only(booking_doc, treatment, starts, zone), now)


def test_the_check_can_fail_without_protection(catalog, booking_doc):
    """Without the protection (no protected ids) the review case loses care-critical SMS."""
    now = datetime(2026, 11, 22, 11, 30, tzinfo=UTC)
    starts = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)
    _, loose = planned(catalog, sms_only(booking_doc, "microneedling", starts, "UTC"), now,
                       LOOSE)
    bare = cap_sms(loose.reminders, SmsSettings(), ZoneInfo("UTC"), email=False)
    skipped = {r.key for r in bare if r.status == "skipped"}
    assert {"redness-check:sms", "resume-retinoids:sms"} <= skipped


def test_a_plan_record_keeps_the_protected_steps(catalog, booking_doc):
    now = datetime(2026, 11, 22, 11, 30, tzinfo=UTC)
    _, p = planned(catalog, sms_only(booking_doc, "microneedling",
                                     datetime(2026, 12, 2, 9, 30, tzinfo=UTC)), now)
    assert p.protected == critical(catalog, "microneedling")
    again = plan_from_record(plan_record(p), p.window, p.caps)
    assert again.protected == p.protected


def test_across_bookings_in_a_real_redis_care_critical_sms_still_go(
        redis_client, catalog, booking_doc):
    """A second booking whose days the first took: its care-critical SMS go anyway (beyond
    the cap, saying so), its other SMS give way."""
    store = Store(redis_client, "cc", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    now = datetime(2026, 11, 22, 11, 30, tzinfo=UTC)
    starts = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)
    first_doc = sms_only(booking_doc, "microneedling", starts, "UTC")
    first = store.upsert(*planned(catalog, first_doc, now), now)
    second_doc = {**copy.deepcopy(first_doc), "booking_id": first_doc["booking_id"] + "-2"}
    second = store.upsert(*planned(catalog, second_doc, now), now)
    crit = critical(catalog, "microneedling")
    for timeline in (first, second):
        for r in timeline["reminders"]:
            if r["channel"] == "sms" and r["step"] in crit:
                assert r["status"] == "scheduled", r
    by_id = {r["id"]: r for r in second["reminders"]}
    assert "sent although the patient's SMS limit" in by_id["redness-check:sms"]["reason"]
    assert "care-critical" in by_id["redness-check:sms"]["reason"]
    others = [r for r in second["reminders"]
              if r["channel"] == "sms" and r["step"] not in crit and r["status"] == "scheduled"]
    assert others == [], others

