"""A move's notice names the day the pause message goes again, as stored (found by review of
cac56ac; real Redis, a real HTTP SMS gateway, the real send path with its clock fixed; the
rig of tests/test_send_caps_notices.py).

The pause message again (`repause`) is placed at the move by that plan, in the clinic's send
window then, and capped by the patient's SMS limit; the send path then keeps to the clinic's
window as it is when the message goes (worker/dispatch.py `_booking`). The notice's "you may
use it until <day>, then stop again" (worker/notices.py `pause_from`) placed the pause step
afresh in the clinic's window as configured when the notice goes, uncapped: after a config
edit of the window (the booking not sent again), or when the SMS cap moved a pause SMS that
is not care-critical a day on, the notice named another day than the one the pause message
then came on.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

import tests.test_send_caps as caps
import tests.test_send_caps_notices as cn
from tests.sinks import HttpSink, SmtpSink
from tests.test_send_caps import Rig, _Fixed
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer


@pytest.fixture
def rig(tmp_path, redis_client, monkeypatch) -> Iterator[Rig]:
    """The rig of tests/test_send_caps_notices.py, with "pausenc": its pause step as a clinic
    may write it (the shipped demo protocol's is so), not care-critical."""
    monkeypatch.setitem(caps.PROTOCOLS, "pause", cn.PAUSE)
    monkeypatch.setitem(caps.PROTOCOLS, "pausenc",
                        cn.PAUSE.replace("care_critical = true\n", ""))
    monkeypatch.setattr("worker.dispatch.datetime", _Fixed)
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield Rig(tmp_path / "config", redis_client, smtp, sms)
    smtp.stop()
    sms.stop()


def test_the_move_notice_names_the_repause_day_after_the_clinic_edits_its_window(rig):
    """Window 09:00-20:00. The pause SMS went on D 18:00 for a visit on D+7; the visit moves to
    D+8 and the pause goes again on D+1 18:00 as planned. The clinic then closes its window at
    18:00 (a config edit; the booking not sent again). The send path keeps to the window as
    edited (tests/test_window_edit_at_send.py): the notice found on D 19:00 waits for D+1
    09:00, and the pause message found on D+1 18:00 for D+2 09:00. The notice names the day
    the pause message comes, D+2: not D+1, the day it was planned for."""
    d = rig.day
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    assert rig.send("A-1", "stop:sms", rig.local(d, 18)) == "sent"
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    (notice,) = cn.keys(rig, "A-1", "rescheduled#")
    (again,) = cn.keys(rig, "A-1", "repause#")
    assert rig.due("A-1", again) == rig.local(d + timedelta(days=1), 18)
    # The clinic's config edit: its window now closes at 18:00 (the booking not sent again).
    path = rig.settings.config_dir / "clinics" / "cap.toml"
    text = path.read_text(encoding="utf-8")
    assert 'end = "20:00"\n' in text
    path.write_text(text.replace('end = "20:00"\n', 'end = "18:00"\n'), encoding="utf-8")
    rig.catalog = Catalog.load(rig.settings)
    assert rig.catalog.clinics["cap"].send_window.describe() == "09:00-18:00"
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))
    texts = len(rig.sms.snapshot())
    assert rig.send("A-1", notice, rig.local(d, 19)) == "deferred"
    assert rig.due("A-1", notice) == rig.local(d + timedelta(days=1), 9)
    assert rig.send("A-1", notice, rig.local(d + timedelta(days=1), 9)) == "sent"
    told = rig.sms.snapshot()[-1].text
    # The pause message waits for the window as edited: D+2 09:00.
    assert rig.send("A-1", again, rig.local(d + timedelta(days=1), 18)) == "deferred"
    repause_at = rig.local(d + timedelta(days=2), 9)
    assert rig.due("A-1", again) == repause_at
    assert rig.send("A-1", again, repause_at) == "sent"
    assert "stop" in rig.sms.snapshot()[-1].text.lower()
    assert len(rig.sms.snapshot()) == texts + 2  # nothing went outside 09:00-18:00
    day = repause_at.astimezone(cn.TZ)
    assert f"until {day.day} {day:%b}, then stop again" in told, (told, day)


def test_the_move_notice_names_the_day_the_sms_cap_moved_the_pause_message_to(rig):
    """SMS-only patient, 1 SMS a day, a pause step that is not care-critical. The pause SMS
    went on D 18:00 for a visit on D+7; A-2's SMS is on D+1 19:00; the visit moves to D+8:
    the pause goes again on D+1 18:00 by the protocol, but the SMS cap moves it to D+2 18:00.
    The notice said "until <D+1>, then stop again" (the email: "We will remind you that
    day") while the pause message came on D+2: it must name D+2."""
    d = rig.day
    cn.book(rig, "A-1", "pausenc", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    assert rig.send("A-1", "stop:sms", rig.local(d, 18)) == "sent"
    rig.book("A-2", "eve", d)  # its SMS on D+1 19:00
    cn.book(rig, "A-1", "pausenc", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    (notice,) = cn.keys(rig, "A-1", "rescheduled#")
    (again,) = cn.keys(rig, "A-1", "repause#")
    repause_at = rig.local(d + timedelta(days=2), 18)
    assert rig.due("A-1", again) == repause_at, rig.reminder("A-1", again)
    assert rig.send("A-1", notice, rig.local(d, 19)) == "sent"
    told = rig.sms.snapshot()[-1].text
    rig.send("A-2", "evening:sms", rig.local(d + timedelta(days=1), 19))
    assert rig.send("A-1", again, repause_at) == "sent"
    assert [m.text for m in rig.sms.snapshot()].count(told) == 1
    day = repause_at.astimezone(cn.TZ)
    assert f"until {day.day} {day:%b}, then stop again" in told, (told, day)
