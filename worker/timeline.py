"""A booking's timeline: the DESIGN.md JSON shape and the human table of it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from .models import Booking, utc_iso
from .planner import Plan, is_hold_notice
from .status import PENDING

REMINDER_FIELDS = ("id", "step", "channel", "due_at", "status", "attempts", "sent_at", "reason")


def from_plan(booking: Booking, plan: Plan, *, version: int = 0) -> dict[str, Any]:
    """Return the timeline a plan would give, before anything is stored or sent."""
    hold = f"booking held: {plan.hold_reason}" if plan.hold_reason else None
    return {
        "clinic": booking.clinic,
        "booking_id": booking.booking_id,
        "status": plan.status,
        "version": version,
        "hold_reason": plan.hold_reason,
        "late_pause": bool(plan.late_pause),
        "reminders": [
            {
                "id": r.key,
                "step": r.step,
                "channel": r.channel,
                "due_at": utc_iso(r.due_at),
                "status": r.status,
                "attempts": 0,
                "sent_at": None,
                # As the stored timeline (`Store._timeline_of`): the hold is the reason of
                # what waits for the release, not of a step skipped for its own reason.
                "reason": (hold if hold and r.status in PENDING and not is_hold_notice(r.key)
                           else r.reason),
            }
            for r in plan.reminders
        ],
    }


def render_table(timeline: dict[str, Any], timezone: str | None = None) -> str:
    """Return the timeline as an aligned text table (times in `timezone` if given)."""
    tz = ZoneInfo(timezone) if timezone else None
    head = (
        f"{timeline['clinic']}/{timeline['booking_id']}  status={timeline['status']}"
        f"  version={timeline['version']}"
    )
    lines = [head]
    if timeline.get("hold_reason"):
        lines.append(f"HELD: {timeline['hold_reason']}")
    rows = [("DUE", "STEP", "CHANNEL", "STATUS", "TRIES", "REASON")]
    dues = [datetime.fromisoformat(r["due_at"]) for r in timeline["reminders"] if r["due_at"]]
    # Seconds only when some reminder needs them (second-based test and demo protocols).
    clock = "%H:%M:%S" if any(d.second for d in dues) else "%H:%M"

    def local(iso: str) -> str:
        when = datetime.fromisoformat(iso)
        return when.astimezone(tz).strftime(f"%a %Y-%m-%d {clock} %Z") if tz else iso

    if timeline.get("late_pause"):
        lines.append("LATE PAUSE: booked too late for the full retinoid pause; the patient is "
                     "asked to call the clinic")
    # The patient's SMS replies (worker/api/inbound.py), as the JSON has them.
    if timeline.get("confirmed_at"):
        lines.append("CONFIRMED: the patient confirmed this visit by SMS on "
                     + local(timeline["confirmed_at"]))
    if timeline.get("call_requested_at"):
        lines.append("CALL REQUESTED: the patient asked by SMS to be called, on "
                     + local(timeline["call_requested_at"]))

    for r in timeline["reminders"]:
        due = local(r["due_at"]) if r["due_at"] else "-"
        if r["status"] == "sent" and r["sent_at"]:  # when, and why if not the plain path
            reason = f"sent {local(r['sent_at'])}" + (f"; {r['reason']}" if r["reason"] else "")
        else:
            reason = r["reason"] or (f"sent {local(r['sent_at'])}" if r["sent_at"] else "")
        rows.append((due, r["id"], r["channel"], r["status"], str(r["attempts"]), reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True))
            + "  "
            + row[5]
        )
    return "\n".join(line.rstrip() for line in lines)
