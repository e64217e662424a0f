"""The booking routes over real HTTP (uvicorn on a loopback port) against a real Redis."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tests.api.conftest import future_booking, held_booking
from worker import store as store_module


def test_put_creates_then_the_same_body_changes_nothing(glow):
    doc = future_booking()
    first = glow.put("/v1/bookings/A-1042", json=doc)
    assert first.status_code == 201, first.text
    assert first.headers["etag"] == '"1"'
    assert first.headers["location"] == "/v1/bookings/A-1042"
    timeline = first.json()
    assert timeline["clinic"] == "glow" and timeline["booking_id"] == "A-1042"
    assert timeline["status"] == "scheduled" and timeline["version"] == 1
    assert {r["id"] for r in timeline["reminders"]} >= {"stop-retinoids:sms", "spf:sms"}

    again = glow.put("/v1/bookings/A-1042", json=doc)
    assert again.status_code == 200
    assert again.json() == timeline and again.headers["etag"] == '"1"'
    assert "location" not in again.headers

    got = glow.get("/v1/bookings/A-1042")
    assert got.status_code == 200 and got.json() == timeline and got.headers["etag"] == '"1"'


def test_the_same_start_written_with_another_offset_changes_nothing(api, glow):
    """The same booking again, its start the same instant written with another UTC offset
    (one system sends the clinic's local time, its nightly sync UTC): the same booking,
    re-submitted (DESIGN.md: an idempotent upsert). It was a change: a new version (the
    clinic's other system's If-Match then refused), and its dead letter (a permanent
    failure) sent again as "booking changed". Then the batch route and back: the same."""
    from tests.api.test_isolation import dead_letter

    doc = future_booking()
    start = datetime.fromisoformat(doc["starts_at"])
    doc["starts_at"] = start.astimezone(timezone(timedelta(hours=1))).isoformat()
    assert glow.put("/v1/bookings/A-1042", json=doc).status_code == 201
    ref = dead_letter(api.app.state.services.store, "glow", "A-1042")
    before = glow.get("/v1/bookings/A-1042").json()
    for offset in (0, -5, 1):
        again = dict(doc, starts_at=start.astimezone(timezone(timedelta(hours=offset)))
                     .isoformat())
        answer = glow.put("/v1/bookings/A-1042", json=again)
        assert (answer.status_code, answer.headers["etag"]) == (200, '"1"'), answer.text
        assert answer.json() == before
        batch = glow.post("/v1/bookings:batch", json={"bookings": [again]}).json()
        assert batch["results"][0]["timeline"] == before
    assert [d["ref"] for d in glow.get("/v1/dead-letters").json()["dead_letters"]] == [ref]


def test_a_changed_body_is_reconciled_with_a_new_version(glow):
    doc = future_booking()
    glow.put("/v1/bookings/A-1042", json=doc)
    doc["medications"] = {"tretinoin": False, "retinol": False, "isotretinoin_last_dose": None}
    changed = glow.put("/v1/bookings/A-1042", json=doc)
    assert changed.status_code == 200 and changed.headers["etag"] == '"2"'
    by_id = {r["id"]: r for r in changed.json()["reminders"]}
    assert by_id["stop-retinoids:sms"]["status"] == "cancelled"  # no retinoid any more


def test_clinic_comes_from_the_key_and_booking_id_from_the_url(glow):
    doc = future_booking()
    del doc["clinic"], doc["booking_id"]
    created = glow.put("/v1/bookings/NO-CLINIC-1", json=doc)
    assert created.status_code == 201, created.text
    assert created.json()["clinic"] == "glow" and created.json()["booking_id"] == "NO-CLINIC-1"


def test_a_body_naming_another_clinic_is_refused_on_clinic_and_nothing_is_stored(glow, demo):
    refused = demo.put("/v1/bookings/A-1042", json=future_booking())  # the body says glow
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_booking"
    assert refused.json()["error"]["fields"] == [
        {"field": "clinic", "message": "is 'glow' but the request is for 'demo'"}]
    assert demo.get("/v1/bookings/A-1042").status_code == 404
    assert glow.get("/v1/bookings/A-1042").status_code == 404


def test_a_body_naming_another_booking_id_is_refused(glow):
    refused = glow.put("/v1/bookings/A-1", json=future_booking("A-2"))
    assert refused.status_code == 422
    assert refused.json()["error"]["fields"] == [
        {"field": "booking_id", "message": "is 'A-2' but the URL names 'A-1'"}]


def test_every_bad_field_is_named_as_the_cli_names_it(glow):
    doc = future_booking()
    doc["treatment"] = "botox"
    doc["starts_at"] = "2026-12-05T14:30:00"
    doc["patient"] = dict(doc["patient"], phone="600111222", timezone="Mars/Base")
    doc["surprise"] = 1
    refused = glow.put("/v1/bookings/A-1042", json=doc)
    assert refused.status_code == 422
    fields = {f["field"]: f["message"] for f in refused.json()["error"]["fields"]}
    assert set(fields) == {"treatment", "starts_at", "patient.phone", "patient.timezone",
                           "surprise"}
    assert fields["patient.phone"] == (
        "must be in E.164 form with the country code, e.g. +34600111222")
    assert fields["surprise"] == "unknown field (not part of a booking)"
    assert glow.get("/v1/bookings/A-1042").status_code == 404


def test_delete_cancels_and_keeps_history(glow, api):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    cancelled = glow.delete("/v1/bookings/A-1042")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert {r["status"] for r in cancelled.json()["reminders"]} == {"cancelled"}
    assert glow.get("/v1/bookings/A-1042").json()["status"] == "cancelled"
    store = api.app.state.services.store
    assert store.redis.zcard(store.due_key) == 0
    assert glow.delete("/v1/bookings/A-1042").status_code == 200  # again: same answer


def test_a_held_booking_is_listed_released_and_a_second_release_conflicts(glow):
    held = glow.put("/v1/bookings/H-1", json=held_booking("H-1"))
    assert held.status_code == 201
    assert held.json()["status"] == "held" and "isotretinoin" in held.json()["hold_reason"]
    glow.put("/v1/bookings/S-1", json=future_booking("S-1"))

    listed = glow.get("/v1/bookings", params={"status": "held"}).json()
    assert [b["booking_id"] for b in listed["bookings"]] == ["H-1"]
    assert listed["bookings"][0]["hold_reason"] == held.json()["hold_reason"]

    released = glow.post("/v1/bookings/H-1/release")
    assert released.status_code == 200, released.text
    assert released.json()["status"] == "scheduled"
    assert released.headers["etag"] == f'"{released.json()["version"]}"'
    conflict = glow.post("/v1/bookings/H-1/release")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "not_held"
    assert glow.post("/v1/bookings/S-1/release").status_code == 409


# --- If-Match -----------------------------------------------------------------------------


def test_if_match_refuses_a_lost_update_and_changes_nothing(glow):
    doc = future_booking()
    glow.put("/v1/bookings/A-1042", json=doc)
    changed = dict(doc, medications={"tretinoin": False})
    assert glow.put("/v1/bookings/A-1042", json=changed,
                    headers={"If-Match": '"1"'}).headers["etag"] == '"2"'
    stale = glow.put("/v1/bookings/A-1042", json=doc, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "precondition_failed"
    assert stale.headers["etag"] == '"2"'
    assert glow.get("/v1/bookings/A-1042").json()["version"] == 2
    weak = glow.put("/v1/bookings/A-1042", json=doc, headers={"If-Match": 'W/"2"'})
    assert weak.status_code == 412  # If-Match compares strongly
    assert glow.put("/v1/bookings/A-1042", json=doc,
                    headers={"If-Match": '"7", "2"'}).status_code == 200


def test_if_match_star_needs_an_existing_booking(glow):
    missing = glow.put("/v1/bookings/A-1042", json=future_booking(), headers={"If-Match": "*"})
    assert missing.status_code == 412
    assert glow.get("/v1/bookings/A-1042").status_code == 404
    glow.put("/v1/bookings/A-1042", json=future_booking())
    assert glow.put("/v1/bookings/A-1042", json=future_booking(),
                    headers={"If-Match": "*"}).status_code == 200


def test_if_match_race_two_writers_of_version_1_one_wins(glow, monkeypatch):
    """Writer A reads version 1 inside its transaction and is parked; writer B (also
    If-Match "1") lands; A resumes: its transaction sees the change and answers 412."""
    doc = future_booking()
    glow.put("/v1/bookings/A-1042", json=doc)
    parked, resume = threading.Event(), threading.Event()
    real = store_module.reconcile
    calls = {"n": 0}

    def slow_reconcile(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # writer A, after it read the booking under WATCH
            parked.set()
            assert resume.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "reconcile", slow_reconcile)
    a_body = dict(doc, medications={"tretinoin": False})
    b_body = dict(doc, patient=dict(doc["patient"], name="Ana María López"))
    result = {}
    writer_a = threading.Thread(target=lambda: result.setdefault("a", glow.put(
        "/v1/bookings/A-1042", json=a_body, headers={"If-Match": '"1"'})))
    writer_a.start()
    assert parked.wait(10)
    b = glow.put("/v1/bookings/A-1042", json=b_body, headers={"If-Match": '"1"'})
    assert b.status_code == 200 and b.headers["etag"] == '"2"'
    resume.set()
    writer_a.join(10)
    assert result["a"].status_code == 412, result["a"].text
    assert result["a"].headers["etag"] == '"2"'
    final = glow.get("/v1/bookings/A-1042").json()
    assert final["version"] == 2
    # B's change stands (the name is not in the timeline: read the stored document).
    by_id = {r["id"]: r for r in final["reminders"]}
    assert by_id["stop-retinoids:sms"]["status"] == "scheduled"  # A's change did not land


# --- listing --------------------------------------------------------------------------------


def test_listing_pages_with_a_cursor_and_filters_by_start(glow):
    for n in range(5):
        assert glow.put(f"/v1/bookings/P-{n}", json=future_booking(f"P-{n}", days=10 + n)
                        ).status_code == 201
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = glow.get("/v1/bookings", params=params).json()
        seen += [b["booking_id"] for b in page["bookings"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"P-{n}" for n in range(5)] and pages == 3
    for summary in glow.get("/v1/bookings").json()["bookings"]:
        assert "patient" not in summary and summary["treatment"] == "microneedling"
    start = datetime.now(UTC) + timedelta(days=11, hours=12)
    end = datetime.now(UTC) + timedelta(days=13, hours=12)
    window = glow.get("/v1/bookings", params={"from": start.isoformat(), "to": end.isoformat()})
    assert [b["booking_id"] for b in window.json()["bookings"]] == ["P-2", "P-3"]


def test_listing_refuses_bad_parameters_naming_them(glow):
    naive = glow.get("/v1/bookings", params={"from": "2026-12-01T00:00:00"})
    assert naive.status_code == 422
    assert [f["field"] for f in naive.json()["error"]["fields"]] == ["from"]
    bad = glow.get("/v1/bookings", params={"status": "lost", "limit": 0})
    assert bad.status_code == 422
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"status", "limit"}
    long_cursor = glow.get("/v1/bookings", params={"cursor": "x" * 201})
    assert long_cursor.status_code == 422
    assert long_cursor.json()["error"]["fields"][0]["field"] == "cursor"


def test_listing_tells_completed_from_scheduled(glow, api, catalog):
    """A booking whose visit has begun and whose reminders are all done is `completed`."""
    from tests.raw import set_reminder_fields
    from worker.models import parse_booking
    from worker.planner import plan
    from worker.store import ref_of

    store = api.app.state.services.store
    then = datetime.now(UTC) - timedelta(days=30)
    doc = future_booking("DONE-1", days=-29)  # booked a month ago; the visit was yesterday
    booking = parse_booking(doc, catalog)
    store.upsert(booking, plan(booking, catalog.protocols["microneedling"],
                               catalog.clinics["glow"], then), then)
    for reminder in store.timeline("glow", "DONE-1")["reminders"]:
        set_reminder_fields(store, ref_of("glow", "DONE-1", reminder["id"]), status="sent")
    glow.put("/v1/bookings/LATER-1", json=future_booking("LATER-1"))
    listed = {b["booking_id"]: b["status"] for b in glow.get("/v1/bookings").json()["bookings"]}
    assert listed == {"DONE-1": "completed", "LATER-1": "scheduled"}
    for status, ids in (("completed", ["DONE-1"]), ("scheduled", ["LATER-1"])):
        page = glow.get("/v1/bookings", params={"status": status}).json()["bookings"]
        assert [b["booking_id"] for b in page] == ids


# --- batch ----------------------------------------------------------------------------------


def test_batch_answers_each_booking_on_its_own(glow):
    glow.put("/v1/bookings/B-0", json=future_booking("B-0"))
    bad_phone = future_booking("B-2")
    bad_phone["patient"] = dict(bad_phone["patient"], phone="12")
    other_clinic = dict(future_booking("B-4"), clinic="demo")
    no_id = future_booking()
    del no_id["booking_id"]
    items = [future_booking("B-0"), future_booking("B-1"), bad_phone, future_booking("B-1"),
             other_clinic, no_id, "not an object"]
    answer = glow.post("/v1/bookings:batch", json={"bookings": items})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stored"] == 2 and body["refused"] == 5
    results = body["results"]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["status"] for r in results] == [200, 201, 422, 422, 422, 422, 422]
    assert results[1]["timeline"]["version"] == 1
    assert results[2]["error"]["fields"][0]["field"] == "patient.phone"
    assert results[3]["error"]["fields"] == [
        {"field": "booking_id", "message": "appears earlier in this batch (index 1)"}]
    assert results[4]["error"]["fields"][0]["field"] == "clinic"
    assert results[5]["error"]["fields"] == [{"field": "booking_id", "message": "Field required"}]
    assert results[6]["error"]["fields"] == [
        {"field": "booking", "message": "must be a JSON object"}]
    assert glow.get("/v1/bookings/B-1").status_code == 200
    assert glow.get("/v1/bookings/B-2").status_code == 404


def test_batch_takes_at_most_1000_bookings(glow):
    too_many = glow.post("/v1/bookings:batch", json={"bookings": [{}] * 1001})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["fields"] == [
        {"field": "bookings", "message": "must hold 1 to 1000 bookings, not 1001"}]
    assert glow.post("/v1/bookings:batch", json=[]).status_code == 422
    assert glow.post("/v1/bookings:batch", json={"bookings": [], "x": 1}).json()["error"][
        "fields"] == [{"field": "x", "message": "unknown field (not part of a batch)"},
                      {"field": "bookings", "message": "must hold 1 to 1000 bookings, not 0"}]


def test_batch_of_1000_is_stored(glow):
    items = [future_booking(f"N-{n:04d}") for n in range(1000)]
    # Sequential upserts (about 30 round trips each): slow on a busy machine, never cut off.
    answer = glow.post("/v1/bookings:batch", json={"bookings": items}, timeout=300)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["stored"] == 1000
    assert {r["status"] for r in answer.json()["results"]} == {201}


@pytest.mark.parametrize("path", ["/v1/bookings/A-1042", "/v1/bookings:batch"])
def test_a_body_that_is_not_json_is_refused_415(glow, path):
    method = glow.put if "batch" not in path else glow.post
    answer = method(path, content=b"{}", headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert method(path, content=b"{}").status_code == 415  # no Content-Type at all


def test_a_query_parameter_the_route_does_not_take_is_refused(glow):
    typo = glow.get("/v1/bookings", params={"stauts": "held", "limit": 5})
    assert typo.status_code == 422
    assert typo.json()["error"]["fields"] == [
        {"field": "stauts", "message": "unknown parameter (not one this route takes)"}]
    assert glow.get("/v1/bookings/A-1", params={"verbose": 1}).status_code == 422
    assert glow.get("/v1/bookings", params={"status": "held", "limit": 5}).status_code == 200


def test_a_query_parameter_given_twice_is_refused_not_half_read(glow):
    """`?status=held&status=cancelled` (a client asking for two statuses) answered only the
    cancelled bookings, as if the first were not there: the held one a clinic must review
    went missing from its list. Each parameter takes one value: refused, naming it."""
    assert glow.put("/v1/bookings/H-1", json=held_booking("H-1")).status_code == 201
    assert glow.put("/v1/bookings/C-1", json=future_booking("C-1")).status_code == 201
    assert glow.delete("/v1/bookings/C-1").status_code == 200
    twice = glow.get("/v1/bookings?status=held&status=cancelled&limit=5")
    assert twice.status_code == 422, twice.text
    assert twice.json()["error"]["fields"] == [
        {"field": "status", "message": "given more than once (it takes one value)"}]
    assert glow.get("/v1/bookings?limit=1&limit=500").status_code == 422
    held = glow.get("/v1/bookings?status=held")
    assert [b["booking_id"] for b in held.json()["bookings"]] == ["H-1"]
