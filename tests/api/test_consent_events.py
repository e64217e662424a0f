"""The clinic hears of every change of a patient's consent, once: STOP, START, a STOP with
no SMS to skip, an email unsubscribe (`patient.replied` with the reply kind and channel),
and a STOP whose event could not be written is told when the STOP comes again.

Real HTTP (uvicorn on a loopback port, Twilio-signed form posts and unsubscribe POSTs),
a real Redis, and the clinic events delivered, signed, to a real webhook receiver.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from tests.api.conftest import future_booking
from tests.api.test_inbound import (
    ANA,
    EVA,
    PUBLIC,
    SECRET,
    TOKEN,
    book,
    link_for,
    message_of,
    reminders,
    text,
    write_config,
)
from tests.sinks import WebhookReceiver
from worker.rendering import Renderer
from worker.webhooks import Events, deliver_event, pump_events

HOOK_SECRET = "whsec-consent-0123456789"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(HOOK_SECRET).start()
    yield r
    r.stop()


@pytest.fixture
def server(serve, tmp_path, monkeypatch, receiver):
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", HOOK_SECRET)
    config = write_config(tmp_path / "config")
    clinic = config / "clinics" / "tw.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        "http://127.0.0.1:9/hooks", receiver.url), encoding="utf-8")
    return serve(config_dir=config, public_url=PUBLIC, unsubscribe_secret=SECRET,
                 data_dir=tmp_path / "data")


@pytest.fixture
def tw(server):
    with server.client(server.issue_key("tw")) as client:
        yield client


def delivered(server, receiver: WebhookReceiver) -> list[dict[str, Any]]:
    """Deliver every clinic event waiting; return every webhook the receiver got, in order."""
    services = server.app.state.services
    events = Events(services.redis, server.settings.key_prefix)
    renderer = Renderer(server.settings.templates_dir)
    pump_events(events, lambda event_id, claim: deliver_event(
        events, event_id, claim, clinics=services.catalog.clinics, renderer=renderer,
        settings=server.settings), batch=100, lease_seconds=30)
    assert [e for e in events.pending() if e.kind == "webhook"] == []
    hooks = receiver.snapshot()
    assert all(h.valid for h in hooks)
    return [h.json() for h in hooks]


def replied(server, receiver) -> list[tuple[str, str, str]]:
    """(booking id, reply, channel) of every `patient.replied` the clinic received."""
    got = [e for e in delivered(server, receiver) if e["type"] == "patient.replied"]
    for event in got:  # ids, the kind of reply and times only: no number, no address
        assert ANA not in str(event) and "ana@example.com" not in str(event)
    return [(e["booking_id"], e["reply"], e.get("channel", "sms")) for e in got]


def test_start_is_told_as_stop_is_once_per_change(server, tw, receiver):
    book(tw, "A-1")
    book(tw, "A-2", days=30)
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    assert message_of(text(server, "STOP")) is not None
    assert sorted(replied(server, receiver)) == [("A-1", "stop", "sms"), ("A-2", "stop", "sms")]
    assert message_of(text(server, "START")) is not None
    got = replied(server, receiver)
    assert sorted(got[2:]) == [("A-1", "start", "sms"), ("A-2", "start", "sms")]
    # START again, STOP after STOP: no change of consent, nothing more told.
    message_of(text(server, "START"))
    assert len(replied(server, receiver)) == 4
    message_of(text(server, "STOP"))
    assert message_of(text(server, "STOP")) is None  # one confirmation
    got = replied(server, receiver)
    assert sorted(got[4:]) == [("A-1", "stop", "sms"), ("A-2", "stop", "sms")]


def test_a_stop_with_no_sms_to_skip_is_told(server, tw, receiver):
    doc = future_booking("A-1", clinic="tw")
    doc["patient"] = doc["patient"] | {"phone": ANA, "channels": ["email"]}
    answer = tw.put("/v1/bookings/A-1", json=doc)
    assert answer.status_code == 201, answer.text
    timeline = answer.json()
    assert not [r for r in timeline["reminders"]
                if r["channel"] == "sms" and r["status"] == "scheduled"]
    assert message_of(text(server, "STOP")) is not None  # the confirmation
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    assert message_of(text(server, "STOP")) is None
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    message_of(text(server, "START"))
    assert replied(server, receiver) == [("A-1", "stop", "sms"), ("A-1", "start", "sms")]


def test_an_email_unsubscribe_is_told_once(server, tw, receiver):
    book(tw, "A-1")
    path = link_for(server, "ana@example.com")
    with server.client() as client:
        for _ in range(2):
            done = client.post(path, content="List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert done.status_code == 200 and "unsubscribed" in done.text
        assert client.get(path).status_code == 200  # the page changes nothing
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]


@pytest.mark.parametrize("word", ["STOP", "START"])
def test_a_consent_change_whose_event_was_not_written_is_told_when_sent_again(
        server, tw, receiver, word):
    """Redis fails right after the opt-out (or opt-in) was written, before anything else:
    the request fails (503) and the provider sends the text again; the clinic is told once."""
    book(tw, "A-1")
    store = server.app.state.services.store
    if word == "START":
        message_of(text(server, "STOP"))
        assert replied(server, receiver) == [("A-1", "stop", "sms")]
    name = "opt_out" if word == "STOP" else "opt_in"
    real = getattr(store, name)
    calls = []

    def then_redis_fails(*args, **kwargs):
        done = real(*args, **kwargs)
        calls.append(done)
        if len(calls) == 1:
            raise redis.ConnectionError("forced: the connection broke after the write")
        return done

    setattr(store, name, then_redis_fails)
    try:
        assert text(server, word).status_code == 503
        assert (store.opted_out("tw", "sms", ANA) is not None) == (word == "STOP")
        answer = message_of(text(server, word))  # the provider's retry
    finally:
        delattr(store, name)
    assert len(calls) == 2
    assert answer is not None  # STOP: its one confirmation (the first was never answered)
    want = [("A-1", "stop", "sms")] + ([("A-1", "start", "sms")] if word == "START" else [])
    assert replied(server, receiver) == want
    message_of(text(server, word))  # and again: nothing more
    assert replied(server, receiver) == want


def test_two_stops_at_once_tell_the_clinic_once(server, tw, receiver):
    book(tw, "A-1")
    store = server.app.state.services.store
    real = store.opt_out
    barrier = threading.Barrier(2, timeout=10)

    def held(*args, **kwargs):
        barrier.wait()  # both requests are past their reads
        return real(*args, **kwargs)

    store.opt_out = held
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: message_of(text(server, "STOP")), range(2)))
    finally:
        del store.opt_out
    assert sum(a is not None for a in answers) == 1, answers
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    assert all(r["status"] != "scheduled" for r in reminders(tw, "A-1").values()
               if r["channel"] == "sms")


def test_an_unsubscribe_whose_event_was_not_written_is_told_when_clicked_again(
        server, tw, receiver):
    book(tw, "A-1")
    store = server.app.state.services.store
    real = store.opt_out
    calls = []

    def then_redis_fails(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        if len(calls) == 1:
            raise redis.ConnectionError("forced: the connection broke after the write")
        return calls[-1]

    path = link_for(server, "ana@example.com")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    store.opt_out = then_redis_fails
    try:
        with server.client() as client:
            assert client.post(path, content="List-Unsubscribe=One-Click",
                               headers=form).status_code == 503
            assert store.opted_out("tw", "email", "ana@example.com")
            assert client.post(path, content="List-Unsubscribe=One-Click",
                               headers=form).status_code == 200
    finally:
        del store.opt_out
    assert len(calls) == 1  # opted out already: the second click only tells the clinic
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]


def test_a_stop_after_a_start_whose_event_was_not_written_is_confirmed(
        server, tw, receiver):
    """STOP (told), then START opts the number in but Redis fails before the clinic is told
    (503), then the patient texts STOP: that STOP opted the number out again and is the
    patient's to be confirmed, although the clinic's record ('stop') needs no new event."""
    book(tw, "A-1")
    assert message_of(text(server, "STOP")) is not None
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    store = server.app.state.services.store
    real = store.opt_in

    def then_redis_fails(*args, **kwargs):
        real(*args, **kwargs)
        raise redis.ConnectionError("forced: the connection broke after the write")

    store.opt_in = then_redis_fails
    try:
        assert text(server, "START").status_code == 503
    finally:
        del store.opt_in
    assert store.opted_out("tw", "sms", ANA) is None  # opted in, the clinic not told
    assert message_of(text(server, "STOP")) is not None  # its one confirmation
    assert store.opted_out("tw", "sms", ANA) is not None
    assert message_of(text(server, "STOP")) is None  # and only one
    assert replied(server, receiver) == [("A-1", "stop", "sms")]


def test_a_stop_landing_while_a_start_is_at_work_is_confirmed(server, tw, receiver):
    """STOP (told), then START parked after its opt-in, before it tells the clinic; a STOP
    lands meanwhile and opts the number out again; START goes on. The STOP is confirmed
    once, the number stays opted out and the clinic, told 'stop', hears nothing more. The
    START, answered after the STOP's confirmation, does not say texts are back on: the
    patient's last word from us would be wrong (it answered 'back on' after all)."""
    book(tw, "A-1")
    assert message_of(text(server, "STOP")) is not None
    store = server.app.state.services.store
    real = store.opt_in
    parked, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        done = real(*args, **kwargs)
        parked.set()
        assert release.wait(10)
        return done

    store.opt_in = held
    try:
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(lambda: message_of(text(server, "START")))
            assert parked.wait(10)
            stop = message_of(text(server, "STOP"))
            release.set()
            answer_start = start.result(10)
    finally:
        release.set()
        del store.opt_in
    assert stop is not None  # the STOP that opted the number out again: confirmed
    assert answer_start is None, answer_start  # no "back on" after the STOP's confirmation
    assert store.opted_out("tw", "sms", ANA) is not None
    assert message_of(text(server, "STOP")) is None
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
