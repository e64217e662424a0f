"""If-None-Match (RFC 9110 13.1.2): `*` on a PUT creates only, never overwrites a booking
that exists (two booking systems creating the same id: the second gets a 412, not a
silent overwrite of the first's patient); a GET whose tag names the current version is a
304. Nothing stored changes on a refusal. Real HTTP to the real app, a real Redis."""

from __future__ import annotations

from tests.api.conftest import future_booking
from tests.api.test_if_match_syntax import _stored


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


def test_get_with_if_none_match_of_the_current_version_is_304(api, glow):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    same = glow.get("/v1/bookings/A-1042", headers={"If-None-Match": '"1"'})
    assert (same.status_code, same.headers["ETag"], same.content) == (304, '"1"', b"")
    assert glow.get("/v1/bookings/A-1042", headers={"If-None-Match": '"0", W/"1"'}
                    ).status_code == 304
    newer = glow.get("/v1/bookings/A-1042", headers={"If-None-Match": '"7"'})
    assert newer.status_code == 200 and newer.json()["version"] == 1


def test_a_malformed_if_none_match_names_the_header_and_changes_nothing(api, glow):
    glow.put("/v1/bookings/A-1042", json=future_booking())
    before = _stored(api, "glow", "A-1042")
    for answer in (glow.put("/v1/bookings/A-1042", json=future_booking(
                       medications={"tretinoin": False}), headers={"If-None-Match": "1"}),
                   glow.delete("/v1/bookings/A-1042", headers={"If-None-Match": "x"}),
                   glow.get("/v1/bookings/A-1042", headers={"If-None-Match": "x"})):
        assert answer.status_code == 400, answer.text
        assert [f["field"] for f in answer.json()["error"]["fields"]] == ["If-None-Match"]
    assert _stored(api, "glow", "A-1042") == before
