"""Properties of the planner over random bookings, timezones, windows and `now`.

For random appointment instants (2000-2040, biased towards DST change days), IANA zones
(both hemispheres, half- and quarter-hour offsets), send windows, medications, `now`
before the appointment, and both the shipped protocols and random ones:

- every scheduled due time lies inside the patient's send window (local minute in [start, end));
- every scheduled reminder of a pre-appointment step is due strictly before the appointment;
- every scheduled due time is >= now;
- planning twice gives identical output; reminder keys are unique.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.clinics import Clinic, SendWindow
from worker.models import Booking
from worker.planner import Plan, plan
from worker.protocols import Protocol, Repeat, Step, parse_duration

ZONES = [
    "Europe/Madrid",
    "Europe/London",
    "America/New_York",
    "America/Sao_Paulo",
    "America/St_Johns",      # -03:30 / -02:30
    "Australia/Sydney",      # southern hemisphere DST
    "Australia/Adelaide",    # +09:30 / +10:30
    "Asia/Kolkata",          # +05:30, no DST
    "Asia/Kathmandu",        # +05:45
    "Pacific/Auckland",      # southern, +12 / +13
    "Pacific/Chatham",       # +12:45 / +13:45
    "UTC",
]


def _transitions(zone: str, years: range = range(2025, 2029)) -> list[datetime]:
    """The UTC instants at which `zone` changes its offset (found by scanning hourly)."""
    tz = ZoneInfo(zone)
    out, t = [], datetime(years.start, 1, 1, tzinfo=UTC)
    end = datetime(years.stop, 1, 1, tzinfo=UTC)
    before = t.astimezone(tz).utcoffset()
    while t < end:
        t += timedelta(hours=1)
        offset = t.astimezone(tz).utcoffset()
        if offset != before:
            out.append(t)
        before = offset
    return out


DST_CHANGES = {zone: _transitions(zone) for zone in ZONES}


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@st.composite
def windows(draw) -> SendWindow:
    if draw(st.booleans()):  # anywhere in the day
        start = draw(st.integers(0, 1439))
        end = draw(st.integers(start + 1, 1440))
    else:  # short windows around the small hours, where DST changes happen
        start = draw(st.integers(0, 5 * 60))
        end = draw(st.integers(start + 1, min(start + 120, 1440)))
    return SendWindow(start=hhmm(start), end=hhmm(end))


def appointment_instants(zone: str) -> st.SearchStrategy[datetime]:
    """Any minute in 2000-2040, or one near one of `zone`'s DST changes."""
    anywhere = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 12, 31))
    strategies = [anywhere.map(lambda d: d.replace(tzinfo=UTC))]
    if DST_CHANGES[zone]:
        strategies.append(st.builds(
            lambda base, minutes, days: base + timedelta(days=days, minutes=minutes),
            st.sampled_from(DST_CHANGES[zone]),
            st.integers(-36 * 60, 36 * 60),
            st.sampled_from([-7, -3, -2, -1, 0, 1, 2, 3, 7]),  # day-relative steps hit the change
        ))
    return st.one_of(*strategies).map(lambda d: d.replace(second=0, microsecond=0))


durations = st.one_of(st.integers(-10 * 86400, 10 * 86400),
                      st.integers(-3 * 3600, 3 * 3600)).map(
    lambda s: ("-" if s < 0 else "") + f"{abs(s)}s")


@st.composite
def random_steps(draw, index: int) -> Step:
    kind = draw(st.sampled_from(["booking", "wall", "offset", "series"]))
    fields: dict = {
        "id": f"step-{index}",
        "template": "t",
        "channels": draw(st.lists(st.sampled_from(["sms", "email"]), min_size=1, max_size=2,
                                  unique=True)),
        "only_if_any": draw(st.lists(st.sampled_from(["tretinoin", "retinol"]), max_size=2,
                                     unique=True)),
        "late": draw(st.sampled_from(["send", "skip"])),
    }
    if fields["late"] == "send" and draw(st.booleans()):
        fields["late_until"] = draw(durations)
    if kind == "booking":
        fields["at"] = "booking"
    elif kind == "offset":
        fields["offset"] = draw(durations)
    else:
        fields["day"] = draw(st.integers(-14, 14))
        fields["time"] = hhmm(draw(st.integers(0, 1439)))
        if kind == "series":
            through = draw(st.integers(fields["day"], fields["day"] + 14))
            if draw(st.booleans()):
                repeat = Repeat(through_day=through, every_days=draw(st.integers(1, 7)))
            else:
                repeat = Repeat(through_day=through, weekdays=draw(st.lists(
                    st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
                    min_size=1, max_size=7, unique=True)))
            fields["repeat"] = repeat
    return Step(**fields)


@st.composite
def random_protocols(draw) -> Protocol:
    n = draw(st.integers(1, 5))
    return Protocol(id="random", name="Random", steps=[draw(random_steps(i)) for i in range(n)],
                    isotretinoin_washout_days=draw(st.none() | st.integers(1, 400)))


@st.composite
def cases(draw, catalog):
    zone = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(zone)
    start = draw(appointment_instants(zone))
    # `now` anywhere in the two months before the visit, often in its last two days
    back = draw(st.one_of(st.integers(1, 60 * 86400), st.integers(1, 2 * 86400)))
    now = start - timedelta(seconds=back)
    shipped = sorted(catalog.protocols)
    protocol = draw(st.one_of(st.sampled_from(shipped).map(catalog.protocols.__getitem__),
                              random_protocols()))
    channels = draw(st.lists(st.sampled_from(["sms", "email"]), min_size=1, max_size=2,
                             unique=True))
    # a last dose is never after the patient's today (the planner refuses it)
    today = now.astimezone(tz).date()
    last_dose = draw(st.none() | st.dates(min_value=today - timedelta(days=400),
                                          max_value=today).map(lambda d: d.isoformat()))
    booking = Booking.model_validate({
        "clinic": "test", "booking_id": "P-1", "treatment": protocol.id,
        # the appointment as the clinic would write it: in the patient's own offset
        "starts_at": start.astimezone(tz).isoformat(),
        "patient": {"name": "Pat", "email": "pat@example.com", "phone": "+34600111222",
                    "timezone": zone, "locale": "en", "channels": channels},
        "medications": {"tretinoin": draw(st.booleans()), "retinol": draw(st.booleans()),
                        "isotretinoin_last_dose": last_dose},
    })
    clinic = Clinic(id="test", name="Test", phone="+34910000000",
                    timezone=draw(st.sampled_from(ZONES)), send_window=draw(windows()),
                    isotretinoin_washout_days=draw(st.none() | st.integers(1, 400)))
    return booking, protocol, clinic, now


def is_pre_appointment(step: Step) -> bool:
    """Steps every occurrence of which is, by definition, before the appointment."""
    if step.at == "booking":
        return True  # `now` is always before the appointment
    if step.offset is not None:
        return step.offset < timedelta(0)
    assert step.day is not None
    last_day = step.repeat.through_day if step.repeat else step.day
    return last_day < 0  # a patient-local day before the appointment's day


def local_minute(instant: datetime, tz: ZoneInfo) -> int:
    at = instant.astimezone(tz)
    return at.hour * 60 + at.minute


SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def case_strategy(catalog):
    return cases(catalog)


def check_plan(booking: Booking, protocol: Protocol, clinic: Clinic, now: datetime) -> Plan:
    p = plan(booking, protocol, clinic, now)
    tz = ZoneInfo(booking.patient.timezone)
    window = clinic.send_window
    start = booking.starts_at
    steps = {s.id: s for s in protocol.steps}
    keys = [r.key for r in p.reminders]
    assert len(keys) == len(set(keys)), keys
    for r in p.reminders:
        assert r.due_at.tzinfo is not None and r.due_at.utcoffset() == timedelta(0)
        if r.step == "hold-notice":  # a held booking's one message: at booking, before the visit
            assert p.status == "held" and r.at_booking and r.channel in booking.patient.channels
            assert r.status == "skipped" or now <= r.due_at < start
            continue
        assert steps[r.step].applies_to(booking.medications)
        assert r.channel in booking.patient.channels
        assert r.reason or r.status == "scheduled"
        if r.status != "scheduled":
            assert r.status == "skipped" and r.reason
            continue
        minute = local_minute(r.due_at, tz)
        assert window.start <= minute < window.end, (
            f"{r.key} due {r.due_at.astimezone(tz)} outside {window.describe()}")
        assert r.due_at >= now, f"{r.key} due {r.due_at} before now {now}"
        if is_pre_appointment(steps[r.step]):
            assert r.due_at < start, f"{r.key} due {r.due_at} not before the visit {start}"
    assert plan(booking, protocol, clinic, now) == p  # deterministic
    return p


def test_planner_properties(case_strategy):
    @SETTINGS
    @given(case_strategy)
    def run(case):
        check_plan(*case)

    run()


def test_planner_properties_shipped_protocols_all_day(catalog):
    """The shipped protocols with every random zone and `now`, and a few fixed windows."""

    @SETTINGS
    @given(st.sampled_from(ZONES).flatmap(lambda z: st.tuples(st.just(z), appointment_instants(z))),
           st.one_of(st.integers(1, 60 * 86400), st.integers(1, 2 * 86400)),
           st.sampled_from(sorted(catalog.protocols)),
           st.sampled_from([("00:00", "24:00"), ("09:00", "20:00"), ("08:00", "21:00"),
                            ("02:00", "03:00"), ("02:00", "02:30"), ("01:00", "02:30"),
                            ("02:15", "03:15"), ("23:00", "24:00")]),
           st.booleans(), st.booleans())
    def run(zone_start, back, protocol_id, window, tretinoin, retinol):
        zone, start = zone_start
        booking = Booking.model_validate({
            "clinic": "test", "booking_id": "P-2", "treatment": protocol_id,
            "starts_at": start.isoformat(),
            "patient": {"name": "Pat", "phone": "+34600111222", "timezone": zone,
                        "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": tretinoin, "retinol": retinol},
        })
        clinic = Clinic(id="test", name="Test", phone="+34910000000", timezone=zone,
                        send_window=SendWindow(start=window[0], end=window[1]))
        protocol = catalog.protocols[protocol_id]
        p = check_plan(booking, protocol, clinic, start - timedelta(seconds=back))
        retinoid_steps = {s.id for s in protocol.steps if s.only_if_any}
        if not (tretinoin or retinol):
            assert not retinoid_steps & {r.step for r in p.reminders}

    run()


def test_durations_used_by_the_strategy_parse():
    assert parse_duration("-90s") == timedelta(seconds=-90)
    assert parse_duration("864000s") == timedelta(days=10)
