"""An email unsubscribe caps the patient's bookings at the clinic again, as a re-submission
of each would (`Store.opt_out`'s `replan`; the unsubscribe route gives it): an SMS that the
cap sent by email instead (no room on its day) was lost when the patient then unsubscribed
from email (the email skipped at its begin, the SMS gone): a patient without email would
have had it on a later day with room. And a care-critical email left to go by SMS takes
its day from the patient's other SMS of that day, as if the booking were written now.

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed (tests/test_send_caps.py's rig; cap: one SMS a day). A-1's SMS of D 10:00 (`morn`)
takes D; A-2's of D 19:00 (`eve`) goes by email, both visits on D-1."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from tests.test_cap_unsub_by_sms import _deliver_all, _one_text_a_day
from tests.test_send_caps import Rig, park_sends, send_in_thread
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401


def _unsubscribe(rig: Rig) -> None:
    rig.store.opt_out("cap", "email", "ana@example.com", "the patient unsubscribed",
                      critical=rig.catalog.critical_steps, replan=rig.catalog.replan)


def _by_email(rig: Rig) -> None:
    d = rig.day
    rig.book("A-1", "morn", d - timedelta(days=1), email=True)
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    assert rig.due("A-1", "morning:sms") == rig.local(d, 10)
    email = rig.reminder("A-2", "evening:email")
    assert email["status"] == "scheduled" and "by email" in email["reason"], email


def _moved(rig: Rig, day: int = 1) -> None:
    """A-2's SMS goes on D+`day` at 19:00, saying why; its email is not to go."""
    evening = rig.reminder("A-2", "evening:sms")
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-2", "evening:sms") == rig.local(rig.day + timedelta(days=day), 19)
    assert "moved to" in evening["reason"] and "1 a day" in evening["reason"], evening
    assert rig.reminder("A-2", "evening:email")["status"] not in ("scheduled", "retrying")


def test_an_sms_sent_by_email_instead_goes_by_sms_on_a_day_with_room_after_an_unsubscribe(rig):
    d = rig.day
    _by_email(rig)
    _unsubscribe(rig)
    _moved(rig)
    _deliver_all(rig, "A-1", "A-2")
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 2
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days


def test_an_unsubscribe_moves_another_bookings_sms_off_the_day_of_an_email_going_by_sms(rig):
    """A-1's care-critical check of D 09:00 goes by email, A-2's SMS takes D 19:00; the
    patient unsubscribes: the check goes by SMS on D, counted first, and A-2's SMS moves to
    D+1 (before, nothing capped again: two texts on D)."""
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)
    assert rig.due("A-2", "evening:sms") == rig.local(d, 19)
    _unsubscribe(rig)
    evening = rig.reminder("A-2", "evening:sms")
    assert "moved to" in evening["reason"], evening
    _deliver_all(rig, "A-1", "A-2")
    _one_text_a_day(rig)


def test_a_clinic_change_landing_while_the_unsubscribe_caps_again_is_kept(rig, monkeypatch):
    """Forced race: the unsubscribe's write of A-2 has read the patient's SMS when the
    clinic moves A-2's visit a day later (its SMS now on D+1, free). That write must not
    put the document it read back over the clinic's: it reads again and caps the clinic's
    document (D+1 has room: its SMS stays there)."""
    d = rig.day
    _by_email(rig)
    real = rig.store._caps_read
    reads: list[list[str]] = []
    moved = threading.Event()

    def parked(items: Any) -> Any:
        read = real(items)
        reads.append([booking.booking_id for booking, _ in items])
        if [booking.booking_id for booking, _ in items] == ["A-2"] and not moved.is_set():
            moved.set()  # between the unsubscribe's read of A-2 and its write
            rig.book("A-2", "eve", d, email=True)
        return read

    monkeypatch.setattr(rig.store, "_caps_read", parked)
    _unsubscribe(rig)
    assert moved.is_set()
    doc = json.loads(rig.store.redis.get(rig.store.doc_key("cap", "A-2")))
    assert datetime.fromisoformat(doc["starts_at"]).date() == d, doc  # the clinic's
    evening = rig.reminder("A-2", "evening:sms")
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-2", "evening:sms") == rig.local(d + timedelta(days=1), 19)
    assert rig.reminder("A-2", "evening:email")["status"] not in ("scheduled", "retrying")
    _deliver_all(rig, "A-1", "A-2")
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 2
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days


def test_an_email_at_its_provider_when_the_patient_unsubscribes_is_not_sent_again_by_sms(
        rig, monkeypatch):
    """Forced race: A-2's email (its SMS without room) is at its provider, begun before the
    unsubscribe, when the patient unsubscribes: it is left to its attempt (delivered: it
    went before the unsubscribe was read), and the step is not sent again by SMS."""
    d = rig.day
    _by_email(rig)
    at_provider, go_on = park_sends(monkeypatch, "email")
    sending, results = send_in_thread(rig, "A-2", "evening:email", rig.local(d, 19))
    try:
        assert at_provider.wait(10)
        _unsubscribe(rig)
        assert rig.reminder("A-2", "evening:email")["status"] == "sending"  # left to it
    finally:  # the attempt goes on, whatever the unsubscribe did
        go_on.set()
        sending.join(10)
    assert results == ["sent"] and len(rig.smtp.snapshot()) == 1
    _deliver_all(rig, "A-1", "A-2")
    shown = {r["id"]: r for r in rig.store.timeline("cap", "A-2")["reminders"]}
    assert shown["evening:email"]["status"] == "sent"
    assert shown.get("evening:sms", {}).get("status") not in ("scheduled", "retrying", "sent")
    assert len(rig.sms.snapshot()) == 1 and rig.sent_days == [d]  # A-1's only


def test_the_email_the_unsubscribe_skipped_says_so_and_stays_skipped_at_an_opt_in(rig):
    """A-2's email (its SMS without room on D) is skipped by the unsubscribe; capping A-2
    again moves the step's SMS to D+1. The email says it was not sent because the patient
    unsubscribed (it read "cancelled: no longer in the plan after a change", a change the
    clinic never made); and, no longer the plan's, the patient subscribing to email again
    does not bring it back beside the SMS (the step would go twice)."""
    d = rig.day
    _by_email(rig)
    _unsubscribe(rig)
    _moved(rig)
    email = rig.reminder("A-2", "evening:email")
    assert email["status"] == "skipped", email
    assert "the patient unsubscribed" in email["reason"], email
    assert "after a change" not in email["reason"], email
    assert rig.store.opt_in("cap", "email", "ana@example.com", why="subscribed again",
                            critical=rig.catalog.critical_steps)
    assert rig.reminder("A-2", "evening:email") == email
    _moved(rig)
    _deliver_all(rig, "A-1", "A-2")
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 2
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days
