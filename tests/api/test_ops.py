"""Health, readiness, metrics and the OpenAPI document, over real HTTP."""

from __future__ import annotations

import time

from tests.conftest import EXAMPLE_BOOKING
from worker.api.schemas import EXAMPLE_BOOKING as DOCUMENTED_EXAMPLE
from worker.health import pump_beat, pump_key


def test_healthz_needs_a_fresh_pump_heartbeat_and_readyz_only_redis(api):
    store = api.app.state.services.store
    with api.client() as client:
        never = client.get("/healthz")
        ready = client.get("/readyz")
        pump_beat(store.redis, store.prefix, 0.01)
        health = client.get("/healthz")
        store.redis.hset(pump_key(store.prefix), "at", f"{time.time() - 120:.6f}")
        stale = client.get("/healthz")
    assert never.status_code == 503 and never.json()["pump"] == "never"
    assert never.json()["status"].startswith("no pump run recorded yet")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "redis": "ok",
                                                       "redis_settings": []}
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["pump"] == "ok" and body["redis"] == "ok"
    assert body["oldest_due_overdue_seconds"] is None
    assert body["redis_settings"] == []  # the session Redis is the embedded default: it passes
    assert 0 <= body["pump_heartbeat_age_seconds"] < 5
    assert stale.status_code == 503 and stale.headers["retry-after"]
    assert stale.json()["pump"] == "stale" and stale.json()["pump_heartbeat_age_seconds"] >= 120
    assert "the last pump run was 1" in stale.json()["status"]


def test_healthz_says_the_pump_is_behind_when_a_due_reminder_waits_too_long(api):
    store = api.app.state.services.store
    with api.client() as client:
        pump_beat(store.redis, store.prefix, 0.01)
        store.redis.zadd(store.due_key, {"glow/X-1/spf:sms": time.time() - 5})
        keeping_up = client.get("/healthz")
        assert keeping_up.status_code == 200 and keeping_up.json()["pump"] == "ok"
        store.redis.zadd(store.due_key, {"glow/X-1/spf:sms": time.time() - 120})
        behind = client.get("/healthz")
        assert client.get("/readyz").status_code == 200  # the API itself can serve
    assert behind.status_code == 503 and behind.headers["retry-after"]
    body = behind.json()
    assert body["pump"] == "behind" and body["oldest_due_overdue_seconds"] >= 120
    assert "are beat and a worker running?" in body["status"]


def test_metrics_count_requests_by_route_template_and_status(api, glow):
    glow.get("/v1/bookings/A-1")
    glow.get("/v1/bookings/B-2")
    with api.client() as anonymous:
        anonymous.get("/v1/bookings")
        text = anonymous.get("/metrics").text
    assert ('reminders_api_requests_total{method="GET",route="/v1/bookings/{booking_id}",'
            'status="404"} 2.0') in text
    assert ('reminders_api_requests_total{method="GET",route="/v1/bookings",status="401"} 1.0'
            in text)
    assert "reminders_api_request_duration_seconds_bucket" in text
    assert "A-1" not in text  # ids never become labels


def test_openapi_documents_the_routes_with_the_design_booking_as_example(api):
    with api.client() as client:
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert DOCUMENTED_EXAMPLE == EXAMPLE_BOOKING  # the code's copy is DESIGN.md's booking
    booking = schema["components"]["schemas"]["BookingIn"]
    assert booking["examples"] == [EXAMPLE_BOOKING]
    assert "clinic" not in booking["required"] and "booking_id" not in booking["required"]
    assert set(schema["paths"]) == {
        "/v1/bookings/{booking_id}", "/v1/bookings/{booking_id}/release", "/v1/bookings",
        "/v1/bookings:batch", "/v1/dead-letters", "/v1/dead-letters/replay", "/healthz",
        "/readyz", "/metrics", "/v1/inbound/sms/{clinic}", "/v1/unsubscribe/{token}"}
    assert schema["components"]["securitySchemes"]["clinicKey"]["scheme"] == "bearer"
    # The patients' routes take no clinic key (the SMS provider's signature, a signed link).
    for path in ("/v1/inbound/sms/{clinic}", "/v1/unsubscribe/{token}"):
        for operation in schema["paths"][path].values():
            assert not operation.get("security"), (path, operation)


def test_run_checks_the_api_port_before_claiming_the_api_is_up():
    import socket

    from worker.service import api_command, port_is_free
    from worker.settings import Settings

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port)
    argv = api_command(Settings(_env_file=None, log_level="WARNING"), port)
    assert argv[1:] == ["-m", "uvicorn", "worker.api:app", "--host", "127.0.0.1",
                        "--port", str(port), "--log-level", "warning"]
