"""The SMS cap counts a held booking's hold notice still to go (real Redis, the real send path
to a real HTTP SMS gateway; the rig of tests/test_replan_caps.py): it is the one message a
hold sends, so it goes while the booking is held, and the patient's other bookings must
count it. Left out (a held booking's SMS counted only once sent), another booking planned
before it went kept an SMS on its day: two SMS that day."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, time

from tests.test_replan_caps import PHONE, TZ, day
from tests.test_replan_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_replan_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan


def test_a_held_bookings_hold_notice_still_to_go_counts_for_the_patients_other_bookings(rig):
    """M-1 is booked at X 22:00 and held (a recent isotretinoin dose): its hold notice by SMS
    waits for the send window, X+1 09:00. M-2, booked at 22:30, has its SMS on X+1 18:00 (the
    day before its visit): it must give way (one SMS a day; here no day before the visit has
    room: skipped, saying so), not go beside the hold notice."""
    folder = rig.settings.config_dir / "protocols"
    (folder / "eve3.toml").write_text((folder / "eve2.toml").read_text(encoding="utf-8").replace(
        'name = "Two texts"', 'name = "Two texts"\nisotretinoin_washout_days = 182'),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    now = rig.at(0, 22)
    booking = parse_booking({
        "clinic": "rp", "booking_id": "M-1", "treatment": "eve3",
        "starts_at": datetime.combine(day(rig, 6), time(14, 30), TZ).isoformat(),
        "patient": {"name": "Ana López", "phone": PHONE, "timezone": "Europe/Madrid",
                    "locale": "en", "channels": ["sms"]},
        "medications": {"tretinoin": False, "retinol": False,
                        "isotretinoin_last_dose": day(rig, -30).isoformat()}}, rig.catalog)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["eve3"],
                                   rig.catalog.clinics["rp"], now), now)
    assert rig.store.timeline("rp", "M-1")["status"] == "held"
    assert rig.due("hold-notice:sms") == rig.at(1, 9)
    rig.book("M-2", 2, rig.at(0, 22, 30), treatment="pre")  # its SMS: X+1 18:00 if it fits
    assert rig.send("M-1", "hold-notice:sms", rig.at(1, 9)) == "sent"
    r = rig.reminders("M-2")["pre:sms"]
    if r["status"] == "scheduled":
        rig.send("M-2", "pre:sms", rig.due("pre:sms", "M-2"))
    assert max(Counter(d for d, _ in rig.sent).values()) == 1, (rig.sent, r)
    assert r["status"] == "skipped" and "SMS limit" in r["reason"], r
