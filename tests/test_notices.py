"""Change notices in the store (real Redis): a move or a cancel after messages went out
adds notices to the booking's own schedule; nothing went out, nothing is added."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Attempt, Store

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
MOVED_TO = "2026-12-12T14:30:00+01:00"


@pytest.fixture
def store(redis_client) -> Store:
    return Store(redis_client, "n", retention_days=FIXED_SCENARIO_RETENTION_DAYS)


def book(store: Store, catalog, doc: dict[str, Any], now: datetime = NOW) -> dict[str, Any]:
    booking = parse_booking(doc, catalog)
    planned = plan(booking, catalog.protocols[booking.treatment],
                   catalog.clinics[booking.clinic], now)
    return store.upsert(booking, planned, now)


def deliver(store: Store, *keys: str, finish: bool = True) -> None:
    """Claim these reminders of glow/A-1042 now and record them sent (or leave them sending)."""
    refs = [f"glow/A-1042/{k}" for k in keys]
    for ref in refs:
        store.redis.zadd(store.due_key, {ref: 0})
    claimed = store.claim_due(100, 60)
    for c in claimed:  # others due by the real clock (the confirmation) wait again
        if c.ref not in refs:
            assert store.requeue(c.ref, NOW + timedelta(days=30), "not in this test", c.claim)
    claims = [c for c in claimed if c.ref in refs]
    assert sorted(c.ref for c in claims) == sorted(refs)
    for c in claims:
        token = f"tok-{c.claim}"
        assert store.begin_send(c.ref, c.version, c.claim, token, 60_000) == "ok"
        if finish:
            assert store.finish_sent(c.ref, Attempt(c.version, c.claim, token), NOW) == "ok"


def by_id(timeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in timeline["reminders"]}


def notices(timeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in by_id(timeline).items()
            if k.startswith(("rescheduled#", "cancelled#"))}


def fields(store: Store) -> dict[str, str]:
    return {k: v for k, v in store.redis.hgetall(store.booking_key("glow", "A-1042")).items()
            if ":" not in k}


def test_move_after_the_pause_went_out_tells_on_both_channels(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email", "stop-retinoids:sms", "stop-retinoids:email")
    moved = book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    told = notices(moved)
    assert set(told) == {"rescheduled#1:email", "rescheduled#1:sms"}
    for key, r in told.items():
        assert r["status"] == "scheduled" and r["due_at"] == "2026-11-21T12:00:00Z"
        # Not past the new appointment's start: a notice is about before the visit.
        assert r["expires_at"] == "2026-12-12T13:30:00Z"
        ref = f"glow/A-1042/{key}"
        assert store.redis.zscore(store.due_key, ref) == NOW.timestamp()
    # The stop message goes again for the new date (the plan's own is history once sent).
    again = {k: r for k, r in by_id(moved).items() if k.startswith("repause#")}
    assert set(again) == {"repause#1:sms", "repause#1:email"}
    assert {r["due_at"] for r in again.values()} == {"2026-12-05T17:00:00Z"}  # 18:00 Madrid
    assert by_id(moved)["stop-retinoids:sms"]["status"] == "sent"
    stored = fields(store)
    assert stored["seq"] == "1" and stored["paused"] == "1"
    assert stored["moved_from"] == str(int(datetime(2026, 12, 5, 13, 30, tzinfo=UTC).timestamp()))
    # The same booking again changes nothing: the notices stay due, the version stays.
    again = book(store, catalog, dict(booking_doc, starts_at=MOVED_TO), NOW + timedelta(minutes=1))
    assert again == moved
    assert {store.redis.zscore(store.due_key, f"glow/A-1042/{k}") for k in told} == {
        NOW.timestamp()}


def test_move_after_only_the_confirmation_updates_the_calendar_by_email(
        store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")
    told = notices(book(store, catalog, dict(booking_doc, starts_at=MOVED_TO)))
    assert set(told) == {"rescheduled#1:email"}
    assert fields(store).get("paused", "") == ""


def test_nothing_went_out_nothing_is_told(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    moved = book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    assert notices(moved) == {}
    assert fields(store)["seq"] == "1"  # the invite sequence moves all the same
    cancelled = store.cancel("glow", "A-1042", NOW)
    assert notices(cancelled) == {}
    assert store.redis.zcard(store.due_key) == 0


def test_cancel_after_the_pause_went_out_tells_the_patient_to_resume(
        store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email", "stop-retinoids:sms")
    timeline = store.cancel("glow", "A-1042", NOW)
    assert timeline["status"] == "cancelled"
    told = notices(timeline)
    assert set(told) == {"cancelled#1:email", "cancelled#1:sms"}
    assert all(r["status"] == "scheduled" for r in told.values())
    assert fields(store)["paused"] == "1"
    # The fence lets the cancel notice go although the booking is cancelled ...
    refs = {f"glow/A-1042/{k}" for k in told}
    claims = [c for c in store.claim_due(100, 60) if c.ref in refs]
    assert len(claims) == 2
    assert {store.begin_send(c.ref, c.version, c.claim, f"t{c.claim}", 60_000)
            for c in claims} == {"ok"}
    # ... and nothing else of the cancelled booking.
    assert all(r["status"] == "cancelled"
               for k, r in by_id(timeline).items() if k.startswith("prep"))


def test_a_reminder_being_sent_at_the_cancel_counts_as_gone_out(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "stop-retinoids:sms", finish=False)  # claimed, ledger taken: in flight
    told = notices(store.cancel("glow", "A-1042", NOW))
    assert set(told) == {"cancelled#1:sms"}


def test_a_later_change_supersedes_a_notice_not_yet_sent(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email", "stop-retinoids:sms")
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    timeline = book(store, catalog, dict(booking_doc, starts_at="2026-12-19T14:30:00+01:00"))
    told = notices(timeline)
    assert told["rescheduled#1:sms"]["status"] == "cancelled"
    assert told["rescheduled#1:sms"]["reason"] == "superseded by a later change"
    assert told["rescheduled#2:sms"]["status"] == "scheduled"
    assert store.redis.zscore(store.due_key, "glow/A-1042/rescheduled#1:sms") is None
    # The stop message again: for the latest date only.
    assert by_id(timeline)["repause#1:sms"]["status"] == "cancelled"
    assert by_id(timeline)["repause#2:sms"]["due_at"] == "2026-12-12T17:00:00Z"
    # A cancel supersedes the move's notice too, and says the pause may end.
    timeline = store.cancel("glow", "A-1042", NOW)
    told = notices(timeline)
    assert told["rescheduled#2:sms"]["status"] == "cancelled"
    assert told["cancelled#3:sms"]["status"] == "scheduled"
    # Booked again: the cancel notice not yet sent is superseded by a rescheduled one.
    timeline = book(store, catalog, booking_doc)
    told = notices(timeline)
    assert timeline["status"] == "scheduled"
    assert told["cancelled#3:sms"]["status"] == "cancelled"
    assert told["rescheduled#4:sms"]["status"] == "scheduled"
    assert "moved_from" not in fields(store)  # booked again: no "moved from" date


def test_a_notice_waits_for_the_send_window(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    deliver(store, "stop-retinoids:sms")
    late = datetime(2026, 11, 21, 22, 30, tzinfo=UTC)  # 23:30 in Madrid; window 09:00-20:00
    told = notices(store.cancel("glow", "A-1042", late))
    assert told["cancelled#1:sms"]["due_at"] == "2026-11-22T08:00:00Z"


def test_a_cancel_applies_only_to_the_booking_as_read(store, catalog, booking_doc):
    """A change between the cancel's read and its write makes it read again."""
    book(store, catalog, booking_doc)
    deliver(store, "stop-retinoids:sms")
    real = store._cancel_notices
    calls = []

    def racing(clinic, booking_id, now):
        out = real(clinic, booking_id, now)
        if not calls:  # the first time: the booking changes after it was read
            store.redis.hset(store.booking_key(clinic, booking_id), "updated_at", "x")
        calls.append(out)
        return out

    store._cancel_notices = racing  # type: ignore[method-assign]
    told = notices(store.cancel("glow", "A-1042", NOW))
    assert len(calls) == 2
    assert set(told) == {"cancelled#1:sms"}
    assert json.loads(calls[1][1])[:2] == ["seq", "1"]


def test_a_move_racing_the_pause_in_flight_counts_it_as_gone_out(store, catalog, booking_doc):
    """The stop SMS is being handed over when the move lands: the patient is told, and the
    attempt's delivery, finished after the move, is still recorded."""
    book(store, catalog, booking_doc)
    deliver(store, "stop-retinoids:sms", finish=False)
    ref = "glow/A-1042/stop-retinoids:sms"
    record = store.record(ref)
    attempt = Attempt(record["version"], record["claim"], f"tok-{record['claim']}")
    moved = book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    assert set(notices(moved)) == {"rescheduled#1:sms"}
    assert fields(store)["paused"] == "1"
    # The attempt finishes after the move: stale, its delivery recorded beside the new plan.
    assert store.finish_sent(ref, attempt, NOW).startswith("stale")
    assert store.timeline("glow", "A-1042") and store.record(ref)["sent_at"]
