"""The SMS frequency cap across a patient's bookings at a clinic, in a real Redis: the store
reads the patient's other SMS through the contact index and the apply script checks that
nothing it read changed (so two bookings for one phone never both take a day's slot)."""

from __future__ import annotations

import copy
import threading
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Store, connect

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
TZ = ZoneInfo("Europe/Madrid")


@pytest.fixture
def store(redis_client) -> Store:
    return Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)


def doc_of(booking_doc, booking_id, *, days=0, phone="+34600111222", email=True):
    doc = copy.deepcopy(booking_doc)
    doc["booking_id"] = booking_id
    start = datetime.fromisoformat(doc["starts_at"]) + timedelta(days=days)
    doc["starts_at"] = start.isoformat()
    doc["patient"]["phone"] = phone
    if not email:
        doc["patient"].pop("email")
        doc["patient"]["channels"] = ["sms"]
    return doc


def planned(catalog, doc):
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], NOW)


def sms_days(*timelines) -> list[date]:
    return [datetime.fromisoformat(r["due_at"]).astimezone(TZ).date()
            for t in timelines for r in t["reminders"]
            if r["channel"] == "sms" and r["status"] == "scheduled"]


def within_caps(days: list[date]) -> bool:
    per_week = max(sum(1 for d in days if first <= d < first + timedelta(days=7))
                   for first in days)
    return max(Counter(days).values()) <= 1 and per_week <= 3


def test_a_second_booking_sends_by_email_what_the_first_took(store, catalog, booking_doc):
    first = store.upsert(*planned(catalog, doc_of(booking_doc, "A-1")), NOW)
    # A second visit the same day (another treatment area, say): every SMS day is taken.
    second = store.upsert(*planned(catalog, doc_of(booking_doc, "A-2")), NOW)
    assert within_caps(sms_days(first, second))
    by_id = {r["id"]: r for r in second["reminders"]}
    assert "day-before:sms" not in by_id
    assert by_id["day-before:email"]["status"] == "scheduled"
    assert by_id["day-before:email"]["reason"] == (
        "1 day before, 10:00 patient-local; by email: the patient's SMS limit at this clinic "
        "(1 a day, 3 in any 7 days) is reached on 2026-12-04")
    # A step that emails anyway keeps its email and drops the SMS, saying why.
    assert by_id["stop-retinoids:sms"]["status"] == "skipped"
    assert by_id["stop-retinoids:sms"]["reason"] == (
        "not sent by SMS: the patient's SMS limit at this clinic (1 a day, 3 in any 7 days) "
        "is reached on 2026-11-28; its email goes")
    assert by_id["stop-retinoids:email"]["status"] == "scheduled"
    assert sms_days(second) == []
    # A visit a day later: only the days (and weeks) with room get an SMS.
    third = store.upsert(*planned(catalog, doc_of(booking_doc, "A-3", days=1)), NOW)
    assert within_caps(sms_days(first, second, third))
    assert sms_days(third) == [date(2026, 11, 29), date(2026, 12, 13)]
    # The first booking, submitted again, keeps what it had: A-2 took no day of A-1's.
    again = store.upsert(*planned(catalog, doc_of(booking_doc, "A-1")), NOW)
    assert again == first
    # Another patient is not capped by this one.
    other = store.upsert(*planned(catalog, doc_of(booking_doc, "B-1", phone="+34600999888")),
                         NOW)
    assert sms_days(other) == sms_days(first)


def test_without_email_an_sms_moves_to_a_day_with_room_or_is_skipped(
        store, catalog, booking_doc):
    first = store.upsert(*planned(catalog, doc_of(booking_doc, "A-1", email=False)), NOW)
    second = store.upsert(*planned(catalog, doc_of(booking_doc, "A-2", days=14, email=False)),
                          NOW)
    # Care-critical SMS go beyond the cap (tests/test_caps_care.py), saying so; the others
    # keep within it.
    beyond = {r["id"] for r in second["reminders"] if "care-critical" in (r["reason"] or "")}
    critical = {s.id for s in catalog.protocols["microneedling"].steps if s.care_critical}
    assert beyond and {k.split(":")[0] for k in beyond} <= critical
    kept = {**second, "reminders": [r for r in second["reminders"] if r["id"] not in beyond]}
    assert within_caps(sms_days(first, kept))
    reasons = [r["reason"] for r in second["reminders"]]
    assert any("and the patient takes no email" in (x or "") and "; moved to " in (x or "")
               for x in reasons) or any("no later day has room" in (x or "") for x in reasons)
    assert all(r["channel"] == "sms" for r in second["reminders"])


def test_two_bookings_for_one_phone_racing_never_share_a_day(
        redis_client, redis_server, catalog, booking_doc):
    """Both upserts read (no other booking yet) and are parked; both are released at once:
    the apply script finds the other's booking in the patient's index and sends the loser
    back to read again, so the two plans together keep the cap."""
    stores = [Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS),
              Store(connect(redis_server.url), "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)]
    parked = threading.Barrier(2, timeout=10)
    calls: list[str] = []
    real = Store._reconcile

    def park_first_read(stored_booking, stored, plan_, *args):
        calls.append("call")
        if len(calls) <= 2:
            parked.wait()  # both have read everything, neither has written
        return real(stored_booking, stored, plan_, *args)

    for s in stores:
        s._reconcile = park_first_read  # type: ignore[method-assign]
    items = [planned(catalog, doc_of(booking_doc, f"A-{n}")) for n in (1, 2)]
    results: dict[int, dict] = {}

    def run(n: int) -> None:
        results[n] = stores[n].upsert(*items[n], NOW)

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 3  # the loser read and reconciled again
    timelines = [stores[0].timeline("glow", f"A-{n}") for n in (1, 2)]
    assert timelines == [results[0], results[1]]
    days = sms_days(*timelines)
    assert within_caps(days), sorted(days)
    # As one after the other: the winner has its five SMS days, the loser none (same days).
    assert sorted(len(sms_days(t)) for t in timelines) == [0, 5]


def test_a_held_booking_takes_no_slot_until_released(store, catalog, booking_doc):
    held = doc_of(booking_doc, "H-1")
    held["medications"] = {"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}
    assert store.upsert(*planned(catalog, held), NOW)["status"] == "held"
    second = store.upsert(*planned(catalog, doc_of(booking_doc, "A-2")), NOW)
    assert "day-before:sms" in {r["id"] for r in second["reminders"]}


def test_one_patients_bookings_in_one_batch_keep_the_cap_in_one_round_each(
        store, catalog, booking_doc, monkeypatch):
    # A family's shared phone, or a course of visits, booked in one batch: each booking of
    # the patient is capped against the ones written before it, one per round, so no round
    # is refused by its guard and read again (which made a batch quadratic).
    items = [planned(catalog, doc_of(booking_doc, f"F-{n}", days=7 * n)) for n in range(12)]
    read_for: list[int] = []  # how many bookings each round read the patient's others for
    real_read = Store._caps_read

    def counted(self, batch):
        read_for.append(len(batch))
        return real_read(self, batch)

    monkeypatch.setattr(Store, "_caps_read", counted)
    timelines = store.upsert_many(items, NOW)
    assert read_for == [1] * len(items)  # one booking of the patient per round, none redone
    assert within_caps(sms_days(*timelines))
    # The same as booking them one by one.
    store.redis.flushdb()
    one_by_one = [store.upsert(*item, NOW) for item in items]
    assert [[(r["id"], r["status"], r["due_at"]) for r in t["reminders"]] for t in timelines] \
        == [[(r["id"], r["status"], r["due_at"]) for r in t["reminders"]] for t in one_by_one]


@pytest.mark.parametrize("days_ahead", [2, 3])
def test_a_late_step_moved_by_the_cap_keeps_its_instant_when_submitted_again(
        store, catalog, booking_doc, days_ahead):
    """An SMS-only patient booked a few days before the visit: a step whose time had passed
    is planned for the booking's instant ("late"), and the cap moves it to a later day. It
    goes at that day's send-window opening, not at the booking's clock time, so the same
    booking submitted a minute later is unchanged (it used to move by that minute and
    count as a change)."""
    doc = doc_of(booking_doc, "L-1", email=False)
    doc["treatment"] = "chemical-peel"
    doc.pop("medications", None)  # no retinoid step of its own takes the day first
    start = (NOW + timedelta(days=days_ahead)).astimezone(TZ).replace(hour=16, minute=0)
    doc["starts_at"] = start.isoformat()
    booking = parse_booking(doc, catalog)
    clinic = catalog.clinics[booking.clinic]

    def submit(at: datetime) -> dict:
        return store.upsert(booking, plan(booking, catalog.protocols[booking.treatment],
                                          clinic, at), at)

    first = submit(NOW + timedelta(minutes=17, seconds=23))
    moved = [r for r in first["reminders"]
             if "late:" in (r["reason"] or "") and "; moved to " in (r["reason"] or "")]
    assert moved, [(r["id"], r["reason"]) for r in first["reminders"]]
    opening = clinic.send_window.start  # minutes after local midnight
    for r in moved:
        local = datetime.fromisoformat(r["due_at"]).astimezone(TZ)
        assert local.hour * 60 + local.minute == opening, (r["id"], local)
    again = submit(NOW + timedelta(minutes=18, seconds=31))
    assert again["version"] == first["version"]
    assert [(r["id"], r["due_at"], r["status"]) for r in again["reminders"]] == \
        [(r["id"], r["due_at"], r["status"]) for r in first["reminders"]]
