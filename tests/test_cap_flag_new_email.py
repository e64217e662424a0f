"""A pending email flagged "s" (an earlier attempt took it by SMS: the patient unsubscribed
from email; the SMS cap counts it as an SMS) whose going by SMS ends because the clinic
re-submits the booking with a new email address, not unsubscribed: it goes by email, to
the new address, and the SMS cap stops counting it (as bfa290e does for an opt-in).

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed (tests/test_send_caps.py's rig)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from tests.test_cap_flag_resubscribe import _retrying_by_sms
from tests.test_cap_flags_upsert import _stored
from tests.test_send_caps import TZ, Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.models import parse_booking
from worker.planner import plan

NEW = "ana.new@example.com"


def _book(rig: Rig, booking_id: str, treatment: str, visit: date, email: str) -> dict[str, Any]:
    """`Rig.book` with email at `email`."""
    doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
           "starts_at": datetime.combine(visit, time(14, 0), TZ).isoformat(),
           "patient": {"name": "Ana López", "phone": "+34600111222", "email": email,
                       "timezone": "Europe/Madrid", "locale": "en",
                       "channels": ["sms", "email"]}}
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(UTC)
    return rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                          rig.catalog.clinics["cap"], now), now)


def _smsv(rig: Rig, booking_id: str) -> int:
    return int(rig.store.redis.hget(rig.store.booking_key("cap", booking_id), "smsv") or 0)


def test_a_new_email_address_ends_an_email_going_by_sms(rig):
    """A-1's care-critical email of D 09:00 goes by SMS (the patient unsubscribed from
    ana@example.com), retrying. The clinic re-submits A-1 with a new address: the email
    goes by email there, so A-2, booked then, keeps its SMS on D 10:00 (the one SMS of D),
    and nothing goes twice."""
    d = rig.day
    _retrying_by_sms(rig)
    before = _smsv(rig, "A-1")
    _book(rig, "A-1", "critmail", d - timedelta(days=1), NEW)
    assert "by_sms" not in _stored(rig, "A-1", "check:email")
    assert _smsv(rig, "A-1") > before  # the cap guards that read A-1 read it again
    _book(rig, "A-2", "morn", d - timedelta(days=1), "ana@example.com")
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10)
    assert rig.send("A-1", "check:email", rig.due("A-1", "check:email")) == "sent"
    rig.deliver_the_rest()
    assert [m.to for m in rig.smtp.snapshot()] == [NEW]
    assert Counter(rig.sent_days) == {d: 1}
    # The gateway was asked for A-1's email by SMS once (refused: 500) and took A-2's SMS.
    assert [status for _, _, status in rig.sms.requests_snapshot()] == [500, 200]
    assert len(rig.sms.snapshot()) == 1
    assert rig.reminder("A-1", "check:email")["status"] == "sent"
    assert rig.reminder("A-2", "morning:sms")["status"] == "sent"


def test_a_new_address_also_unsubscribed_keeps_the_email_going_by_sms(rig):
    """Control: the new address is unsubscribed too: the email still goes by SMS, counted
    as one, so A-2's SMS moves to D+1 (one SMS a day)."""
    d = rig.day
    _retrying_by_sms(rig)
    rig.store.opt_out("cap", "email", NEW, "unsubscribed", critical=rig.catalog.critical_steps)
    _book(rig, "A-1", "critmail", d - timedelta(days=1), NEW)
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"
    _book(rig, "A-2", "morn", d - timedelta(days=1), "ana@example.com")
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=1), 10)
    assert rig.send("A-1", "check:email", rig.due("A-1", "check:email")) == "sent"
    rig.deliver_the_rest()
    assert rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}


def test_the_email_sent_by_sms_while_the_resubmission_is_parked_stays_an_sms(rig, monkeypatch):
    """Forced race: the re-submission with the new address has read A-1 (its email going by
    SMS, to be unflagged) and is parked before its write; meanwhile the email's retry goes,
    by SMS (its begin read the old, unsubscribed address). The write then finds A-1 changed,
    reads it again: the email is sent, by SMS, and stays counted as one, so A-2's SMS moves
    to D+1 (one SMS a day), and nothing goes by email."""
    import worker.store as store_module

    d = rig.day
    _retrying_by_sms(rig)
    real = store_module.reconcile
    calls = {"n": 0}

    def parked(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the re-submission, after its read, before its write
            assert rig.send("A-1", "check:email", rig.due("A-1", "check:email")) == "sent"
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "reconcile", parked)
    _book(rig, "A-1", "critmail", d - timedelta(days=1), NEW)
    assert calls["n"] >= 2  # read again after the send changed A-1
    assert _stored(rig, "A-1", "check:email")["status"] == "sent"
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"
    # A-2 under the old address (unsubscribed): no email to take its SMS's step instead.
    _book(rig, "A-2", "morn", d - timedelta(days=1), "ana@example.com")
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=1), 10)
    rig.deliver_the_rest()
    assert rig.smtp.snapshot() == []
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}
