"""The outcome counters are kept by the store's own scripts, in a real Redis: exact.

Each test drives the store as the send path does (claim, begin, finish) and reads the
counters back as Prometheus would (`ScheduleCollector` through prometheus-client's own
exposition), including an attempt that the clinic's cancel overtook: it counts nothing.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.connections import PROBE, from_url
from worker.embedded import free_port
from worker.metrics import QUEUES, ScheduleCollector, read_counters
from worker.models import parse_booking
from worker.planner import plan
from worker.service import WORKER_QUEUES
from worker.store import Attempt, Store

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PREFIX = "t"


@pytest.fixture
def store(redis_client) -> Store:
    return Store(redis_client, PREFIX, retention_days=FIXED_SCENARIO_RETENTION_DAYS)


def book(store, catalog, doc, now=NOW):
    booking = parse_booking(doc, catalog)
    planned = plan(booking, catalog.protocols[booking.treatment],
                   catalog.clinics[booking.clinic], now)
    return store.upsert(booking, planned, now)


def counts(store, what):
    return {(clinic, channel): n for (kind, clinic, channel), n in
            read_counters(store.redis, PREFIX).items() if kind == what and n}


def attempt_on(store, ref):
    """Make `ref` due now, claim it and take its ledger: an attempt that owns it.

    It alone is claimed (due at 0, the first of the due set): the booking's other reminders,
    planned at fixed dates, are due by Redis's real clock once those dates pass, and a
    wider claim would lease them too."""
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = store.claim_due(1, 60)
    assert claim.ref == ref
    token = uuid.uuid4().hex
    assert store.begin_send(ref, claim.version, claim.claim, token, 60_000) == "ok"
    return Attempt(claim.version, claim.claim, token)


def test_booking_writes_count_what_they_put_in_the_schedule_and_what_the_plan_skips(
        store, catalog, booking_doc):
    timeline = book(store, catalog, booking_doc)
    due = Counter(("glow", r["channel"]) for r in timeline["reminders"]
                  if r["status"] == "scheduled")
    assert counts(store, "scheduled") == dict(due) and sum(due.values()) == 10
    book(store, catalog, booking_doc, NOW + timedelta(minutes=5))  # the same: nothing new
    assert counts(store, "scheduled") == dict(due)
    assert counts(store, "skipped") == {}
    # Two hours before the visit: the plan skips what makes no sense any more.
    late = dict(booking_doc, booking_id="A-2",
                starts_at=(NOW + timedelta(hours=2)).isoformat())
    skipped = Counter(("glow", r["channel"]) for r in book(store, catalog, late)["reminders"]
                      if r["status"] == "skipped")
    assert skipped and counts(store, "skipped") == dict(skipped)


def test_finishes_count_their_outcome_once_and_an_overtaken_attempt_counts_nothing(
        store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    email = "glow/A-1042/booking-confirmation:email"
    first = attempt_on(store, email)
    assert store.finish_retry(email, first, NOW, "HTTP 503") == "ok"
    assert counts(store, "failed_attempt") == {("glow", "email"): 1}
    assert counts(store, "retried") == {("glow", "email"): 1}
    second = attempt_on(store, email)
    assert store.finish_sent(email, second, NOW) == "ok"
    assert store.finish_sent(email, second, NOW) == "repeated"  # a repeated finish
    assert counts(store, "sent") == {("glow", "email"): 1}

    sms = "glow/A-1042/day-before:sms"
    failing = attempt_on(store, sms)
    assert store.finish_failed(sms, failing, "HTTP 400") == "ok"
    assert counts(store, "dead_lettered") == {("glow", "sms"): 1}
    assert counts(store, "failed_attempt") == {("glow", "email"): 1, ("glow", "sms"): 1}
    assert store.replay([sms], NOW) == [sms]
    assert counts(store, "replayed") == {("glow", "sms"): 1}

    # Overtaken: the clinic cancels while an attempt is out; its failure changes nothing.
    overtaken = attempt_on(store, "glow/A-1042/spf:sms")
    store.cancel("glow", "A-1042", NOW)
    assert store.finish_failed("glow/A-1042/spf:sms", overtaken, "HTTP 400") == "stale"
    assert counts(store, "dead_lettered") == {("glow", "sms"): 1}
    assert counts(store, "failed_attempt") == {("glow", "email"): 1, ("glow", "sms"): 1}


def test_prometheus_sees_the_counters_gauges_and_queue_lengths(store, catalog, booking_doc):
    book(store, catalog, booking_doc)
    email = "glow/A-1042/booking-confirmation:email"
    store.finish_sent(email, attempt_on(store, email), NOW)
    store.redis.zadd(store.due_key, {"glow/A-1042/spf:sms": NOW.timestamp() - 3600})
    store.redis.rpush(f"{PREFIX}:celery:reminders.send.sms", "a", "b")
    registry = CollectorRegistry()
    registry.register(ScheduleCollector(store.redis, PREFIX))
    text = generate_latest(registry).decode()
    assert 'reminders_sent_total{channel="email",clinic="glow"} 1.0' in text
    assert 'reminders_scheduled_total{channel="sms",clinic="glow"} 5.0' in text
    assert "reminders_due 9.0" in text and "reminders_leased 0.0" in text
    assert 'reminders_celery_queue_length{queue="reminders.send.sms"} 2.0' in text
    overdue = float(text.split("\nreminders_oldest_overdue_seconds ")[1].split()[0])
    assert overdue > (datetime.now(UTC) - NOW).total_seconds() + 3000
    assert "reminders_redis_up 1.0" in text
    assert "A-1042" not in text  # no booking id in any label


def test_a_scrape_with_redis_down_says_so_and_fails_nothing():
    registry = CollectorRegistry()
    registry.register(ScheduleCollector(from_url(f"redis://127.0.0.1:{free_port()}/0", PROBE),
                                        PREFIX))
    text = generate_latest(registry).decode()
    assert "reminders_redis_up 0.0" in text and "reminders_sent_total" not in text


def test_the_queue_lengths_cover_the_celery_apps_queues():
    # worker/service.py's copy is checked against worker/celery_app.py's by its own tests.
    assert set(QUEUES) == set(WORKER_QUEUES.split(","))


def test_the_senders_gauge_covers_the_channels():
    from worker.metrics import CHANNELS as METRIC_CHANNELS
    from worker.models import CHANNELS

    assert METRIC_CHANNELS == CHANNELS
