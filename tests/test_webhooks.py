"""Clinic events: signing, the durable event schedule, delivery to a real endpoint and SMTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.sinks import SmtpSink, WebhookReceiver
from worker.clinics import Clinic
from worker.clock import redis_time
from worker.rendering import Renderer
from worker.settings import Settings
from worker.webhooks import (
    SIGNATURE_HEADER,
    Events,
    deliver_event,
    iso,
    pump_events,
    sign,
    verify_signature,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec-test-0123456789"
ENV = {"GLOW_WEBHOOK_SECRET": SECRET}
STARTS = datetime(2026, 12, 5, 13, 30, tzinfo=UTC).timestamp()


def glow(**extra: object) -> Clinic:
    doc: dict[str, object] = {
        "id": "glow", "name": "Glow Skin Clinic", "phone": "+34910000000",
        "email": "hola@glow.example", "timezone": "Europe/Madrid", "locale": "en",
    }
    return Clinic.model_validate(doc | extra)


def settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(templates_dir=ROOT / "templates", data_dir=tmp_path, _env_file=None,
                    backoff_base_seconds=30, backoff_cap_seconds=60, **extra)  # type: ignore[arg-type]


# --- signatures ----------------------------------------------------------------------


def test_a_signature_verifies_only_the_same_body_secret_and_a_recent_time():
    body = b'{"id":"1","type":"reminder.sent"}'
    now = 1_800_000_000
    header = sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature(SECRET, header, body, now=now + 299)
    assert not verify_signature(SECRET, header, body + b" ", now=now)  # tampered body
    assert not verify_signature("another-secret", header, body, now=now)
    assert not verify_signature(SECRET, header, body, now=now + 301)  # replayed too late
    assert not verify_signature(SECRET, header, body, now=now - 301)  # from the future
    forged_time = header.replace(f"t={now}", f"t={now + 100}")  # fresh time, old signature
    assert not verify_signature(SECRET, forged_time, body, now=now + 100)
    for broken in (None, "", "v1=abc", "t=abc,v1=00", f"t={now}"):
        assert not verify_signature(SECRET, broken, body, now=now)


# --- the event schedule --------------------------------------------------------------


@pytest.fixture
def events(redis_client) -> Events:
    return Events(redis_client, "t", retention_days=1)


def test_an_event_is_claimed_once_per_lease_and_deleted_when_delivered(events, redis_client):
    event_id = events.emit("glow", "webhook", "booking.held",
                           {"booking_id": "A-1", "reason": "isotretinoin", "starts_at": STARTS})
    (claimed,) = events.claim(10, lease_seconds=30)
    assert claimed[0] == event_id
    assert events.claim(10, lease_seconds=30) == []  # leased: nobody else takes it
    event = events.load(*claimed)
    assert event is not None and event.type == "booking.held"
    assert event.payload()["starts_at"] == iso(STARTS) == "2026-12-05T13:30:00Z"
    assert events.done(*claimed) == "done"
    assert redis_client.exists(events.event_key(event_id)) == 0
    assert redis_client.zcard(events.due_key) == 0


def test_an_expired_lease_is_claimed_again_and_the_old_claim_is_stale(events):
    events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
    first = events.claim(10, lease_seconds=0.2)[0]
    time.sleep(0.3)
    second = events.claim(10, lease_seconds=30)[0]
    assert first[0] == second[0] and first[1] != second[1]
    assert events.load(*first) is None  # the old attempt no longer owns it
    assert events.retry(first[0], first[1], 0, "late") == "stale"
    # ... but a delivery by the old attempt still counts: the event is done.
    assert events.done(*first) == "done"
    assert events.load(*second) is None


def test_retry_reschedules_and_give_up_keeps_it_dead(events, redis_client):
    event_id = events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
    claim = events.claim(10, 30)[0]
    later = redis_time(redis_client) + 100  # 100 s from now on Redis's clock, the claims'
    assert events.retry(event_id, claim[1], 100, "HTTP 500") == "retry"
    assert redis_client.zscore(events.due_key, event_id) == pytest.approx(later, abs=1)
    assert events.claim(10, 30) == []  # not due yet
    redis_client.zadd(events.due_key, {event_id: 0})
    claim = events.claim(10, 30)[0]
    assert events.give_up(event_id, claim[1], "HTTP 500") == "dead"
    assert events.dead() == [event_id]
    assert redis_client.zcard(events.due_key) == 0
    assert redis_client.hget(events.event_key(event_id), "attempts") == "2"
    assert 0 < redis_client.ttl(events.event_key(event_id)) <= 86400


# --- delivery ------------------------------------------------------------------------


@pytest.fixture
def receiver():
    r = WebhookReceiver(SECRET).start()
    yield r
    r.stop()


def hooked(receiver: WebhookReceiver, **extra: object) -> Clinic:
    return glow(webhook={"url": receiver.url, "secret": "${GLOW_WEBHOOK_SECRET}", **extra})


def deliver_all(events: Events, clinic: Clinic, tmp_path: Path, **extra: object) -> list[str]:
    results: list[str] = []
    pump_events(
        events,
        lambda event_id, claim: results.append(deliver_event(
            events, event_id, claim, clinics={clinic.id: clinic},
            renderer=Renderer(ROOT / "templates"), settings=settings(tmp_path, **extra), env=ENV,
        )),
        batch=100,
        lease_seconds=30,
    )
    return results


def test_a_webhook_arrives_signed_with_ids_and_times_but_no_contact_or_body(
        events, receiver, tmp_path):
    fields = {"booking_id": "A-1042", "reminder": "prep:sms", "step": "prep", "channel": "sms",
              "due_at": STARTS - 86400, "sent_at": STARTS - 86399, "attempts": 1}
    event_id = events.emit("glow", "webhook", "reminder.sent", fields)
    assert deliver_all(events, hooked(receiver), tmp_path) == ["delivered"]
    (hook,) = receiver.snapshot()
    assert hook.valid
    assert hook.headers["Reminders-Event"] == "reminder.sent"
    assert hook.headers["Reminders-Event-Id"] == event_id
    assert hook.headers[SIGNATURE_HEADER].startswith("t=")
    created = hook.json().pop("created_at")
    assert abs(datetime.fromisoformat(created).timestamp() - time.time()) < 5
    assert hook.json() | {"created_at": created} == {
        "id": event_id, "type": "reminder.sent", "clinic": "glow", "booking_id": "A-1042",
        "reminder": "prep:sms", "step": "prep", "channel": "sms", "attempts": 1,
        "due_at": "2026-12-04T13:30:00Z", "sent_at": "2026-12-04T13:30:01Z",
        "created_at": created,
    }
    assert events.pending() == []


def test_a_failing_endpoint_is_retried_with_backoff_then_given_up(
        events, receiver, tmp_path, redis_client):
    receiver.status = 503
    event_id = events.emit("glow", "webhook", "reminder.failed",
                           {"booking_id": "A-1", "reason": "HTTP 400"})
    before = time.time()
    assert deliver_all(events, hooked(receiver), tmp_path, webhook_max_attempts=2) == [
        "retrying: webhook answered HTTP 503"]
    # Backoff base 30 s: the next try is 15-30 s away, not now.
    assert 15 <= redis_client.zscore(events.due_key, event_id) - before <= 31
    redis_client.zadd(events.due_key, {event_id: 0})
    assert deliver_all(events, hooked(receiver), tmp_path, webhook_max_attempts=2) == [
        "given up: webhook answered HTTP 503"]
    assert events.dead() == [event_id]
    assert len(receiver.snapshot()) == 2 and all(h.valid for h in receiver.snapshot())


def test_an_unreachable_endpoint_is_retried(events, tmp_path):
    clinic = glow(webhook={"url": "http://127.0.0.1:9/hooks", "secret": "${GLOW_WEBHOOK_SECRET}"})
    events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
    assert deliver_all(events, clinic, tmp_path) == [
        "retrying: webhook unreachable (ConnectionError)"]
    assert len(events.pending()) == 1 and events.pending()[0].attempts == 1


def test_events_a_clinic_does_not_take_are_dropped(events, receiver, tmp_path):
    events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
    events.emit("glow", "webhook", "booking.held", {"booking_id": "A-2"})
    events.emit("gone", "webhook", "booking.held", {"booking_id": "A-3"})
    results = deliver_all(events, hooked(receiver, events=["booking.held"]), tmp_path)
    # A clinic not in config/ as read now is retried: its file may be back soon (a deploy
    # rewriting config/; tests/test_review_conf_missing_clinic_events.py).
    gone = [r for r in results if "'gone'" in r]
    assert len(gone) == 1 and gone[0].startswith("retrying: clinic 'gone' not configured")
    assert sorted(r for r in results if r not in gone) == sorted([
        "dropped: the clinic's webhook does not take this event", "delivered"])
    assert [h.json()["booking_id"] for h in receiver.snapshot()] == ["A-2"]
    assert [e.clinic for e in events.pending()] == ["gone"]


def test_a_missing_secret_is_retried_not_sent_unsigned(events, receiver, tmp_path):
    events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
    results: list[str] = []
    pump_events(events, lambda i, c: results.append(deliver_event(
        events, i, c, clinics={"glow": hooked(receiver)}, renderer=Renderer(ROOT / "templates"),
        settings=settings(tmp_path), env={})), batch=10, lease_seconds=30)
    assert results == ["retrying: environment variable GLOW_WEBHOOK_SECRET is not set"]
    assert receiver.snapshot() == []


def test_the_held_alert_is_emailed_to_the_clinic_through_its_email_channel(events, tmp_path):
    sink = SmtpSink().start()
    try:
        clinic = glow(channels={
            "email": f"mailto://127.0.0.1:{sink.port}?from=noreply@glow.example&to={{to}}"
                     "&mode=insecure",
            "sms": "json://127.0.0.1:9/sms?:to={to}",
        })
        events.emit("glow", "alert", "booking.held", {
            "booking_id": "A-1042", "treatment": "microneedling", "starts_at": STARTS,
            "reason": "isotretinoin 40 days before the appointment (needs 180)"})
        assert deliver_all(events, clinic, tmp_path) == ["delivered"]
    finally:
        sink.stop()
    (mail,) = sink.snapshot()
    assert mail.to == "hola@glow.example"
    assert mail.subject == "Booking A-1042 is held for your review"
    assert "isotretinoin 40 days before the appointment (needs 180)" in mail.text
    assert "Saturday, December 5, 2026 at 2:30" in mail.text  # clinic-local (Madrid) time
    assert "/v1/bookings/A-1042/release" in mail.text


def test_the_held_alert_goes_to_the_outbox_of_an_outbox_clinic(events, tmp_path):
    clinic = glow(locale="es", outbox=True)
    events.emit("glow", "alert", "booking.held", {
        "booking_id": "A-7", "treatment": "chemical-peel", "starts_at": STARTS, "reason": "r"})
    (result,) = deliver_all(events, clinic, tmp_path)
    assert result.startswith("delivered")
    (written,) = (tmp_path / "outbox").iterdir()
    text = written.read_text(encoding="utf-8")
    assert "La cita A-7 está retenida para su revisión" in text
    assert "sábado, 5 de diciembre de 2026" in text


def test_the_held_alert_is_dropped_for_a_clinic_without_an_email(events, tmp_path):
    clinic = glow(email=None, outbox=True)
    events.emit("glow", "alert", "booking.held", {"booking_id": "A-7", "starts_at": STARTS})
    assert deliver_all(events, clinic, tmp_path) == ["dropped: the clinic has no email address"]


def test_a_webhook_url_requests_cannot_parse_is_retried_then_given_up(events, tmp_path):
    # The config accepts any http(s) URL without spaces; a typo such as an empty label
    # ("hooks..glow.example") makes urllib3 raise LocationParseError, a ValueError and not a
    # requests.RequestException. It escaped the delivery: the event stayed claimed, was
    # claimed again at every lease's end with its attempts never counted, and was never
    # given up, so `reminders events dead` never showed the clinic's broken URL.
    clinic = glow(webhook={"url": "https://hooks..glow.example/reminders",
                           "secret": "${GLOW_WEBHOOK_SECRET}"})
    event_id = events.emit("glow", "webhook", "booking.held", {"booking_id": "A-1"})
    assert deliver_all(events, clinic, tmp_path, webhook_max_attempts=2) == [
        "retrying: webhook URL cannot be used (LocationParseError)"]
    assert [e.attempts for e in events.pending()] == [1]
    events.redis.zadd(events.due_key, {event_id: 0})
    assert deliver_all(events, clinic, tmp_path, webhook_max_attempts=2) == [
        "given up: webhook URL cannot be used (LocationParseError)"]
    assert events.dead() == [event_id]


def test_an_answer_whose_body_never_ends_counts_by_its_status(events, receiver, tmp_path):
    # The clinic's endpoint answers 200 at once, then its body trickles on (a proxy holding
    # the connection open, a streaming error page): each byte within the read timeout, so
    # the delivery read it until the task's time limit (lease_seconds - 3), and the event,
    # which the clinic had taken, was left claimed and sent again at every lease's end.
    # The answer's status decides: the body is never read.
    receiver.trickle_seconds = 20.0
    event_id = events.emit("glow", "webhook", "booking.held", {"booking_id": "A-1"})
    began = time.monotonic()
    assert deliver_all(events, hooked(receiver), tmp_path, webhook_timeout_seconds=1.0) == [
        "delivered"]
    assert time.monotonic() - began < 5
    assert [h.json()["id"] for h in receiver.snapshot()] == [event_id]
    assert events.pending() == []


def test_events_go_out_in_the_order_they_were_written_past_a_power_of_ten(
        events, receiver, tmp_path, redis_client):
    """Events due together are claimed oldest first: the id "10" after the id "9" (a due
    set of equal scores sorts its ids as text, "10" before "9"), so a booking's last
    reminder.sent is not told after its booking.completed, nor a backlog shuffled."""
    nines = "9" * 13  # ids are at least Redis's clock in milliseconds (13 digits until 2286)
    redis_client.set(f"{events.prefix}:ev:seq", int(nines) - 1)
    sent = events.emit("glow", "webhook", "reminder.sent",
                       {"booking_id": "A-1", "reminder": "spf:sms", "version": 1})
    completed = events.emit("glow", "webhook", "booking.completed",
                            {"booking_id": "A-1", "version": 1})
    assert (sent, completed) == (nines, "1" + "0" * 13)
    assert [e.id for e in events.pending()] == [sent, completed]  # "oldest first"
    assert deliver_all(events, hooked(receiver), tmp_path) == ["delivered", "delivered"]
    assert [(h.json()["id"], h.json()["type"]) for h in receiver.snapshot()] == [
        (sent, "reminder.sent"), (completed, "booking.completed")]
    # Given up, then replayed together (`reminders events replay --all`): oldest first too.
    receiver.status = 500
    redis_client.set(f"{events.prefix}:ev:seq", int("9" * 14) - 2)
    written = [events.emit("glow", "webhook", "reminder.failed", {"booking_id": f"A-{n}"})
               for n in range(3)]
    assert [len(i) for i in written] == [14, 14, 15]
    deliver_all(events, hooked(receiver), tmp_path, webhook_max_attempts=1)
    assert sorted(events.dead(), key=int) == written
    assert events.replay(written[::-1]) == written
    assert [e.id for e in events.pending()] == written


def rotating(url: str) -> Clinic:
    return glow(webhook={"url": url, "secret": "${GLOW_WEBHOOK_SECRET_NEW}",
                         "previous_secret": "${GLOW_WEBHOOK_SECRET}"})


def deliver_with(events: Events, clinic: Clinic, tmp_path: Path, env: dict[str, str]
                 ) -> list[str]:
    results: list[str] = []
    pump_events(events, lambda i, c: results.append(deliver_event(
        events, i, c, clinics={"glow": clinic}, renderer=Renderer(ROOT / "templates"),
        settings=settings(tmp_path), env=env)), batch=10, lease_seconds=30)
    return results


def test_a_secret_rotated_with_previous_secret_verifies_with_either_secret(events, tmp_path):
    """Rotating the signing secret: while `previous_secret` names the old one, each event is
    signed with both (two `v1=` in the header), so the clinic's receiver still on the old
    secret, and the one already on the new, both verify every event; none is refused in the
    switch-over (refused ones were retried, then given up)."""
    new = "whsec-new-0123456789-0123456789-abcdef"
    env = ENV | {"GLOW_WEBHOOK_SECRET_NEW": new}
    for receiving_with in (SECRET, new):
        receiver = WebhookReceiver(receiving_with).start()
        try:
            events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"})
            assert deliver_with(events, rotating(receiver.url), tmp_path, env) == ["delivered"]
            (hook,) = receiver.snapshot()
            assert hook.valid
            header = hook.headers[SIGNATURE_HEADER]
            assert header.count("v1=") == 2
            assert verify_signature(new, header, hook.body)
            assert verify_signature(SECRET, header, hook.body)
        finally:
            receiver.stop()
    # Its variable unset: retried, not sent signed with the new secret alone.
    receiver = WebhookReceiver(SECRET).start()
    try:
        events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-2"})
        only_new = {"GLOW_WEBHOOK_SECRET_NEW": new}
        assert deliver_with(events, rotating(receiver.url), tmp_path, only_new) == [
            "retrying: environment variable GLOW_WEBHOOK_SECRET is not set"]
        assert receiver.snapshot() == []
        assert rotating(receiver.url).missing_secrets(only_new) == ["GLOW_WEBHOOK_SECRET"]
    finally:
        receiver.stop()


def test_an_event_id_is_not_used_again_after_redis_rolls_back(events, receiver, tmp_path,
                                                               redis_client):
    """Redis restored from a backup, or a replica promoted that had not yet got the last
    writes: the event counter goes back. The events written after that are new events: a
    receiver deduplicating on `id` as the README says must not take one for an event it
    already had (a second hold dropped, never reviewed)."""
    seq = f"{events.prefix}:ev:seq"
    backup = redis_client.get(seq)  # the counter as the backup (or the replica) holds it
    first = events.emit("glow", "webhook", "booking.held", {"booking_id": "A-1"})
    assert deliver_all(events, hooked(receiver), tmp_path) == ["delivered"]
    if backup is None:
        redis_client.delete(seq)
    else:
        redis_client.set(seq, backup)
    time.sleep(0.01)
    second = events.emit("glow", "webhook", "booking.held", {"booking_id": "A-2"})
    assert deliver_all(events, hooked(receiver), tmp_path) == ["delivered"]
    seen: set[str] = set()
    taken = []
    for hook in receiver.snapshot():  # the clinic's receiver, deduplicating on id
        if hook.json()["id"] not in seen:
            seen.add(hook.json()["id"])
            taken.append(hook.json()["booking_id"])
    assert taken == ["A-1", "A-2"]
    assert int(second) > int(first)  # and still in the order they were written
