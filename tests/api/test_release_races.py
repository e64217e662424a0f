"""The release route under a change landing between its check and its write (review).

The release reads the booking (held) and its document, then stores them again with the
clinic's release. The request is parked at that store call while another client cancels
the booking, or corrects it with a PUT; then released. The release must not undo the
other change: it answers 409 and the booking stays as the other client left it, in
Redis (its hash, document and the due set).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from tests.api.conftest import held_booking
from worker.store import Store


def parked_release(api, glow, monkeypatch, change):
    """POST the release of H-1, parked on its store write while `change()` runs."""
    parked, go = threading.Event(), threading.Event()
    real_upsert_many = Store.upsert_many

    def upsert_many(self, items, now, *, release=False, **kwargs):
        if release:
            parked.set()
            assert go.wait(10)
        return real_upsert_many(self, items, now, release=release, **kwargs)

    monkeypatch.setattr(Store, "upsert_many", upsert_many)
    answer = {}
    thread = threading.Thread(
        target=lambda: answer.setdefault("r", glow.post("/v1/bookings/H-1/release")))
    thread.start()
    try:
        assert parked.wait(10)
        change()
    finally:
        go.set()
        thread.join(30)
    return answer["r"]


def stored_state(api):
    store = api.app.state.services.store
    r = store.redis
    return (r.hgetall(store.booking_key("glow", "H-1")), r.get(store.doc_key("glow", "H-1")),
            sorted(m for m in r.zrange(store.due_key, 0, -1) if m.startswith("glow/H-1/")))


def test_a_cancel_landing_during_a_release_stands(api, glow, monkeypatch):
    assert glow.put("/v1/bookings/H-1", json=held_booking()).json()["status"] == "held"

    def cancel() -> None:
        assert glow.delete("/v1/bookings/H-1").status_code == 200

    before = {}
    response = parked_release(api, glow, monkeypatch,
                              lambda: (cancel(), before.setdefault("s", stored_state(api))))
    assert response.status_code == 409, response.text
    assert stored_state(api) == before["s"]  # nothing of the release was written
    final = glow.get("/v1/bookings/H-1").json()
    assert final["status"] == "cancelled"
    assert not [r for r in final["reminders"] if r["status"] == "scheduled"]
    assert before["s"][2] == []  # nothing of it will be sent


def test_a_correction_landing_during_a_release_is_not_overwritten(api, glow, monkeypatch):
    doc = held_booking()
    assert glow.put("/v1/bookings/H-1", json=doc).json()["version"] == 1
    # The clinic's system corrects the last dose (a week ago, not a month): still held, and
    # the clinic has not reviewed this one.
    recent = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
    corrected = dict(doc, medications=dict(doc["medications"], isotretinoin_last_dose=recent))

    def correct() -> None:
        put = glow.put("/v1/bookings/H-1", json=corrected)
        assert put.status_code == 200 and put.json()["status"] == "held"

    before = {}
    response = parked_release(api, glow, monkeypatch,
                              lambda: (correct(), before.setdefault("s", stored_state(api))))
    assert response.status_code == 409, response.text
    assert stored_state(api) == before["s"]
    final = glow.get("/v1/bookings/H-1").json()
    assert final["status"] == "held" and final["version"] == 2
    store = api.app.state.services.store
    assert store.booking_doc("glow", "H-1")["medications"]["isotretinoin_last_dose"] == recent
