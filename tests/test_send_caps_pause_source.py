"""The pause message again for a new date (`repause`) is care-critical by the booking's own
stored plan, at send time as in the store's scripts (real Redis, a real HTTP SMS gateway, the
real send path with its clock fixed; the rig of tests/test_send_caps_notices.py).

A repause names no step of its own: it stands for the pause step of the plan it was made
from, which the store keeps with the booking (`ns`) and its scripts read (`is_critical`:
by SMS for a patient unsubscribed from email). The send path's SMS cap (worker/dispatch.py
`_capped`) read the pause step of the protocol as configured now: once the clinic changed
which step pauses (a config edit, the booking not sent again), the two disagreed, and the
repause of the care-critical pause step was capped as an ordinary SMS (moved a day on)."""

from __future__ import annotations

from datetime import timedelta

import tests.test_send_caps_notices as cn
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer

rig = cn.rig  # fixture


def test_the_repause_is_care_critical_by_the_bookings_stored_pause_step(rig):
    """As tests/test_send_caps_notices.py's repause test, but after the move the clinic's
    protocol no longer marks its step as the pause step (`pause = true` dropped; the step
    still care-critical). The booking's repause still stands for that step: its retry lands
    on D+2 09:00 beside A-2's SMS and goes there beyond the cap, saying so."""
    d = rig.day
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    assert rig.send("A-1", "stop:sms", rig.local(d, 18)) == "sent"
    cn.book(rig, "A-1", "pause", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    (again,) = cn.keys(rig, "A-1", "repause#")
    rig.book("A-2", "morn", d + timedelta(days=1))
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 10)
    # The clinic's config edit: no step pauses now (the booking is not sent again).
    path = rig.settings.config_dir / "protocols" / "pause.toml"
    text = path.read_text(encoding="utf-8")
    assert "pause = true\n" in text
    path.write_text(text.replace("pause = true\n", ""), encoding="utf-8")
    rig.catalog = Catalog.load(rig.settings)
    assert rig.catalog.protocols["pause"].pause_step() is None
    assert "pause/stop" in rig.catalog.critical_steps.split()
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))
    rig.sms.status = 503
    assert rig.send("A-1", again, rig.local(d + timedelta(days=1), 19, 55)) == "retrying"
    rig.sms.status = 200
    r = rig.reminder("A-1", again)
    assert r["status"] == "retrying", r
    assert rig.due("A-1", again) == rig.local(d + timedelta(days=2), 9), r
    assert "care-critical" in r["reason"], r
