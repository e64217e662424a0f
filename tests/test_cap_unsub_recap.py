"""An email unsubscribe caps the patient's bookings at the clinic again, as a re-submission
of each would (`Store.opt_out`'s `replan`; the unsubscribe route gives it): an SMS that the
cap sent by email instead (no room on its day) was lost when the patient then unsubscribed
from email (the email skipped at its begin, the SMS gone): a patient without email would
have had it on a later day with room. And a care-critical email left to go by SMS takes
its day from the patient's other SMS of that day, as if the booking were written now.

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed (tests/test_send_caps.py's rig; cap: one SMS a day). A-1's SMS of D 10:00 (`morn`)
takes D; A-2's of D 19:00 (`eve`) goes by email, both visits on D-1.

The same after the visit (the patient unsubscribing the day after it, from an aftercare
email): the store's clock is the send path's there, as the store plans at its now."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from tests.test_cap_unsub_by_sms import _deliver_all, _one_text_a_day
from tests.test_send_caps import (
    ADVICE,
    CAPS,
    Clock,
    Rig,
    _book_at,
    _Fixed,
    park_sends,
    send_in_thread,
    step,
)
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.errors import BookingRejected


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


def _unsubscribe_at_provider(rig: Rig, monkeypatch: pytest.MonkeyPatch, *,
                             refuse: str | None = None,
                             meanwhile: Any = None) -> list[str]:
    """Forced race: A-2's email (its SMS without room on D) parked at its provider (D 19:00)
    when the patient unsubscribes: left to its attempt (`sending`); `meanwhile()` then runs,
    and with `refuse` the mail server answers that; then the attempt goes on. Its results."""
    at_provider, go_on = park_sends(monkeypatch, "email")
    sending, results = send_in_thread(rig, "A-2", "evening:email", rig.local(rig.day, 19))
    try:
        assert at_provider.wait(10)
        _unsubscribe(rig)
        assert rig.reminder("A-2", "evening:email")["status"] == "sending"  # left to it
        if meanwhile is not None:
            meanwhile()
        rig.smtp.refuse_code = refuse
    finally:  # the attempt goes on, whatever the unsubscribe did
        go_on.set()
        sending.join(10)
    rig.smtp.refuse_code = None
    return results


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
    results = _unsubscribe_at_provider(rig, monkeypatch)
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


# After the visit (found by review): A-2's steps the day after its visit of D-1, and two
# before it (the pause a week before); A-1's SMS of D 10:00 (`morn`) takes D, so A-2's SMS
# of D go by email.
AFTER = """
name = "Before and after"
[[steps]]
id = "stop"
day = -7
time = "18:00"
channels = ["sms"]
template = "stop-retinoids"
pause = true
care_critical = true
late = "send"
late_until = "-6h"
[[steps]]
id = "before"
day = -2
time = "19:00"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
[[steps]]
id = "early"
day = 1
time = "09:30"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
[[steps]]
id = "noon"
day = 1
time = "11:00"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
[[steps]]
id = "evening"
day = 1
time = "19:00"
channels = ["sms"]
template = "week-check"
late = "send"
late_until = "10d"
""" + ADVICE + """retinoids_sensitise = true
no_retinoid_on_the_day = true
retinoid_pause_min_days = 5
"""


def _after_the_visit(rig: Rig, monkeypatch: Any) -> dict[str, dict[str, Any]]:
    """A-1 and A-2 (visits on D-1) stored three weeks ahead; then, on the send path's clock
    (the store's too from here: `Store.recap` plans at its now), A-2's pause SMS of D-8
    fails (the provider refuses it: a dead letter, the patient never paused), its `before`
    SMS goes on D-3, its `early` email (the SMS without room) at D 09:30 and A-1's SMS at
    D 10:00; A-2's `noon` email of D 11:00 is not sent yet (a backlog); it is D 12:00.
    Return A-2's timeline then, by reminder id."""
    (rig.settings.config_dir / "protocols" / "after.toml").write_text(AFTER, encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    rig.book("A-1", "morn", d - timedelta(days=1), email=True)
    rig.book("A-2", "after", d - timedelta(days=1), email=True)
    assert rig.due("A-2", "before:sms") == rig.local(d - timedelta(days=3), 19)
    for key, hour in (("early", 9.5), ("noon", 11), ("evening", 19)):
        email = rig.reminder("A-2", f"{key}:email")
        assert email["status"] == "scheduled" and "by email" in email["reason"], email
        assert rig.due("A-2", f"{key}:email") == rig.local(d, int(hour), int(hour % 1 * 60))
    monkeypatch.setattr("worker.store.datetime", _Fixed)
    rig.sms.status = 400
    rig.send("A-2", "stop:sms", rig.local(d - timedelta(days=8), 18))
    rig.sms.status = 200
    assert rig.reminder("A-2", "stop:sms")["status"] == "failed"
    assert rig.send("A-2", "before:sms", rig.local(d - timedelta(days=3), 19)) == "sent"
    assert rig.send("A-2", "early:email", rig.local(d, 9, 30)) == "sent"
    assert rig.send("A-1", "morning:sms", rig.local(d, 10)) == "sent"
    Clock.at = rig.local(d, 12)
    timeline = rig.store.timeline("cap", "A-2")
    assert not timeline["late_pause"], timeline  # planned a week before the visit
    return {r["id"]: r for r in timeline["reminders"]}


def test_after_the_visit_an_sms_sent_by_email_instead_goes_by_sms_after_an_unsubscribe(
        rig, monkeypatch):
    """The patient unsubscribes from email at D 12:00, the day after the visit. Before,
    `Catalog.replan` refused the visit as past and the unsubscribe capped nothing again:
    A-2's evening email was skipped for the unsubscribe and no SMS was left for the step.
    Now its SMS goes on D+1 at 19:00 (D holds A-1's), saying why; what went, failed or
    whose time passed stays as it was (the noon email as the unsubscribe skipped it: not
    sent late by SMS), nothing goes twice, and a click again changes nothing."""
    d = rig.day
    before = _after_the_visit(rig, monkeypatch)
    a1 = rig.store.timeline("cap", "A-1")
    _unsubscribe(rig)
    shown = {r["id"]: r for r in rig.store.timeline("cap", "A-2")["reminders"]}
    assert "evening:sms" in shown, shown  # before: no SMS left for the step
    evening = shown["evening:sms"]
    assert evening["status"] == "scheduled", evening
    assert rig.due("A-2", "evening:sms") == rig.local(d + timedelta(days=1), 19)
    assert evening["reason"].endswith(
        f"; moved to {d + timedelta(days=1)}: {CAPS.format(day=d)} and the patient takes no "
        "email"), evening
    email = shown["evening:email"]  # skipped for the unsubscribe, saying so
    assert email["status"] == "skipped", email
    assert email["reason"].startswith("not sent: the patient unsubscribed"), email
    # Whose time has passed stays as it was: sent; and the noon email (due 11:00, not sent
    # yet) as the unsubscribe skipped it, its reason saying why, not sent late by SMS.
    assert set(shown) == set(before) | {"evening:sms"}, shown
    for key in ("before:sms", "early:email"):
        assert shown[key] == before[key] and shown[key]["status"] == "sent", shown[key]
    assert shown["stop:sms"] == before["stop:sms"]  # the dead letter: as it was
    # Whether the booking came too late for the pause is as stored (the plan made just
    # before the visit finds the pause's time passed: the clinic is not told now).
    assert not rig.store.timeline("cap", "A-2")["late_pause"]
    noon = shown["noon:email"]
    assert noon["status"] == "skipped" and noon["reason"].startswith(
        "opted_out: the patient unsubscribed"), noon
    assert {k: v for k, v in noon.items() if k not in ("status", "reason")} == {
        k: v for k, v in before["noon:email"].items() if k not in ("status", "reason")}
    assert rig.store.timeline("cap", "A-1") == a1  # its SMS went: nothing to cap again
    # A click again (the route caps again): nothing left to change.
    version = rig.store.timeline("cap", "A-2")["version"]
    assert rig.store.recap("cap", "ana@example.com", rig.catalog.replan) == []
    assert rig.store.timeline("cap", "A-2")["version"] == version
    _deliver_all(rig, "A-1", "A-2")
    assert rig.reminder("A-2", "evening:sms")["status"] == "sent"
    # One of each step: the early step by its email only, the noon step not at all.
    assert len(rig.smtp.snapshot()) == 1 and len(rig.sms.snapshot()) == 3
    assert Counter(rig.sent_days) == {d - timedelta(days=3): 1, d: 1,
                                      d + timedelta(days=1): 1}, rig.sent_days
    # The clinic cannot re-submit the booking now: its visit is past (as before).
    doc = rig.store.redis.get(rig.store.doc_key("cap", "A-2"))
    with pytest.raises(BookingRejected, match="starts_at"):
        rig.catalog.replan(doc, rig.local(d, 12))


def test_a_cancel_landing_while_the_unsubscribe_caps_a_past_visit_again_is_kept(
        rig, monkeypatch):
    """Forced race: the clinic cancels A-2 (after its visit) between the unsubscribe's read
    of A-2 and its write: the write must not bring back what the cancel called off."""
    _after_the_visit(rig, monkeypatch)
    real = rig.store._caps_read
    cancelled = threading.Event()

    def parked(items: Any) -> Any:
        read = real(items)
        if [booking.booking_id for booking, _ in items] == ["A-2"] and not cancelled.is_set():
            cancelled.set()
            rig.store.cancel("cap", "A-2", rig.local(rig.day, 12))
        return read

    monkeypatch.setattr(rig.store, "_caps_read", parked)
    _unsubscribe(rig)
    assert cancelled.is_set()
    timeline = rig.store.timeline("cap", "A-2")
    assert timeline["status"] == "cancelled"
    assert not any(r["status"] in ("scheduled", "retrying") for r in timeline["reminders"])
    _deliver_all(rig, "A-1", "A-2")
    assert len(rig.sms.snapshot()) == 2 and len(rig.smtp.snapshot()) == 1


def test_an_email_at_its_provider_that_fails_for_now_as_the_patient_unsubscribes_goes_by_sms(
        rig, monkeypatch):
    """Forced race: A-2's email (its SMS without room on D) is at its provider when the
    patient unsubscribes: the unsubscribe leaves it to its attempt, and capping A-2 again
    plans no SMS of the step (the email may be delivered). The mail server then answers
    451 (try later): retrying, and its retry's begin skips it (unsubscribed). Nothing
    capped A-2 again after that: the step was lost (no email, no SMS), where a patient who
    unsubscribed a moment earlier gets it by SMS on a day with room. The begin that skips
    it caps the patient's bookings again: the SMS goes on D+1, saying why."""
    d = rig.day
    _by_email(rig)
    results = _unsubscribe_at_provider(rig, monkeypatch, refuse="451 4.3.0 Try again later")
    assert results == ["retrying"] and rig.smtp.snapshot() == []
    retry = rig.due("A-2", "evening:email")
    assert rig.send("A-2", "evening:email", retry) == "dropped: opted out"
    email = rig.reminder("A-2", "evening:email")
    assert email["status"] == "skipped" and "the patient unsubscribed" in email["reason"], email
    _moved(rig)
    _deliver_all(rig, "A-1", "A-2")
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 2
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days
    assert rig.store.attempts("cap/A-2/evening:email")[-1]["outcome"] == "retrying"


def test_after_the_visit_an_email_at_its_provider_that_fails_for_now_goes_by_sms(
        rig, monkeypatch):
    """The same with the store on the send path's clock (found by review): D 19:00 is the
    day after A-2's visit, as for any aftercare email. The re-caps (the unsubscribe's, then
    the retry's begin's) found the step's time passed and kept it as stored: the email,
    left to its attempt, then skipped at its retry's begin, and no SMS of the step (lost).
    Under way when the patient unsubscribed, it goes by SMS as before the visit: D+1."""
    d = rig.day
    _by_email(rig)
    monkeypatch.setattr("worker.store.datetime", _Fixed)
    seen: list[set[str]] = []
    results = _unsubscribe_at_provider(
        rig, monkeypatch, refuse="451 4.3.0 Try again later",
        meanwhile=lambda: seen.append({r["id"] for r in rig.store.timeline("cap", "A-2")[
            "reminders"]}))
    # No SMS of the step beside the email, which may still be delivered.
    assert seen and "evening:sms" not in seen[0]
    assert results == ["retrying"] and rig.smtp.snapshot() == []
    retry = rig.due("A-2", "evening:email")
    assert rig.send("A-2", "evening:email", retry) == "dropped: opted out"
    shown = {r["id"]: r for r in rig.store.timeline("cap", "A-2")["reminders"]}
    assert "evening:sms" in shown, shown  # before: the step lost
    _moved(rig)
    _deliver_all(rig, "A-1", "A-2")
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 2
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}, rig.sent_days


def test_a_re_cap_that_fails_at_the_begin_leaves_the_skip_and_says_so(rig, monkeypatch,
                                                                     caplog):
    """The begin's re-cap of a stand-in email is best effort: whatever it raises (Redis
    gone, a bug), the skip stands, the attempt ends as dropped (not "not completed", to be
    brought back by its lease), and a WARNING names the reminder."""
    import logging

    from worker.store import Store

    _by_email(rig)
    results = _unsubscribe_at_provider(rig, monkeypatch, refuse="451 4.3.0 Try again later")
    assert results == ["retrying"]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the re-cap")

    monkeypatch.setattr(Store, "recap", broken)
    with caplog.at_level(logging.INFO, logger="worker.dispatch"):
        assert rig.send("A-2", "evening:email", rig.due("A-2", "evening:email")) \
            == "dropped: opted out"
    assert rig.reminder("A-2", "evening:email")["status"] == "skipped"
    assert any(r.levelno == logging.WARNING and "cap/A-2/evening:email" in r.getMessage()
               and "RuntimeError" in r.getMessage() for r in caplog.records), caplog.text


# Two steps when the booking arrives, both by SMS (found by review): the cap (one SMS a day)
# sends the first by SMS and the second by email instead, both on the booking's day B.
AT_BOOKING = """
name = "Two at booking"
[[steps]]
id = "hello"
at = "booking"
channels = ["sms"]
template = "week-check"
late = "send"
[[steps]]
id = "welcome"
at = "booking"
channels = ["sms"]
template = "day-before"
late = "send"
""" + ADVICE


def _booked_and_sent(rig: Rig) -> date:
    """A-1 (visit on D) booked on B = D-7 at 08:30 (before the send window): its `hello`
    goes by SMS and its `welcome` by email (no room on B) at B 09:00, both sent. Return B."""
    (rig.settings.config_dir / "protocols" / "atb.toml").write_text(AT_BOOKING,
                                                                    encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    b = rig.day - timedelta(days=7)
    _book_at(rig, "A-1", "atb", rig.day, rig.local(b, 8, 30))
    welcome = rig.reminder("A-1", "welcome:email")
    assert "by email" in welcome["reason"], welcome
    assert rig.send("A-1", "hello:sms", rig.local(b, 9)) == "sent"
    assert rig.send("A-1", "welcome:email", rig.local(b, 9)) == "sent"
    assert len(rig.sms.snapshot()) == 1 and len(rig.smtp.snapshot()) == 1
    return b


def _welcome_once(rig: Rig, b: date) -> None:
    """The `welcome` step went once, by email on B: its SMS does not go, saying why."""
    _deliver_all(rig, "A-1")
    shown = {r["id"]: r for r in rig.store.timeline("cap", "A-1")["reminders"]}
    assert len(rig.sms.snapshot()) == 1 and len(rig.smtp.snapshot()) == 1, shown
    assert rig.sent_days == [b]
    assert shown["welcome:email"]["status"] == "sent", shown
    sms = shown.get("welcome:sms")
    assert sms is None or (sms["status"], sms["reason"]) == (
        "skipped", f"not sent: already sent by email on {b}"), sms


def test_an_unsubscribe_does_not_send_again_by_sms_a_step_at_booking_that_went_by_email(
        rig, monkeypatch):
    """The patient unsubscribes from email at B 12:00 (from the `welcome` email). The re-cap
    plans A-1 as re-submitted then: both steps at booking again, the planner's own cap
    sending `welcome` by email (as stored: sent, nothing to change); but the store caps
    again from the plan before that cap, where `welcome` was still an SMS: B holds `hello`,
    so it moved to B+1 and went a second time, by SMS."""
    b = _booked_and_sent(rig)
    monkeypatch.setattr("worker.store.datetime", _Fixed)
    Clock.at = rig.local(b, 12)
    _unsubscribe(rig)
    _welcome_once(rig, b)


def test_a_resubmission_the_next_day_does_not_send_again_by_sms_a_step_at_booking(rig):
    """The clinic sends A-1 again, unchanged, on B+1 (a nightly sync): B+1 has room, and
    `welcome`, which went by email on B, went again by SMS on B+1."""
    b = _booked_and_sent(rig)
    _book_at(rig, "A-1", "atb", rig.day, rig.local(b + timedelta(days=1), 8, 30))
    _welcome_once(rig, b)


# A step before the visit on both channels (found by review): the cap skips its SMS when
# the day holds another (its email goes).
BOTH = step("prep", -2, "19:00", '["sms", "email"]', "week-check")


def _prep_went_by_email(rig: Rig) -> date:
    """A-1's SMS takes D 10:00 (`morn`, visit on D-1); A-2's `prep` (visit on D+2) is due D
    19:00 on both channels: its SMS is skipped, its email goes. Both sent. Return D."""
    (rig.settings.config_dir / "protocols" / "both.toml").write_text(BOTH, encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    rig.book("A-1", "morn", d - timedelta(days=1), email=True)
    rig.book("A-2", "both", d + timedelta(days=2), email=True)
    prep = rig.reminder("A-2", "prep:sms")
    assert prep["status"] == "skipped" and prep["reason"].endswith("; its email goes"), prep
    assert rig.send("A-1", "morning:sms", rig.local(d, 10)) == "sent"
    assert rig.send("A-2", "prep:email", rig.local(d, 19)) == "sent"
    return d


def _prep_once(rig: Rig, skipped: dict[str, Any]) -> None:
    """`prep` went once, by email on D: its SMS stays skipped as the cap left it."""
    _deliver_all(rig, "A-1", "A-2")
    assert len(rig.sms.snapshot()) == 1 and len(rig.smtp.snapshot()) == 1, \
        rig.reminder("A-2", "prep:sms")
    assert rig.sent_days == [rig.day]
    assert rig.reminder("A-2", "prep:sms") == skipped


def test_an_unsubscribe_does_not_send_late_by_sms_a_step_whose_email_went(rig, monkeypatch):
    """The patient unsubscribes at D 20:30, from the `prep` email. The re-cap plans A-2 as
    re-submitted then: `prep` late, at the next opening (D+1 09:00, before the visit), on
    both channels; its email went (history), and its SMS, skipped at its time for the cap,
    was scheduled for D+1 (a day with room): the step a second time, the next morning."""
    d = _prep_went_by_email(rig)
    skipped = rig.reminder("A-2", "prep:sms")
    monkeypatch.setattr("worker.store.datetime", _Fixed)
    Clock.at = rig.local(d, 20, 30)
    _unsubscribe(rig)
    _prep_once(rig, skipped)


def test_a_resubmission_does_not_send_late_by_sms_a_step_whose_email_went(rig):
    """The clinic sends A-2 again, unchanged, on D+1 at 08:30 (a nightly sync): the same."""
    d = _prep_went_by_email(rig)
    skipped = rig.reminder("A-2", "prep:sms")
    _book_at(rig, "A-2", "both", d + timedelta(days=2), rig.local(d + timedelta(days=1), 8, 30))
    _prep_once(rig, skipped)
