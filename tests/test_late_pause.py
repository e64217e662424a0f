"""A booking too late for the protocol's minimum retinoid pause (5 days for microneedling,
`[advice] retinoid_pause_min_days`, seeds/001): the patient's message says to call the
clinic, and the clinic is told (`late_pause` on the timeline, `booking.late_pause` event and
alert, the flag on the other booking events)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.store import Store
from worker.webhooks import Event, Events, render_alert

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
HOOKS = "booking.held booking.completed booking.late_pause alert"


def doc_in(booking_doc: dict[str, Any], days: float, **meds: Any) -> dict[str, Any]:
    doc = copy.deepcopy(booking_doc)
    doc["starts_at"] = (NOW + timedelta(days=days)).isoformat()
    if meds:
        doc["medications"] = meds
    return doc


def planned(catalog: Catalog, doc: dict[str, Any], now: datetime = NOW):
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], now)


def test_the_planner_finds_a_booking_too_late_for_the_pause(catalog, booking_doc):
    _, late = planned(catalog, doc_in(booking_doc, 3))
    assert late.pause_rule == ("stop-retinoids", 5)
    assert late.late_pause == (
        "the message to pause retinoids goes 3 days before the appointment, less than the "
        "protocol's minimum pause of 5 days: the patient is asked to call")
    # Five days ahead is enough; so is the planned seven.
    assert planned(catalog, doc_in(booking_doc, 5.2))[1].late_pause is None
    assert planned(catalog, doc_in(booking_doc, 14))[1].late_pause is None
    # No retinoid: nothing to pause, nothing late.
    _, none = planned(catalog, doc_in(booking_doc, 3, tretinoin=False))
    assert none.late_pause is None and none.pause_rule is None
    # Hours away: the pause message cannot go at all (late_until), the clinic is told too.
    _, hours = planned(catalog, doc_in(booking_doc, 0.2))
    assert "cannot go before the appointment" in (hours.late_pause or "")
    # A protocol without the minimum stated (tretinoin-start has no pause step) says nothing.
    start = dict(doc_in(booking_doc, 3), treatment="tretinoin-start")
    assert planned(catalog, start)[1].pause_rule is None


def test_the_message_asks_the_patient_to_call(catalog, booking_doc):
    renderer = Renderer(catalog.templates_dir)
    booking, p = planned(catalog, doc_in(booking_doc, 3))
    (stop,) = [r for r in p.reminders if r.key == "stop-retinoids:sms"]
    for locale, words in (("en", "call us"), ("es", "llamanos")):
        b = booking.model_copy(update={"patient": booking.patient.model_copy(
            update={"locale": locale})})
        text = renderer.render(template="stop-retinoids", channel="sms", booking=b,
                               clinic=catalog.clinics["glow"],
                               protocol=catalog.protocols["microneedling"], occurrence=1,
                               due_at=stop.due_at).text
        assert words in text and "from tonight" not in text, text


def events_of(redis_client) -> list[tuple[str, str, dict[str, Any]]]:
    events = Events(redis_client, "t")
    return [(e.kind, e.type, e.fields) for e in sorted(events.pending(), key=lambda e: int(e.id))]


def test_timeline_and_events_tell_the_clinic_once(redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    late = store.upsert(*planned(catalog, doc_in(booking_doc, 3)), NOW)
    assert late["late_pause"] is True
    assert store.timeline("glow", "A-1042") == late
    sent = events_of(redis_client)
    assert [(k, t) for k, t, _ in sent] == [("webhook", "booking.late_pause"),
                                           ("alert", "booking.late_pause")]
    fields = sent[0][2]
    assert fields["late_pause"] is True and fields["booking_id"] == "A-1042"
    assert "minimum pause of 5 days" in fields["reason"]
    # The same booking again: nothing new to tell.
    assert store.upsert(*planned(catalog, doc_in(booking_doc, 3)), NOW) == late
    assert len(events_of(redis_client)) == 2
    # Moved two weeks on: no longer late, and the timeline says so.
    moved = store.upsert(*planned(catalog, doc_in(booking_doc, 14)), NOW)
    assert moved["late_pause"] is False and len(events_of(redis_client)) == 2
    # A held booking carries the flag on its booking.held event.
    held = doc_in(booking_doc, 3, tretinoin=True, isotretinoin_last_dose="2026-10-01")
    held["booking_id"] = "H-1"
    store.upsert(*planned(catalog, held), NOW)
    (webhook,) = [f for k, t, f in events_of(redis_client) if t == "booking.held"
                  and k == "webhook"]
    assert webhook["late_pause"] is True


def test_a_booking_on_time_has_the_flag_false(redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    timeline = store.upsert(*planned(catalog, booking_doc), NOW)
    assert timeline["late_pause"] is False
    assert events_of(redis_client) == []
    assert "late_pause" not in store.redis.hgetall(store.booking_key("glow", "A-1042"))


def test_the_clinic_alert_renders_in_each_language(catalog):
    renderer = Renderer(catalog.templates_dir)
    event = Event("1", "glow", "alert", "booking.late_pause",
                  {"booking_id": "A-1042", "treatment": "microneedling",
                   "starts_at": NOW.timestamp(), "reason": "the message goes 3 days before",
                   "late_pause": True}, 0)
    for locale, words in (("en", "expect the call"), ("es", "Espere su llamada")):
        clinic = catalog.clinics["glow"].model_copy(update={"locale": locale})
        message = render_alert(clinic, event, renderer)
        assert "A-1042" in (message.subject or "") and words in message.text
        assert "the message goes 3 days before" in message.text


def _send(store: Store, sent_at: datetime | None, *keys: str) -> None:
    """Claim these reminders of glow/A-1042 and record them sent at `sent_at` (None: leave
    them being sent)."""
    from worker.store import Attempt

    refs = [f"glow/A-1042/{k}" for k in keys]
    store.redis.zadd(store.due_key, {ref: 0 for ref in refs})
    for c in store.claim_due(100, 60):
        if c.ref not in refs:  # others due by the real clock wait again
            assert store.requeue(c.ref, NOW + timedelta(days=60), "not in this test", c.claim)
            continue
        token = f"tok-{c.claim}"
        assert store.begin_send(c.ref, c.version, c.claim, token, 60_000) == "ok"
        if sent_at is not None:
            assert store.finish_sent(c.ref, Attempt(c.version, c.claim, token),
                                     sent_at) == "ok"


def test_the_pause_that_went_out_in_time_is_not_late_when_the_booking_comes_again(
        redis_client, catalog, booking_doc):
    # Visit 5 Dec 14:30 Madrid: "stop tretinoin tonight" went on 28 Nov at 18:00, seven days
    # before. The clinic's daily sync sends the same booking on 3 Dec: the plan alone finds
    # the pause step's time passed (late: "now", two days before the visit) and flagged the
    # booking too late for the five-day pause, telling the clinic (webhook and alert email)
    # to call a patient who has paused for a week.
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    assert store.upsert(*planned(catalog, booking_doc), NOW)["late_pause"] is False
    paused_at = datetime(2026, 11, 28, 17, 0, 2, tzinfo=UTC)
    _send(store, paused_at, "stop-retinoids:sms", "stop-retinoids:email")
    sync_at = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    sync = store.upsert(*planned(catalog, booking_doc, sync_at), sync_at)
    assert sync["late_pause"] is False
    assert store.timeline("glow", "A-1042")["late_pause"] is False
    assert "late_pause" not in store.redis.hgetall(store.booking_key("glow", "A-1042"))
    assert events_of(redis_client) == []
    # Moved a day earlier: paused since 28 Nov, still six days before 4 Dec: not late.
    earlier = store.upsert(*planned(catalog, booking_doc | {
        "starts_at": "2026-12-04T14:30:00+01:00"}, sync_at), sync_at)
    assert earlier["late_pause"] is False and events_of(redis_client) == []


def test_a_move_too_close_to_the_pause_that_went_out_is_late(redis_client, catalog, booking_doc):
    # The other side: told to pause on 28 Nov, moved on 29 Nov to 2 Dec: four days of pause
    # against the protocol's five. Late, and the clinic is told.
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    store.upsert(*planned(catalog, booking_doc), NOW)
    _send(store, datetime(2026, 11, 28, 17, 0, 2, tzinfo=UTC), "stop-retinoids:sms")
    at = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    late = store.upsert(*planned(catalog, booking_doc | {
        "starts_at": "2026-12-02T18:00:00+01:00"}, at), at)
    assert late["late_pause"] is True
    assert [(k, t) for k, t, _ in events_of(redis_client)] == [
        ("webhook", "booking.late_pause"), ("alert", "booking.late_pause")]


def test_a_pause_the_patient_was_told_to_end_does_not_count(redis_client, catalog, booking_doc):
    # Told to pause on 28 Nov; cancelled on 1 Dec, and the cancel notice ("you may resume")
    # went out; booked again on 2 Dec for the same 5 Dec: the pause begins again now, three
    # days before: late, and the clinic is told.
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    store.upsert(*planned(catalog, booking_doc), NOW)
    _send(store, datetime(2026, 11, 28, 17, 0, 2, tzinfo=UTC), "stop-retinoids:sms")
    store.cancel("glow", "A-1042", datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    _send(store, datetime(2026, 12, 1, 9, 0, 1, tzinfo=UTC), "cancelled#1:sms")
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    again = store.upsert(*planned(catalog, booking_doc, at), at)
    assert again["status"] == "scheduled" and again["late_pause"] is True
    assert [(k, t) for k, t, _ in events_of(redis_client)] == [
        ("webhook", "booking.late_pause"), ("alert", "booking.late_pause")]


def test_a_resume_notice_being_sent_ends_the_pause_too(redis_client, catalog, booking_doc):
    # As above, but the cancel notice ("you may resume") is being sent as the booking comes
    # again: it may be on the patient's phone already, so the pause told on 28 Nov no longer
    # counts and the pause begins again now: late.
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS,
                  hooks=lambda clinic: HOOKS)
    store.upsert(*planned(catalog, booking_doc), NOW)
    _send(store, datetime(2026, 11, 28, 17, 0, 2, tzinfo=UTC), "stop-retinoids:sms")
    store.cancel("glow", "A-1042", datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    _send(store, None, "cancelled#1:sms")
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    again = store.upsert(*planned(catalog, booking_doc, at), at)
    assert again["late_pause"] is True
    assert [(k, t) for k, t, _ in events_of(redis_client)] == [
        ("webhook", "booking.late_pause"), ("alert", "booking.late_pause")]
