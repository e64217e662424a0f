"""Status names of reminders and bookings: the one source (the Lua scripts get them here)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A reminder's status (the first seven) or a booking's (scheduled, held, cancelled,
    completed). DESIGN.md lists both."""

    SCHEDULED = "scheduled"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    HELD = "held"
    COMPLETED = "completed"


# A reminder in one of these may still be sent.
PENDING = frozenset({Status.SCHEDULED, Status.SENDING, Status.RETRYING})
# A reminder in one of these is history: nothing about it changes any more (a dead letter
# changes only by replay, a correction of the booking or a cancel).
TERMINAL = frozenset({Status.SENT, Status.FAILED, Status.SKIPPED, Status.CANCELLED})


def lua_prelude() -> str:
    """Return Lua locals naming every status (`ST_SENDING = 'sending'`, ...)."""
    return "".join(f"local ST_{s.name} = '{s.value}'\n" for s in Status)
