"""The begin's change of an email's flag "s" (an email going by SMS: counted by the SMS cap)
is seen by the SMS cap's guard of another booking's upsert: the begin bumps `smsv`, as the
opt-in (bfa290e) and the re-submission (01ed5e3) do when they change "s".

Forced races (found by review): booking A-2's upsert of the same patient is parked after its
SMS cap read (`Store._caps_read`); A-1's email is sent through the real send path meanwhile
(its begin flips "s"); A-2's write is then released. Real Redis, a real HTTP SMS gateway and
SMTP server, the real send path with its clock fixed (tests/test_send_caps.py's rig)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tests.test_cap_flag_resubscribe import _retrying_by_sms
from tests.test_cap_flags_upsert import _stored
from tests.test_send_caps import Clock, Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.dispatch import send_claimed
from worker.store import _without_flag


def _park_caps_read(rig: Rig, meanwhile: Callable[[], None]) -> dict[str, int]:
    """Run `meanwhile` once, right after the next upsert's SMS cap read, before its write."""
    real = rig.store._caps_read
    calls = {"n": 0}

    def parked(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            meanwhile()
        return out

    rig.store._caps_read = parked  # type: ignore[method-assign]
    return calls


def test_an_email_taken_by_sms_at_its_begin_is_seen_by_a_parked_upsert(rig):
    """Under-cap: A-2's upsert read A-1's care-critical email of D 09:00 as an email (not
    yet taken by SMS) and found D free; meanwhile A-1's email goes by SMS (the patient
    unsubscribed from email: its begin flags it "s"). A-2's write must see that D now holds
    an SMS: its SMS moves to D+1, one SMS a day. (The unsubscribe flags it itself now; the
    flag is taken off here, as a booking stored by an earlier version holds it, so that its
    begin flips it.)"""
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)  # its email: D 09:00
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)
    key = rig.store.booking_key("cap", "A-1")
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"
    rig.store.redis.hset(key, "check:email", _without_flag(
        rig.store.redis.hget(key, "check:email"), "s"))
    assert _stored(rig, "A-1", "check:email").get("by_sms") is None

    def the_email_goes_by_sms() -> None:
        assert rig.send("A-1", "check:email", rig.local(d, 9)) == "sent"

    calls = _park_caps_read(rig, the_email_goes_by_sms)
    rig.book("A-2", "morn", d - timedelta(days=1))  # its SMS: D 10:00, unless D is taken
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"
    rig.deliver_the_rest()
    assert rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}
    assert rig.reminder("A-2", "morning:sms")["sent_at"].startswith(
        str(d + timedelta(days=1)))
    assert calls["n"] >= 2  # read again: A-1 changed what the cap counts


def test_an_email_going_by_email_again_at_its_begin_is_seen_by_a_parked_upsert(rig):
    """Over-cap: A-1's email went by SMS at an earlier attempt (flag "s", retrying) and is
    claimed again when the patient subscribes to email again (the opt-in unflags only what
    is not being sent). A-2's upsert reads it as an SMS on D and is parked; A-1's begin finds
    the address subscribed: it goes by email, unflagged. A-2's write must see D free again:
    its SMS stays on D 10:00 (nothing moved needlessly)."""
    d = rig.day
    _retrying_by_sms(rig)
    ref = "cap/A-1/check:email"
    at = rig.due("A-1", "check:email")
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    (claim,) = [c for c in rig.store.claim_due(100, 300) if c.ref == ref]
    rig.store.opt_in("cap", "email", "ana@example.com", why="subscribed again",
                     critical=rig.catalog.critical_steps)
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"  # being sent: kept

    def the_email_goes_by_email() -> None:
        Clock.at = at
        assert send_claimed(rig.ctx, ref, claim.version, claim.claim) == "sent"

    calls = _park_caps_read(rig, the_email_goes_by_email)
    rig.book("A-2", "morn", d - timedelta(days=1))
    assert "by_sms" not in _stored(rig, "A-1", "check:email")
    assert [m.to for m in rig.smtp.snapshot()] == ["ana@example.com"]
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10)
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d: 1}
    assert calls["n"] >= 2  # read again: A-1 changed what the cap counts
