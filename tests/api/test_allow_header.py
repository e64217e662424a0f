"""A method a route does not serve: 405 in the error shape with `Allow` naming the methods
the path does serve (RFC 9110 15.5.6), and nothing stored changes. Real HTTP (uvicorn)."""

from __future__ import annotations

import pytest

from tests.api.conftest import future_booking


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PATCH", "/v1/bookings/A-1", "DELETE, GET, HEAD, PUT"),
    ("PUT", "/v1/bookings/A-1/release", "POST"),
    ("GET", "/v1/bookings:batch", "POST"),
    ("GET", "/v1/inbound/sms/glow", "POST"),
    ("PUT", "/v1/unsubscribe/v1.abc.def", "GET, HEAD, POST"),
])
def test_a_method_the_path_does_not_serve_names_those_it_does(glow, api, method, path,
                                                              allowed):
    assert glow.put("/v1/bookings/A-1", json=future_booking("A-1")).status_code == 201
    before = glow.get("/v1/bookings/A-1").json()
    answer = glow.request(method, path, json={"patient": {"phone": "+34600999888"}})
    assert answer.status_code == 405, answer.text
    assert answer.json()["error"]["code"] == "method_not_allowed"
    assert answer.headers.get("allow") == allowed
    assert glow.get("/v1/bookings/A-1").json() == before
