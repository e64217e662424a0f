"""The SMS cap counts a care-critical email step that goes by SMS to a patient unsubscribed
from email (worker/store.py `_BEGIN_SEND` "ok sms") on the day it goes, as the README says
an email sent by SMS counts, and counted first, as a care-critical SMS is: the booking's
other SMS give way to it. Counted only once it had gone, the patient unsubscribed before
the booking was stored got two SMS on one day from a clinic whose cap is one a day.

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed (tests/test_send_caps.py's rig); the unsubscribe through `Store.opt_out`, as the
unsubscribe route calls it."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from tests.test_send_caps import ADVICE, Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog

# The day after the visit: the care-critical check by email at 09:00 (by SMS to a patient
# unsubscribed from email), and a plain SMS at 19:00 that may move (late until 10 days).
PROTOCOL = """
name = "Check and evening"
[[steps]]
id = "check"
day = 1
time = "09:00"
channels = ["email"]
template = "week-check"
late = "send"
late_until = "10d"
care_critical = true
[[steps]]
id = "evening"
day = 1
time = "19:00"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
""" + ADVICE


def _deliver(rig: Rig, booking_id: str) -> None:
    """Send every reminder of the booking still to go, each at its stored due time."""
    while True:
        pending = sorted((rig.due(booking_id, r["id"]), r["id"])
                         for r in rig.store.timeline("cap", booking_id)["reminders"]
                         if r["status"] in ("scheduled", "retrying"))
        if not pending:
            return
        at, key = pending[0]
        assert rig.send(booking_id, key, at) == "sent", rig.reminder(booking_id, key)


def test_a_care_critical_email_going_by_sms_takes_its_day_from_the_other_sms(rig):
    (rig.settings.config_dir / "protocols" / "twice.toml").write_text(PROTOCOL,
                                                                      encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.book("A-1", "twice", d - timedelta(days=1), email=True)
    check = rig.reminder("A-1", "check:email")
    assert check["status"] == "scheduled" and rig.due("A-1", "check:email") == rig.local(d, 9)
    evening = rig.reminder("A-1", "evening:sms")
    # D's one SMS is the care-critical check's: the evening SMS gives way (no email: the
    # patient unsubscribed), to the next day with room, saying why.
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 19), evening
    assert "moved to" in evening["reason"] and "1 a day" in evening["reason"], evening
    _deliver(rig, "A-1")
    texts = rig.sms.snapshot()
    assert len(texts) == 2 and rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days
    assert rig.store.attempts("cap/A-1/check:email")[-1]["via"].startswith("sms:")
