"""START after STOP resumes the patient's SMS where the clinic's SMS cap has room across
their bookings (`Store.opt_in`): a forced race with a booking of the same patient stored
between the opt-in's read and its write. Real Redis, the store's own scripts."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, time, timedelta
from typing import Any

from tests import test_send_races as races
from worker.catalog import Catalog

gate = races.gate  # the send-path rig's fixtures
rig = races.rig
PHONE = "+34600111222"


def _sms_days(rig: races.Rig, *booking_ids: str) -> Counter[object]:
    days: Counter[object] = Counter()
    for booking_id in booking_ids:
        for r in rig.store.timeline("rc", booking_id)["reminders"]:
            if r["channel"] == "sms" and r["status"] == "scheduled":
                days[datetime.fromisoformat(r["due_at"].replace("Z", "+00:00")).date()] += 1
    return days


def test_a_booking_stored_between_the_opt_ins_read_and_its_write_keeps_the_cap(rig):
    """R-1's SMS are skipped by STOP. START has read the patient's bookings (only R-1: its
    SMS day free) when the clinic stores R-2 for the same patient, its SMS planned on that
    day (R-1's, skipped, take no room). The opt-in's write checked only the bookings it had
    read: it put R-1's SMS back beside R-2's, four SMS that day (the clinic's cap: 2)."""
    clinic = rig.ctx.settings.config_dir / "clinics" / "rc.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        "max_per_day = 10", "max_per_day = 2"), encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.ctx.settings)
    now = datetime.now(UTC)
    noon = datetime.combine(now.date() + timedelta(days=2), time(12), UTC)
    starts_in = noon - now  # its two SMS (3 h and 2 h before the visit) on one day
    rig.book(rig.booking(starts_in=starts_in))
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP at test")[0] >= 1
    caps = rig.catalog.clinics["rc"].sms
    real = rig.store._opt_out
    calls: list[str] = []

    def parked(*, keys: Any, args: Any) -> Any:
        if args[5] == "in" and not calls:  # between the opt-in's read and its write
            calls.append("in")
            rig.book(rig.booking(booking_id="R-2", starts_in=starts_in))
            assert _sms_days(rig, "R-2")
        return real(keys=keys, args=args)

    rig.store._opt_out = parked  # type: ignore[method-assign]
    assert rig.store.opt_in("rc", "sms", PHONE, caps=caps, why="START at test")
    assert calls == ["in"]
    days = _sms_days(rig, "R-1", "R-2")
    assert days and max(days.values()) <= caps.max_per_day, days
