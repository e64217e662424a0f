"""The schedule store and the claim script against a real Redis server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.errors import NotFound
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Attempt, Store

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(redis_client) -> Store:
    return Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)


def book(store, catalog, doc, now=NOW):
    booking = parse_booking(doc, catalog)
    planned = plan(
        booking, catalog.protocols[booking.treatment], catalog.clinics[booking.clinic], now
    )
    return store.upsert(booking, planned, now)


def test_upsert_stores_plan_and_due_set(store, catalog, booking_doc):
    timeline = book(store, catalog, booking_doc)
    assert timeline["version"] == 1
    assert timeline["status"] == "scheduled"
    keys = {r["id"] for r in timeline["reminders"]}
    assert "stop-retinoids:sms" in keys and "week-check:sms" in keys
    assert store.redis.zcard(store.due_key) == len(keys)
    first = store.redis.zrange(store.due_key, 0, 0, withscores=True)[0]
    assert first[0] == "glow/A-1042/booking-confirmation:email"


def test_same_booking_again_changes_nothing(store, catalog, booking_doc):
    first = book(store, catalog, booking_doc)
    for minutes in range(1, 10):
        again = book(store, catalog, booking_doc, NOW + timedelta(minutes=minutes))
    assert again == first
    assert store.redis.zcard(store.due_key) == len(first["reminders"])


def test_moved_appointment_reschedules_and_cancels(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    moved = dict(
        booking_doc, starts_at="2026-12-12T14:30:00+01:00", medications={"tretinoin": False}
    )
    timeline = book(store, catalog, moved)
    by_id = {r["id"]: r for r in timeline["reminders"]}
    assert timeline["version"] == 2
    assert by_id["stop-retinoids:sms"]["status"] == "cancelled"
    assert by_id["day-before:sms"]["due_at"] == "2026-12-11T09:00:00Z"
    assert by_id["day-before:sms"]["reason"].startswith("rescheduled")
    score = store.redis.zscore(store.due_key, "glow/A-1042/day-before:sms")
    assert score == datetime(2026, 12, 11, 9, tzinfo=UTC).timestamp()
    assert store.redis.zscore(store.due_key, "glow/A-1042/stop-retinoids:sms") is None


def test_cancel_removes_pending_keeps_history(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    timeline = store.cancel("glow", "A-1042", NOW)
    assert timeline["status"] == "cancelled"
    assert {r["status"] for r in timeline["reminders"]} == {"cancelled"}
    assert store.redis.zcard(store.due_key) == 0
    with pytest.raises(NotFound):
        store.cancel("glow", "nope", NOW)


def test_clinics_never_meet(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    with pytest.raises(NotFound):
        store.timeline("other", "A-1042")


def test_claim_is_atomic_across_concurrent_pumps(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    # Make everything due now.
    for ref in store.redis.zrange(store.due_key, 0, -1):
        store.redis.zadd(store.due_key, {ref: 0})
    total = store.redis.zcard(store.due_key)
    claimed: list[str] = []
    lock = threading.Lock()

    def pump_once():
        for _ in range(5):
            got = store.claim_due(2, 60)
            with lock:
                claimed.extend(c.ref for c in got)

    threads = [threading.Thread(target=pump_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == total == len(set(claimed))
    assert store.redis.zcard(store.lease_key) == total


def test_expired_lease_is_claimed_again_and_ledger_blocks_double_send(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    ref = "glow/A-1042/booking-confirmation:email"
    store.redis.zadd(store.due_key, {ref: 0})
    (first,) = [c for c in store.claim_due(10, 60) if c.ref == ref]
    assert store.begin_send(ref, first.version, first.claim, "tok1", 60_000) == "ok"
    # The lease runs out (worker died): the pump claims it again with a new claim number.
    store.redis.zadd(store.lease_key, {ref: 0})
    (second,) = [c for c in store.claim_due(10, 60) if c.ref == ref]
    assert second.claim != first.claim
    assert store.begin_send(ref, first.version, first.claim, "tok2", 60_000) == "stale claim"
    assert store.begin_send(ref, second.version, second.claim, "tok3", 60_000) == "in flight"
    # The first attempt delivers after all: recorded as sent, though its claim was overtaken.
    assert store.finish_sent(ref, Attempt(first.version, first.claim, "tok1"), NOW) == (
        "stale: recorded as sent")
    assert store.begin_send(ref, second.version, second.claim, "tok4", 60_000) == "status sent"
    assert store.record(ref)["status"] == "sent"


def test_held_booking_stores_the_plan_but_nothing_is_due_until_released(
    store, catalog, booking_doc
):
    held = dict(
        booking_doc, medications={"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}
    )
    timeline = book(store, catalog, held)
    assert timeline["status"] == "held"
    assert "isotretinoin last taken 2026-10-01" in timeline["hold_reason"]
    # Nothing goes but the one neutral message of a held booking (tests/test_hold_notice.py).
    assert all(r["reason"].startswith("booking held: isotretinoin") for r in timeline["reminders"]
               if r["step"] != "hold-notice")
    assert store.redis.zrange(store.due_key, 0, -1) == ["glow/A-1042/hold-notice:sms"]
    assert [c.ref for c in store.claim_due(100, 60)] == ["glow/A-1042/hold-notice:sms"]
    # The clinic reviews and corrects the booking (the dose was in 2025): it is released.
    released = dict(
        booking_doc, medications={"tretinoin": True, "isotretinoin_last_dose": "2025-01-01"}
    )
    timeline = book(store, catalog, released)
    assert timeline["status"] == "scheduled" and timeline["version"] == 2
    # The hold notice is no longer in the plan (it was being sent: the attempt is stale).
    assert store.redis.zcard(store.due_key) == len(timeline["reminders"]) - 1


def test_release_waives_the_hold_for_the_reviewed_medications_only(store, catalog, booking_doc):
    held = dict(
        booking_doc, medications={"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}
    )
    booking = parse_booking(held, catalog)
    protocol, clinic = catalog.protocols["microneedling"], catalog.clinics["glow"]
    assert book(store, catalog, held)["status"] == "held"
    later = NOW + timedelta(hours=1)
    released = store.upsert(booking, plan(booking, protocol, clinic, later), later, release=True)
    assert released["status"] == "scheduled" and released["hold_reason"] is None
    # Every reminder is due but the hold notice, which the release cancelled.
    assert store.redis.zcard(store.due_key) == len(released["reminders"]) - 1
    # The same booking again stays released; a new isotretinoin date holds it again.
    assert book(store, catalog, held, later)["status"] == "scheduled"
    again = dict(held, medications={"tretinoin": True, "isotretinoin_last_dose": "2026-11-01"})
    timeline = book(store, catalog, again, later)
    assert timeline["status"] == "held"
    assert store.redis.zrange(store.due_key, 0, -1) == ["glow/A-1042/hold-notice:sms"]


def test_resubmitting_keeps_a_late_step_that_is_already_due(store, catalog, booking_doc):
    """A late step is planned for "now"; a later identical submission must not move it."""
    soon = dict(booking_doc, starts_at="2026-11-24T14:30:00+01:00")  # visit in 3 days
    first = book(store, catalog, soon)
    late = {r["id"]: r for r in first["reminders"]}["stop-retinoids:sms"]
    assert late["status"] == "scheduled" and "late: its time had passed" in late["reason"]
    again = book(store, catalog, soon, NOW + timedelta(minutes=5))
    assert again == first
    # A real change (the visit moves a week later) does move it.
    moved = book(store, catalog, dict(soon, starts_at="2026-12-01T14:30:00+01:00"),
                 NOW + timedelta(minutes=10))
    assert moved["version"] == 2
    assert {r["id"]: r for r in moved["reminders"]}["stop-retinoids:sms"]["due_at"] == (
        "2026-11-24T17:00:00Z")


def test_a_dead_letter_rewritten_into_a_held_booking_leaves_the_dead_letters(
    store, catalog, booking_doc
):
    from worker.store import Attempt

    book(store, catalog, booking_doc)
    ref = "glow/A-1042/booking-confirmation:email"
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"), "permanent: SMTP 550")
    corrected = dict(booking_doc, patient=dict(booking_doc["patient"], email="ana@fixed.example"),
                     medications={"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"})
    timeline = book(store, catalog, corrected)
    assert timeline["status"] == "held"
    assert store.dead_letters() == []  # waits for the clinic's review, not for a replay
    assert store.record(ref)["status"] == "scheduled"
    assert store.redis.ttl(store.booking_key("glow", "A-1042")) > 0  # retention applies again
