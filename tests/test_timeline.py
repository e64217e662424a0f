"""The human table of a timeline: local times, and why each reminder is where it is."""

from __future__ import annotations

from worker.timeline import render_table

TIMELINE = {
    "clinic": "glow", "booking_id": "A-1042", "status": "scheduled", "version": 3,
    "hold_reason": None,
    "reminders": [
        {"id": "stop-retinoids:sms", "step": "stop-retinoids", "channel": "sms",
         "due_at": "2026-11-28T17:00:00Z", "status": "sent", "attempts": 1,
         "sent_at": "2026-11-28T17:00:01Z", "reason": None},
        {"id": "day-before:sms", "step": "day-before", "channel": "sms",
         "due_at": "2026-12-04T09:00:00Z", "status": "retrying", "attempts": 2,
         "sent_at": None, "reason": "retrying at 2026-12-04T09:00:30Z: timed out"},
    ],
}


def test_table_in_the_patients_timezone_with_sent_times_and_reasons():
    lines = render_table(TIMELINE, "Europe/Madrid").splitlines()
    assert lines[0] == "glow/A-1042  status=scheduled  version=3"
    assert lines[2].split() == ["Sat", "2026-11-28", "18:00", "CET", "stop-retinoids:sms", "sms",
                                "sent", "1", "sent", "Sat", "2026-11-28", "18:00", "CET"]
    assert lines[3].split()[-7:] == [
        "retrying", "2", "retrying", "at", "2026-12-04T09:00:30Z:", "timed", "out"]


def test_table_shows_seconds_only_when_needed_and_the_hold():
    held = dict(TIMELINE, status="held", hold_reason="isotretinoin last taken 2026-10-01")
    held["reminders"] = [dict(TIMELINE["reminders"][1], due_at="2026-12-04T09:00:05Z")]
    lines = render_table(held, "Europe/Madrid").splitlines()
    assert lines[1] == "HELD: isotretinoin last taken 2026-10-01"
    assert "10:00:05 CET" in lines[3]
