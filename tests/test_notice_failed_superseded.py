"""A change notice refused for good, then superseded by a later change, keeps why it failed
(real Redis, the real send path, a real HTTP SMS gateway; the rig of tests/test_notices_sms.py).

The gateway refused "your visit moved" (HTTP 400: a dead letter, `failed`). The clinic moved
the visit again: the new move's notice replaces it and the dead letter leaves (a replay must
not send a notice of a date no longer true), but "superseded by a later change" was written
over the failure: the timeline then said the first notice was never sent because of the
second move, while the patient's number had been refused first. As a cancel and a step
leaving the plan keep it (tests/api/test_cancel_after_failure.py), the reason says both.
"""

from __future__ import annotations

from tests import test_notices_sms as ns
from worker.timeline import render_table

gate = ns.gate  # fixtures
rig = ns.rig
NOTICE = "sk/M-1/rescheduled#1:sms"
FAILED = "permanent failure: HTTP 400 from the provider"


def test_a_failed_notice_superseded_by_a_later_move_keeps_why_it_failed(rig):
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"  # "see you on <date>": a move must be told
    rig.book(rig.doc(12))
    rig.gate.answer(400)
    assert rig.send(NOTICE) == "failed"
    failed = rig.reminders()["rescheduled#1:sms"]
    assert failed["status"] == "failed" and failed["reason"] == FAILED, failed
    assert [d["ref"] for d in rig.store.dead_letters("sk")] == [NOTICE]

    rig.gate.answer(200)
    rig.book(rig.doc(19))
    told = ns.notices(rig.reminders())
    assert set(told) == {"rescheduled#1:sms", "rescheduled#2:sms"}
    first = told["rescheduled#1:sms"]
    assert first["status"] == "cancelled" and first["attempts"] == 1, first
    assert first["reason"] == f"superseded by a later change; it had failed before: {FAILED}"
    assert told["rescheduled#2:sms"]["status"] == "scheduled"
    assert rig.store.dead_letters("sk") == []  # never replayed
    assert rig.store.redis.zscore(rig.store.due_key, NOTICE) is None
    table = render_table(rig.store.timeline("sk", "M-1"), "Europe/Madrid")
    (row,) = [line for line in table.splitlines() if "rescheduled#1:sms" in line]
    assert row.endswith(f"superseded by a later change; it had failed before: {FAILED}"), row
