"""`booking.completed` means nothing more will be sent: a clinic's change that takes out of
the plan the last reminder to go while an attempt is sending it (at the gateway) does not
tell the booking complete before that attempt is done; the attempt's finish tells it, once,
whether it delivered or not (review of 5221279, which told it in the change's own write, so
the clinic heard "complete" and then "reminder.sent" for a message that went after it).
As STOP leaves a reminder in flight to its attempt (tests/test_completed_skips.py). A
reminder claimed but not begun (nothing at the gateway) is still told at the change.

Real Redis, the real send path to a real HTTP SMS gateway parked mid-request
(tests/test_send_races.py's rig), the clinic events delivered, signed, to a real webhook
receiver (tests/test_completed_again.py's rig)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tests.test_completed_again import completed, delivered, send
from tests.test_completed_again import gate as gate  # noqa: F401  (the fixtures)
from tests.test_completed_again import receiver as receiver  # noqa: F401
from tests.test_completed_again import rig as rig  # noqa: F401
from tests.test_send_races import PREP, STOP
from worker.dispatch import send_claimed


def _stop_tretinoin(rig, doc: dict) -> dict:
    """The clinic records that the patient stopped tretinoin (the same visit): the stop SMS
    leaves the plan."""
    return rig.book(doc | {"medications": {"tretinoin": False}})


def test_a_change_ending_the_reminder_at_the_gateway_tells_complete_after_it_went(
        rig, receiver):
    """The prep SMS went; the stop SMS is at the gateway when the clinic takes it out of the
    plan: nothing told yet; the gateway accepts it (the delivery is recorded): then, and
    once, booking.completed."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    rig.gate.reset()
    thread, result = rig.park(STOP)
    timeline = _stop_tretinoin(rig, doc)
    assert {r["id"]: r["status"] for r in timeline["reminders"]}[STOP.rsplit("/", 1)[1]] \
        == "cancelled"
    assert completed(delivered(rig, receiver)) == []  # the stop SMS may still go
    rig.gate.answer(200)
    thread.join(20)
    assert not thread.is_alive()
    assert rig.state(STOP)["record"]["status"] == "sent"
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "reminder.sent", "booking.completed"]
    assert len(rig.gate.bodies) == 2, result


def test_the_attempt_overtaken_and_not_delivered_tells_it_complete(rig, receiver):
    """The same, but the gateway refuses the stop SMS for now (503): the attempt, overtaken
    by the change, writes nothing of its own, and tells the booking complete, once."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    rig.gate.reset()
    thread, result = rig.park(STOP)
    _stop_tretinoin(rig, doc)
    assert completed(delivered(rig, receiver)) == []
    rig.gate.answer(503)
    thread.join(20)
    assert not thread.is_alive()
    assert rig.state(STOP)["record"]["status"] == "cancelled", result
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"]
    assert rig.state(STOP)["due"] is None and rig.state(STOP)["lease"] is None


def test_a_change_ending_a_reminder_claimed_but_not_begun_tells_complete_at_once(
        rig, receiver):
    """Claimed (its task on its way), not begun: nothing is at the gateway, and its begin
    will drop it (the version moved): told complete by the change, once."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    claim = rig.claim_now(STOP)
    _stop_tretinoin(rig, doc)
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"]
    assert send_claimed(rig.ctx, STOP, claim.version, claim.claim).startswith("dropped")
    assert delivered(rig, receiver) == got
    assert len(rig.gate.bodies) == 1


def test_the_attempt_whose_worker_died_tells_it_complete_when_its_task_comes_again(
        rig, receiver):
    """The stop SMS's attempt began (its ledger taken: at the provider, as far as anyone
    knows) and its worker died before its finish; the clinic takes it out of the plan
    meanwhile: nothing told (it may have gone). Its task comes again (acks_late: a worker
    lost rejects it back to the queue): its begin drops it (the version moved) and tells the
    booking complete, once."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    claim = rig.claim_now(STOP)
    # The dead worker's begin: the ledger taken, then nothing more.
    assert rig.store.begin_send(STOP, claim.version, claim.claim, "dead-worker", 8000) == "ok"
    _stop_tretinoin(rig, doc)
    assert completed(delivered(rig, receiver)) == []
    again = send_claimed(rig.ctx, STOP, claim.version, claim.claim)
    assert again.startswith("dropped"), again
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"]
    assert send_claimed(rig.ctx, STOP, claim.version, claim.claim).startswith("dropped")
    assert delivered(rig, receiver) == got
    assert len(rig.gate.bodies) == 1


@pytest.mark.parametrize("answer", [200, 503])
def test_a_move_and_back_ending_the_reminder_at_the_gateway_waits_for_it(
        rig, receiver, answer):
    """The prep SMS went; the stop SMS is at the gateway when the clinic moves the visit a
    day on (the stop SMS is rescheduled for the new date: no longer `sending`, its attempt
    still at the gateway; the prep SMS is to go again), then moves it back and records that
    the patient stopped tretinoin (nothing is planned to go any more). Nothing is told
    complete while that attempt may still deliver; the gateway accepts it (or refuses it for
    now: the attempt, overtaken, writes nothing of its own): then, once, booking.completed,
    after its reminder.sent (before, the second change told it at once: the clinic heard
    "complete", then "sent" for a message that went after it)."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    rig.gate.reset()
    thread, result = rig.park(STOP)
    moved = doc | {"starts_at": (datetime.fromisoformat(doc["starts_at"])
                                 + timedelta(days=1)).isoformat()}
    rig.book(moved)
    assert rig.state(STOP)["record"]["status"] == "scheduled"
    timeline = _stop_tretinoin(rig, doc)
    shown = {r["id"]: r["status"] for r in timeline["reminders"]}
    assert shown["stop:sms"] == "cancelled" and shown["again-prep#1:sms"] == "cancelled", shown
    assert completed(delivered(rig, receiver)) == []  # the stop SMS may still go
    rig.gate.answer(answer)
    thread.join(20)
    assert not thread.is_alive()
    got = delivered(rig, receiver)
    went = ["prep:sms", "stop:sms"] if answer == 200 else ["prep:sms"]
    assert [e["type"] for e in got] == ["reminder.sent"] * len(went) + ["booking.completed"], got
    assert [e.get("reminder") for e in got[:-1]] == went, got
    assert rig.state(STOP)["record"]["status"] == (
        "sent" if answer == 200 else "cancelled"), result
    assert rig.state(STOP)["due"] is None and rig.state(STOP)["lease"] is None
    assert len(rig.gate.bodies) == 2
    assert rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "completed_told") == "1"


def test_the_moved_attempt_ending_between_the_changes_read_and_write_tells_it_once(
        rig, receiver):
    """As above, but the stop SMS's attempt ends (the gateway refuses it for now: the
    attempt, overtaken, writes nothing of its own) after the second change has read the
    booking and before its write lands: the finish still sees the stop SMS to go and tells
    nothing; the write must then tell it, once (before, it read the attempt as at work
    before the write and told nothing either: booking.completed never came)."""
    doc = rig.booking()
    rig.book(doc)
    rig.gate.answer(200)
    assert send(rig, PREP) == "sent"
    rig.gate.reset()
    thread, result = rig.park(STOP)
    moved = doc | {"starts_at": (datetime.fromisoformat(doc["starts_at"])
                                 + timedelta(days=1)).isoformat()}
    rig.book(moved)
    real = rig.store._apply
    landed: list[str] = []

    def finish_landing(*args, **kwargs):
        if not landed:  # the attempt ends between the change's read and its write
            rig.gate.answer(503)
            thread.join(20)
            landed.append(result["outcome"])
        return real(*args, **kwargs)

    rig.store._apply = finish_landing  # type: ignore[method-assign]
    timeline = _stop_tretinoin(rig, doc)
    rig.store._apply = real  # type: ignore[method-assign]
    assert landed and not thread.is_alive()
    shown = {r["id"]: r["status"] for r in timeline["reminders"]}
    assert shown["stop:sms"] == "cancelled" and shown["again-prep#1:sms"] == "cancelled", shown
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.sent", "booking.completed"], got
    assert rig.state(STOP)["record"]["status"] == "cancelled", result
    assert rig.state(STOP)["due"] is None and rig.state(STOP)["lease"] is None
    assert rig.state(STOP)["ledger"] is None
    assert len(rig.gate.bodies) == 2  # the prep SMS and the refused stop SMS
    assert rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "completed_told") == "1"
