"""One clinic never sees or changes another's bookings, on any route.

Clinic glow holds booking A-1042 (held, with a dead letter). For every route, clinic
demo asking for it gets exactly what it gets for an id that exists nowhere: same status,
same body, same headers (but the date) — and glow's booking is unchanged afterwards.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import future_booking, held_booking
from worker.store import Attempt

GLOW_ID = "A-1042"
NOWHERE_ID = "Z-9999"


def dead_letter(store, clinic: str, booking_id: str, step: str = "booking-confirmation:email"
                ) -> str:
    """Make one of the booking's reminders a dead letter (claim, begin, fail for good)."""
    ref = f"{clinic}/{booking_id}/{step}"
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"), "permanent: SMTP 550")
    return ref


def comparable(answer: httpx.Response, booking_id: str) -> tuple[int, Any, dict[str, str]]:
    """Status, body and headers, with the asked-for id and the date taken out."""
    headers = {k: v for k, v in answer.headers.items() if k not in ("date", "content-length")}
    return answer.status_code, answer.text.replace(booking_id, "<id>"), headers


@pytest.fixture
def glow_state(glow, api) -> dict[str, Any]:
    """glow's held booking with a dead letter, and everything stored about it."""
    doc = held_booking(GLOW_ID)
    assert glow.put(f"/v1/bookings/{GLOW_ID}", json=doc).status_code == 201
    store = api.app.state.services.store
    # A held booking sends nothing; dead-letter a reminder of a second, scheduled one.
    assert glow.put("/v1/bookings/D-1", json=future_booking("D-1")).status_code == 201
    ref = dead_letter(store, "glow", "D-1")
    return {"ref": ref, "snapshot": snapshot(glow)}


def snapshot(glow) -> Any:
    return (glow.get(f"/v1/bookings/{GLOW_ID}").json(), glow.get("/v1/bookings/D-1").json(),
            glow.get("/v1/dead-letters").json())


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/bookings/{id}"),
    ("DELETE", "/v1/bookings/{id}"),
    ("POST", "/v1/bookings/{id}/release"),
])
def test_another_clinics_booking_is_404_exactly_like_a_missing_one(
        glow, demo, glow_state, method, path):
    theirs = demo.request(method, path.format(id=GLOW_ID))
    nowhere = demo.request(method, path.format(id=NOWHERE_ID))
    assert theirs.status_code == 404
    assert comparable(theirs, GLOW_ID) == comparable(nowhere, NOWHERE_ID)
    assert snapshot(glow) == glow_state["snapshot"]


def test_put_of_another_clinics_id_is_a_new_booking_of_ones_own(glow, demo, glow_state):
    doc = future_booking(GLOW_ID)
    del doc["clinic"]
    theirs = demo.put(f"/v1/bookings/{GLOW_ID}", json=doc)
    nowhere = demo.put(f"/v1/bookings/{NOWHERE_ID}", json=dict(doc, booking_id=NOWHERE_ID))
    assert theirs.status_code == nowhere.status_code == 201  # created, like a missing one
    assert theirs.json()["clinic"] == "demo" and theirs.json()["version"] == 1
    assert theirs.json()["status"] == "scheduled"  # not glow's held booking
    assert snapshot(glow) == glow_state["snapshot"]
    # ...and If-Match on that id sees demo's own version, never glow's.
    assert demo.put(f"/v1/bookings/{GLOW_ID}", json=doc,
                    headers={"If-Match": '"1"'}).status_code == 200


def test_batch_of_another_clinics_id_is_a_new_booking_of_ones_own(glow, demo, glow_state):
    doc = future_booking(GLOW_ID)
    del doc["clinic"]
    answer = demo.post("/v1/bookings:batch", json={"bookings": [
        doc, dict(doc, booking_id=NOWHERE_ID)]}).json()
    assert [r["status"] for r in answer["results"]] == [201, 201]
    assert answer["results"][0]["timeline"]["clinic"] == "demo"
    assert snapshot(glow) == glow_state["snapshot"]


def test_listing_shows_only_ones_own_bookings(glow, demo, glow_state):
    assert demo.get("/v1/bookings").json() == {"bookings": [], "next_cursor": None}
    assert demo.get("/v1/bookings", params={"status": "held"}).json()["bookings"] == []
    demo.put("/v1/bookings/MINE-1", json=dict(future_booking("MINE-1"), clinic="demo"))
    assert [b["booking_id"] for b in demo.get("/v1/bookings").json()["bookings"]] == ["MINE-1"]
    assert [b["booking_id"] for b in glow.get("/v1/bookings").json()["bookings"]] == [
        GLOW_ID, "D-1"]


def test_dead_letters_show_only_ones_own(glow, demo, glow_state):
    assert demo.get("/v1/dead-letters").json() == {"dead_letters": []}
    mine = glow.get("/v1/dead-letters").json()["dead_letters"]
    assert [d["ref"] for d in mine] == [glow_state["ref"]]


@pytest.mark.parametrize("named", ["ref", "booking_id"])
def test_replay_of_another_clinics_dead_letter_is_404_like_a_missing_one(
        glow, demo, glow_state, named):
    theirs_item = glow_state["ref"] if named == "ref" else "D-1"
    nowhere_item = "glow/Z-9999/booking-confirmation:email" if named == "ref" else NOWHERE_ID
    theirs = demo.post("/v1/dead-letters/replay", json={"refs": [theirs_item]})
    nowhere = demo.post("/v1/dead-letters/replay", json={"refs": [nowhere_item]})
    assert theirs.status_code == 404
    assert comparable(theirs, theirs_item) == comparable(nowhere, nowhere_item)
    assert demo.post("/v1/dead-letters/replay", json={"all": True}).json() == {"replayed": []}
    assert snapshot(glow) == glow_state["snapshot"]


def test_replay_sends_ones_own_dead_letter_again(glow, api, glow_state):
    store = api.app.state.services.store
    nothing = glow.post("/v1/dead-letters/replay", json={"refs": []})
    assert nothing.status_code == 422
    assert nothing.json()["error"]["fields"][0]["field"] == "refs"
    typo = glow.post("/v1/dead-letters/replay", json={"refs": ["D-1", "D-2"]})
    assert typo.status_code == 404
    assert typo.json()["error"]["fields"] == [
        {"field": "refs.1", "message": "not a dead letter of this clinic"}]
    assert glow.get("/v1/dead-letters").json()["dead_letters"]  # nothing was replayed
    bad = glow.post("/v1/dead-letters/replay", json={"refs": "D-1", "extra": 1})
    assert bad.status_code == 422
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"refs", "extra"}

    replayed = glow.post("/v1/dead-letters/replay", json={"refs": ["D-1"]})
    assert replayed.status_code == 200
    assert replayed.json() == {"replayed": [glow_state["ref"]]}
    assert glow.get("/v1/dead-letters").json() == {"dead_letters": []}
    assert store.redis.zscore(store.due_key, glow_state["ref"]) is not None
