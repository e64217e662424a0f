"""Two PUTs of the same booking with different bodies and no If-Match, forced: writer A has
read the booking and is parked in its reconcile; writer B (another date, another name)
lands; A resumes. A's write finds the booking changed, reads it again and reconciles over
B's: the stored booking is A's entirely (document and plan, no mix), B's reminders that
A's plan does not have are out of the schedule. Real HTTP (uvicorn), real Redis."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from tests.api.conftest import future_booking
from worker import store as store_module

PENDING = ("scheduled", "retrying", "sending")


def plain(timeline: dict) -> dict[str, tuple[str, str]]:
    """The plan's own reminders (not the confirmation, whose time is the write's, nor the
    store's notices): id -> (status, due)."""
    return {r["id"]: (r["status"], r["due_at"]) for r in timeline["reminders"]
            if not r["id"].startswith(("booking-confirmation", "rescheduled#", "cancelled#",
                                       "again-", "repause#"))}


def test_two_puts_racing_leave_one_of_them_entirely(glow, api, monkeypatch):
    doc = future_booking("A-1042", days=20)
    assert glow.put("/v1/bookings/A-1042", json=doc).status_code == 201
    base = datetime.fromisoformat(doc["starts_at"])
    a_body = dict(doc, starts_at=(base + timedelta(days=5)).isoformat(),
                  medications={"tretinoin": False, "retinol": False,
                               "isotretinoin_last_dose": None})
    b_body = dict(doc, starts_at=(base + timedelta(days=10)).isoformat(),
                  patient=dict(doc["patient"], name="Ana María López"))
    parked, resume = threading.Event(), threading.Event()
    real = store_module.reconcile
    calls = {"n": 0}

    def slow_reconcile(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # writer A, after it read the booking
            parked.set()
            assert resume.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "reconcile", slow_reconcile)
    result = {}
    writer_a = threading.Thread(target=lambda: result.setdefault(
        "a", glow.put("/v1/bookings/A-1042", json=a_body)))
    writer_a.start()
    assert parked.wait(10)
    b = glow.put("/v1/bookings/A-1042", json=b_body)
    assert b.status_code == 200, b.text
    resume.set()
    writer_a.join(10)
    a = result["a"]
    assert a.status_code == 200, a.text
    assert calls["n"] == 3  # A read again after B's write, and reconciled over it
    monkeypatch.setattr(store_module, "reconcile", real)
    store = api.app.state.services.store
    stored = store.booking_doc("glow", "A-1042")
    assert stored["starts_at"] == a_body["starts_at"] or datetime.fromisoformat(
        stored["starts_at"]) == datetime.fromisoformat(a_body["starts_at"])
    assert stored["patient"]["name"] == doc["patient"]["name"]  # not B's
    assert stored["medications"]["tretinoin"] is False
    final = glow.get("/v1/bookings/A-1042").json()
    assert final["version"] == int(a.headers["etag"].strip('"'))
    # The same body as a fresh booking: the plan A's write must have left.
    # (another patient: the SMS cap counts one patient's SMS across their bookings)
    other = dict(a_body["patient"], phone="+34600777666", email="f@example.com")
    fresh = glow.put("/v1/bookings/F-1", json=dict(a_body, booking_id="F-1",
                                                   patient=other)).json()
    want = {k: v for k, v in plain(fresh).items() if v[0] in PENDING}
    got = {k: v for k, v in plain(final).items() if v[0] in PENDING}
    assert got == want, (got, want)
    # Nothing of B's plan (nor of the first) is left in the schedule.
    due = {ref.split("/", 2)[2]: score for ref, score in store.redis.zrange(
        store.due_key, 0, -1, withscores=True) if ref.startswith("glow/A-1042/")}
    for key, (status, at) in plain(final).items():
        if status in ("scheduled", "retrying"):
            when = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
            assert abs(due.pop(key) - when) < 1, key
        else:
            assert key not in due, (key, status)
    assert all(k.startswith(("booking-confirmation", "rescheduled#", "cancelled#", "again-",
                             "repause#")) for k in due), due
    assert datetime.now(UTC) < base + timedelta(days=5)


def test_an_unchanged_put_racing_a_cancel_answers_what_is_stored(glow, api, monkeypatch):
    """The clinic's sync sends the booking again as it is (nothing changed: a no-op) and is
    parked after its read; the clinic's desk cancels it (version 2); the PUT resumes. Its
    answer must be the booking as it is stored after it: either it re-opened the booking
    (the later write wins) or it answers the cancel, never "scheduled, version 1" over a
    booking cancelled at version 2 (the clinic's system would hold a version going back
    and a visit it thinks is on). Real HTTP (uvicorn), real Redis."""
    doc = future_booking("A-1042", days=20)
    assert glow.put("/v1/bookings/A-1042", json=doc).status_code == 201
    store = api.app.state.services.store
    parked, resume = threading.Event(), threading.Event()
    real = store_module.reconcile
    calls = {"n": 0}

    def slow_reconcile(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the unchanged PUT, after it read version 1
            parked.set()
            assert resume.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "reconcile", slow_reconcile)
    result = {}
    writer = threading.Thread(target=lambda: result.setdefault(
        "put", glow.put("/v1/bookings/A-1042", json=doc)))
    writer.start()
    try:
        assert parked.wait(10)
        cancelled = glow.delete("/v1/bookings/A-1042")
        assert cancelled.status_code == 200 and cancelled.headers["etag"] == '"2"'
    finally:
        resume.set()
        writer.join(10)
    put = result["put"]
    assert put.status_code == 200, put.text
    monkeypatch.setattr(store_module, "reconcile", real)
    final = glow.get("/v1/bookings/A-1042").json()
    answered = put.json()
    assert int(put.headers["etag"].strip('"')) > 2, put.headers["etag"]  # after the cancel
    assert (answered["version"], answered["status"]) == (final["version"], final["status"])
    assert final["status"] == "scheduled"
    stored = store.redis.hgetall(store.booking_key("glow", "A-1042"))
    assert stored["status"] == "scheduled" and stored["version"] == str(final["version"])
    due = {ref.split("/", 2)[2] for ref in store.redis.zrange(store.due_key, 0, -1)
           if ref.startswith("glow/A-1042/")}
    pending = {r["id"] for r in final["reminders"] if r["status"] in ("scheduled", "retrying")}
    assert pending and due == pending, (due, pending)
