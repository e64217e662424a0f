"""A clinic's send window as edited applies to the bookings already stored (found by review;
real Redis, a real HTTP SMS gateway, the real send path with its clock fixed; the rig of
tests/test_send_caps.py).

The send path applied the window each booking was planned under (kept with the booking),
not the clinic's as configured now. A clinic that narrows its window (a patient's
complaint; a window `reminders check` refuses as US quiet hours, corrected) saw every
booking it had already stored go on texting in the old hours, for as long as those
bookings last (a series of weeks; visits booked up to two years ahead), unless each was
sent again. Now every attempt checks the window the clinic has now: outside it, the
reminder waits for its next opening (or is skipped past its expiry), as README's
`[send_window]` says.
"""

from __future__ import annotations

from datetime import timedelta

from tests.test_send_caps import Rig, rig, sinks  # noqa: F401  (fixtures)
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer


def edit_window(rig: Rig, old: str, new: str) -> None:  # noqa: F811
    """The clinic's config edit, read by the send path as a running worker reads it."""
    path = rig.settings.config_dir / "clinics" / "cap.toml"
    text = path.read_text(encoding="utf-8")
    assert old in text, text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    rig.catalog = Catalog.load(rig.settings)
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))


def test_an_sms_planned_before_the_clinic_narrowed_its_window_waits_for_the_new_opening(
        rig):  # noqa: F811
    """Window 09:00-20:00: A-1's SMS is planned for D+1 19:00. The clinic then closes its
    window at 18:00. At 19:00 the SMS is not sent: it waits for D+2 09:00, saying why, and
    goes then."""
    d = rig.day
    rig.book("A-1", "eve", d)
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 19)
    edit_window(rig, 'end = "20:00"', 'end = "18:00"')
    assert rig.catalog.clinics["cap"].send_window.describe() == "09:00-18:00"

    result = rig.send("A-1", "evening:sms", rig.local(d + timedelta(days=1), 19))
    assert rig.sms.snapshot() == [], "texted at 19:00, outside the clinic's 09:00-18:00"
    assert result == "deferred"
    r = rig.reminder("A-1", "evening:sms")
    assert r["status"] == "scheduled"
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=2), 9)
    assert "outside the send window 09:00-18:00" in r["reason"], r["reason"]

    assert rig.send("A-1", "evening:sms", rig.local(d + timedelta(days=2), 9)) == "sent"
    assert len(rig.sms.snapshot()) == 1
    assert rig.sent_days == [d + timedelta(days=2)]


def test_a_window_corrected_out_of_quiet_hours_stops_the_early_texts_already_planned(
        rig):  # noqa: F811
    """A clinic's window of 07:00-22:00 (which `reminders check` refuses, but the worker
    takes): A-2's morning SMS is planned for D+1 10:00 and fails at once (HTTP 503); its
    retry falls after 22:00, so it waits for 07:00 the next morning. The clinic corrects its
    window to 09:00-20:00 meanwhile: the retry found at 07:00 waits for 09:00."""
    edit_window(rig, 'start = "09:00"\nend = "20:00"', 'start = "07:00"\nend = "22:00"')
    d = rig.day
    rig.book("A-2", "morn", d)
    rig.sms.status = 503
    assert rig.send("A-2", "morning:sms", rig.local(d + timedelta(days=1), 21, 55)) == \
        "retrying"
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 7)
    rig.sms.status = 200
    edit_window(rig, 'start = "07:00"\nend = "22:00"', 'start = "09:00"\nend = "20:00"')

    result = rig.send("A-2", "morning:sms", rig.local(d + timedelta(days=2), 7))
    assert [m for m in rig.sms.snapshot()] == [], "texted at 07:00, outside 09:00-20:00"
    assert result == "deferred"
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 9)
    assert rig.send("A-2", "morning:sms", rig.local(d + timedelta(days=2), 9)) == "sent"
    assert len(rig.sms.snapshot()) == 1
