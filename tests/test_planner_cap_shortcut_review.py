"""The SMS cap's shortcut (`_all_fit`, 22e3a65) changes nothing (review of 22e3a65): over
random SMS plans in zones with DST days, the patient's other bookings' SMS, a
re-submission's history and its own SMS sent, care-critical steps, steps with an email
copy, with and without email, caps 1..3 a day, 1..6 a week: `cap_sms` gives the same
reminders (and the same list object when nothing changes) as with the shortcut disabled.
And plan records handed back pickled (78a1cab, abb0abd) decode to the same plans, their
uncapped reminders too (left out of a Plan's equality), none sharing fields across bookings."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.intake import realistic_bookings
from worker import planner
from worker.clinics import SendWindow, SmsSettings
from worker.models import parse_booking
from worker.planner import PlannedReminder
from worker.status import Status

ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "America/Santiago", "UTC"]
# Around the 2026 DST changes (March, April, October, November).
STARTS = [datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 25, tzinfo=UTC),
          datetime(2026, 10, 20, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)]
STEPS = ["a", "b", "c", "d", "e", "f"]


@st.composite
def cases(draw):
    tz = ZoneInfo(draw(st.sampled_from(ZONES)))
    start = draw(st.sampled_from(STARTS))
    minutes = st.integers(0, 16 * 24 * 60)
    reminders = []
    for i in range(draw(st.integers(0, 7))):
        step = draw(st.sampled_from(STEPS))
        due = start + timedelta(minutes=draw(minutes))
        expires = (None if draw(st.booleans()) else
                   due + timedelta(days=draw(st.integers(0, 9)), hours=draw(st.integers(0, 23))))
        late = draw(st.integers(0, 4)) == 0
        channels = draw(st.sampled_from([("sms",), ("sms", "email"), ("email",)]))
        status = draw(st.sampled_from([Status.SCHEDULED] * 5 + [Status.SKIPPED, Status.SENT]))
        for channel in channels:
            reminders.append(PlannedReminder(
                key=f"{step}#{i}:{channel}", step=step, channel=channel, template=step,
                occurrence=i, due_at=due, status=status,
                reason="planned" + planner._LATE * late,
                at_booking=False, expires_at=expires, expires_note=""))
    reminders.sort(key=planner._order)
    keys = [r.key for r in reminders if r.channel == "sms"]
    history = frozenset(draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else [])
    taken = draw(st.lists(minutes.map(lambda m: start + timedelta(minutes=m - 9 * 24 * 60)),
                          max_size=6))
    per_day = draw(st.integers(1, 3))
    caps = SmsSettings(max_per_day=per_day, max_per_week=draw(st.integers(per_day, 6)))
    protected = frozenset(draw(st.lists(st.sampled_from(STEPS), max_size=3)))
    window = draw(st.sampled_from([None, SendWindow()]))
    return reminders, caps, tz, draw(st.booleans()), taken, protected, window, history


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_the_cap_shortcut_gives_what_counting_each_sms_gives(case):
    reminders, caps, tz, email, taken, protected, window, history = case
    fast = planner.cap_sms(reminders, caps, tz, email=email, taken=taken, protected=protected,
                           window=window, history=history)
    real = planner._all_fit
    planner._all_fit = lambda *args: False
    try:
        counted = planner.cap_sms(reminders, caps, tz, email=email, taken=taken,
                                  protected=protected, window=window, history=history)
    finally:
        planner._all_fit = real
    assert fast == counted
    assert (fast is reminders) == (counted is reminders)


def test_plans_handed_back_pickled_decode_to_the_same_plans_and_uncapped(catalog):
    from dataclasses import fields

    from worker.planner import Plan, plan_from_record, plan_record

    capped = 0
    for base in (datetime(2026, 3, 20, 9, tzinfo=UTC), datetime(2026, 10, 30, 9, tzinfo=UTC)):
        plans, clinics, items = [], [], []
        for doc in realistic_bookings(300, seed=3, now=base):
            booking = parse_booking(doc, catalog)
            clinic = catalog.clinics[booking.clinic]
            p = planner.plan(booking, catalog.protocols[booking.treatment], clinic, base)
            plans.append(p)
            clinics.append(clinic)
            items.append((booking.model_dump(mode="json"), plan_record(p)))
        back = pickle.loads(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
        decoded = [plan_from_record(record, c.send_window, c.sms)
                   for (_, record), c in zip(back, clinics, strict=True)]
        owners: dict[int, int] = {}
        for i, (p, q) in enumerate(zip(plans, decoded, strict=True)):
            built = Plan(**{f.name: getattr(p, f.name) for f in fields(Plan)})
            assert p == q == built
            assert q.uncapped == p.uncapped  # not part of Plan's equality
            again = pickle.loads(pickle.dumps(q))
            assert again == p and again.uncapped == p.uncapped
            capped += p.uncapped is not None
            for r in [*q.reminders, *(q.uncapped or [])]:
                assert owners.setdefault(id(r.__dict__), i) == i  # no fields shared
    assert capped > 20  # plans the cap changed are among them
