"""Held bookings and the pause message again (`repause`): rules found left over by review
(real Redis, real Apprise, a real HTTP gateway; the rig of tests/test_notices_sms.py, the
shipped microneedling protocol, a send window open all day unless a test narrows it).

- a booking held before anything was told (held from the start, or moved and held at once
  before any message went) named in its hold message the date it had when first stored:
  `held_from` took the stored document's start although the patient had been told none, so
  the hold message ("we will call you before your <date> visit") named the first date and
  the release then told a move from a date the patient never heard;
- a booking booked again while held before `reopened` existed (commit 7a8337b) told nothing
  at its release (on the cancelled date), its hold message named the cancelled date, and a
  cancel while so held told the cancel a second time: the stored shape is written here
  directly, as that code left it (the mark removed from the hash in Redis);
- a move keeping the visit's day (a later hour), made while the send window was closed,
  sent the pause message again at the next opening, word for word the one the patient had
  (its time had passed in both plans: "too soon for a full pause, stop now").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests import test_notices_sms as ns
from tests.test_told_date import _held, _release, _send_one
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer

gate = ns.gate  # fixtures
rig = ns.rig


# --- the hold message names the date the patient can know ------------------------------------

def test_held_from_the_start_and_moved_before_the_hold_message_went_names_the_new_date(rig):
    """Booked 5 days out and held at once; the clinic moves it to 12 days (still held) before
    the hold message went: the hold message names 12 days, the only date the patient hears;
    the release then has no move to tell (nothing told of 5 days)."""
    first, moved = _held(rig.doc(5)), _held(rig.doc(12))
    assert rig.book(first)["status"] == "held"
    assert rig.book(moved)["status"] == "held"
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, moved["starts_at"]), text
    assert not ns.names(text, first["starts_at"]), text
    _release(rig, moved)
    assert ns.notices(rig.reminders()) == {}, ns.notices(rig.reminders())


def test_held_from_the_start_the_hold_message_gone_names_that_date_at_the_release(rig):
    """Held from the start at 5 days, its hold message gone (naming 5 days); moved to 12 while
    held: the release tells the move, from 5 days (as before)."""
    first, moved = _held(rig.doc(5)), _held(rig.doc(12))
    assert rig.book(first)["status"] == "held"
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, first["starts_at"]), text
    assert rig.book(moved)["status"] == "held"
    _release(rig, moved)
    assert set(ns.notices(rig.reminders())) == {"rescheduled#1:sms"}
    text = _send_one(rig, "sk/M-1/rescheduled#1:sms")
    assert ns.names(text, moved["starts_at"]) and "moved" in text, text


def test_scheduled_with_nothing_sent_then_moved_and_held_names_the_new_date(rig):
    """Booked 5 days out, nothing sent yet; moved to 12 days and held at once: the hold
    message names 12 days (the patient was told no other)."""
    rig.book(rig.doc(5))
    moved = _held(rig.doc(12))
    assert rig.book(moved)["status"] == "held"
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, moved["starts_at"]), text


# --- a booking booked again while held, as stored before `reopened` (7a8337b) -------------------

def _reopened_held_as_stored_before(rig, days: int) -> dict[str, Any]:
    """Told 5 days out, cancelled (the patient told so), booked again at `days` and held:
    stored as the code before 7a8337b left it, without the `reopened` mark (written here
    by removing it from the booking's hash in Redis)."""
    rig.book(rig.doc(5))
    assert rig.send(ns.DAY_BEFORE) == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert _send_one(rig, "sk/M-1/cancelled#1:sms")
    again = _held(rig.doc(days))
    assert rig.book(again)["status"] == "held"
    assert rig.store.redis.hdel(rig.store.booking_key("sk", "M-1"), "reopened") == 1
    return again


@pytest.mark.parametrize("days", [5, 12])
def test_an_old_reopened_held_booking_is_told_at_its_release(rig, days):
    """Released, the patient hears the visit is on again, on its date (the same date as the
    cancelled one too), as a booking stored with `reopened` does; once."""
    again = _reopened_held_as_stored_before(rig, days)
    told = set(ns.notices(rig.reminders()))
    _release(rig, again)
    new = {k: r for k, r in ns.notices(rig.reminders()).items() if k not in told}
    assert [r["status"] for r in new.values()] == ["scheduled"], new
    (key,) = new
    assert key.startswith("rescheduled#") and key.endswith(":sms"), key
    text = _send_one(rig, f"sk/M-1/{key}")
    assert ns.names(text, again["starts_at"]) and "14:30" in text, text
    _release(rig, again)
    assert {k for k in ns.notices(rig.reminders()) if k not in told} == {key}


def test_an_old_reopened_held_bookings_hold_message_names_the_new_date(rig):
    again = _reopened_held_as_stored_before(rig, 12)
    text = _send_one(rig, "sk/M-1/hold-notice:sms")
    assert ns.names(text, again["starts_at"]), text


def test_an_old_reopened_held_booking_cancelled_again_says_nothing_more(rig):
    """Cancelled again while so held: the patient was told it is cancelled and heard of
    nothing since; no second cancel message."""
    _reopened_held_as_stored_before(rig, 12)
    told = set(ns.notices(rig.reminders()))
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert set(ns.notices(rig.reminders())) == told


# --- the pause message again only when what it says changed ----------------------------------

def _window_closed_now(rig) -> None:
    """The clinic's send window made one hour wide, opening at least an hour after now in
    Madrid (so it is closed for the test, whatever the hour it runs at); the catalog read
    again."""
    hour = datetime.now(ns.TZ).hour
    start = hour + 2 if hour + 3 <= 24 else 1
    path = rig.ctx.settings.config_dir / "clinics" / "sk.toml"
    text = path.read_text(encoding="utf-8")
    assert 'start = "00:00"\nend = "24:00"' in text
    path.write_text(text.replace('start = "00:00"\nend = "24:00"',
                                 f'start = "{start:02d}:00"\nend = "{start + 1:02d}:00"'),
                    encoding="utf-8")
    rig.catalog = Catalog.load(rig.ctx.settings)
    rig.ctx = Context(settings=rig.ctx.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))


def _on_tretinoin(doc: dict[str, Any], hour: int = 14, minute: int = 30) -> dict[str, Any]:
    doc["medications"]["tretinoin"] = True
    start = datetime.fromisoformat(doc["starts_at"]).replace(hour=hour, minute=minute)
    doc["starts_at"] = start.isoformat()
    return doc


@pytest.mark.parametrize("days", [5, 6])
def test_a_move_keeping_the_visits_day_sends_the_pause_message_once(rig, days):
    """Booked 5 days out, on tretinoin: the pause SMS's time (7 days before) had passed, so
    it went at once ("your <date> visit is too soon for a full pause: stop now and call
    us"). Later, with the send window closed, the clinic moves the visit to 16:30 the same
    day: the move's notice tells the new time (and to keep pausing); the pause SMS does not
    go again at the next opening, word for word the one the patient has. Moved to another
    day (6 days out), it goes again for the new date."""
    first = _on_tretinoin(rig.doc(5))
    rig.book(first)
    text = _send_one(rig, "sk/M-1/stop-retinoids:sms")
    assert ns.names(text, first["starts_at"]) and "stop" in text, text
    _window_closed_now(rig)
    moved = _on_tretinoin(rig.doc(days), 16, 30)
    rig.book(moved)
    shown = rig.reminders()
    assert set(ns.notices(shown)) == {"rescheduled#1:sms"}, shown
    again = sorted(k for k in shown if k.startswith("repause#"))
    assert again == ([] if days == 5 else ["repause#1:sms"]), again
    if again:
        assert rig.reminders()[again[0]]["status"] == "scheduled"
