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

from tests.api.conftest import future_booking, held_booking
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


# --- DELETE with If-Match (review) -----------------------------------------------------------


def test_delete_with_a_stale_if_match_is_refused_and_cancels_nothing(api, glow):
    """A clinic's system read version 1 and cancels on that view; meanwhile another moved
    the appointment (version 2). The stale DELETE names version 1: 412, nothing changed."""
    first = glow.put("/v1/bookings/A-1", json=future_booking("A-1"))
    assert first.headers["etag"] == '"1"'
    moved = glow.put("/v1/bookings/A-1", json=future_booking("A-1", days=21))
    assert moved.headers["etag"] == '"2"'
    store = api.app.state.services.store
    before = (store.redis.hgetall(store.booking_key("glow", "A-1")),
              store.redis.zrange(store.due_key, 0, -1, withscores=True))
    stale = glow.delete("/v1/bookings/A-1", headers={"If-Match": '"1"'})
    assert stale.status_code == 412, stale.text
    assert stale.json()["error"]["code"] == "precondition_failed"
    assert stale.headers["etag"] == '"2"'
    assert (store.redis.hgetall(store.booking_key("glow", "A-1")),
            store.redis.zrange(store.due_key, 0, -1, withscores=True)) == before
    # A missing booking answers as without If-Match (RFC 9110 13.2.1): 404.
    assert glow.delete("/v1/bookings/A-2", headers={"If-Match": "*"}).status_code == 404
    current = glow.delete("/v1/bookings/A-1", headers={"If-Match": '"2"'})
    assert current.status_code == 200 and current.json()["status"] == "cancelled"
    assert current.headers["etag"] == '"3"'


def test_a_put_landing_during_a_conditional_delete_wins(api, glow, monkeypatch):
    """The DELETE (If-Match "1") is parked after its read of version 1; a PUT moves the
    appointment (version 2); released, the DELETE answers 412 and the move stands."""
    assert glow.put("/v1/bookings/A-1", json=future_booking("A-1")).status_code == 201
    parked, go = threading.Event(), threading.Event()
    real = Store._cancel_notices

    def cancel_notices(self, clinic, booking_id, now):
        out = real(self, clinic, booking_id, now)
        if not parked.is_set():
            parked.set()
            assert go.wait(10)
        return out

    monkeypatch.setattr(Store, "_cancel_notices", cancel_notices)
    answer = {}
    thread = threading.Thread(target=lambda: answer.setdefault(
        "r", glow.delete("/v1/bookings/A-1", headers={"If-Match": '"1"'})))
    thread.start()
    try:
        assert parked.wait(10)
        moved = glow.put("/v1/bookings/A-1", json=future_booking("A-1", days=21))
        assert moved.status_code == 200 and moved.headers["etag"] == '"2"'
    finally:
        go.set()
        thread.join(30)
    assert answer["r"].status_code == 412, answer["r"].text
    final = glow.get("/v1/bookings/A-1").json()
    assert final["status"] == "scheduled" and final["version"] == 2


def test_a_release_with_if_match_releases_only_the_version_reviewed(api, glow):
    """The clinic reviews a held booking at version 1 and releases it with `If-Match: "1"`;
    meanwhile its booking system corrected the medications (a dose 5 days ago: version 2,
    held again for another reason, not reviewed). The release must not release version
    2: 412 with the current ETag, nothing stored changes (RFC 9110 13.1.1: a server
    evaluates If-Match before the method; the route ignored it and released the unreviewed
    version). A malformed If-Match is the 400 naming the header, as on PUT and DELETE."""
    assert glow.put("/v1/bookings/H-1", json=held_booking()).headers["ETag"] == '"1"'
    corrected = held_booking()
    dose = (datetime.now(UTC) - timedelta(days=5)).date().isoformat()
    corrected["medications"]["isotretinoin_last_dose"] = dose
    put = glow.put("/v1/bookings/H-1", json=corrected)
    assert (put.status_code, put.json()["status"], put.headers["ETag"]) == (200, "held", '"2"')
    before = stored_state(api)

    refused = glow.post("/v1/bookings/H-1/release", headers={"If-Match": '"1"'})
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"]["code"] == "precondition_failed"
    assert refused.headers["ETag"] == '"2"'
    malformed = glow.post("/v1/bookings/H-1/release", headers={"If-Match": "1"})
    assert malformed.status_code == 400, malformed.text
    assert [f["field"] for f in malformed.json()["error"]["fields"]] == ["If-Match"]
    assert stored_state(api) == before
    assert glow.get("/v1/bookings/H-1").json()["status"] == "held"

    released = glow.post("/v1/bookings/H-1/release", headers={"If-Match": '"2"'})
    assert released.status_code == 200, released.text
    assert (released.json()["status"], released.headers["ETag"]) == ("scheduled", '"3"')
