"""Which date a change notice names when a message before the visit went around a change
(real Redis, real Apprise, a real HTTP gateway for SMS and email; the rig of
tests/test_notices_sms.py). Found by review of `_told_by` (worker/store.py) and the send's
`went` (worker/dispatch.py):

- a plan's own reminder counted as telling the new date by its record's version, not by
  the version its words went for: an attempt rendered for the old date, parked at the
  provider while the clinic moved the visit, then delivered, was recorded as sent under
  the move's version and counted as telling the new date;
- a plan's own reminder in flight at a change was stored in `untold` by its step alone, so
  the send read its copy on the other channel, sent for the earlier date, as "went".
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from tests import test_notices_sms as ns
from worker.dispatch import send_claimed

gate = ns.gate  # fixtures
rig = ns.rig


def _park(rig, ref: str) -> tuple[threading.Thread, list[str]]:
    """Send `ref` in a thread, parked at the gateway until `rig.gate.answer`."""
    rig.gate.reset()
    claim = rig.claim(ref)
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(send_claimed(
        rig.ctx, ref, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), f"{ref} never reached the gateway"
    return thread, out


def _said(body: dict[str, Any]) -> str:
    return f"{body.get('title', '')} {body['message']}"


def test_a_stale_delivery_for_the_old_date_does_not_tell_the_new_one(rig):
    """The day-before SMS for 5 days out ("see you on <5 days>") is at the gateway when the
    clinic moves the visit to 12 days and takes the patient to email only (the SMS step no
    longer planned); it is delivered. The move's email notice waits for its retry; the
    clinic cancels: the patient, told only the first date, hears that one is cancelled."""
    first, moved = rig.doc(5), rig.doc(12, channels=("email",))
    rig.book(first)
    thread, out = _park(rig, ns.DAY_BEFORE)
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.gate.answer(200)
    thread.join(15)
    assert out and out[0] == "sent", out
    assert ns.names(rig.texts()[-1], first["starts_at"])  # the old date went
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    rig.gate.status = 200
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    (key,) = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    before = len(rig.gate.bodies)
    assert rig.send(f"sk/M-1/{key}") == "sent"
    (body,) = rig.gate.bodies[before:]
    assert ns.names(_said(body), first["starts_at"]), body
    assert not ns.names(_said(body), moved["starts_at"]), body


def test_the_other_channels_copy_for_the_old_date_is_not_the_new_date_told(rig):
    """Told 5 days out by email (confirmation, day-before email); moved to 12 days and given
    SMS too: the email notice waits for its retry, and the day-before SMS for the new date is
    at the gateway when the clinic cancels; the gateway refuses it. The patient never heard
    of 12 days: the cancel names 5 days, not because the day-before went by email (for 5)."""
    both = ("sms", "email")
    first, moved = rig.doc(5, channels=("email",)), rig.doc(12, channels=both)
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    assert rig.send("sk/M-1/day-before:email") == "sent"
    rig.book(moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    rig.gate.status = 503
    assert rig.send("sk/M-1/rescheduled#1:email") == "retrying"
    thread, out = _park(rig, ns.DAY_BEFORE)
    assert ns.names(rig.texts()[-1], moved["starts_at"])
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    rig.gate.answer(400)
    thread.join(15)
    assert out and out[0] == "failed", out
    rig.gate.answer(200)
    scheduled = [k for k, r in ns.notices(rig.reminders()).items() if r["status"] == "scheduled"]
    assert scheduled, rig.reminders()
    for key in scheduled:
        before = len(rig.gate.bodies)
        assert rig.send(f"sk/M-1/{key}") == "sent", key
        (body,) = rig.gate.bodies[before:]
        assert ns.names(_said(body), first["starts_at"]), (key, body)
        assert not ns.names(_said(body), moved["starts_at"]), (key, body)
