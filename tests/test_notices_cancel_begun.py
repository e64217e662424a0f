"""A cancel once the visit has begun tells an SMS patient nothing (real Redis; the rig of
tests/test_notices_sms.py): "see you tomorrow at 14:30" by SMS makes a move or a cancel before
the visit worth an SMS, but a booking cancelled after its start (a no-show, aftercare stopped)
got "your 5 Dec visit is cancelled. Call the clinic." about a visit already past."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests import test_notices_sms as ns

gate = ns.gate  # fixtures
rig = ns.rig


def cancel_at(rig, at: datetime) -> dict:
    rig.store.cancel("sk", "M-1", at)
    return ns.notices(rig.reminders())


def test_a_cancel_after_the_visit_began_sends_no_sms_notice(rig):
    doc = rig.doc(5)
    rig.book(doc)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    start = datetime.fromisoformat(doc["starts_at"])
    assert cancel_at(rig, start + timedelta(hours=3)) == {}


def test_a_cancel_just_before_the_visit_still_tells_the_patient_by_sms(rig):
    doc = rig.doc(5)
    rig.book(doc)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    start = datetime.fromisoformat(doc["starts_at"])
    assert list(cancel_at(rig, start - timedelta(hours=3))) == ["cancelled#1:sms"]
