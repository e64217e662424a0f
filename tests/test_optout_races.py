"""An opt-out racing a send in flight, forced: the attempt is parked mid-flight (before the
hand-over, or at the SMS gateway after it), the patient's STOP lands, the attempt is
released. The send either happened before the opt-out (and is recorded as sent) or never
(skipped with the reason `opted_out`); the final Redis state of everything is asserted,
and the reminder is counted once: as sent or as skipped, never both (the opt-out leaves a
reminder being sent to its attempt's own fence).
Real Redis, real Apprise, a real HTTP gateway on 127.0.0.1 (tests/test_send_races.py's rig).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from tests import test_send_races as races
from tests.test_send_races import PREP, STOP, Rig, assert_no_claim
from worker.dispatch import send_claimed
from worker.store import Attempt, Store

gate = races.gate  # the rig's fixtures
rig = races.rig
PHONE = "+34600111222"
WHY = "the patient replied STOP by SMS at 2026-11-22T10:00:00Z"


def opt_out(rig: Rig) -> tuple[int, list[str]]:
    return rig.store.opt_out("rc", "sms", PHONE, WHY)


def counted(rig: Rig) -> dict[str, int]:
    raw = rig.store.redis.hgetall(f"{rig.store.prefix}:metrics")
    return {k.split("|")[0]: int(v) for k, v in raw.items() if k.endswith("|rc|sms")
            and k.startswith(("sent|", "skipped|"))}


def test_parked_at_the_gateway_the_send_happened_before_and_is_recorded_as_sent(rig):
    rig.book(rig.booking())
    thread, result = rig.park(PREP)  # handed over: the gateway holds the request
    skipped, touched = opt_out(rig)
    assert (skipped, touched) == (1, ["R-1"])  # the one waiting; the one in flight is its own
    rig.gate.answer(200)
    thread.join(20)
    assert result["outcome"] == "sent"
    s = rig.state(PREP)
    # It went out before the opt-out: recorded as sent, never to be sent again.
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"], s["dead"]) == (None, None, None), s
    assert s["log"][-1]["result"] == "ok"  # its attempt still owned it: sent, counted once
    assert len(rig.gate.bodies) == 1
    assert counted(rig) == {"sent": 1, "skipped": 1}  # PREP sent, STOP skipped
    # The other SMS never goes: skipped with the reason, out of every set.
    other = rig.state(STOP)
    assert other["record"]["status"] == "skipped"
    assert other["record"]["reason"] == f"opted_out: {WHY}"
    assert (other["due"], other["lease"], other["ledger"]) == (None, None, None), other
    assert_no_claim(rig)


def test_parked_before_the_hand_over_the_send_never_happens(rig):
    """The attempt has begun (ledger taken) and rendered; it is held just before its last
    check. The opt-out lands; released, the attempt sends nothing."""
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    parked, release = threading.Event(), threading.Event()
    real = Store.still_owned

    def held_still_owned(self, *args, **kwargs):
        parked.set()
        assert release.wait(20)
        return real(self, *args, **kwargs)

    rig.store.still_owned = held_still_owned.__get__(rig.store)  # type: ignore[method-assign]
    result: dict[str, str] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "outcome", send_claimed(rig.ctx, PREP, claim.version, claim.claim)))
    thread.start()
    assert parked.wait(10)
    assert rig.store.redis.get(rig.store.ledger_key(PREP))  # it holds the ledger
    assert opt_out(rig) == (1, ["R-1"])  # STOP; PREP is left to its attempt
    release.set()
    thread.join(20)
    assert result["outcome"] == "dropped: overtaken before sending"
    assert rig.gate.bodies == []  # nothing reached the gateway
    # Its fence found the address opted out: back to the schedule at once, ledger freed...
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled", s
    assert s["due"] is not None and (s["lease"], s["dead"], s["ledger"]) == (None, None, None)
    # ...and the next begin applies the opt-out in full, as if it had landed before.
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: opted out"
    assert rig.gate.bodies == []
    for ref in (PREP, STOP):
        s = rig.state(ref)
        assert s["record"]["status"] == "skipped", s
        assert s["record"]["reason"] == f"opted_out: {WHY}"
        assert (s["due"], s["lease"], s["dead"], s["ledger"]) == (None, None, None, None), s
    log = rig.state(PREP)["log"]
    assert [(x["outcome"], x["result"]) for x in log] == [("abandoned", "ok")], log
    assert counted(rig) == {"skipped": 2}  # each reminder once, nothing sent
    assert_no_claim(rig)


def test_claimed_but_not_begun_is_refused_by_the_fenced_begin(rig):
    """The pump claimed it; the opt-out lands before the send task begins."""
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    opt_out(rig)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: opted out"
    assert rig.gate.bodies == []
    s = rig.state(PREP)
    assert s["record"]["status"] == "skipped" and s["ledger"] is None and s["lease"] is None


def test_a_booking_the_opt_out_did_not_see_is_refused_at_begin(rig):
    """A booking stored after the opt-out (or missed by it): the fenced begin reads the
    opt-out itself and skips the reminder with the reason; nothing is sent."""
    opt_out(rig)
    rig.book(rig.booking(booking_id="R-1"))
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: opted out"
    assert rig.gate.bodies == []
    s = rig.state(PREP)
    assert s["record"]["status"] == "skipped" and s["record"]["reason"] == f"opted_out: {WHY}"
    assert (s["due"], s["lease"], s["ledger"]) == (None, None, None), s
    # Opted in again: the next booking's SMS goes.
    assert rig.store.opt_in("rc", "sms", PHONE)
    rig.book(rig.booking(booking_id="R-2"))
    ref = "rc/R-2/prep:sms"
    claim = rig.claim_now(ref)
    rig.gate.answer(200)
    assert send_claimed(rig.ctx, ref, claim.version, claim.claim) == "sent"


@pytest.mark.parametrize("order", ["opt-out first", "begin first"])
def test_begin_and_opt_out_in_either_order(rig, order):
    """Both are one script: the begin is wholly before the opt-out (then the attempt owns
    the ledger and its last check finds it overtaken) or after it (refused)."""
    rig.book(rig.booking())
    claim = rig.claim_now(PREP)
    if order == "opt-out first":
        opt_out(rig)
        assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok", 8000) == \
            "opted out"
    else:
        assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok", 8000) == "ok"
        opt_out(rig)
        attempt = Attempt(claim.version, claim.claim, "tok")
        assert not rig.store.still_owned(PREP, attempt, send_to=("sms", PHONE))
        assert rig.store.finish(PREP, attempt, "abandon", at=datetime.now(UTC)) == "ok"
        claim = rig.claim_now(PREP)  # back at once; the next begin applies the opt-out
        assert rig.store.begin_send(PREP, claim.version, claim.claim, "tok2", 8000) == \
            "opted out"
    s = rig.state(PREP)
    assert s["record"]["status"] == "skipped" and s["ledger"] is None, s
    assert_no_claim(rig)
