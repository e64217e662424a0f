"""A pending email flagged "s" (went by SMS at an earlier attempt, counted as an SMS by the
SMS cap) whose going by SMS ended before it is sent (real Redis, a real HTTP SMS gateway,
the real send path; see tests/test_send_caps.py for the rig): the patient subscribes to
email again, so it goes by email, and the SMS cap stops counting it."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from tests.test_cap_flags_upsert import _stored
from tests.test_send_caps import Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401


def _retrying_by_sms(rig: Rig) -> None:
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)  # its email: D 09:00
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.sms.status = 500
    assert rig.send("A-1", "check:email", rig.local(d, 9)) == "retrying"
    rig.sms.status = 200
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"


def test_resubscribed_email_is_not_counted_as_an_sms(rig):
    """A-1's care-critical email goes by SMS (unsubscribed from email), retrying. The
    patient subscribes to email again: it will go by email. A-2, booked then, keeps its SMS
    on D 10:00 (the one SMS of D)."""
    d = rig.day
    _retrying_by_sms(rig)
    rig.store.opt_in("cap", "email", "ana@example.com", why="subscribed again",
                     critical=rig.catalog.critical_steps)
    rig.book("A-2", "morn", d - timedelta(days=1))  # its SMS: D 10:00, unless D is taken
    assert rig.send("A-1", "check:email", rig.due("A-1", "check:email")) == "sent"
    rig.deliver_the_rest()
    assert rig.smtp.snapshot()
    assert Counter(rig.sent_days) == {d: 1}
