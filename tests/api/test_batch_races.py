"""The batch route under a change landing between its read and its apply (found sound by
review): the apply thread is parked on the first chunk while a PUT creates, or a DELETE
cancels, a booking of a later chunk; then released. That booking is read again and
written after the change: 200 (it existed by then) with the version it really has. The
same for a change landing while an earlier part of the batch is stored (the route stores
STORE_PART accepted items at a time), to bookings of later parts."""

from __future__ import annotations

import threading
from datetime import datetime

import pytest

from tests.api.conftest import future_booking
from worker.store import APPLY_CHUNK, Store


def parked_batch(glow, items, change, monkeypatch):
    monkeypatch.setattr("worker.store.APPLY_CHUNK", 1)
    parked, go, second = threading.Event(), threading.Event(), threading.Event()
    real_send, real_prepared = Store._send, Store._prepared
    batch_prepares: list[int] = []
    batch_sends: list[int] = []

    def prepared(self, ready, now, release):
        out = real_prepared(self, ready, now, release)
        if len(ready.batch) == 1 and ready.batch[0][1][0].booking_id == "B-1":
            second.set()  # B-1 read and prepared (the batch's second chunk)
        batch_prepares.append(1)
        return out

    def send(self, ready):
        if threading.current_thread().name.startswith("store-apply"):
            batch_sends.append(1)
            if len(batch_sends) == 1:
                parked.set()
                assert go.wait(10)
        return real_send(self, ready)

    monkeypatch.setattr(Store, "_send", send)
    monkeypatch.setattr(Store, "_prepared", prepared)
    answer: dict[str, object] = {}

    def post() -> None:
        answer["r"] = glow.post("/v1/bookings:batch", json={"bookings": items})

    thread = threading.Thread(target=post)
    thread.start()
    assert parked.wait(10) and second.wait(10)
    try:
        change()
    finally:
        go.set()
        thread.join(30)
    response = answer["r"]
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    return response.json()  # type: ignore[attr-defined]


@pytest.mark.parametrize("what", ["created", "cancelled"])
def test_the_batch_route_answers_a_booking_changed_since_its_read_as_stored(
        glow, monkeypatch, what):
    docs = [future_booking(f"B-{n}", patient=dict(future_booking()["patient"],
                                                  phone=f"+3460011144{n}")) for n in range(3)]
    if what == "cancelled":  # stored as it was; the batch corrects the patient's name
        assert glow.put("/v1/bookings/B-1", json=docs[1]).status_code == 201
        docs[1] = dict(docs[1], patient=dict(docs[1]["patient"], name="Ana María López"))
    moved = dict(docs[1], starts_at=future_booking(days=21)["starts_at"])

    def change() -> None:
        if what == "created":  # another client creates it first, for another day
            assert glow.put("/v1/bookings/B-1", json=moved).status_code == 201
        else:
            assert glow.delete("/v1/bookings/B-1").status_code == 200

    body = parked_batch(glow, docs, change, monkeypatch)
    results = body["results"]
    assert [r["status"] for r in results] == [201, 200, 201]
    stored = glow.get("/v1/bookings/B-1").json()
    assert results[1]["timeline"] == stored
    # Written after the change: a new version (2 after the PUT's 1; 3 after the cancel's 2,
    # reopened).
    assert stored["status"] == "scheduled"
    assert stored["version"] == (2 if what == "created" else 3)


def test_a_later_part_of_the_batch_is_written_after_a_change_landing_while_one_is_stored(
        api, glow, monkeypatch):
    """The route stores a batch STORE_PART accepted items at a time: while its first part
    is parked at Redis, another request moves a booking of the second part and cancels one
    of the third. Each is then written as the batch says, against the change (200, a new
    version; the cancelled one reopened), and answered as stored."""
    from worker.api.bookings import STORE_PART

    docs = [future_booking(f"P-{n}", days=20 + n / 100,
                           patient=dict(future_booking()["patient"], phone=f"+346001{n:05d}"))
            for n in range(2 * STORE_PART + 10)]
    moved_id, cancelled_id = f"P-{STORE_PART + 5}", f"P-{2 * STORE_PART + 5}"
    cancelled = docs[2 * STORE_PART + 5]
    assert glow.put(f"/v1/bookings/{cancelled_id}", json=cancelled).status_code == 201
    docs[2 * STORE_PART + 5] = dict(cancelled, patient=dict(cancelled["patient"],
                                                             name="Ana María López"))
    other_day = dict(docs[STORE_PART + 5], starts_at=future_booking(days=40)["starts_at"])
    parked, go = threading.Event(), threading.Event()
    real_send = Store._send
    sends: list[int] = []

    def send(self, ready):
        if threading.current_thread().name.startswith("store-apply"):
            sends.append(len(ready.batch))
            if len(sends) == 1:
                parked.set()
                assert go.wait(10)
        return real_send(self, ready)

    monkeypatch.setattr(Store, "_send", send)
    answer: dict[str, object] = {}
    thread = threading.Thread(target=lambda: answer.update(
        r=glow.post("/v1/bookings:batch", json={"bookings": docs}, timeout=60)))
    thread.start()
    try:
        assert parked.wait(10)
        assert glow.put(f"/v1/bookings/{moved_id}", json=other_day).status_code == 201
        assert glow.delete(f"/v1/bookings/{cancelled_id}").status_code == 200
    finally:
        go.set()
        thread.join(60)
    response = answer["r"]
    assert response.status_code == 200, response.text[:500]  # type: ignore[attr-defined]
    results = response.json()["results"]  # type: ignore[attr-defined]
    # Two apply chunks in each of the first two parts (the third, one chunk, is sent by the
    # request's own thread).
    assert sends == [APPLY_CHUNK] * 4
    statuses = {r["booking_id"]: r["status"] for r in results}
    assert statuses.pop(moved_id) == statuses.pop(cancelled_id) == 200
    assert set(statuses.values()) == {201}
    for booking_id, version, starts in ((moved_id, 2, docs[STORE_PART + 5]["starts_at"]),
                                        (cancelled_id, 3, cancelled["starts_at"])):
        stored = glow.get(f"/v1/bookings/{booking_id}")
        timeline = stored.json()
        assert [r["timeline"] for r in results if r["booking_id"] == booking_id] == [timeline]
        assert timeline["status"] == "scheduled" and timeline["version"] == version
        assert stored.headers["ETag"] == f'"{version}"'
        written = api.app.state.services.store.booking_doc("glow", booking_id)
        assert datetime.fromisoformat(written["starts_at"]) == datetime.fromisoformat(starts)
    assert written["patient"]["name"] == "Ana María López"


def test_the_same_document_put_while_the_batch_is_stored_stays_unchanged(api, glow, monkeypatch):
    """A booking whose steps are late (its visit in two and a half days: the steps of a
    week and three days before go at once), given by the batch and, while an earlier part
    of the batch is stored, by a PUT of the same document: the PUT creates it (a moment
    after the batch planned it), and the batch, writing it after, finds it unchanged (200,
    version 1, the PUT's timeline). Its late steps were planned for "now" by each, the
    batch's a moment before the PUT's: due now in both plans, not a move (it was version 2,
    each late step 'rescheduled' to the batch's earlier instant)."""
    from worker.api.bookings import STORE_PART

    docs = [future_booking(f"P-{n}", days=20 + n / 100,
                           patient=dict(future_booking()["patient"], phone=f"+346001{n:05d}"))
            for n in range(STORE_PART + 10)]
    late_id = f"P-{STORE_PART + 5}"
    docs[STORE_PART + 5] = late = future_booking(late_id, days=2.5)
    parked, go = threading.Event(), threading.Event()
    real_send = Store._send
    sends: list[int] = []

    def send(self, ready):
        if threading.current_thread().name.startswith("store-apply"):
            sends.append(len(ready.batch))
            if len(sends) == 1:
                parked.set()
                assert go.wait(10)
        return real_send(self, ready)

    monkeypatch.setattr(Store, "_send", send)
    answer: dict[str, object] = {}
    thread = threading.Thread(target=lambda: answer.update(
        r=glow.post("/v1/bookings:batch", json={"bookings": docs}, timeout=60)))
    thread.start()
    try:
        assert parked.wait(10)
        put = glow.put(f"/v1/bookings/{late_id}", json=late)
        assert put.status_code == 201
    finally:
        go.set()
        thread.join(60)
    response = answer["r"]
    assert response.status_code == 200, response.text[:500]  # type: ignore[attr-defined]
    (result,) = [r for r in response.json()["results"]  # type: ignore[attr-defined]
                 if r["booking_id"] == late_id]
    reasons = [r["reason"] or "" for r in put.json()["reminders"]]
    assert any("late:" in reason for reason in reasons)  # steps planned for "now"
    assert (result["status"], result["timeline"]["version"]) == (200, 1)
    assert result["timeline"] == put.json() == glow.get(f"/v1/bookings/{late_id}").json()
