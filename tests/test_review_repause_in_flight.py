"""A move's notice names the day the pause message goes again when the pause SMS was at the
gateway as the move landed (review of 631055b; real Redis, a real HTTP SMS gateway, the real
send path with its clock fixed and its hand-over parked at the seam; the rig of
tests/test_review_repause_window.py).

Being sent, not sent, when the move was written, the pause SMS gets no `repause#<seq>`: the
plan's own pause reminder carries it again (rescheduled to the new plan's time, the SMS cap
applied; the delivery recorded beside it). The notice (the pause went: "you may use it until
<day>, then stop again") found no repause and worked the pause step's time out afresh,
uncapped: with a pause step that is not care-critical and the patient's other booking
holding that day, it named a day before the one the pause message then came on."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import tests.test_send_caps_notices as cn
import worker.dispatch as dispatch
from tests.test_review_repause_window import rig as rig  # noqa: F401  (the fixture)


def test_the_notice_names_the_day_the_plans_own_pause_sms_goes_again(rig, monkeypatch):
    """SMS-only, 1 SMS a day, a pause step not care-critical. A-2's SMS is on D+1 19:00. A-1's
    pause SMS (visit D+7) is at the gateway on D 18:00 when the visit moves to D+8: its pause
    goes again by the plan on D+1 18:00, moved by the SMS cap to D+2 18:00. The SMS then
    goes. The notice must name D+2, the day the pause message comes."""
    d = rig.day
    cn.book(rig, "A-1", "pausenc", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    rig.book("A-2", "eve", d)  # its SMS on D+1 19:00
    real = dispatch.deliver
    arrived, release = threading.Event(), threading.Event()

    def at_the_gateway(*args: Any, **kwargs: Any) -> Any:
        arrived.set()
        assert release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", at_the_gateway)
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", rig.send("A-1", "stop:sms", rig.local(d, 18))))
    thread.start()
    assert arrived.wait(10)
    cn.book(rig, "A-1", "pausenc", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    release.set()
    thread.join(20)
    monkeypatch.setattr(dispatch, "deliver", real)
    assert out["r"] == "sent"
    assert cn.keys(rig, "A-1", "repause#") == []  # the plan's own pause SMS carries it
    again_at = rig.local(d + timedelta(days=2), 18)
    assert rig.due("A-1", "stop:sms") == again_at, rig.reminder("A-1", "stop:sms")
    (notice,) = cn.keys(rig, "A-1", "rescheduled#")
    assert rig.send("A-1", notice, rig.local(d, 19)) == "sent"
    told = rig.sms.snapshot()[-1].text
    rig.send("A-2", "evening:sms", rig.local(d + timedelta(days=1), 19))
    assert rig.send("A-1", "stop:sms", again_at) == "sent"
    assert "stop" in rig.sms.snapshot()[-1].text.lower()
    day = again_at.astimezone(cn.TZ)
    assert f"until {day.day} {day:%b}, then stop again" in told, (told, day)
