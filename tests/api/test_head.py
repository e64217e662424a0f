"""HEAD is served wherever GET is (RFC 9110 9.1: every general-purpose server supports
both): the same status and headers as GET, no body. Uptime monitors (UptimeRobot's default
HTTP check) and load balancers (HAProxy `option httpchk HEAD`) ask /healthz with HEAD; a
405 there reads as "down". FastAPI's routes answer only the methods declared, so HEAD was
a 405 on every route. Real HTTP to the real app under uvicorn, a real Redis.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import future_booking
from worker.health import pump_beat


def same_but_body(head, get, *, same_length: bool = True) -> None:
    assert head.status_code == get.status_code, (head.status_code, head.text)
    assert head.content == b""
    for name in ("content-type", "etag", "retry-after", "location"):
        assert head.headers.get(name) == get.headers.get(name), name
    if same_length and "content-length" in get.headers:  # what GET would send
        assert head.headers["content-length"] == str(len(get.content))
    else:  # a body that changes between the two requests (an age, a counter): one is sent
        assert int(head.headers["content-length"]) > 0


def test_health_routes_answer_head_as_get(api, redis_client):
    with api.client() as ops:
        pump_beat(redis_client, api.settings.key_prefix, 0.01)
        for path in ("/healthz", "/readyz", "/metrics"):
            get, head = ops.get(path), ops.head(path)
            assert get.status_code == 200, (path, get.text)
            # Their bodies change between the two requests: the pump heartbeat's age, and
            # /metrics by the GET's own count.
            same_but_body(head, get, same_length=False)
        assert 'reminders_api_requests_total{method="HEAD",route="/healthz",status="200"}' \
            in ops.get("/metrics").text  # counted under its own method and the route
        # Unhealthy reads the same way: a stale pump heartbeat is a 503 to HEAD too.
        redis_client.delete(*redis_client.keys(f"{api.settings.key_prefix}:health:*"))
        get, head = ops.get("/healthz"), ops.head("/healthz")
        assert get.status_code == 503
        same_but_body(head, get, same_length=False)


def test_a_booking_answers_head_with_its_etag_and_nothing_changes(glow, api):
    assert glow.put("/v1/bookings/A-1", json=future_booking("A-1")).status_code == 201
    get = glow.get("/v1/bookings/A-1")
    head = glow.head("/v1/bookings/A-1")
    same_but_body(head, get)
    assert head.headers["etag"] == '"1"'
    assert glow.get("/v1/bookings/A-1").json() == get.json()
    same_but_body(glow.head("/v1/bookings/NOPE"), glow.get("/v1/bookings/NOPE"))  # 404
    with api.client() as anonymous:  # no key: 401 alike
        same_but_body(anonymous.head("/v1/bookings/A-1"), anonymous.get("/v1/bookings/A-1"))


@pytest.mark.parametrize("path", ["/v1/bookings:batch", "/v1/bookings/A-1/release"])
def test_head_where_get_is_not_served_is_a_405_naming_the_methods(glow, path):
    answer = glow.head(path)
    assert answer.status_code == 405
    assert answer.content == b""
    assert "HEAD" not in answer.headers["allow"] and "GET" not in answer.headers["allow"]


def test_the_allow_header_names_head_beside_get(glow):
    answer = glow.patch("/v1/bookings/A-1", json={})
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET, HEAD, PUT"
