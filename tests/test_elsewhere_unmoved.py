"""A step the patient already has does not go again on a new channel because its time
changed without the visit moving (real Redis, real Apprise, a real HTTP SMS gateway; the rig
of tests/test_notices_sms.py, a send window open all day).

`sent_elsewhere` skips a plan step on a new channel when the same step already went on a
channel the plan no longer sends it on ("already sent by email on <date>"), except when it
goes again for a new date: at a move, the plan's own reminder on the new channel carries the
step for the new date (`again_fields` cannot: its step is not on the old channel any more).
That exception asked only whether the plan's time for the step differs from the one the copy
went for, not whether the visit moved: a corrected timezone, a narrower send window or a
protocol edit changes the day-before's time too. An email-only patient who had "see you
tomorrow at 14:30" by email, whose clinic then corrected their timezone (or narrowed its
window, or moved the step to 11:00) and later switched them to SMS, got it again by SMS.
So did the pause message ("stop tretinoin tonight", `_repauses` asked only that its time be
still ahead), and a day-before whose copy for the new date had already gone again after a
move. The exception now holds only after a move since the copy went: this change is one
(`_change_kind`), or an earlier one's copy for the new date is still to go (an again or
repause on that channel, or the plan's own reminder that carries it, which says so). After a
real move the step still goes on the new channel (here, tests/test_again_channels.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests import test_notices_sms as ns
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan

gate = ns.gate  # fixtures
rig = ns.rig
DAY_BEFORE_SMS = "sk/M-1/day-before:sms"
PAUSE_SMS = "sk/M-1/stop-retinoids:sms"
PHONE = "+34600111222"


def _book_with(rig, doc: dict[str, Any], catalog: Catalog) -> None:
    booking = parse_booking(doc, catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, catalog.protocols["microneedling"],
                                   catalog.clinics["sk"], now), now)


def _edited(rig, path: str, old: str, new: str) -> Catalog:
    """The rig's configuration with one file edited, loaded afresh (as a clinic's edit and a
    restart would)."""
    file = rig.ctx.settings.config_dir / path
    text = file.read_text(encoding="utf-8")
    assert old in text, (path, old)
    file.write_text(text.replace(old, new, 1), encoding="utf-8")
    return Catalog.load(rig.ctx.settings)


def _force_send(rig, ref: str) -> str | None:
    """Make `ref` due now by hand and, if the pump would claim it, send it through the real
    send path; None when it is not claimed (nothing to send)."""
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    result = None
    for c in rig.store.claim_due(100, rig.ctx.settings.lease_seconds):
        if c.ref == ref:
            result = send_claimed(rig.ctx, ref, c.version, c.claim)
        else:
            assert rig.store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                     "not in this test", c.claim)
    return result


def _sms_bodies(rig, since: int) -> list[str]:
    return [b["message"] for b in rig.gate.bodies[since:] if b.get("to") == PHONE]


def _sent_day(rig, key: str, zone: str | None = None) -> str:
    """The patient-local day `key` went on, in `zone` (the patient's timezone as the reason is
    written, after a correction), else the rig's."""
    sent_at = rig.reminders()[key]["sent_at"]
    tz = ZoneInfo(zone) if zone else ns.TZ
    return datetime.fromisoformat(sent_at).astimezone(tz).date().isoformat()


@pytest.mark.parametrize("change", ["timezone", "window", "protocol"])
def test_the_day_before_by_email_is_not_sent_again_by_sms_after_a_change_of_its_time(
        rig, change):
    """Email only; the day-before went by email. The clinic changes the step's time without
    moving the visit (a corrected timezone, Canary Islands: 10:00 there is 11:00 Madrid; a send
    window opening at 10:30; the protocol's day-before at 11:00), then switches the patient to
    SMS only. The day-before is skipped, and even made due by hand no SMS goes."""
    doc = rig.doc(5, channels=("email",))
    rig.book(doc)
    assert rig.send("sk/M-1/day-before:email") == "sent"
    catalog = rig.catalog
    if change == "timezone":
        doc["patient"]["timezone"] = "Atlantic/Canary"
    elif change == "window":
        catalog = _edited(rig, "clinics/sk.toml", 'start = "00:00"', 'start = "10:30"')
    else:
        catalog = _edited(rig, "protocols/microneedling.toml",
                          'id = "day-before"\nday = -1\ntime = "10:00"',
                          'id = "day-before"\nday = -1\ntime = "11:00"')
    day = _sent_day(rig, "day-before:email", doc["patient"]["timezone"])
    due = rig.reminders()["day-before:email"]["due_at"]
    _book_with(rig, doc, catalog)  # the step's time changed; the visit did not move
    shown = rig.reminders()
    assert shown["day-before:email"]["status"] == "sent"
    rig.ctx = Context(settings=rig.ctx.settings, store=rig.store, catalog=catalog,
                      renderer=rig.ctx.renderer)
    doc["patient"]["channels"] = ["sms"]
    _book_with(rig, doc, catalog)
    shown = rig.reminders()
    assert not any(k.startswith(("again-", "rescheduled#")) for k in shown), sorted(shown)
    before = len(rig.gate.bodies)
    result = _force_send(rig, DAY_BEFORE_SMS)
    assert not [t for t in _sms_bodies(rig, before) if "see you" in t], (result, due)
    sms = rig.reminders()["day-before:sms"]
    assert (sms["status"], sms["reason"]) == (
        "skipped", f"not sent: already sent by email on {day}"), sms
    assert rig.store.redis.zscore(rig.store.due_key, DAY_BEFORE_SMS) is None


def test_the_pause_message_by_email_is_not_sent_again_by_sms_after_a_timezone_correction(rig):
    """A tretinoin user, email only: "stop tretinoin tonight" went by email. The clinic
    corrects the patient's timezone (New York: 18:00 there is after midnight in Madrid, still
    ahead), then switches them to SMS only: the pause message is not sent again by SMS (it is
    only re-sent for a new date, `repause`, after a move)."""
    doc = rig.doc(10, channels=("email",))
    doc["medications"] = {"tretinoin": True, "retinol": False}
    rig.book(doc)
    assert rig.send("sk/M-1/stop-retinoids:email") == "sent"
    doc["patient"]["timezone"] = "America/New_York"
    day = _sent_day(rig, "stop-retinoids:email", "America/New_York")
    rig.book(doc)
    doc["patient"]["channels"] = ["sms"]
    rig.book(doc)
    shown = rig.reminders()
    assert not any(k.startswith(("repause", "rescheduled#")) for k in shown), sorted(shown)
    before = len(rig.gate.bodies)
    result = _force_send(rig, PAUSE_SMS)
    assert not [t for t in _sms_bodies(rig, before) if "tretinoin" in t.lower()], result
    sms = rig.reminders()["stop-retinoids:sms"]
    assert (sms["status"], sms["reason"]) == (
        "skipped", f"not sent: already sent by email on {day}"), sms


def test_the_day_before_again_by_email_went_then_sms_only_not_again_by_sms(rig):
    """Moved: the day-before went by email for the old date and again by email for the new
    one (again-day-before#1:email). The clinic then switches the patient to SMS only, the
    date unchanged: the patient has the new date's day-before, so it does not go by SMS."""
    rig.book(rig.doc(5, channels=("email",)))
    assert rig.send("sk/M-1/day-before:email") == "sent"
    moved = rig.doc(12, channels=("email",))
    rig.book(moved)
    assert rig.send("sk/M-1/again-day-before#1:email") == "sent"
    day = _sent_day(rig, "again-day-before#1:email")
    rig.book(rig.doc(12, channels=("sms",)))
    before = len(rig.gate.bodies)
    result = _force_send(rig, DAY_BEFORE_SMS)
    assert not [t for t in _sms_bodies(rig, before) if "see you" in t], result
    sms = rig.reminders()["day-before:sms"]
    assert (sms["status"], sms["reason"]) == (
        "skipped", f"not sent: already sent by email on {day}"), sms


def test_moved_and_switched_to_sms_the_day_before_goes_by_sms_and_stays_after_a_sync(rig):
    """The move itself (the exception kept): the day-before went by email for the old date;
    the clinic moves the visit and switches the patient to SMS in one re-submission. The
    plan's own day-before SMS carries the step for the new date, saying so; a later
    re-submission without a move (a corrected name) keeps it, and it goes."""
    rig.book(rig.doc(5, channels=("email",)))
    assert rig.send("sk/M-1/day-before:email") == "sent"
    moved = rig.doc(12, channels=("sms",))
    rig.book(moved)
    sms = rig.reminders()["day-before:sms"]
    assert sms["status"] == "scheduled", sms
    assert sms["due_at"] == ns.madrid(moved["starts_at"], -1, 10)
    assert sms["reason"].startswith(
        "the appointment moved after it had gone out by email for the old date: again for "
        "the new date ("), sms
    moved["patient"]["name"] = "Ana Ruiz Pérez"
    rig.book(moved)
    assert rig.reminders()["day-before:sms"]["status"] == "scheduled"
    before = len(rig.gate.bodies)
    assert rig.send(DAY_BEFORE_SMS) == "sent"
    (text,) = _sms_bodies(rig, before)
    assert "see you" in text and ns.names(text, moved["starts_at"]), text


def test_moved_then_sms_only_the_pause_message_again_goes_by_sms(rig):
    """The pause message went by email; the visit moved (repause#1:email to go, "stop again
    for the new date"); then the clinic switches the patient to SMS only without moving it:
    the repause email is cancelled and the plan's own pause SMS carries it, saying so."""
    doc = rig.doc(10, channels=("email",))
    doc["medications"] = {"tretinoin": True, "retinol": False}
    rig.book(doc)
    assert rig.send("sk/M-1/stop-retinoids:email") == "sent"
    moved = rig.doc(17, channels=("email",))
    moved["medications"] = doc["medications"]
    rig.book(moved)
    assert rig.reminders()["repause#1:email"]["status"] == "scheduled"
    moved["patient"]["channels"] = ["sms"]
    rig.book(moved)
    shown = rig.reminders()
    assert shown["repause#1:email"]["status"] == "cancelled"
    sms = shown["stop-retinoids:sms"]
    assert sms["status"] == "scheduled", sms
    assert "by email for the old date: again for the new date (" in sms["reason"], sms
    before = len(rig.gate.bodies)
    assert rig.send(PAUSE_SMS) == "sent"
    (text,) = _sms_bodies(rig, before)
    assert "tretinoin" in text.lower() and ns.names(text, moved["starts_at"]), text
