"""A write through the API wakes the pump, as `reminders book` does: a real worker and beat
with a long pump interval (30 s: beat's first tick comes 30 s after its start), real Redis,
real HTTP to the API, the SMTP sink. A confirmation PUT, and a reminder a PUT moves
earlier, arrive within seconds, long before the tick (worker/nudge.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.api.conftest import ApiServer, api_settings
from tests.conftest import ROOT
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration

INTERVAL = 30.0


@pytest.fixture
def api(service, e2e_config, redis_server):
    server = ApiServer(api_settings(config_dir=e2e_config, templates_dir=ROOT / "templates",
                                    pump_interval_seconds=INTERVAL),
                       redis_server.url).start()
    yield server
    server.stop()


def emails(smtp_sink, to: str, subject_has: str = "") -> list[float]:
    return [m.at for m in smtp_sink.snapshot()
            if m.to == to and subject_has.lower() in (m.subject or "").lower()]


def test_a_put_confirmation_and_a_reminder_moved_earlier_go_before_the_tick(
        service, api, make_booking, smtp_sink):
    service.configure(REMINDERS_PUMP_INTERVAL_SECONDS=str(INTERVAL))
    worker = service.worker()
    service.beat()
    no_tick_before = time.time() + INTERVAL  # beat's first tick: INTERVAL after its start
    doc = make_booking("NUDGE-1", starts_in=3600)  # only the confirmation is due now
    del doc["clinic"]  # the key says which clinic
    to = "nudge-1@example.com"
    with api.client(api.issue_key("e2e")) as client:
        put_at = time.time()
        created = client.put("/v1/bookings/NUDGE-1", json=doc)
        assert created.status_code == 201, created.text
        wait_until(lambda: emails(smtp_sink, to), no_tick_before - time.time() - 1)
        first = emails(smtp_sink, to)[0]
        # Seconds: a fresh worker's pool process warms up (Apprise, templates) before it
        # takes the nudge, 4 s on a loaded machine; the tick would be 30 s.
        assert first - put_at < 15.0, f"the confirmation came {first - put_at:.1f}s after the PUT"
        assert first < no_tick_before - 5
        print(f"confirmation at the sink {first - put_at:.2f}s after the PUT "
              f"(the tick: {no_tick_before - put_at:.0f}s after it)")
        # Moved earlier: its "prep" email (8 s before the start) now falls due in a few
        # seconds, before the tick: the pump's follow-up waits for it once nudged.
        moved = doc | {"starts_at": (datetime.now(UTC) + timedelta(seconds=12)).isoformat(
            timespec="milliseconds")}
        prep_due = time.time() + 4
        changed = client.put("/v1/bookings/NUDGE-1", json=moved)
        assert changed.status_code == 200 and changed.json()["version"] == 2, changed.text
        assert time.time() < prep_due - 1, "moved too late to tell a nudge from the due wait"

        def prep_sent():
            timeline = client.get("/v1/bookings/NUDGE-1").json()
            return [r for r in timeline["reminders"]
                    if r["id"] == "prep:email" and r["status"] == "sent"]

        wait_until(prep_sent, no_tick_before - time.time() - 1, interval=0.2)
        assert time.time() < no_tick_before
        print(f"moved prep email sent {time.time() - prep_due:+.2f}s from its due instant")
        time.sleep(1.0)  # room for a stray second copy
        timeline = client.get("/v1/bookings/NUDGE-1").json()
    sent = {r["id"]: r["attempts"] for r in timeline["reminders"] if r["status"] == "sent"}
    assert sent.get("confirm:email") == 1 and sent.get("prep:email") == 1, timeline
    # Each message once: the confirmation, the move's notice if one was planned, the prep
    # email; nothing twice.
    emailed = [r for r in timeline["reminders"]
               if r["status"] == "sent" and r["channel"] == "email"]
    assert len(emails(smtp_sink, to)) == len(emailed), timeline
    log = worker.log_path.read_text()  # type: ignore[attr-defined]
    assert "Task reminders.pump[" in log
