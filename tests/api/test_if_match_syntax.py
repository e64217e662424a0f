"""A malformed If-Match (not `*` nor a list of entity tags, RFC 9110 13.1.1) is a client's
syntax error: 400 naming the header, nothing stored changed. A well-formed tag that names
no current version stays the 412 of a lost update (tests/api/test_bookings.py).

Real HTTP requests to the real app (uvicorn on a loopback port), a real Redis."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import future_booking

MALFORMED = ["1", "abc", '"1', '1"', "W/1", '"1" "2"', '*, "1"', '"1",,x', "'1'", 'w/"1"',
             '"a"b"']


def _stored(api, clinic: str, booking_id: str) -> dict[str, object]:
    """The booking's hash and document as Redis holds them."""
    redis = api.app.state.services.redis
    store = api.app.state.services.store
    return {"hash": redis.hgetall(store.booking_key(clinic, booking_id)),
            "doc": redis.get(store.doc_key(clinic, booking_id)),
            "due": redis.zrange(store.due_key, 0, -1, withscores=True)}


def _names_if_match(response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert "If-Match" in error["message"]
    assert [f["field"] for f in error["fields"]] == ["If-Match"]


@pytest.mark.parametrize("header", MALFORMED)
def test_a_malformed_if_match_on_put_names_the_header_and_changes_nothing(api, glow, header):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    changed = future_booking(medications={"tretinoin": False})
    _names_if_match(glow.put("/v1/bookings/A-1042", json=changed, headers={"If-Match": header}))
    assert _stored(api, "glow", "A-1042") == before
    # A booking not stored yet is not created by it either.
    _names_if_match(glow.put("/v1/bookings/A-7", json=future_booking("A-7"),
                             headers={"If-Match": header}))
    assert glow.get("/v1/bookings/A-7").status_code == 404


@pytest.mark.parametrize("header", ["1", '"1', '*, "1"'])
def test_a_malformed_if_match_on_delete_names_the_header_and_cancels_nothing(api, glow, header):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    _names_if_match(glow.delete("/v1/bookings/A-1042", headers={"If-Match": header}))
    assert _stored(api, "glow", "A-1042") == before
    assert glow.get("/v1/bookings/A-1042").json()["status"] == "scheduled"


def test_well_formed_tags_keep_their_answers(api, glow):
    """Tags that parse but name no current version: 412 (a weak one too: If-Match compares
    strongly); the current one, amid others and odd spacing: 200."""
    glow.put("/v1/bookings/A-1042", json=future_booking())
    for header in ['"2"', 'W/"1"', '"abc"', '""', '"7" , "8"', ',"9",']:
        stale = glow.put("/v1/bookings/A-1042", json=future_booking(),
                         headers={"If-Match": header})
        assert stale.status_code == 412, (header, stale.text)
        assert stale.headers["etag"] == '"1"'
    ok = glow.put("/v1/bookings/A-1042", json=future_booking(medications={"tretinoin": False}),
                  headers={"If-Match": '"7",\t"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == '"2"'
    assert glow.delete("/v1/bookings/A-1042", headers={"If-Match": '"1"'}).status_code == 412
    assert glow.delete("/v1/bookings/A-1042", headers={"If-Match": "*"}).status_code == 200


@pytest.mark.parametrize("header", ['"01"', '"001"', '"+1"', '"1.0"'])
def test_a_tag_that_spells_the_version_otherwise_is_not_it(api, glow, header):
    """Entity tags compare character by character (RFC 9110 8.8.3.2): `"01"` or `"+1"` is
    not `"1"`: a 412 that changes nothing, never a write over a version the client did
    not name."""
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    moved = glow.put("/v1/bookings/A-1042", json=future_booking(medications={"tretinoin": False}),
                     headers={"If-Match": header})
    assert moved.status_code == 412, (header, moved.text)
    assert moved.headers["etag"] == '"1"'
    assert glow.delete("/v1/bookings/A-1042", headers={"If-Match": header}).status_code == 412
    assert _stored(api, "glow", "A-1042") == before


def test_a_tag_of_a_version_too_long_to_be_one_is_a_412(api, glow):
    """A well-formed tag of digits no version reaches (thousands of them: Python refuses to
    read past 4300 digits as an int) names no current version: the 412 of any other tag,
    changing nothing, not a 500 (review)."""
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    for header in ['"' + "1" * 5000 + '"', '"7", "' + "9" * 4301 + '"']:
        moved = glow.put("/v1/bookings/A-1042",
                         json=future_booking(medications={"tretinoin": False}),
                         headers={"If-Match": header})
        assert moved.status_code == 412, (moved.status_code, moved.text[:200])
        assert moved.headers["etag"] == '"1"'
        gone = glow.delete("/v1/bookings/A-1042", headers={"If-Match": header})
        assert gone.status_code == 412, (gone.status_code, gone.text[:200])
    assert _stored(api, "glow", "A-1042") == before


def test_if_match_sent_as_several_header_lines_is_one_list(api, glow):
    """RFC 9110 5.3: a field sent on several lines is the comma-joined list of them (as a
    proxy may split or a client library send it). The current version on a later line
    matches (it was a 412: only the first line was read), and a malformed later line is
    the 400 naming the header, nothing changed (it was ignored: the write went through)."""
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    changed = future_booking(medications={"tretinoin": False})
    for lines in ([("If-Match", '"1"'), ("If-Match", "garbage")],
                  [("If-Match", '"1"'), ("If-Match", "*")]):
        _names_if_match(glow.put("/v1/bookings/A-1042", json=changed,
                                 headers=httpx.Headers(lines)))
        _names_if_match(glow.delete("/v1/bookings/A-1042", headers=httpx.Headers(lines)))
        assert _stored(api, "glow", "A-1042") == before
    stale_then_current = httpx.Headers([("If-Match", '"9"'), ("If-Match", '"1"')])
    put = glow.put("/v1/bookings/A-1042", json=changed, headers=stale_then_current)
    assert put.status_code == 200, put.text
    assert put.headers["ETag"] == '"2"'
    # The old version on a later line does not match the new one; the current one does.
    assert glow.delete("/v1/bookings/A-1042", headers=stale_then_current).status_code == 412
    deleted = glow.delete("/v1/bookings/A-1042",
                          headers=httpx.Headers([("If-Match", '"9"'), ("If-Match", '"2"')]))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["status"] == "cancelled"
