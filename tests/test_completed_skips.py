"""`booking.completed` is told whichever step leaves a booking nothing more to send, not only
an attempt's finish: the skip of an attempt that finds the patient opted out at its begin,
and STOP's skips of every SMS still to go. Once, and again (a60bec1) once START brings
reminders back and they are done.

Real Redis, the real send path to a real HTTP SMS gateway (tests/test_send_races.py's rig),
the clinic events delivered, signed, to a real webhook receiver
(tests/test_completed_again.py's rig)."""

from __future__ import annotations

from tests.test_completed_again import PHONE, completed, delivered, send
from tests.test_completed_again import gate as gate  # noqa: F401  (the fixtures)
from tests.test_completed_again import receiver as receiver  # noqa: F401
from tests.test_completed_again import rig as rig  # noqa: F401
from tests.test_send_races import PREP, STOP
from worker.dispatch import send_claimed


def _told(rig) -> str | None:
    return rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "completed_told")


def test_stop_skipping_the_last_sms_tells_the_booking_complete(rig, receiver):
    """The stop SMS went; STOP skips the prep SMS, the last one to go: the clinic is told
    the booking is complete, once (a second STOP skips nothing and tells nothing)."""
    timeline = rig.book(rig.booking())
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent"
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP at test") == (1, ["R-1"])
    assert rig.state(PREP)["record"]["status"] == "skipped"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "reminder.skipped",
                                        "booking.completed"]
    assert {k: got[-1][k] for k in ("booking_id", "version", "late_pause")} == {
        "booking_id": "R-1", "version": timeline["version"], "late_pause": False}
    assert _told(rig) == "1"
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP again") == (0, [])
    assert delivered(rig, receiver) == got  # nothing new
    assert len(rig.gate.bodies) == 1


def test_stop_then_start_tells_the_booking_complete_again(rig, receiver):
    """Told complete by STOP's skips; START puts the prep SMS back, it goes: told again
    (a60bec1's rule), and only then."""
    rig.book(rig.booking())
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent"
    rig.store.opt_out("rc", "sms", PHONE, "STOP at test")
    first = completed(delivered(rig, receiver))
    assert len(first) == 1
    assert rig.store.opt_in("rc", "sms", PHONE, caps=rig.catalog.clinics["rc"].sms,
                            why="START at test")
    assert rig.state(PREP)["record"]["status"] == "scheduled"
    assert completed(delivered(rig, receiver)) == first  # more to send: nothing told yet
    assert send(rig, PREP) == "sent"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got[-2:]] == ["reminder.sent", "booking.completed"]
    assert len(completed(got)) == 2 and completed(got)[0]["id"] != completed(got)[1]["id"]
    assert len(rig.gate.bodies) == 2


def test_stop_skipping_some_sms_tells_nothing_while_one_is_at_the_gateway(rig, receiver):
    """STOP while the stop SMS is at the gateway skips the prep SMS but leaves the one in
    flight to its attempt: not complete yet; the attempt's finish tells it, once."""
    rig.book(rig.booking())
    thread, result = rig.park(STOP)
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP at test") == (1, ["R-1"])
    assert completed(delivered(rig, receiver)) == []
    rig.gate.answer(200)
    thread.join(20)
    assert result["outcome"] == "sent"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.skipped", "reminder.sent",
                                        "booking.completed"]


def test_an_attempt_finding_the_patient_opted_out_at_its_begin_tells_it_complete(
        rig, receiver):
    """The prep SMS is claimed (its task on its way) when STOP lands: STOP leaves it to its
    attempt; the attempt's begin finds the patient opted out and skips it, the last one to
    go: the clinic is told the booking is complete, once."""
    rig.book(rig.booking())
    rig.gate.answer(200)
    assert send(rig, STOP) == "sent"
    claim = rig.claim_now(PREP)  # parked between the pump's claim and the task's begin
    assert rig.store.opt_out("rc", "sms", PHONE, "STOP at test") == (0, [])
    assert rig.state(PREP)["record"]["status"] == "sending"
    assert completed(delivered(rig, receiver)) == []
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: opted out"
    state = rig.state(PREP)
    assert state["record"]["status"] == "skipped" and state["lease"] is None
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "reminder.skipped",
                                        "booking.completed"]
    assert got[-1]["booking_id"] == "R-1"
    assert _told(rig) == "1"
    assert len(rig.gate.bodies) == 1
    # START brings it back (its time is still ahead): told again once it went.
    assert rig.store.opt_in("rc", "sms", PHONE, caps=rig.catalog.clinics["rc"].sms,
                            why="START at test")
    assert send(rig, PREP) == "sent"
    assert len(completed(delivered(rig, receiver))) == 2


def test_a_change_ending_the_last_reminder_to_go_tells_the_booking_complete(rig, receiver):
    """The prep SMS went; the clinic then records that the patient stopped tretinoin: the
    stop SMS, the last one to go, leaves the plan (cancelled). Nothing more goes: told
    complete, once (the same document again tells nothing); tretinoin back puts the stop
    SMS back: told again once it went (a60bec1's rule)."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    assert completed(delivered(rig, receiver)) == []
    doc["medications"] = {"tretinoin": False}
    timeline = rig.book(doc)
    assert {r["id"]: r["status"] for r in timeline["reminders"]}["stop:sms"] == "cancelled"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"]
    assert {k: got[-1][k] for k in ("booking_id", "version", "late_pause")} == {
        "booking_id": "R-1", "version": timeline["version"], "late_pause": False}
    assert rig.book(doc)["version"] == timeline["version"]  # a sync: nothing told
    assert delivered(rig, receiver) == got
    doc["medications"] = {"tretinoin": True}
    again = rig.book(doc)
    assert {r["id"]: r["status"] for r in again["reminders"]}["stop:sms"] == "scheduled"
    assert _told(rig) is None and delivered(rig, receiver) == got
    assert send(rig, STOP) == "sent"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got[-2:]] == ["reminder.sent", "booking.completed"]
    assert len(completed(got)) == 2 and len(rig.gate.bodies) == 2
