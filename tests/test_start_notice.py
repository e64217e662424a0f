"""START brings back the change notice its STOP skipped, when its time is still ahead.

An SMS-only patient told the first date; the clinic moves the visit outside the patient's
send window: the notice ("your visit moved to ...") waits for the window's opening. The
patient texts STOP, then START before it opens. The notice is the one message that tells
them of the move: left skipped, they come on the old date. START puts back the SMS its
STOP skipped whose time is still ahead; the change notice was left out ("told at once: its
time passed"), which is not so for a notice waiting for the window. Only the booking's
latest change's come back: a notice, or a message again for a new date, that a later
change superseded while the number was opted out stayed skipped, and START put the old
message back beside the new one. The SMS cap does not hold a notice back, as when planned.

Real Redis, the real send path to a real HTTP SMS gateway (tests/test_notices_sms.py's rig,
the shipped microneedling protocol); the STOP and START through `Store.opt_out` and
`Store.opt_in`, as the inbound SMS route calls them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests import test_notices_sms as ns
from tests.raw import set_reminder_fields
from tests.test_notices_sms import TZ
from worker.catalog import Catalog

gate = ns.gate  # fixtures
rig = ns.rig
PHONE = "+34600111222"


def _window_ahead(rig: ns.Rig) -> None:
    """The clinic's send window: opening two hours from now (patient-local), closing at
    midnight, so that it holds a later step's 10:00 or takes it to that day's opening (a
    one-hour window opening at 03:00 took the day-before to the visit's own day, past its
    expiry: skipped, with no message again for a new date); one hour when the opening is
    past midnight (it then holds now, 22:00 or 23:00, no more), taking the day-before to
    the visit day's 00:00 or 01:00, before its expiry (12h before the 14:30 visit)."""
    hour = (datetime.now(TZ).hour + 2) % 24
    end = "24:00" if hour >= 2 else f"{hour + 1:02d}:00"
    clinic = rig.ctx.settings.config_dir / "clinics" / "sk.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'start = "00:00"\nend = "24:00"', f'start = "{hour:02d}:00"\nend = "{end}"'),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.ctx.settings)


def _start(rig: ns.Rig) -> int:
    back = rig.store.opt_in("sk", "sms", PHONE, caps=rig.catalog.clinics["sk"].sms,
                            why="the patient replied START by SMS at test",
                            critical=rig.catalog.critical_steps)
    assert back.was
    return back.resumed


def test_start_brings_back_the_move_notice_waiting_for_the_window(rig, monkeypatch):
    first, later = rig.doc(10), rig.doc(17)
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"  # "see you on <first date>"
    _window_ahead(rig)
    rig.book(later)
    notice = rig.reminders()["rescheduled#1:sms"]
    due = notice["due_at"]
    assert notice["status"] == "scheduled"
    assert datetime.fromisoformat(due.replace("Z", "+00:00")) > datetime.now(TZ) + timedelta(
        minutes=30)  # waits for the window
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "skipped"
    assert _start(rig) >= 1
    back = rig.reminders()["rescheduled#1:sms"]
    assert back["status"] == "scheduled", back
    assert back["due_at"] == due  # at its time, not at once
    ref = "sk/M-1/rescheduled#1:sms"
    assert rig.store.redis.zscore(rig.store.due_key, ref) == datetime.fromisoformat(
        due.replace("Z", "+00:00")).timestamp()
    # It goes once the window opens (the send path's clock moved there: the booking keeps
    # the window it was planned with), telling the move.
    opens = datetime.fromisoformat(due.replace("Z", "+00:00")) + timedelta(minutes=1)

    class _Opened(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return opens.astimezone(tz) if tz is not None else opens.replace(tzinfo=None)

    monkeypatch.setattr("worker.dispatch.datetime", _Opened)
    assert rig.send(ref) == "sent"
    told = rig.texts()[-1]
    assert "moved" in told and ns.names(told, later["starts_at"]), told
    assert len(rig.texts()) == 2  # the day-before, then the notice: nothing else went


def test_start_leaves_what_a_later_change_superseded_cancelled(rig):
    """STOP skipped the first move's notice and its day-before again for the new date
    (`again-day-before#1`); the clinic moved the visit again while the number was opted out
    (its own notice and day-before again, #2). START brings back the latest change's only:
    the first's name a date no longer true, and its day-before again would have gone a week
    early beside the second's (two day-before SMS). The second move superseded the first's
    (`cancelled`, as one not skipped: tests/test_notice_skipped_superseded.py)."""
    rig.book(rig.doc(10))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    _window_ahead(rig)
    rig.book(rig.doc(17))
    assert rig.reminders()["again-day-before#1:sms"]["status"] == "scheduled"
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    rig.book(rig.doc(24))
    first = ("rescheduled#1:sms", "again-day-before#1:sms")
    latest = ("rescheduled#2:sms", "again-day-before#2:sms")
    before = rig.reminders()
    assert [(before[k]["status"], before[k]["reason"]) for k in first] == [
        ("cancelled", "superseded by a later change")] * 2, before
    assert [before[k]["status"] for k in latest] == ["scheduled", "scheduled"], before
    _start(rig)
    after = rig.reminders()
    for key in first:
        assert after[key]["status"] == "cancelled", after[key]
        assert rig.store.redis.zscore(rig.store.due_key, f"sk/M-1/{key}") is None
    assert [after[k]["status"] for k in latest] == ["scheduled", "scheduled"], after
    day_before = [k for k, r in after.items() if k.startswith(("day-before", "again-day-before"))
                  and r["status"] == "scheduled"]
    assert day_before == ["again-day-before#2:sms"], day_before


def test_start_brings_back_the_cancel_notice_waiting_for_the_window(rig, monkeypatch):
    """The clinic cancels outside the patient's send window: the cancel notice's attempt
    defers it to the window's opening. STOP skips it, START comes before the opening: the
    notice goes at its time (a cancelled booking sends only that), or the patient, told the
    date, comes to a visit that no longer exists."""
    rig.book(rig.doc(10))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    _window_ahead(rig)
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    ref = "sk/M-1/cancelled#1:sms"
    assert rig.send(ref) == "deferred"  # to the window's opening
    due = rig.reminders()["cancelled#1:sms"]["due_at"]
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    assert rig.reminders()["cancelled#1:sms"]["status"] == "skipped"
    assert _start(rig) == 1
    back = rig.reminders()["cancelled#1:sms"]
    assert (back["status"], back["due_at"]) == ("scheduled", due), back
    opens = datetime.fromisoformat(due.replace("Z", "+00:00")) + timedelta(minutes=1)

    class _Opened(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return opens.astimezone(tz) if tz is not None else opens.replace(tzinfo=None)

    monkeypatch.setattr("worker.dispatch.datetime", _Opened)
    assert rig.send(ref) == "sent"
    assert len(rig.texts()) == 2  # the day-before, then the cancel notice
    assert "cancel" in rig.texts()[-1].lower(), rig.texts()[-1]
    assert rig.store.timeline("sk", "M-1")["status"] == "cancelled"


def test_start_brings_back_the_move_notice_skipped_at_its_time_while_the_visit_is_ahead(rig):
    """The patient texts STOP; the clinic then moves the visit: the notice is due at once
    and its begin skips it (opted out). The patient texts START a little later: the notice's
    time has passed, but it is meant for any time before the visit (its expiry), unlike a
    reminder of a given day ("not sent late"): it goes now, or the patient, who asked for
    the texts back, never hears that the visit moved."""
    first, later = rig.doc(10), rig.doc(17)
    rig.book(first)
    assert rig.send(ns.DAY_BEFORE) == "sent"
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    rig.book(later)
    ref = "sk/M-1/rescheduled#1:sms"
    assert rig.send(ref) == "dropped: opted out"
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "skipped"
    assert _start(rig) >= 1
    back = rig.reminders()["rescheduled#1:sms"]
    assert back["status"] == "scheduled", back
    due = rig.store.redis.zscore(rig.store.due_key, ref)
    assert due is not None and due <= datetime.now(UTC).timestamp() + 1  # at once
    assert rig.send(ref) == "sent"
    told = rig.texts()[-1]
    assert "moved" in told and ns.names(told, later["starts_at"]), told
    assert len(rig.texts()) == 2  # the day-before, then the notice


def test_start_leaves_a_move_notice_whose_visit_has_begun(rig):
    """The same, START coming once the moved visit has begun: the notice has expired (it
    was meant for before the visit) and stays skipped."""
    rig.book(rig.doc(10))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    rig.book(rig.doc(17))
    ref = "sk/M-1/rescheduled#1:sms"
    assert rig.send(ref) == "dropped: opted out"
    past = datetime.now(UTC).timestamp() - 60
    set_reminder_fields(rig.store, ref, expires_epoch=repr(past))  # the visit has begun
    _start(rig)
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "skipped"
    assert rig.store.redis.zscore(rig.store.due_key, ref) is None


def test_start_brings_back_an_email_move_notice_of_a_patient_unsubscribed_from_email(rig):
    """The patient was told the date by email (the booking confirmation), then
    unsubscribed from email and texted STOP. The clinic moves the visit: its notice is an
    email, which goes by SMS to a patient unsubscribed from email (a change notice counts as
    care-critical, worker/store.py `is_critical`); opted out of SMS too, its begin skips
    it. START: it goes now, by SMS, as its begin then says; without it the patient never
    hears of the move."""
    first, later = rig.doc(10, channels=("sms", "email")), rig.doc(17, channels=("sms", "email"))
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    assert rig.store.opt_out("sk", "email", "ana@example.com", "unsubscribed at test").first
    assert rig.store.opt_out("sk", "sms", PHONE, "STOP at test").first
    rig.book(later)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:email"}
    ref = "sk/M-1/rescheduled#1:email"
    assert rig.send(ref) == "dropped: opted out"
    assert rig.reminders()["rescheduled#1:email"]["status"] == "skipped"
    _start(rig)
    back = rig.reminders()["rescheduled#1:email"]
    assert back["status"] == "scheduled", back
    assert rig.send(ref) == "sent"
    (body,) = [b for b in rig.gate.bodies if b.get("to") == PHONE]  # by SMS, once
    assert "moved" in body["message"] and ns.names(body["message"], later["starts_at"]), body
