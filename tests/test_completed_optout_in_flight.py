"""`booking.completed` means nothing more will be sent. A reminder the clinic's change took
out of the plan while its attempt was at the gateway still counts as going until that
attempt is done (tests/test_completed_in_flight.py): the change's own write waits for it.
So must the patient's STOP landing meanwhile, which skips the booking's last SMS still to
go: in its own script, and in the begin of a claim the STOP left to it (claimed, not yet
begun). Without this the clinic heard "booking.completed" and then "reminder.sent" for the
message at the gateway, as 5221279's review found for the change's write.

Real Redis, the real send path to a real HTTP SMS gateway parked mid-request
(tests/test_send_races.py's rig), the clinic events delivered, signed, to a real webhook
receiver (tests/test_completed_again.py's rig); the STOP through `Store.opt_out`, the one
script the inbound SMS route and the unsubscribe link run.
"""

from __future__ import annotations

import pytest

from tests.test_completed_again import completed, delivered
from tests.test_completed_again import gate as gate  # noqa: F401  (the fixtures)
from tests.test_completed_again import receiver as receiver  # noqa: F401
from tests.test_completed_again import rig as rig  # noqa: F401
from tests.test_send_races import PREP, STOP
from worker.dispatch import send_claimed

PHONE = "+34600111222"
WHY = "the patient replied STOP by SMS at 2026-11-24T09:00:00Z"


@pytest.mark.parametrize("prep", ["waiting", "claimed"])
@pytest.mark.parametrize("answer", [200, 503])
def test_stop_after_a_change_ended_the_sms_at_the_gateway_waits_for_it(
        rig, receiver, prep, answer):
    """The stop SMS is at the gateway when the clinic records that the patient stopped
    tretinoin (it leaves the plan; its attempt goes on). The prep SMS is still to go
    (`waiting`), or claimed with its task on the way to a sender (`claimed`). The patient
    texts STOP: the prep SMS is skipped (by the STOP, or by its begin), nothing else is left
    to go but the stop SMS at the gateway: booking.completed only once that is done."""
    doc = rig.booking()
    rig.book(doc)
    thread, result = rig.park(STOP)
    timeline = rig.book(doc | {"medications": {"tretinoin": False}})
    assert {r["id"]: r["status"] for r in timeline["reminders"]}["stop:sms"] == "cancelled"
    claim = rig.claim_now(PREP) if prep == "claimed" else None
    done = rig.store.opt_out("rc", "sms", PHONE, WHY)
    assert tuple(done) == ((1, ["R-1"]) if prep == "waiting" else (0, []))
    if claim is not None:
        assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: opted out"
    assert rig.store.record(PREP)["status"] == "skipped"
    assert rig.store.record(PREP)["reason"] == f"opted_out: {WHY}"
    # The stop SMS may still go: the booking is not complete yet.
    got = delivered(rig, receiver)
    assert [e["type"] for e in got] == ["reminder.skipped"], got
    rig.gate.answer(answer)
    thread.join(20)
    assert not thread.is_alive()
    got = delivered(rig, receiver)
    if answer == 200:  # it went: recorded as sent, told, then the booking complete
        assert result["outcome"] == "sent"
        assert rig.store.record(STOP)["status"] == "sent"
        assert [e["type"] for e in got] == [
            "reminder.skipped", "reminder.sent", "booking.completed"], got
        assert got[1]["reminder"] == "stop:sms"
    else:  # refused: overtaken, nothing of its own written; the booking complete
        assert rig.store.record(STOP)["status"] == "cancelled"
        assert [e["type"] for e in got] == ["reminder.skipped", "booking.completed"], got
    assert len(completed(got)) == 1
    assert len(rig.gate.bodies) == 1  # the stop SMS's one request; the prep SMS never went
    s = rig.state(STOP)
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s
    s = rig.state(PREP)
    assert (s["due"], s["lease"], s["ledger"]) == (None, None, None), s
    # Nothing more is told later (the pump's next run, an expired lease): once only.
    assert rig.store.claim_due(100, 8) == []
    assert delivered(rig, receiver) == got
