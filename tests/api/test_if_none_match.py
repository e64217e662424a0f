"""If-None-Match (RFC 9110 13.1.2): `*` on a PUT creates only, never overwrites a booking
that exists (two booking systems creating the same id: the second gets a 412, not a
silent overwrite of the first's patient). Nothing stored changes on a refusal. A GET is
always answered in full (the version does not cover the reminders' progress). Real HTTP
to the real app, a real Redis."""

from __future__ import annotations

from tests.api.conftest import future_booking
from tests.api.test_if_match_syntax import _stored
from tests.api.test_isolation import dead_letter


def test_put_with_if_none_match_star_creates_but_never_overwrites(api, glow):
    created = glow.put("/v1/bookings/A-1042", json=future_booking(),
                       headers={"If-None-Match": "*"})
    assert created.status_code == 201, created.text
    before = _stored(api, "glow", "A-1042")
    other = future_booking(medications={"tretinoin": False})
    other["patient"]["name"] = "Another Patient"
    refused = glow.put("/v1/bookings/A-1042", json=other, headers={"If-None-Match": "*"})
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"]["code"] == "precondition_failed"
    assert refused.headers["ETag"] == '"1"'
    assert _stored(api, "glow", "A-1042") == before
    # A tag of the current version refuses a write too; another version's does not.
    assert glow.put("/v1/bookings/A-1042", json=other,
                    headers={"If-None-Match": 'W/"1"'}).status_code == 412
    assert glow.delete("/v1/bookings/A-1042", headers={"If-None-Match": "*"}).status_code == 412
    assert _stored(api, "glow", "A-1042") == before
    assert glow.put("/v1/bookings/A-1042", json=other,
                    headers={"If-None-Match": '"7"'}).headers["ETag"] == '"2"'


def test_get_with_if_none_match_of_the_version_still_answers_the_timeline(api, glow):
    """The version (the ETag) is the clinic's booking's; the timeline changes under it as
    its reminders go out (here one fails for good, version 1 still). A GET with
    If-None-Match of that version is answered in full, never a 304 that would hide the
    reminders' progress from a client polling with its cached ETag."""
    glow.put("/v1/bookings/A-1042", json=future_booking())
    dead_letter(api.app.state.services.store, "glow", "A-1042")
    polled = glow.get("/v1/bookings/A-1042", headers={"If-None-Match": '"1"'})
    assert (polled.status_code, polled.headers["ETag"]) == (200, '"1"')
    failed = [r["id"] for r in polled.json()["reminders"] if r["status"] == "failed"]
    assert failed == ["booking-confirmation:email"]


def test_a_malformed_if_none_match_names_the_header_and_changes_nothing(api, glow):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    for answer in (glow.put("/v1/bookings/A-1042", json=future_booking(
                       medications={"tretinoin": False}), headers={"If-None-Match": "1"}),
                   glow.delete("/v1/bookings/A-1042", headers={"If-None-Match": "x"})):
        assert answer.status_code == 400, answer.text
        assert [f["field"] for f in answer.json()["error"]["fields"]] == ["If-None-Match"]
    assert _stored(api, "glow", "A-1042") == before


def test_two_creators_with_if_none_match_star_one_wins(api, glow, monkeypatch):
    """A PUT with `If-None-Match: *` reads the booking missing and is parked at its
    reconcile; another system creates the booking meanwhile; the first resumes. It must not
    overwrite it: 412 with the ETag, the other's patient stored (the check is made again
    inside the upsert's transaction, not only before it)."""
    import threading
    from typing import Any

    from worker.store import Store

    parked, go = threading.Event(), threading.Event()
    real = Store._reconcile

    def reconcile(stored_booking: dict[str, str], *args: Any, **kwargs: Any) -> Any:
        if not parked.is_set():  # the conditional PUT's first read: missing
            assert not stored_booking
            parked.set()
            assert go.wait(10)
        return real(stored_booking, *args, **kwargs)

    monkeypatch.setattr(Store, "_reconcile", staticmethod(reconcile))
    mine = future_booking(medications={"tretinoin": False})
    mine["patient"]["name"] = "First System"
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", glow.put(
        "/v1/bookings/A-1042", json=mine, headers={"If-None-Match": "*"})))
    thread.start()
    try:
        assert parked.wait(10)
        theirs = glow.put("/v1/bookings/A-1042", json=future_booking())
        assert theirs.status_code == 201, theirs.text
    finally:
        go.set()
        thread.join(30)
    monkeypatch.undo()
    refused = answer["r"]
    assert refused.status_code == 412, refused.text
    assert refused.headers["ETag"] == '"1"'
    store = api.app.state.services.store
    assert store.booking_doc("glow", "A-1042")["patient"]["name"] == "Ana López"
    assert glow.get("/v1/bookings/A-1042").json()["version"] == 1
