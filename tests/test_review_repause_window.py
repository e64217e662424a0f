"""A move's notice names the day the pause message goes again by the send window the
booking's plan was placed in (found by review of cac56ac; real Redis, a real HTTP SMS
gateway, the real send path with its clock fixed; the rig of tests/test_send_caps_notices.py).

The pause message again (`repause`) is placed, at the move, in the send window of that plan,
which the store keeps with the booking (`window`) and the send path applies to it
(worker/dispatch.py `_booking`). The notice's "you may use it until <day>, then stop again"
(worker/notices.py `pause_from`) placed the pause in the clinic's window as configured when
the notice goes: once the clinic edited its window after the move (the booking not sent
again), the notice named another day than the one the pause message then came on.
"""

from __future__ import annotations

from datetime import timedelta

import tests.test_send_caps_notices as cn
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer

rig = cn.rig  # fixture


def test_the_move_notice_names_the_repause_day_after_the_clinic_edits_its_window(rig):
    """Window 09:00-20:00. The pause SMS went on D 18:00 for a visit on D+7; the visit moves to
    D+8 and the pause goes again on D+1 18:00. The clinic then closes its window at 18:00
    (a config edit). The notice, sent on D 19:00, said "until <D+2>" (18:00 placed on the
    next morning by the new window) while the pause message came on D+1 18:00, placed and
    sent by the booking's own window: it must name D+1."""
    d = rig.day
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    assert rig.send("A-1", "stop:sms", rig.local(d, 18)) == "sent"
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    (notice,) = cn.keys(rig, "A-1", "rescheduled#")
    (again,) = cn.keys(rig, "A-1", "repause#")
    repause_at = rig.local(d + timedelta(days=1), 18)
    assert rig.due("A-1", again) == repause_at
    # The clinic's config edit: its window now closes at 18:00 (the booking not sent again).
    path = rig.settings.config_dir / "clinics" / "cap.toml"
    text = path.read_text(encoding="utf-8")
    assert 'end = "20:00"\n' in text
    path.write_text(text.replace('end = "20:00"\n', 'end = "18:00"\n'), encoding="utf-8")
    rig.catalog = Catalog.load(rig.settings)
    assert rig.catalog.clinics["cap"].send_window.describe() == "09:00-18:00"
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))
    assert rig.send("A-1", notice, rig.local(d, 19)) == "sent"
    told = rig.sms.snapshot()[-1].text
    # The pause message goes when the booking's window says, on D+1 at 18:00.
    assert rig.send("A-1", again, repause_at) == "sent"
    assert "stop" in rig.sms.snapshot()[-1].text.lower()
    day = repause_at.astimezone(cn.TZ)
    assert f"until {day.day} {day:%b}, then stop again" in told, (told, day)
