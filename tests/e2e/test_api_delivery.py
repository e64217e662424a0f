"""End to end over HTTP: a booking PUT to the API is delivered by a real worker to real sinks."""

from __future__ import annotations

import pytest

from tests.api.conftest import ApiServer, api_settings
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK_MESSAGES, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def api(service, e2e_config, redis_server):
    server = ApiServer(api_settings(config_dir=e2e_config, templates_dir=ROOT / "templates"),
                       redis_server.url).start()
    yield server
    server.stop()


def test_a_booking_put_over_http_is_delivered_by_the_worker(service, api, make_booking,
                                                            smtp_sink, sms_sink):
    service.up()
    doc = make_booking("API-1", starts_in=12)
    del doc["clinic"]  # the key says which clinic
    with api.client(api.issue_key("e2e")) as client:
        created = client.put("/v1/bookings/API-1", json=doc)
        assert created.status_code == 201, created.text
        assert created.json()["clinic"] == "e2e"

        def all_sent():
            timeline = client.get("/v1/bookings/API-1").json()
            statuses = [r["status"] for r in timeline["reminders"]]
            return timeline if statuses and set(statuses) == {"sent"} else None

        timeline = wait_until(all_sent, 60, interval=0.5)
        assert len(timeline["reminders"]) == QUICK_MESSAGES
        assert all(r["attempts"] == 1 and r["sent_at"] for r in timeline["reminders"])
        wait_until(lambda: client.get("/v1/bookings/API-1").json()["status"] == "completed", 30)
        listed = client.get("/v1/bookings", params={"status": "completed"}).json()
        assert [b["booking_id"] for b in listed["bookings"]] == ["API-1"]
    emails = [m for m in smtp_sink.snapshot() if m.to == "api-1@example.com"]
    texts = [m for m in sms_sink.snapshot() if m.to == "+34600111222"]
    assert len(emails) == 3 and len(texts) == 2  # confirm, prep, aftercare; prep, spf
    # The CLI sees the same booking the API stored.
    assert service.show("API-1")["version"] == 1
