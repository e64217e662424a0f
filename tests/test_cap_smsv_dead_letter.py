"""An SMS dead-lettered (or skipped) at its send is seen by the SMS cap's guard of another
booking's upsert that read it before: the finish bumps `smsv` for every outcome of an SMS,
not only those that move it. A failed or skipped SMS no longer counts for the cap (neither
sent nor to go: `_sms_slots`), so the patient's other booking planned in the meantime kept
its SMS moved a day for an SMS that never went, its reason naming a limit not reached.

Forced race (found by review of bbfadfb): booking A-2's upsert is parked after its SMS cap
read (`Store._caps_read`); A-1's SMS of the same day is sent through the real send path
meanwhile and refused for good (HTTP 400: dead-lettered); A-2's write is then released.
Real Redis, a real HTTP SMS gateway, the real send path with its clock fixed
(tests/test_send_caps.py's rig)."""

from __future__ import annotations

from datetime import timedelta

from tests.test_cap_flag_begin_smsv import _park_caps_read
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401


def test_an_sms_dead_lettered_after_a_parked_upserts_cap_read_frees_its_day(rig):
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))  # its SMS: D 19:00
    assert rig.due("A-1", "evening:sms") == rig.local(d, 19)

    def the_sms_is_refused_for_good() -> None:
        rig.sms.status = 400
        assert rig.send("A-1", "evening:sms", rig.local(d, 19)) == "failed"
        rig.sms.status = 200

    calls = _park_caps_read(rig, the_sms_is_refused_for_good)
    rig.book("A-2", "morn", d - timedelta(days=1))  # its SMS: D 10:00, unless D is taken
    assert rig.reminder("A-1", "evening:sms")["status"] == "failed"
    morning = rig.reminder("A-2", "morning:sms")
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10), morning["reason"]
    assert "limit" not in (morning["reason"] or "")
    assert calls["n"] >= 2  # read again: A-1's SMS no longer counts
    rig.deliver_the_rest()
    assert rig.sent_days == [d]


def test_control_an_sms_dead_lettered_before_the_upsert_frees_its_day(rig):
    """The same without the race: A-1's dead letter is not counted; A-2's SMS stays on D."""
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))
    rig.sms.status = 400
    assert rig.send("A-1", "evening:sms", rig.local(d, 19)) == "failed"
    rig.sms.status = 200
    rig.book("A-2", "morn", d - timedelta(days=1))
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10)
