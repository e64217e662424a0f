"""Review of patients' consent (STOP, START, the email one-click), each case forced:

- a STOP confirmed while an SMS of the number is past its last check (parked after
  `still_owned`, before the gateway): that SMS still reaches the patient after the
  confirmation was answered, so the confirmation must not promise that nothing more comes;
- STOP, START, STOP interleaved (the first STOP parked before it tells the clinic, the
  START parked after its opt-in, the second STOP parked before it tells): each STOP that
  opted the number out is confirmed, the clinic is told "stop" once, the number stays out;
- an RFC 8058 one-click POST in the RFC's own multipart/form-data form unsubscribes.

Real Redis, a real API (uvicorn), a real HTTP SMS gateway, real Apprise; clinic events
delivered signed to a real webhook receiver.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_consent_events import receiver, replied, server, tw  # noqa: F401
from tests.api.test_inbound import ANA, book, link_for, message_of, text
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK_PROTOCOL
from tests.sinks import HttpSink
from worker.api import inbound
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

PROTOCOL = """
name = "Consent review protocol"
[[steps]]
id = "prep"
offset = "-3h"
channels = ["sms"]
template = "day-before"
late = "send"
[[steps]]
id = "later"
offset = "-2h"
channels = ["sms"]
template = "day-before"
late = "send"
[advice]""" + QUICK_PROTOCOL.split("[advice]", 1)[1]


def write_clinic(folder: Path, port: int) -> None:
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    (folder / "protocols" / "consent.toml").write_text(PROTOCOL, encoding="utf-8")
    (folder / "clinics" / "cr.toml").write_text(f"""
name = "Consent Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[sms]
max_per_day = 10
max_per_week = 30
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "json://127.0.0.1:{port}/sms?:to={{to}}"
[inbound]
allow_unsigned = true
""", encoding="utf-8")


@pytest.fixture
def gateway() -> Iterator[HttpSink]:
    sink = HttpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def both(tmp_path, redis_client, gateway, serve):
    """The API and a sender (the worker's send path, in this process) on one Redis."""
    folder = tmp_path / "config"
    write_clinic(folder, gateway.port)
    api = serve(config_dir=folder)
    settings = Settings(config_dir=folder, templates_dir=ROOT / "templates", _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, api.settings.key_prefix)  # the API's store
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    booking = parse_booking({
        "clinic": "cr", "booking_id": "C-1", "treatment": "consent",
        "starts_at": starts.isoformat(),
        "patient": {"name": "Ana López", "phone": ANA, "timezone": "UTC", "locale": "en",
                    "channels": ["sms"]}}, catalog)
    now = datetime.now(UTC)
    store.upsert(booking, plan(booking, catalog.protocols["consent"], catalog.clinics["cr"],
                               now), now)
    return api, ctx


def test_a_stop_confirmed_while_an_sms_is_past_its_last_check_promises_no_more_than_holds(
        both, gateway):
    api, ctx = both
    store: Store = ctx.store
    ref = "cr/C-1/prep:sms"
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(100, 300) if c.ref == ref]
    real = store.still_owned
    parked, release = threading.Event(), threading.Event()

    def owned_then_park(*args: Any, **kwargs: Any) -> bool:
        owned = real(*args, **kwargs)  # its last check: passed
        parked.set()
        assert release.wait(20)
        return owned

    store.still_owned = owned_then_park  # type: ignore[method-assign]
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", send_claimed(ctx, ref, claim.version, claim.claim)))
    thread.start()
    try:
        assert parked.wait(10)
        confirmation = message_of(text(api, "STOP", clinic="cr", sign=False))
        answered = datetime.now(UTC).timestamp()
    finally:
        release.set()
        thread.join(20)
        del store.still_owned
    assert out["r"] == "sent"
    # The SMS past its last check reached the patient after the STOP was answered...
    (got,) = gateway.posts
    assert got.to.endswith(ANA[1:]) and got.at > answered
    assert store.record(ref)["status"] == "sent"
    later = store.record("cr/C-1/later:sms")
    assert later["status"] == "skipped" and later["reason"].startswith("opted_out: ")
    assert store.redis.zscore(store.due_key, "cr/C-1/later:sms") is None
    # ...so the one confirmation must not say that nothing more comes at all.
    assert confirmation is not None
    assert "no more texts from us after any already on the way" in confirmation, confirmation


def test_stop_start_stop_interleaved_confirms_each_opt_out_and_tells_the_clinic_once(
        server, tw, receiver, monkeypatch):  # noqa: F811
    """Known (1): STOP A parked before it tells the clinic; START B parked after its
    opt-in; STOP C opts the number out again and is parked before it tells; A, then C,
    then B go on. A and C each opted the number out (both first): each is confirmed; the
    clinic, whose record went from nothing to 'stop', is told 'stop' once; B, answered
    last while the number is opted out, does not say texts are back on."""
    book(tw, "A-1")
    store = server.app.state.services.store
    real_tell, real_in = inbound.tell_consent, store.opt_in
    at_tell = [threading.Event(), threading.Event()]
    go_tell = [threading.Event(), threading.Event()]
    calls: list[int] = []
    lock = threading.Lock()

    def parked_tell(*args: Any, **kwargs: Any) -> str | None:
        with lock:
            n = len(calls)
            calls.append(n)
        if n < 2:  # the two STOPs' tells
            at_tell[n].set()
            assert go_tell[n].wait(20)
        return real_tell(*args, **kwargs)

    b_in, b_go = threading.Event(), threading.Event()

    def parked_in(*args: Any, **kwargs: Any) -> Any:
        done = real_in(*args, **kwargs)
        b_in.set()
        assert b_go.wait(20)
        return done

    monkeypatch.setattr(inbound, "tell_consent", parked_tell)
    store.opt_in = parked_in
    try:
        with ThreadPoolExecutor(3) as pool:
            a = pool.submit(lambda: message_of(text(server, "STOP")))
            assert at_tell[0].wait(10)
            b = pool.submit(lambda: message_of(text(server, "START")))
            assert b_in.wait(10)
            c = pool.submit(lambda: message_of(text(server, "STOP")))
            assert at_tell[1].wait(10)
            go_tell[0].set()
            answer_a = a.result(20)
            go_tell[1].set()
            answer_c = c.result(20)
            b_go.set()
            answer_b = b.result(20)
    finally:
        for event in (*go_tell, b_go):
            event.set()
        del store.opt_in
    assert answer_a is not None and answer_c is not None  # two opt-outs: two answers
    # B's opt-in was undone by C before B answered (after C's confirmation): B must not
    # say texts are back on, the patient's last word from us would be wrong.
    assert answer_b is None, answer_b
    assert store.opted_out("tw", "sms", ANA) is not None  # the last STOP holds
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    assert message_of(text(server, "STOP")) is None  # and nothing more
    assert replied(server, receiver) == [("A-1", "stop", "sms")]


def test_the_rfc_8058_multipart_one_click_post_unsubscribes(server, tw, receiver):  # noqa: F811
    """RFC 8058 section 8's example: the mail receiver's POST in multipart/form-data."""
    book(tw, "A-1")
    path = link_for(server, "ana@example.com")
    boundary = "---FormBoundaryjWmhtjORrn"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n"
            f"\r\nOne-Click\r\n--{boundary}--\r\n")
    with server.client() as client:
        done = client.post(path, content=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert done.status_code == 200 and "unsubscribed" in done.text, done.text
    store = server.app.state.services.store
    assert store.opted_out("tw", "email", "ana@example.com")
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]


def test_an_unsubscribe_answered_while_an_email_is_past_its_last_check_promises_no_more_than_holds(
        tmp_path, redis_client, serve):
    """The email analog: an email of the patient parked after its last check; the one-click
    POST answers; released, that email reaches the SMTP server after the answer, so the
    page must not say that no email comes at all."""
    from tests.sinks import SmtpSink
    from tests.test_unsub_races import book as book_email
    from tests.test_unsub_races import claim as claim_email
    from tests.test_unsub_races import first_link
    from tests.test_unsubscribe_send import PUBLIC, SECRET, Rig

    smtp, sms = SmtpSink().start(), HttpSink().start()
    try:
        rig = Rig(tmp_path / "config", redis_client, smtp, sms)
        api = serve(config_dir=tmp_path / "config", public_url=PUBLIC,
                    unsubscribe_secret=SECRET)
        rig.store = Store(redis_client, api.settings.key_prefix)
        rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                          renderer=rig.ctx.renderer)
        book_email(rig, "U-1", "ana@example.com", 2)
        book_email(rig, "U-2", "ana@example.com", 9)
        link = first_link(rig)
        ref = "uc/U-2/plain:email"
        c = claim_email(rig, ref)
        real = rig.store.still_owned
        parked, release = threading.Event(), threading.Event()

        def owned_then_park(*args: Any, **kwargs: Any) -> bool:
            owned = real(*args, **kwargs)
            parked.set()
            assert release.wait(20)
            return owned

        rig.store.still_owned = owned_then_park  # type: ignore[method-assign]
        out: dict[str, str] = {}
        thread = threading.Thread(target=lambda: out.setdefault(
            "r", send_claimed(rig.ctx, ref, c.version, c.claim)))
        thread.start()
        try:
            assert parked.wait(10)
            with api.client() as client:
                page = client.post(link.replace(PUBLIC, ""), content="List-Unsubscribe=One-Click",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
            answered = datetime.now(UTC).timestamp()
        finally:
            release.set()
            thread.join(20)
        assert page.status_code == 200 and "You are unsubscribed" in page.text
        assert out["r"] == "sent"
        mails = smtp.snapshot()
        assert len(mails) == 2 and mails[-1].at > answered  # U-1's, then U-2's after
        assert "after any already on the way" in page.text, page.text
        with api.client() as client:  # the page of a link used again says the same
            assert "after any already on the way" in client.get(
                link.replace(PUBLIC, "")).text
    finally:
        smtp.stop()
        sms.stop()


@pytest.mark.parametrize("body", [
    "Yes, no more texts please", "Yes please remove me from your list",
    "Yeah, don't text me anymore", "Thanks but no more texts",
])
def test_an_opt_out_after_yes_or_but_is_an_opt_out(body):
    from worker.optout import classify

    assert classify(body) == "stop", body


@pytest.mark.parametrize("body,intent", [
    ("Yes", "confirm"), ("Yes, see you Friday", "confirm"), ("yes confirmed", "confirm"),
    # a question: no opt-out, and since a confirm word in a question confirms nothing
    # ("Yes?"), no confirmation either
    ("Yes no more tretinoin?", "unknown"), ("But I got no more texts after Tuesday", "unknown"),
])
def test_yes_or_but_alone_opts_nothing_out(body, intent):
    from worker.optout import classify

    assert classify(body) == intent, body


def test_yes_no_more_texts_opts_the_number_out_and_confirms_no_visit(
        server, tw, receiver):  # noqa: F811
    """'Yes, no more texts please' was a visit confirmation (its first word): the number
    stayed opted in, the answer ('your visit is confirmed') did not say how to stop."""
    book(tw, "A-1")
    answer = message_of(text(server, "Yes, no more texts please"))
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is not None
    assert answer is not None and "no more texts" in answer, answer
    assert replied(server, receiver) == [("A-1", "stop", "sms")]


@pytest.mark.parametrize("locale", ["en", "es"])
def test_answers_to_texts_use_the_clinics_sms_name(locale):
    """A clinic whose name is too long for SMS sets `sms_name` (what every SMS names it by,
    and what `reminders check` measures): the answers to a patient's texts (STOP's one
    confirmation, HELP, ...) used the full name, two segments with a 60-character name."""
    from worker.api.inbound import reply_text
    from worker.clinics import Clinic
    from worker.sms import is_gsm7

    clinic = Clinic(id="x", name="Clinica Dermatologica y Estetica Doctora Montserrat Garcia L",
                    sms_name="Clinica Montserrat", phone="+34910000000",
                    timezone="Europe/Madrid")
    assert len(clinic.name) == 60
    for what in ("stop", "start", "help", "confirm", "reschedule", "no_visit", "clarify",
                 "change"):
        answer = reply_text(ROOT / "templates", locale, what, clinic, date="28 de sept.",
                            time="18:30")
        assert "Clinica Montserrat" in answer and clinic.name not in answer, (what, answer)
        assert is_gsm7(answer) and len(answer) <= 160, (what, len(answer), answer)


def test_a_stop_opts_the_number_out_at_that_clinic_only(server, tw, receiver):  # noqa: F811
    """README: 'opted out of SMS from this clinic'. The same number booked at two clinics:
    its STOP to one leaves the other's SMS to go (and tells that clinic nothing)."""
    from tests.api.test_inbound import reminders

    book(tw, "A-1")
    with server.client(server.issue_key("dev")) as dev:
        from tests.api.conftest import future_booking

        doc = future_booking("D-1", clinic="dev")
        doc["patient"] = doc["patient"] | {"phone": ANA, "email": "ana@example.com"}
        assert dev.put("/v1/bookings/D-1", json=doc).status_code == 201
        assert message_of(text(server, "STOP")) is not None  # to tw
        store = server.app.state.services.store
        assert store.opted_out("tw", "sms", ANA) is not None
        assert store.opted_out("dev", "sms", ANA) is None
        assert all(r["status"] == "skipped" for r in reminders(tw, "A-1").values()
                   if r["channel"] == "sms" and r["status"] != "sent")
        theirs = [r for r in reminders(dev, "D-1").values() if r["channel"] == "sms"]
        assert theirs and all(r["status"] == "scheduled" for r in theirs), theirs
        due = store.redis.zrange(store.due_key, 0, -1)
        assert [ref for ref in due if ref.startswith("dev/D-1/") and ref.endswith(":sms")]
        assert not [ref for ref in due if ref.startswith("tw/") and ref.endswith(":sms")]
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
