"""Clinic events are written by the same atomic step as the state they report (real Redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.clinics import Clinic
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Attempt, Store
from worker.webhooks import Events, hooks_for, hooks_of

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
HELD_MEDS = {"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}
EVERYTHING = ("reminder.sent reminder.failed reminder.skipped booking.held booking.completed "
              "alert")


def make_store(redis_client, hooks: str = EVERYTHING) -> Store:
    return Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                 hooks=lambda clinic: hooks if clinic == "glow" else "")


@pytest.fixture
def store(redis_client) -> Store:
    return make_store(redis_client)


@pytest.fixture
def events(redis_client) -> Events:
    return Events(redis_client, "t")


def book(store, catalog, doc, now=NOW, release=False):
    booking = parse_booking(doc, catalog)
    planned = plan(booking, catalog.protocols[booking.treatment], catalog.clinics[booking.clinic],
                   now)
    return store.upsert(booking, planned, now, release=release)


def told(events: Events) -> list[tuple[str, str, dict]]:
    return [(e.kind, e.type, e.fields) for e in sorted(events.pending(), key=lambda e: int(e.id))]


def test_hooks_of_follows_the_clinic_config():
    base = {"id": "glow", "name": "Glow", "phone": "+34910000000", "timezone": "UTC"}
    assert hooks_of(Clinic.model_validate(base)) == ""
    assert hooks_of(Clinic.model_validate(base | {"email": "a@glow.example"})) == "alert"
    hooked = Clinic.model_validate(base | {"webhook": {
        "url": "https://h.example/x", "secret": "${S}", "events": ["booking.held"]}})
    assert hooks_of(hooked) == "booking.held"
    assert hooks_for({"glow": hooked})("glow") == "booking.held"
    assert hooks_for({"glow": hooked})("other") == ""


def test_a_hold_is_told_once_by_webhook_and_alert(store, events, catalog, booking_doc):
    held = dict(booking_doc, medications=HELD_MEDS)
    timeline = book(store, catalog, held)
    assert timeline["status"] == "held"
    got = told(events)
    assert [(k, t) for k, t, _ in got] == [("webhook", "booking.held"), ("alert", "booking.held")]
    fields = got[0][2]
    assert fields["booking_id"] == "A-1042" and fields["version"] == 1
    assert fields["reason"] == timeline["hold_reason"]
    assert fields["treatment"] == "microneedling"
    assert fields["starts_at"] == datetime.fromisoformat(booking_doc["starts_at"]).timestamp()
    # The same booking again, or later: nothing new to tell.
    book(store, catalog, held, NOW + timedelta(hours=1))
    assert len(told(events)) == 2
    # Held for another reason: told again.
    book(store, catalog, dict(booking_doc, medications=dict(HELD_MEDS,
                                                            isotretinoin_last_dose="2026-11-01")))
    assert len(told(events)) == 4
    # Released and held again later: a new hold, told again.
    book(store, catalog, booking_doc)
    assert len(told(events)) == 4
    book(store, catalog, held)
    assert len(told(events)) == 6


def test_a_clinic_that_asks_for_nothing_is_told_nothing(redis_client, events, catalog,
                                                         booking_doc):
    quiet = make_store(redis_client, hooks="")
    book(quiet, catalog, dict(booking_doc, medications=HELD_MEDS))
    assert told(events) == []


def test_a_held_batch_tells_each_booking(store, events, catalog, booking_doc):
    items = []
    for n in range(3):
        booking = parse_booking(dict(booking_doc, booking_id=f"H-{n}", medications=HELD_MEDS),
                                catalog)
        items.append((booking, plan(booking, catalog.protocols["microneedling"],
                                    catalog.clinics["glow"], NOW)))
    store.upsert_many(items, NOW)
    assert sorted(f["booking_id"] for k, _, f in told(events) if k == "webhook") == [
        "H-0", "H-1", "H-2"]


def claim(store, ref):
    store.redis.zadd(store.due_key, {ref: 0})
    (c,) = [c for c in store.claim_due(100, 60) if c.ref == ref]
    token = f"tok-{c.claim}"
    assert store.begin_send(ref, c.version, c.claim, token, 60_000) == "ok"
    return Attempt(c.version, c.claim, token)


def test_each_outcome_is_told_once_and_the_last_one_completes_the_booking(
        store, events, catalog, booking_doc):
    timeline = book(store, catalog, booking_doc)
    refs = [f"glow/A-1042/{r['id']}" for r in timeline["reminders"]]
    sent_at = NOW + timedelta(minutes=1)
    first = claim(store, refs[0])
    assert store.finish_sent(refs[0], first, sent_at) == "ok"
    assert store.finish_sent(refs[0], first, sent_at) == "repeated"  # no second event
    failing = claim(store, refs[1])
    store.finish_failed(refs[1], failing, "HTTP 400: invalid number")
    skipping = claim(store, refs[2])
    store.finish_skip(refs[2], skipping, "it is more than a day past its planned time")
    retrying = claim(store, refs[3])
    store.finish_retry(refs[3], retrying, NOW + timedelta(minutes=5), "HTTP 503")  # untold
    got = told(events)
    assert [t for _, t, _ in got] == ["reminder.sent", "reminder.failed", "reminder.skipped"]
    sent = got[0][2]
    step, channel = refs[0].rsplit("/", 1)[1].split(":")
    assert sent == sent | {"booking_id": "A-1042", "reminder": f"{step}:{channel}",
                           "step": step, "channel": channel, "version": 1, "attempts": 1,
                           "sent_at": sent_at.timestamp()}
    assert got[1][2]["reason"] == "HTTP 400: invalid number"
    assert got[2][2]["reason"] == "it is more than a day past its planned time"
    assert not any(t == "booking.completed" for _, t, _ in got)
    for ref in refs[3:]:
        store.finish_sent(ref, claim(store, ref), sent_at)
    types = [t for _, t, _ in told(events)]
    assert types.count("booking.completed") == 1 and types[-1] == "booking.completed"
    assert types.count("reminder.sent") == len(refs) - 2


def test_a_delivery_overtaken_by_a_cancel_is_still_told(store, events, catalog, booking_doc):
    timeline = book(store, catalog, booking_doc)
    ref = f"glow/A-1042/{timeline['reminders'][0]['id']}"
    attempt = claim(store, ref)
    store.cancel("glow", "A-1042", NOW)  # the clinic cancels while the send is in flight
    assert store.finish_sent(ref, attempt, NOW) == "stale: recorded as sent"
    (event,) = told(events)
    assert event[1] == "reminder.sent" and event[2]["reminder"] == ref.rsplit("/", 1)[1]
    # A cancelled booking is not "completed".
    assert store.timeline("glow", "A-1042")["status"] == "cancelled"


def test_each_event_carries_the_fields_the_readme_lists(store, events, catalog, booking_doc):
    """The README's table of event fields, as the real store writes them."""
    book(store, catalog, dict(booking_doc, booking_id="H-1", medications=HELD_MEDS))
    timeline = book(store, catalog, booking_doc)
    refs = [f"glow/A-1042/{r['id']}" for r in timeline["reminders"]]
    store.finish_failed(refs[0], claim(store, refs[0]), "HTTP 400: invalid number")
    store.finish_skip(refs[1], claim(store, refs[1]), "too late")
    for ref in refs[2:]:
        store.finish_sent(ref, claim(store, ref), NOW + timedelta(minutes=1))
    common = {"booking_id", "version", "created_at"}
    reminder = common | {"reminder", "step", "channel", "due_at", "attempts"}
    expected = {
        "booking.held": common | {"reason", "treatment", "starts_at", "late_pause"},
        "reminder.failed": reminder | {"reason"}, "reminder.skipped": reminder | {"reason"},
        "reminder.sent": reminder | {"sent_at"},
        "booking.completed": common | {"late_pause"},
    }
    seen = set()
    for kind, etype, fields in told(events):
        if kind == "webhook":
            assert set(fields) == expected[etype], etype
            assert isinstance(fields["version"], int) and isinstance(fields["booking_id"], str)
            seen.add(etype)
    assert seen == set(expected)
