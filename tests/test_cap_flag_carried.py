"""A care-critical email left to go by SMS (flag "s": the patient unsubscribed from email,
and the step's own SMS did not carry it) whose own SMS then carries the step again is no
longer an SMS to the cap: its begin skips it ("the SMS of this step carries it"), so only
its own SMS goes. With its flag left, the SMS cap of the patient's other bookings counted
the step twice on its day (found by review).

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock fixed
(tests/test_send_caps.py's rig: one SMS a day, three in any seven days); the unsubscribe
through `Store.opt_out` with the re-cap, as the unsubscribe route calls it."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from tests.test_cap_flags_upsert import _stored
from tests.test_send_caps import Rig, step
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog


def test_an_email_whose_own_sms_carries_its_step_again_is_not_counted_as_an_sms(rig: Rig):
    """A-1's SMS takes D 10:00 (`morn`); A-2's care-critical check of D 09:00 goes on both
    channels (`critboth`), so its SMS, without room on D, is skipped ("its email goes").
    The patient unsubscribes from email: the check's email is left to go by SMS (flag "s"),
    and the re-cap moves A-1's SMS to D+1 and gives the check its SMS back on D (counted
    first); the email, carried by that SMS, kept its flag. A-3, booked then, has its SMS
    on D+3 19:00: D, D+1 and D+3 are three texts in seven days, within the cap; counting
    the check twice on D, it was moved to D+7, four days late."""
    (rig.settings.config_dir / "protocols" / "critboth.toml").write_text(
        step("check", 1, "09:00", '["sms", "email"]', "week-check", critical=True),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    rig.book("A-1", "morn", d - timedelta(days=1), email=True)
    rig.book("A-2", "critboth", d - timedelta(days=1), email=True)
    assert rig.reminder("A-2", "check:sms")["status"] == "skipped"
    assert rig.reminder("A-2", "check:email")["status"] == "scheduled"
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps, replan=rig.catalog.replan)
    assert rig.due("A-1", "morning:sms") == rig.local(d + timedelta(days=1), 10)
    check = rig.reminder("A-2", "check:sms")
    assert check["status"] == "scheduled" and rig.due("A-2", "check:sms") == rig.local(d, 9)
    email = rig.reminder("A-2", "check:email")
    assert email.get("via") != "sms", email  # its begin skips it: the SMS carries the step
    assert _stored(rig, "A-2", "check:email").get("by_sms") is None
    rig.book("A-3", "eve", d + timedelta(days=2), email=True)  # its SMS: D+3 19:00
    evening = rig.reminder("A-3", "evening:sms")
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-3", "evening:sms") == rig.local(d + timedelta(days=3), 19), evening
    # Everything still to go, each at its time: the check's email is skipped at its begin.
    while pending := sorted((rig.due(b, r["id"]), b, r["id"]) for b in ("A-1", "A-2", "A-3")
                            for r in rig.store.timeline("cap", b)["reminders"]
                            if r["status"] in ("scheduled", "retrying")):
        at, booking_id, key = pending[0]
        assert rig.send(booking_id, key, at) == (
            "dropped: carried by its own sms" if key == "check:email" else "sent"), key
    email = rig.reminder("A-2", "check:email")
    assert email["status"] == "skipped" and "carries it" in email["reason"], email
    assert len(rig.sms.snapshot()) == 3 and rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1,
                                      d + timedelta(days=3): 1}, rig.sent_days
