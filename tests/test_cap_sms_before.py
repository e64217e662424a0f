"""The SMS cap gives exactly what it gave before its redundant work was cut (each SMS's
local day worked out once, the reasons' days and words memoised, a moved SMS's later days
looked up, the 7-day counts by running totals): `cap_sms` against its copy as it was
(tests/cap_sms_before.py) over random SMS plans in zones with DST days, with the patient's
other SMS, some beyond the cap, a re-submission's history and its SMS held as the cap left
them; over the benchmark's realistic bookings planned at several `now`s (late steps, held
bookings), patients with several bookings, with and without email; and whole plans planned
with each cap, the memos cold, warm and overflowing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.intake import realistic_bookings
from tests import cap_sms_before as before
from tests.test_planner_cap_shortcut_review import cases as sms_plans
from tests.test_planner_properties import cases as planner_cases
from worker import planner
from worker.clinics import SmsSettings
from worker.models import parse_booking
from worker.planner import PlannedReminder


def clear_memos() -> None:
    planner._YMD.clear()
    planner._LATER.clear()
    planner._DAYS.clear()


def same(reminders: list[PlannedReminder], caps: SmsSettings, tz: ZoneInfo,
         **kwargs: object) -> list[PlannedReminder]:
    old = before.cap_sms(reminders, caps, tz, **kwargs)
    new = planner.cap_sms(reminders, caps, tz, **kwargs)
    assert new == old
    assert [r.__dict__ for r in new] == [r.__dict__ for r in old]  # at_booking, expiry too
    assert (new is reminders) == (old is reminders)
    return new


@st.composite
def held_cases(draw):
    """A random SMS plan, and maybe a re-submission of it: its SMS held as a first cap left
    them (some with another reason or time), some of the others' SMS beyond the cap."""
    reminders, caps, tz, email, taken, protected, window, history = draw(sms_plans())
    held: dict[str, tuple[float, str]] | None = None
    beyond: list[datetime] = []
    if draw(st.booleans()):
        first = before.cap_sms(reminders, caps, tz, email=email, taken=taken,
                               protected=protected, window=window)
        held = {}
        for r in first:
            if r.channel == "sms" and r.status == "scheduled" and draw(st.integers(0, 3)):
                reason = r.reason if draw(st.integers(0, 4)) else r.reason + " (then)"
                shift = timedelta(days=draw(st.sampled_from([0, 0, 0, 1, 2])))
                held[r.key] = ((r.due_at + shift).timestamp(), reason)
        beyond = [t for t in taken if draw(st.booleans())]
    return reminders, caps, tz, email, taken, protected, window, history, held, beyond


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(held_cases(), st.booleans())
def test_the_cap_gives_what_it_gave_on_random_sms_plans(case, cold):
    reminders, caps, tz, email, taken, protected, window, history, held, beyond = case
    if cold:
        clear_memos()
    same(reminders, caps, tz, email=email, taken=taken, protected=protected, window=window,
         history=history, held=held, beyond=beyond)


@pytest.mark.parametrize("base", [datetime(2026, 3, 20, 9, tzinfo=UTC),
                                  datetime(2026, 10, 23, 16, tzinfo=UTC)])
def test_the_cap_gives_what_it_gave_on_realistic_patients_with_several_bookings(catalog, base):
    """The benchmark's bookings, three to five a patient (each capped against the SMS of
    the patient's other bookings, some beyond the cap, then again as a re-submission with
    its SMS held), planned far ahead and late; caps of 1-3 a day."""
    rng = random.Random(11)
    docs = list(realistic_bookings(1200, seed=5, now=base))
    changed = moved = 0
    for i in range(0, len(docs), 4):
        group = []
        for doc in docs[i:i + rng.choice([3, 4, 5])]:
            booking = parse_booking(doc, catalog)
            start = booking.starts_at
            now = rng.choice([base, start - timedelta(days=2), start - timedelta(hours=5)])
            if now < base:
                now = base
            p = planner.plan(booking, catalog.protocols[booking.treatment],
                             catalog.clinics[booking.clinic], now)
            group.append((booking, p))
        tz = ZoneInfo(group[0][0].patient.timezone)  # one patient: one zone
        per_day = rng.choice([1, 1, 2, 3])
        caps = SmsSettings(max_per_day=per_day, max_per_week=rng.choice([per_day, 3, 4, 7]))
        taken: list[datetime] = []
        for booking, p in group:
            email = "email" in booking.patient.channels and rng.random() < 0.5
            base_reminders = p.uncapped if p.uncapped is not None else p.reminders
            beyond = [t for t in taken if rng.random() < 0.2]
            kwargs = dict(email=email, taken=list(taken), protected=p.protected,
                          window=p.window, beyond=beyond)
            capped = same(base_reminders, caps, tz, **kwargs)
            changed += capped is not base_reminders
            moved += any("moved to" in r.reason for r in capped)
            held = {r.key: (r.due_at.timestamp(), r.reason) for r in capped
                    if r.channel == "sms" and r.status == "scheduled"}
            history = frozenset(k for k in held if rng.random() < 0.15)
            same(base_reminders, caps, tz, held=held, **{**kwargs, "taken": taken + [
                datetime.fromtimestamp(held[k][0], UTC) for k in history]}, history=history)
            taken += [r.due_at for r in capped if r.channel == "sms" and r.status == "scheduled"]
    assert changed > 50 and moved > 20  # the cap's moves are exercised, not only its shortcut


def test_the_memos_overflowing_change_nothing(catalog, monkeypatch):
    monkeypatch.setattr(planner, "_YMD_MAX", 3)
    monkeypatch.setattr(planner, "_LATER_MAX", 5)
    test_the_cap_gives_what_it_gave_on_realistic_patients_with_several_bookings(
        catalog, datetime(2026, 3, 27, 9, tzinfo=UTC))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_plans_are_what_the_cap_before_made(catalog, data, monkeypatch):
    """Whole plans (random protocols, zones, windows, `now`) with the cap as it was."""
    booking, protocol, clinic, now = data.draw(planner_cases(catalog))
    if data.draw(st.booleans()):
        clear_memos()
    try:
        new = planner.plan(booking, protocol, clinic, now)
    except Exception as exc:  # a refused booking: refused the same
        with monkeypatch.context() as m:
            m.setattr(planner, "cap_sms", before.cap_sms)
            with pytest.raises(type(exc)):
                planner.plan(booking, protocol, clinic, now)
        return
    with monkeypatch.context() as m:
        m.setattr(planner, "cap_sms", before.cap_sms)
        old = planner.plan(booking, protocol, clinic, now)
    assert new == old and new.uncapped == old.uncapped


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "Australia/Lord_Howe",
                                  "America/Santiago"])
def test_an_sms_moved_past_a_clock_time_a_dst_change_skips_is_as_before(zone):
    """An SMS with no room, at a clock time the next day does not have (the spring DST
    change skips it): it moves a day further, to that clock time, as before."""
    from datetime import date, time

    tz = ZoneInfo(zone)
    gaps = [(d, t) for d in (date(2026, 1, 1) + timedelta(days=n) for n in range(365))
            for t in (time(h, m) for h in range(24) for m in (0, 30))
            if planner._wall(d, t.hour, t.minute, tz).astimezone(tz).timetz().replace(
                tzinfo=None) != t]
    assert gaps
    caps = SmsSettings(max_per_day=1, max_per_week=3)
    for gap_day, at in gaps:
        clear_memos()
        due = planner.wall_clock(gap_day - timedelta(days=1), at, tz)
        sms = PlannedReminder(key="a:sms", step="a", channel="sms", template="a",
                              occurrence=1, due_at=due, status=planner._SCHEDULED,
                              reason="planned", expires_at=due + timedelta(days=5))
        capped = same([sms], caps, tz, email=False, taken=[due])
        (moved,) = capped
        assert moved.due_at.astimezone(tz).date() == gap_day + timedelta(days=1)
        assert moved.due_at.astimezone(tz).timetz().replace(tzinfo=None) == at
