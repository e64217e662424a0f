"""The fast planner gives exactly the plans of the straightforward one (planner_reference).

Over realistic bookings (benchmarks/intake.py: five zones, three protocols, both channels,
retinoid users, held ones) planned at several `now`s — far ahead, days before, hours before,
minutes before, so late steps are sent or skipped — over random protocols, zones (DST days
included), send windows and `now` (the property strategies of test_planner_properties),
and with the memo caches cold and warm.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.intake import realistic_bookings
from tests import planner_reference as reference
from tests.test_planner_properties import cases
from worker import planner
from worker.errors import BookingRejected
from worker.models import parse_booking


def both(booking, protocol, clinic, now):
    try:
        expected = reference.plan(booking, protocol, clinic, now)
    except BookingRejected as exc:
        with pytest.raises(BookingRejected) as fast:
            planner.plan(booking, protocol, clinic, now)
        assert fast.value.errors == exc.errors
        return None
    got = planner.plan(booking, protocol, clinic, now)
    assert got == expected
    return got


def clear_caches() -> None:
    for cached in (planner._wall, planner._opening_after, planner._last_opening_before,
                   planner._channel_choice, planner._window_notes):
        cached.cache_clear()
    planner._PREPARED.clear()
    for memo in (planner._WALLS, planner._CHOICES, planner._DAYS, planner._PAUSES):
        memo.clear()


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_realistic_bookings_plan_the_same(catalog, cold):
    base = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)  # DST changes ahead in both hemispheres
    docs = list(realistic_bookings(400, seed=3, now=base))
    compared = 0
    for i, doc in enumerate(docs):
        booking = parse_booking(doc, catalog)
        start = booking.starts_at
        protocol = catalog.protocols[booking.treatment]
        clinic = catalog.clinics[booking.clinic]
        for now in (base, start - timedelta(days=8, hours=3), start - timedelta(days=2),
                    start - timedelta(hours=5), start - timedelta(minutes=7)):
            if cold and i % 7 == 0:
                clear_caches()
            if both(booking, protocol, clinic, now) is not None:
                compared += 1
    assert compared > 1500


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_protocols_zones_windows_and_now_plan_the_same(catalog, data):
    booking, protocol, clinic, now = data.draw(cases(catalog))
    if data.draw(st.booleans()):
        clear_caches()
    both(booking, protocol, clinic, now)


def test_a_plan_is_the_same_whatever_offset_now_and_the_start_are_given_in(catalog, booking_doc):
    """Memoised by instant: equal instants in other offsets share a cache entry."""
    from zoneinfo import ZoneInfo

    booking = parse_booking(booking_doc, catalog)
    protocol, clinic = catalog.protocols["microneedling"], catalog.clinics["glow"]
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    first = planner.plan(booking, protocol, clinic, now.astimezone(ZoneInfo("Asia/Tokyo")))
    second = planner.plan(booking, protocol, clinic, now)
    assert first == second == reference.plan(booking, protocol, clinic, now)
    assert all(r.due_at.tzinfo is UTC for r in first.reminders)


def test_the_sms_cap_s_shortcut_changes_nothing(catalog, monkeypatch):
    """`cap_sms` returns a plan at once when every SMS fits where it is planned
    (`_all_fit`): over realistic plans, other SMS of the patient, caps, protected steps,
    history and with and without email, it gives exactly what counting each SMS does."""
    import random
    from zoneinfo import ZoneInfo

    from worker.clinics import SmsSettings

    rng = random.Random(17)
    base = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)
    cases = []
    for doc in realistic_bookings(300, seed=9, now=base):
        booking = parse_booking(doc, catalog)
        protocol = catalog.protocols[booking.treatment]
        p = planner.plan(booking, protocol, catalog.clinics[booking.clinic], base)
        reminders = p.uncapped if p.uncapped is not None else p.reminders
        tz = ZoneInfo(booking.patient.timezone)
        sms = [r for r in reminders if r.channel == "sms"]
        for _ in range(6):
            per_day = rng.choice([1, 1, 2, 3])
            caps = SmsSettings(max_per_day=per_day,
                               max_per_week=rng.choice([per_day, 3, 4, 6, 10]))
            taken = [rng.choice(sms).due_at + timedelta(days=rng.randrange(-9, 10))
                     if sms and rng.random() < 0.7 else base + timedelta(days=rng.randrange(120))
                     for _ in range(rng.choice([0, 0, 1, 2, 5]))]
            steps = sorted({r.step for r in reminders})
            protected = frozenset(s for s in steps if rng.random() < 0.3)
            history = frozenset(r.key for r in sms if rng.random() < 0.1)
            cases.append((reminders, caps, tz, rng.random() < 0.5, taken, protected,
                          p.window, history))

    def run() -> list[list]:
        return [planner.cap_sms(r, caps, tz, email=email, taken=taken, protected=protected,
                                window=window, history=history)
                for r, caps, tz, email, taken, protected, window, history in cases]

    fast = run()
    monkeypatch.setattr(planner, "_all_fit", lambda *args: False)
    counted = run()
    assert fast == counted
    changed = sum(got != r for got, (r, *_) in zip(fast, cases, strict=True))
    assert 0.1 * len(cases) < changed < 0.9 * len(cases)  # both ways are exercised


def test_a_reminder_the_cap_changes_is_what_dataclasses_replace_makes(catalog):
    from dataclasses import replace

    from worker.status import Status

    base = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)
    for doc in realistic_bookings(20, seed=4, now=base):
        booking = parse_booking(doc, catalog)
        p = planner.plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], base)
        for r in p.reminders:
            for changes in ({"reason": "x"}, {"status": Status.SKIPPED, "reason": "y"},
                            {"key": r.key + "!", "channel": "email", "reason": "z"},
                            {"due_at": base, "reason": "w"}):
                got, want = planner._changed(r, **changes), replace(r, **changes)
                assert got == want and got is not r
                assert list(got.__dict__.items()) == list(want.__dict__.items())
                assert r == replace(want, **{k: getattr(r, k) for k in changes})  # r as it was


def test_a_plan_is_built_as_its_dataclass_builds_it(catalog):
    """plan() and plan_from_record build Plans and reminders without `__init__`: the same
    fields, in the same order, as the dataclasses' own `__init__` sets."""
    from dataclasses import fields

    from worker.planner import Plan, PlannedReminder, plan_from_record, plan_record

    base = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)
    for doc in realistic_bookings(40, seed=6, now=base):
        booking = parse_booking(doc, catalog)
        clinic = catalog.clinics[booking.clinic]
        p = planner.plan(booking, catalog.protocols[booking.treatment], clinic, base)
        for q in (p, plan_from_record(plan_record(p), clinic.send_window, clinic.sms)):
            built = Plan(**{f.name: getattr(q, f.name) for f in fields(Plan)})
            assert list(q.__dict__.items()) == list(built.__dict__.items())
            for r in [*q.reminders, *(q.uncapped or [])]:
                again = PlannedReminder(**{f.name: getattr(r, f.name)
                                           for f in fields(PlannedReminder)})
                assert list(r.__dict__.items()) == list(again.__dict__.items())


def test_local_day_is_the_instant_s_day_in_the_zone_and_its_memo_stays_bounded(monkeypatch):
    """`local_day` (the SMS cap's days) gives `astimezone(tz).toordinal()` for UTC instants
    (memoised) and for wall times of another zone, a repeated hour's second one too (worked
    out), around the autumn's DST changes; its memo holds at most `_DAYS_MAX` instants."""
    from zoneinfo import ZoneInfo

    monkeypatch.setattr(planner, "_DAYS_MAX", 50, raising=False)
    zones = [ZoneInfo(z) for z in ("Europe/Madrid", "America/New_York", "Australia/Sydney",
                                   "Pacific/Chatham")]
    base = datetime(2026, 10, 24, tzinfo=UTC)
    for i in range(400):
        instant = base + timedelta(minutes=37 * i)
        for tz in zones:
            assert planner.local_day(instant, tz) == instant.astimezone(tz).toordinal()
            local = instant.astimezone(tz)  # the same instant as a wall time there
            for other in zones:
                assert planner.local_day(local, other) == local.astimezone(other).toordinal()
        assert sum(len(days) for days in planner._DAYS.values()) <= 50
