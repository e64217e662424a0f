"""How many attempts a reminder took, as the clinic reads it, across a move and a replay
(real Redis, the real send path to a real HTTP gateway answering 503; the rig of
tests/test_notices_sms.py, its patient by email).

A move (or a replay) gives a reminder a fresh budget of `max_attempts`, so its attempt count
was reset to 0: a day-before email tried twice, then moved, showed `attempts: 0` after the
move, "gave up after 3 attempts" once dead although the gateway had been tried 5 times, and
its attempt log numbered its attempts 1, 2, 1, 2, 3. The count the timeline shows (README:
"how many attempts it took") is now every attempt made, in the log too; the budget after a
move or a replay stays fresh."""

from __future__ import annotations

from datetime import UTC, datetime

from tests import test_notices_sms as ns

gate = ns.gate  # fixtures
rig = ns.rig
KEY = "day-before:email"  # by email: the SMS cap of the rig's clinic (one a day) stays out
DAY_BEFORE = f"sk/M-1/{KEY}"


def test_a_move_and_a_replay_keep_counting_attempts_with_a_fresh_budget(rig):
    rig.ctx.settings.max_attempts = 3
    rig.book(rig.doc(5, channels=("email",)))
    rig.gate.answer(503)
    assert rig.send(DAY_BEFORE) == "retrying"
    assert rig.send(DAY_BEFORE) == "retrying"
    assert rig.reminders()[KEY]["attempts"] == 2
    rig.book(rig.doc(6, channels=("email",)))  # moved while retrying: its budget starts afresh
    moved = rig.reminders()[KEY]
    assert moved["status"] == "scheduled" and moved["attempts"] == 2, moved
    # Three more attempts (the fresh budget), not one: then it is dead.
    assert [rig.send(DAY_BEFORE) for _ in range(3)] == ["retrying", "retrying", "failed"]
    assert len(rig.gate.bodies) == 5
    dead = rig.reminders()[KEY]
    assert dead["status"] == "failed" and dead["attempts"] == 5, dead
    assert dead["reason"] == ("gave up after 3 attempts since it was rescheduled or "
                              "replayed (5 in all): HTTP 503 from the provider"), dead
    (letter,) = rig.store.dead_letters("sk")
    assert letter["attempts"] == 5, letter
    assert [line["attempt"] for line in rig.store.attempts(DAY_BEFORE)] == [1, 2, 3, 4, 5]
    # Replayed (a fresh budget again): the count goes on.
    assert rig.store.replay([DAY_BEFORE], datetime.now(UTC)) == [DAY_BEFORE]
    assert rig.reminders()[KEY]["attempts"] == 5
    rig.gate.answer(200)
    assert rig.send(DAY_BEFORE) == "sent"
    sent = rig.reminders()[KEY]
    assert sent["status"] == "sent" and sent["attempts"] == 6 and sent["reason"] is None, sent
    assert [line["attempt"] for line in rig.store.attempts(DAY_BEFORE)] == [1, 2, 3, 4, 5, 6]


def test_a_first_budget_reads_as_before(rig):
    """Never moved nor replayed: "gave up after 3 attempts", the count is the budget's."""
    rig.ctx.settings.max_attempts = 3
    rig.book(rig.doc(5, channels=("email",)))
    rig.gate.answer(503)
    assert [rig.send(DAY_BEFORE) for _ in range(3)] == ["retrying", "retrying", "failed"]
    dead = rig.reminders()[KEY]
    assert dead["attempts"] == 3, dead
    assert dead["reason"] == "gave up after 3 attempts: HTTP 503 from the provider", dead
    assert [line["attempt"] for line in rig.store.attempts(DAY_BEFORE)] == [1, 2, 3]


def test_an_attempt_at_the_gateway_through_two_moves_counts_once(rig):
    """The day-before email is parked at the gateway (handed over, no answer) while the
    clinic moves the visit twice: the attempt still at work keeps counting (the store's
    `_in_flight_keys`), once: never as one of this budget and again as an earlier one."""
    import threading

    from worker.dispatch import send_claimed

    rig.book(rig.doc(5, channels=("email",)))
    rig.gate.reset()
    claim = rig.claim(DAY_BEFORE)
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(
        send_claimed(rig.ctx, DAY_BEFORE, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), "never reached the gateway"
    rig.book(rig.doc(12, channels=("email",)))
    assert rig.reminders()[KEY]["attempts"] == 1
    rig.book(rig.doc(13, channels=("email",)))
    assert rig.reminders()[KEY]["attempts"] == 1, rig.reminders()[KEY]
    rig.gate.answer(503)
    thread.join(15)
    shown = rig.reminders()[KEY]
    assert shown["status"] == "scheduled" and shown["attempts"] == 1, shown
