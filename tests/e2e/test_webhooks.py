"""Clinic webhooks and the held alert, end to end: real worker and beat, real receiver."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import QUICK_MESSAGES, wait_until
from tests.sinks import DeadEndpoint, WebhookReceiver
from worker.webhooks import Events

SECRET = "e2e-webhook-secret-0123456789"
RECENT_DOSE = (date.today() - timedelta(days=30)).isoformat()  # within the 180-day washout


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(SECRET).start()
    yield r
    r.gate.set()
    r.stop()


@pytest.fixture
def hooked(service, e2e_config: Path, receiver: WebhookReceiver):
    """Clinic e2e with a webhook and an address; the protocol holds recent isotretinoin."""
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_text(
        clinic.read_text().replace('locale = "en"\n', 'locale = "en"\nemail = "desk@e2e.test"\n')
        + f'[webhook]\nurl = "{receiver.url}"\nsecret = "${{E2E_WEBHOOK_SECRET}}"\n')
    protocol = e2e_config / "protocols" / "quick.toml"
    # No message to the patient while held (tests/test_hold_notice.py has it): only the
    # clinic's events are counted here.
    protocol.write_text('isotretinoin_washout_days = 180\nhold_template = ""\n'
                        + protocol.read_text())
    return service.configure(E2E_WEBHOOK_SECRET=SECRET)


def by_type(receiver: WebhookReceiver) -> Counter[str]:
    return Counter(h.json()["type"] for h in receiver.snapshot())


def test_every_send_and_the_completion_reach_the_clinic_signed(hooked, receiver, make_booking,
                                                                smtp_sink, sms_sink):
    hooked.up()
    booking = make_booking("W-1", starts_in=10)
    hooked.book(booking)
    wait_until(lambda: by_type(receiver)["booking.completed"] == 1, 60)
    hooks = receiver.snapshot()
    assert all(h.valid for h in hooks)
    assert by_type(receiver) == {"reminder.sent": QUICK_MESSAGES, "booking.completed": 1}
    sent = [h.json() for h in hooks if h.json()["type"] == "reminder.sent"]
    timeline = {r["id"]: r for r in hooked.show("W-1")["reminders"]}
    assert sorted(e["reminder"] for e in sent) == sorted(timeline)
    for event in sent:  # the same instant, to the second
        assert event["sent_at"][:19] == timeline[event["reminder"]]["sent_at"][:19]
    # No contact detail or message text ever leaves in a webhook.
    patient = booking["patient"]
    texts = [m.text for m in smtp_sink.snapshot()] + [p.text for p in sms_sink.snapshot()]
    for hook in hooks:
        body = hook.body.decode()
        assert patient["email"] not in body and patient["phone"] not in body
        assert "Ana" not in body and not any(t[:40] in body for t in texts)
    assert len({h.headers["Reminders-Event-Id"] for h in hooks}) == len(hooks)


def test_a_held_booking_is_told_once_by_webhook_and_email(hooked, receiver, make_booking,
                                                           smtp_sink):
    hooked.up()
    held = make_booking("W-2", starts_in=3600)
    held["medications"] = {"isotretinoin_last_dose": RECENT_DOSE}
    (timeline,) = hooked.book(held)
    assert timeline["status"] == "held"
    hooked.book(held)  # the same booking again: no second alert
    wait_until(lambda: by_type(receiver)["booking.held"] == 1, 30)
    alert = wait_until(lambda: [m for m in smtp_sink.snapshot() if m.to == "desk@e2e.test"], 30)
    (event,) = [h.json() for h in receiver.snapshot()]
    assert event["booking_id"] == "W-2" and event["reason"] == timeline["hold_reason"]
    assert alert[0].subject == "Booking W-2 is held for your review"
    assert timeline["hold_reason"] in alert[0].text
    # Nothing went to the patient.
    assert [m for m in smtp_sink.snapshot() if m.to != "desk@e2e.test"] == []


def test_an_event_in_flight_when_the_worker_is_killed_is_delivered_after_the_lease(
        hooked, receiver, make_booking):
    worker, _ = hooked.start("w1")
    receiver.gate.clear()  # the clinic's endpoint hangs: the first POST is parked
    hooked.book(make_booking("W-3", starts_in=3600,
                             **{"channels": ["email"]}) | {"medications": {
                                 "isotretinoin_last_dose": RECENT_DOSE}})
    wait_until(lambda: receiver.snapshot(), 30)
    hooked.kill(worker)  # mid-POST
    receiver.gate.set()
    hooked.worker("w2")
    # Lease 10 s in these tests: the event is claimed again and delivered by w2.
    wait_until(lambda: len(receiver.snapshot()) >= 2, 40)
    hooks = receiver.snapshot()
    ids = Counter(h.headers["Reminders-Event-Id"] for h in hooks)
    assert len(ids) == 1 and all(h.valid for h in hooks)  # the same event, the same id
    assert hooks[-1].json()["type"] == "booking.held"


@pytest.fixture
def dead_endpoint() -> Iterator[DeadEndpoint]:
    endpoint = DeadEndpoint().start()
    yield endpoint
    endpoint.stop()


def dead_hooked(service, e2e_config: Path, endpoint: DeadEndpoint):
    """Clinic e2e whose webhook URL is up but dead (accepts, never answers)."""
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_text(clinic.read_text()
                      + f'[webhook]\nurl = "{endpoint.url}"\nsecret = "${{E2E_WEBHOOK_SECRET}}"\n')
    return service.configure(E2E_WEBHOOK_SECRET=SECRET)


def emit_events(redis_client, count: int) -> list[str]:
    """Write `count` events for clinic e2e as the store's scripts do."""
    events = Events(redis_client, "reminders")
    return [str(events.emit("e2e", "webhook", "reminder.skipped",
                            {"booking_id": f"OLD-{n}", "reason": "test"})) for n in range(count)]


def test_a_dead_clinic_endpoint_delays_no_reminder(service, e2e_config, dead_endpoint,
                                                   make_booking, smtp_sink, sms_sink,
                                                   redis_client):
    # A lease long enough that a delivery waits the webhook's whole timeout (10 s) for
    # the answer that never comes, as in production (the lease there is 300 s).
    svc = dead_hooked(service, e2e_config, dead_endpoint).configure(
        REMINDERS_LEASE_SECONDS="30")
    svc.up()
    emit_events(redis_client, 30)
    # Deliveries are under way, each waiting for the dead endpoint.
    wait_until(lambda: dead_endpoint.connections() >= 2, 20)
    svc.book(make_booking("D-1", starts_in=12))
    wait_until(lambda: len(smtp_sink.snapshot()) + len(sms_sink.snapshot())
               >= QUICK_MESSAGES, 60)
    timeline = svc.show("D-1")["reminders"]
    assert len(timeline) == QUICK_MESSAGES
    assert all(r["status"] == "sent" for r in timeline), timeline
    late = {r["id"]: round(iso_seconds(r["sent_at"]) - iso_seconds(r["due_at"]), 1)
            for r in timeline}
    # Each on time (a few seconds' margin for a loaded machine), though the clinic's
    # events are still waiting for their endpoint meanwhile.
    print(f"seconds late with {dead_endpoint.connections()} deliveries to the dead endpoint "
          f"under way or timed out: {late}")
    assert max(late.values()) < 5, late
    events = Events(redis_client, "reminders")
    assert len(events.pending("e2e")) >= 30 and events.dead() == []


def iso_seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_warm_shutdown_lets_the_event_under_way_be_delivered_once(hooked, receiver,
                                                                   redis_client):
    import signal
    import subprocess
    import threading

    svc = hooked.configure(REMINDERS_SHUTDOWN_GRACE_SECONDS="10")
    worker, _ = svc.start("w1")
    receiver.gate.clear()  # the clinic's endpoint parks the POST
    (event_id,) = emit_events(redis_client, 1)
    wait_until(lambda: receiver.snapshot(), 30)
    worker.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
    # It answers within the grace period, a second after the SIGTERM.
    threading.Timer(1.0, receiver.gate.set).start()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(worker.log_path.read_text()) from None
    events = Events(redis_client, "reminders")
    (hook,) = receiver.snapshot()
    assert hook.valid and hook.headers["Reminders-Event-Id"] == event_id
    assert events.pending() == [] and events.dead() == []  # delivered and recorded: once
    assert redis_client.zcard(events.out_key) == 0
    assert redis_client.zrange(events.senders_key, 0, -1) == []  # left the pump's count


def test_a_webhook_url_s_token_is_in_no_log_line_when_its_answer_is_malformed(
        service, e2e_config, dead_endpoint, redis_client):
    # A receiver's URL often carries its own token (in the path or the query: Zapier's
    # hooks, a `?token=`). An answer whose headers urllib3 cannot parse (a header line
    # without a colon) made urllib3 log, at WARNING, "Failed to parse headers (url=...)"
    # with the whole URL, through the worker's handler: the token in its log.
    dead_endpoint.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Receiver-Note\r\n"
                         b"Connection: close\r\n\r\n")
    clinic = e2e_config / "clinics" / "e2e.toml"
    url = f"{dead_endpoint.url}/PathToken9f3a?token=QueryToken7c1e"
    clinic.write_text(clinic.read_text()
                      + f'[webhook]\nurl = "{url}"\nsecret = "${{E2E_WEBHOOK_SECRET}}"\n')
    svc = service.configure(E2E_WEBHOOK_SECRET=SECRET)
    worker = svc.up()
    [event_id] = emit_events(redis_client, 1)
    wait_until(lambda: dead_endpoint.answered_ids() == [event_id], 30)
    events = Events(redis_client, "reminders")
    wait_until(lambda: events.pending("e2e") == [], 30)  # delivered: a 200 is a 200
    assert events.dead() == []
    log = worker.log_path.read_text()
    assert f"clinic event {event_id}" in log  # the worker's own lines are there
    assert "PathToken9f3a" not in log and "QueryToken7c1e" not in log, log


def test_a_burst_of_clinic_events_goes_at_the_endpoints_pace_not_a_pump_run_s_worth_a_tick(
        hooked, receiver, redis_server, redis_client):
    """A 09:00 burst sends hundreds of reminders: one `reminder.sent` each for their clinics.
    The pump claims no more clinic events than the event senders take at once (so that a
    dead endpoint holds no more than them); a thread done with a delivery claims the next
    due events itself, up to its process's free threads, rather than leaving them due
    until the pump's next run: with one thread a pool process (two claimed a run) and one
    pump run (no beat: nothing else runs the pump), 60 events reach a live endpoint within
    seconds, each once; before, two did, the rest waiting for the ticks (one a second)."""
    from worker.nudge import PumpNudge
    from worker.settings import Settings

    svc = hooked.configure(REMINDERS_WEBHOOK_THREADS="1")
    svc.worker("w1")  # its pool's event senders registered: the pump counts their threads
    ids = emit_events(redis_client, 60)
    PumpNudge(Settings(_env_file=None, redis_url=redis_server.url)).publish_now()  # one run
    skipped = lambda: [h for h in receiver.snapshot()  # noqa: E731
                       if h.json()["type"] == "reminder.skipped"]
    began = time.monotonic()
    try:
        wait_until(lambda: len(skipped()) >= 60, 20)
    except AssertionError:
        raise AssertionError(f"{len(skipped())} of 60 events delivered within 20 s") from None
    print(f"60 clinic events delivered in {time.monotonic() - began:.2f} s")
    got = Counter(h.headers["Reminders-Event-Id"] for h in skipped())
    assert got == Counter(ids), got  # every one, once
    assert all(h.valid for h in skipped())
    events = Events(redis_client, "reminders")
    wait_until(lambda: redis_client.zcard(events.out_key) == 0, 10)  # none left claimed
    assert events.pending("e2e") == [] and events.dead() == []
