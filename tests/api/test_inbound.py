"""Texts from patients and email unsubscribe, over real HTTP (uvicorn on a loopback port)
against a real Redis: Twilio-signed form posts, TwiML answers, the state they change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import pytest

from tests.api.conftest import future_booking
from tests.conftest import ROOT
from worker.api.inbound import reply_text
from worker.clinics import Clinic
from worker.dispatch import unsubscribe_link
from worker.models import Booking
from worker.optout import twilio_signature
from worker.rendering import Renderer
from worker.sms import fold_to_gsm7, is_gsm7, normalise
from worker.webhooks import Events

PUBLIC = "https://reminders.example/base"
TOKEN = "twilio-auth-token-for-tests"
SECRET = "unsubscribe-secret-for-tests-0123456789"
ANA = "+34600111222"
EVA = "+34600333444"


def write_config(folder: Path) -> Path:
    shutil.copytree(ROOT / "config" / "protocols", folder / "protocols")
    (folder / "clinics").mkdir()
    common = """
phone = "+34910000000"
email = "clinic@tw.example"
timezone = "Europe/Madrid"
locale = "en"
outbox = true
[webhook]
url = "http://127.0.0.1:9/hooks"
secret = "${TW_HOOK_SECRET}"
"""
    (folder / "clinics" / "tw.toml").write_text(
        'name = "Piel & Co <Madrid>"\n' + common
        + '[inbound]\ntwilio_auth_token = "${TW_AUTH_TOKEN}"\n', encoding="utf-8")
    (folder / "clinics" / "dev.toml").write_text(
        'name = "Dev Clinic"\n' + common + "[inbound]\nallow_unsigned = true\n",
        encoding="utf-8")
    (folder / "clinics" / "plain.toml").write_text(
        'name = "Plain Clinic"\n' + common, encoding="utf-8")
    return folder


@pytest.fixture
def server(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    return serve(config_dir=write_config(tmp_path / "config"), public_url=PUBLIC,
                 unsubscribe_secret=SECRET, data_dir=tmp_path / "data")


@pytest.fixture
def tw(server):
    with server.client(server.issue_key("tw")) as client:
        yield client


def book(client, booking_id: str, phone: str = ANA, email: str = "ana@example.com",
         patient_locale: str = "en", **changes: Any) -> dict[str, Any]:
    doc = future_booking(booking_id, clinic="tw", **changes)
    doc["patient"] = doc["patient"] | {"phone": phone, "email": email,
                                       "locale": patient_locale}
    answer = client.put(f"/v1/bookings/{booking_id}", json=doc)
    assert answer.status_code == 201, answer.text
    return answer.json()


def text(server, body: str, *, clinic: str = "tw", sender: str = ANA, sign: bool = True,
         signature: str | None = None, extra: dict[str, str] | None = None,
         sid: str | None = None):
    """POST what Twilio posts for an inbound SMS, signed as Twilio signs it: each text its
    own MessageSid, unless `sid` names one (the same request again: a replay)."""
    form = {"MessageSid": sid or "SM" + uuid.uuid4().hex, "AccountSid": "AC" + "1" * 32,
            "From": sender,
            "To": "+34910000000", "Body": body, "NumMedia": "0"} | (extra or {})
    path = f"/v1/inbound/sms/{clinic}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if sign:
        headers["X-Twilio-Signature"] = signature or twilio_signature(
            TOKEN, PUBLIC + path, list(form.items()))
    with server.client() as client:
        return client.post(path, content=urlencode(form), headers=headers)


def message_of(answer) -> str | None:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(answer.content)
    assert root.tag == "Response"
    found = root.findall("Message")
    assert len(found) <= 1
    return found[0].text if found else None


def reminders(client, booking_id: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in client.get(f"/v1/bookings/{booking_id}").json()["reminders"]}


def events(server) -> list[Any]:
    return Events(server.app.state.services.redis, server.settings.key_prefix).pending("tw")


# --- STOP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["STOP", "stop.", "Please STOP texting me", "opt out",
                                  "Quiero darme de BAJA", "Cancelar"])
def test_stop_opts_the_number_out_of_every_booking_at_once(server, tw, body):
    book(tw, "A-1")
    book(tw, "A-2", days=30)
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    before = {b: reminders(tw, b) for b in ("A-1", "A-2")}
    assert any(r["channel"] == "sms" and r["status"] == "scheduled"
               for r in before["A-1"].values())

    reply = message_of(text(server, body))
    assert reply is not None and "Reply START" in reply and "+34910000000" in reply
    assert "Piel & Co <Madrid>" in reply  # the XML escaping round trip

    for booking_id in ("A-1", "A-2"):
        for r in reminders(tw, booking_id).values():
            was = before[booking_id][r["id"]]
            if r["channel"] == "sms" and was["status"] == "scheduled":
                assert r["status"] == "skipped", r
                assert r["reason"].startswith("opted_out: the patient replied STOP by SMS at ")
            else:
                # Email is another channel; an SMS the frequency cap had already left out
                # keeps its reason.
                assert (r["status"], r["reason"]) == (was["status"], was["reason"]), r
    # Nothing of theirs is due any more by SMS; Eva's number is untouched.
    store = server.app.state.services.store
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.startswith(("tw/A-1/", "tw/A-2/"))
                and ref.endswith(":sms")]
    assert all(r["status"] == "scheduled" for r in reminders(tw, "E-1").values())
    assert store.opted_out("tw", "sms", ANA).startswith("the patient replied STOP")
    # The clinic hears of it without the number or the words.
    replied = [e for e in events(server) if e.type == "patient.replied"]
    assert {e.fields["booking_id"] for e in replied} == {"A-1", "A-2"}
    assert all(e.fields["reply"] == "stop" for e in replied)
    # (The reason names the keyword "STOP" itself, never the patient's words.)
    assert all(ANA not in str(e.fields) and (body == "STOP" or body not in str(e.fields))
               for e in events(server))


def test_one_confirmation_then_nothing_else(server, tw):
    book(tw, "A-1")
    assert message_of(text(server, "STOP")) is not None
    assert message_of(text(server, "STOP")) is None
    assert message_of(text(server, "hello?")) is None  # no help answer to an opted-out number
    assert message_of(text(server, "C")) is None  # recorded, not answered
    assert tw.get("/v1/bookings/A-1").json()["confirmed_at"]
    help_answer = message_of(text(server, "HELP"))  # HELP is always answered
    assert help_answer and "STOP" in help_answer


@pytest.mark.parametrize("body", ["Hi, HELP", "Please help", "Hola, ayuda", "Hello. HELP"])
def test_help_after_a_greeting_is_answered_also_when_opted_out(server, tw, body):
    """HELP is always answered (CTIA), but only a text beginning with it was: "Hi, HELP"
    was unknown, which an opted-out number gets no answer to (review rev-patient)."""
    book(tw, "A-1")
    assert message_of(text(server, "STOP")) is not None
    services = server.app.state.services
    assert message_of(text(server, body)) == reply_text(
        server.settings.templates_dir, "en", "help", services.catalog.clinics["tw"])
    assert services.store.opted_out("tw", "sms", ANA) is not None


def test_two_stops_at_once_get_one_confirmation(server, tw):
    """Both texts are read before either opts out (a barrier holds each at the store's
    opt-out): the reply follows the opt-out script's own answer, so one confirmation."""
    book(tw, "A-1")
    store = server.app.state.services.store
    real = store.opt_out
    barrier = threading.Barrier(2, timeout=10)

    def held(*args, **kwargs):
        barrier.wait()  # both requests have read the opt-out state by now
        return real(*args, **kwargs)

    store.opt_out = held
    try:
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: message_of(text(server, "STOP")), range(2)))
    finally:
        del store.opt_out
    assert sum(r is not None for r in replies) == 1, replies
    assert store.opted_out("tw", "sms", ANA)


def test_start_opts_back_in_and_a_new_booking_gets_sms_again(server, tw):
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    reply = message_of(text(server, "Start"))
    assert reply and "STOP" in reply
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is None
    # (Another month: A-1's SMS, resumed by START, keep their days under the SMS cap.)
    timeline = book(tw, "A-3", days=60)
    assert any(r["channel"] == "sms" and r["status"] == "scheduled"
               for r in timeline["reminders"])


def test_help_names_the_clinic_its_phone_and_how_to_stop(server, tw):
    reply = message_of(text(server, "help"))
    assert reply and "Piel & Co <Madrid>" in reply and "+34910000000" in reply
    assert "STOP" in reply


def test_spanish_patient_gets_spanish_answers(server, tw):
    doc = future_booking("S-1", clinic="tw")
    doc["patient"] = doc["patient"] | {"locale": "es"}
    assert tw.put("/v1/bookings/S-1", json=doc).status_code == 201
    reply = message_of(text(server, "Ayuda"))
    assert reply and "BAJA" in reply
    reply = message_of(text(server, "baja"))
    assert reply and "ALTA" in reply
    assert message_of(text(server, "alta")) and \
        server.app.state.services.store.opted_out("tw", "sms", ANA) is None


# --- two-way replies ---------------------------------------------------------------------------

def test_confirm_marks_the_next_visit_and_tells_the_clinic(server, tw):
    book(tw, "A-LATER", days=40)
    book(tw, "A-NEXT", days=10)
    reply = message_of(text(server, "Sí, confirmo"))
    assert reply and "confirmed" in reply
    assert tw.get("/v1/bookings/A-NEXT").json()["confirmed_at"]
    assert "confirmed_at" not in tw.get("/v1/bookings/A-LATER").json()
    (event,) = [e for e in events(server) if e.type == "patient.replied"]
    assert event.kind == "webhook"
    assert event.fields["booking_id"] == "A-NEXT" and event.fields["reply"] == "confirm"
    assert set(event.payload()) == {"id", "type", "clinic", "booking_id", "version", "reply",
                                    "received_at", "created_at"}


@pytest.mark.parametrize("locale", ["es-LA", "en-EU", "es-ES-x1"])
def test_confirm_answers_a_patient_whose_locale_babel_does_not_know(server, tw, locale):
    """A locale the booking takes (its language has templates: "es-LA", as clinic software
    writes Latin American Spanish) but Babel cannot format dates in: the confirmation was
    recorded, then the answer's date formatting raised, a 500 to the provider and no
    answer to the patient. It answers in the language's own format now."""
    book(tw, "L-1", days=10, patient_locale=locale)
    answer = text(server, "C")
    reply = message_of(answer)
    stored = server.app.state.services.store.booking_doc("tw", "L-1")
    starts = datetime.fromisoformat(stored["starts_at"])
    day = starts.astimezone(ZoneInfo(stored["patient"]["timezone"])).day  # the patient's
    assert reply and str(day) in reply, reply
    assert ("queda confirmada" if locale.startswith("es") else "confirmed") in reply, reply
    assert tw.get("/v1/bookings/L-1").json()["confirmed_at"]


@pytest.mark.parametrize("locale", ["en", "en-GB", "es"])
def test_confirm_names_the_visit_as_the_reminders_do(server, tw, locale):
    """The answer to "C" names the visit's date and time the way the patient's reminders
    do (the message's variant: rendering.Renderer.variant). An English patient of a Madrid
    clinic (locale "en") reads "see you tomorrow at 14:35" and "5 Dec" in every reminder;
    the answer said "your visit on Dec 5 at 2:35 PM", American formats nobody had chosen."""
    book(tw, "F-1", days=10, patient_locale=locale)
    reply = message_of(text(server, "C"))
    services = server.app.state.services
    stored = services.store.booking_doc("tw", "F-1")
    booking = Booking.model_validate(stored)
    clinic = services.catalog.clinics["tw"]
    words = Renderer(ROOT / "templates").context(
        booking=booking, clinic=clinic, protocol=services.catalog.protocols["microneedling"],
        occurrence=1, due_at=datetime.now(UTC), channel="sms")
    date, time_ = (fold_to_gsm7(normalise(words[k]))
                   for k in ("appointment_date_short", "appointment_time"))
    assert reply and f" {date} " in f" {reply} " and time_ in reply, (reply, date, time_)


def test_reschedule_asks_the_clinic_to_call(server, tw):
    book(tw, "A-1")
    reply = message_of(text(server, "R"))
    assert reply and "call" in reply
    assert tw.get("/v1/bookings/A-1").json()["call_requested_at"]
    kinds = sorted((e.kind, e.type, e.fields["reply"]) for e in events(server)
                   if e.type == "patient.replied")
    assert kinds == [("alert", "patient.replied", "reschedule"),
                     ("webhook", "patient.replied", "reschedule")]


@pytest.mark.parametrize("body,locale,says", [
    ("Can I cancel Tuesday and come Friday?", "en", "Reply STOP"),
    ("I need to cancel my appointment", "en", "reply STOP"),
    ("¿Puedo cancelar el martes y venir el viernes?", "es", "responde BAJA"),
    ("Quiero cambiar la cita al jueves", "es", "responde BAJA"),
])
def test_cancel_in_a_sentence_asks_the_clinic_to_call_and_opts_nothing_out(
        server, tw, body, locale, says):
    book(tw, "A-1", patient_locale=locale)
    reply = message_of(text(server, body))
    assert reply and "+34910000000" in reply and says.lower() in reply.lower()
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is None
    assert all(r["status"] == "scheduled" for r in reminders(tw, "A-1").values())
    assert tw.get("/v1/bookings/A-1").json()["call_requested_at"]
    kinds = sorted((e.kind, e.fields["reply"]) for e in events(server)
                   if e.type == "patient.replied")
    assert kinds == [("alert", "reschedule"), ("webhook", "reschedule")]  # as R does


@pytest.mark.parametrize("body,locale", [
    ("Yes I can't make it", "en"), ("Yes, I need to change the time", "en"),
    ("Yes I will be late", "en"), ("Si pero no puedo ir", "es"),
    ("Sí, pero no podré llegar a esa hora", "es"),
])
def test_yes_then_a_visit_the_patient_cannot_keep_asks_the_clinic_to_call(
        server, tw, body, locale):
    """A text beginning with "Yes" / "Sí" confirmed the visit whatever followed: "Yes I
    can't make it" answered "your visit on ... is confirmed" and told the clinic so (review
    rev-patient). It asks the clinic to call, as a change does, and confirms nothing."""
    book(tw, "A-1", patient_locale=locale)
    services = server.app.state.services
    assert message_of(text(server, body)) == reply_text(
        server.settings.templates_dir, locale, "change", services.catalog.clinics["tw"])
    timeline = tw.get("/v1/bookings/A-1").json()
    assert timeline.get("call_requested_at") and not timeline.get("confirmed_at"), timeline
    kinds = sorted((e.kind, e.fields["reply"]) for e in events(server)
                   if e.type == "patient.replied")
    assert kinds == [("alert", "reschedule"), ("webhook", "reschedule")]


@pytest.mark.parametrize("body", ["Yes?", "C?", "Yes, can I come at 5 instead?",
                                  "Yes I have a question about the cream?"])
def test_yes_in_a_question_confirms_nothing(server, tw, body):
    """"Yes?" or "C?" asks something: it confirmed the visit and said so (review
    rev-patient). Not a confirmation: the clinic is told nothing; the help-style answer."""
    book(tw, "A-1")
    reply = message_of(text(server, body))
    assert reply is None or "confirmed" not in reply, reply
    assert not tw.get("/v1/bookings/A-1").json().get("confirmed_at")
    assert not [e for e in events(server) if e.type == "patient.replied"
                and e.fields["reply"] == "confirm"]


@pytest.mark.parametrize("body", ["see you at the end of the week", "Should I stop the cream?",
                                  "¿Tengo que parar la crema antes?", "I quit smoking, is that ok"])
def test_a_stop_word_in_a_sentence_gets_one_clarifying_answer(server, tw, body):
    book(tw, "A-1")
    reply = message_of(text(server, body))
    assert reply and "reply STOP" in reply and "+34910000000" in reply
    assert message_of(text(server, body)) is None  # once a day, shared with unknown texts
    assert message_of(text(server, "hello?")) is None
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is None
    assert all(r["status"] == "scheduled" for r in reminders(tw, "A-1").values())
    assert [e for e in events(server) if e.type == "patient.replied"] == []


def test_confirm_without_a_visit_says_so(server, tw):
    reply = message_of(text(server, "C"))
    assert reply and "no upcoming visit" in reply
    assert events(server) == []


def test_unknown_text_gets_one_help_answer_a_day(server, tw):
    first = message_of(text(server, "what time is it?"))
    assert first and "STOP" in first
    assert message_of(text(server, "hello??")) is None
    assert message_of(text(server, "anyone?", sender=EVA))  # per number
    store = server.app.state.services.store
    once = f"{server.settings.key_prefix}:once:help:tw:{store.contact_id('phone', ANA)}"
    assert store.redis.ttl(once) > 86_000
    assert not [k for k in store.redis.keys("*") if ANA in k]  # no number in a key name


# --- refusals ---------------------------------------------------------------------------------

def refused(answer, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    return answer.json()["error"]


def test_a_forged_or_missing_signature_is_refused_and_changes_nothing(server, tw):
    book(tw, "A-1")
    forged = twilio_signature("not-the-token", PUBLIC + "/v1/inbound/sms/tw",
                              [("From", ANA), ("Body", "STOP")])
    error = refused(text(server, "STOP", signature=forged), 403)
    assert error["code"] == "forbidden" and error["fields"][0]["field"] == "X-Twilio-Signature"
    refused(text(server, "STOP", sign=False), 403)
    # Signed for another URL (the API's own, not the public one): refused too.
    wrong_url = twilio_signature(TOKEN, server.url + "/v1/inbound/sms/tw",
                                 [("From", ANA), ("Body", "STOP")])
    refused(text(server, "STOP", signature=wrong_url), 403)
    assert server.app.state.services.store.opted_out("tw", "sms", ANA) is None
    assert all(r["status"] == "scheduled" for r in reminders(tw, "A-1").values())


def test_a_replayed_text_is_not_acted_on_again(server, tw):
    """Twilio's signature has no timestamp: a signed request captured (or retried by the
    provider) can be sent again as it is. Its MessageSid was acted on once; the same text
    again changes nothing: an old START replayed after the patient's later STOP must not
    put their SMS back, nor an old confirm tell the clinic again."""
    book(tw, "A-1")
    store = server.app.state.services.store
    assert message_of(text(server, "STOP", sid="SM" + "1" * 32))
    assert message_of(text(server, "START", sid="SM" + "2" * 32))
    assert message_of(text(server, "STOP", sid="SM" + "3" * 32))
    before = reminders(tw, "A-1")
    told = [(e.type, e.fields.get("reply")) for e in events(server)]
    assert any(r["channel"] == "sms" and r["status"] == "skipped" for r in before.values())

    assert message_of(text(server, "START", sid="SM" + "2" * 32)) is None  # the replay
    assert message_of(text(server, "C", sid="SM" + "4" * 32)) is None  # opted out: no answer
    assert message_of(text(server, "C", sid="SM" + "4" * 32)) is None

    assert store.opted_out("tw", "sms", ANA), "a replayed START opted the number back in"
    assert reminders(tw, "A-1") == before
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.startswith("tw/A-1/") and ref.endswith(":sms")]
    after = [(e.type, e.fields.get("reply")) for e in events(server)]
    assert Counter(after) - Counter(told) == Counter({("patient.replied", "confirm"): 1})
    assert not Counter(told) - Counter(after)


def retention_passes(server) -> None:
    """`REMINDERS_RETENTION_DAYS` (and a second) go by, as far as Redis's expiries go: every
    key of the server's whose TTL ends by then expires, as Redis would expire it; a key
    without a TTL, or with a longer one, is kept, as it would be."""
    redis = server.app.state.services.redis
    ends = server.settings.retention_days * 86_400_000 + 1000
    for key in redis.scan_iter(f"{server.settings.key_prefix}:*"):
        if 0 < redis.pttl(key) <= ends:
            redis.pexpire(key, 1)
    time.sleep(0.05)


# Review (consent): the MessageSid guard was kept `retention` only, and the opt-out it
# protects is kept until the patient opts in again. A patient texts START, months later
# STOP; the START's signed request (in a proxy's log, or retried late) sent again then
# opted them back in: their SMS went back into the schedule after their STOP, and "texts
# are back on" was the last word they got. An old STOP sent again after a later START
# stopped their care reminders likewise. Real HTTP, real Redis, the guard expiring by its
# own TTL.
def test_an_old_consent_text_replayed_after_the_retention_changes_nothing(server, tw):
    book(tw, "A-1")
    store = server.app.state.services.store
    start, stop, start_again = "SM" + "5" * 32, "SM" + "6" * 32, "SM" + "7" * 32
    assert message_of(text(server, "STOP", sid="SM" + "4" * 32))
    assert "back on" in message_of(text(server, "START", sid=start)).lower()
    retention_passes(server)  # the START's guard is gone by now, if it expires
    assert message_of(text(server, "STOP", sid=stop))
    stopped = reminders(tw, "A-1")
    assert any(r["channel"] == "sms" and r["status"] == "skipped" for r in stopped.values())
    told = [(e.type, e.fields.get("reply")) for e in events(server)]

    retention_passes(server)
    assert message_of(text(server, "START", sid=start)) is None  # the old START again
    assert store.opted_out("tw", "sms", ANA), "an old START opted the number back in"
    assert reminders(tw, "A-1") == stopped
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.startswith("tw/A-1/") and ref.endswith(":sms")]
    assert [(e.type, e.fields.get("reply")) for e in events(server)] == told

    # The other way: the patient's START, then the old STOP again.
    assert message_of(text(server, "START", sid=start_again))
    back = reminders(tw, "A-1")
    assert any(r["channel"] == "sms" and r["status"] == "scheduled" for r in back.values())
    retention_passes(server)
    assert message_of(text(server, "STOP", sid=stop)) is None
    assert store.opted_out("tw", "sms", ANA) is None, "an old STOP opted the number out"
    assert reminders(tw, "A-1") == back
    # What is kept names no phone number.
    assert not [k for k in store.redis.scan_iter("*") if ANA in k or ANA[1:] in k]


# Review (replies): a confirm's MessageSid was kept `retention` only, but what it acts on is
# the number's next visit as found when it comes. Sent again after that (a proxy's log, a
# late retry), an old "C" confirmed the patient's next visit, one they never confirmed, and
# the clinic was told so ("confirm"): a visit nobody calls about.
def test_an_old_confirm_replayed_after_the_retention_confirms_no_later_visit(server, tw):
    book(tw, "A-1", days=10)
    assert "confirmed" in message_of(text(server, "C", sid="SM" + "8" * 32))
    assert tw.delete("/v1/bookings/A-1").status_code in (200, 204)
    retention_passes(server)  # months later: a new visit
    book(tw, "A-2", days=20)
    told = [(e.type, e.fields.get("booking_id"), e.fields.get("reply")) for e in events(server)]
    assert message_of(text(server, "C", sid="SM" + "8" * 32)) is None
    assert "confirmed_at" not in tw.get("/v1/bookings/A-2").json()
    assert [(e.type, e.fields.get("booking_id"), e.fields.get("reply"))
            for e in events(server)] == told


def test_a_numbers_consent_texts_are_kept_without_expiry_and_bounded(server):
    """Kept as long as the opt-out (no expiry), the last CONSENT_SIDS_MAX of a number only:
    memory stays bounded however often one number texts STOP and START."""
    store = server.app.state.services.store
    most = store.CONSENT_SIDS_MAX
    sids = [f"SM{n:032x}" for n in range(most + 5)]
    for sid in sids:
        store.took_inbound("tw", sid, ANA)
    key = store.consent_sids_key("tw", ANA)
    assert store.redis.zcard(key) == most and store.redis.ttl(key) == -1
    assert all(store.inbound_taken("tw", sid, ANA) for sid in sids[5:])
    assert not any(store.inbound_taken("tw", sid, ANA) for sid in sids[:5])
    assert not store.inbound_taken("tw", sids[-1], EVA)  # another number's record
    assert not store.inbound_taken("tw", sids[-1])  # not in the texts kept `retention`


def test_a_clinic_without_a_token_refuses_unless_it_allows_unsigned(server):
    refused(text(server, "STOP", clinic="plain", sign=False), 403)
    assert message_of(text(server, "HELP", clinic="dev", sign=False))


def test_an_unknown_clinic_is_answered_like_a_bad_signature(server):
    """Nobody learns which clinic ids exist: an unknown clinic, a clinic taking no texts
    and a bad signature get the same status, headers that matter and body."""
    forged = twilio_signature("not-the-token", PUBLIC + "/v1/inbound/sms/tw",
                              [("From", ANA), ("Body", "STOP")])
    answers = [text(server, "STOP", signature=forged), text(server, "STOP", sign=False),
               text(server, "STOP", clinic="plain", sign=False),
               text(server, "STOP", clinic="nowhere", sign=False),
               text(server, "STOP", clinic="nowhere", signature=forged),
               # signed as Twilio would sign for that path with some clinic's token
               text(server, "STOP", clinic="nowhere")]
    first = answers[0]
    assert first.status_code == 403
    for answer in answers:
        assert (answer.status_code, answer.content) == (first.status_code, first.content)
        assert answer.headers["content-type"] == first.headers["content-type"]
    # The body still goes through the same checks first: a wrong media type is 415
    # whether the clinic exists or not.
    with server.client() as client:
        for clinic in ("tw", "nowhere"):
            answer = client.post(f"/v1/inbound/sms/{clinic}", json={"From": ANA})
            assert answer.status_code == 415, clinic


def test_bad_requests_name_the_field(server):
    error = refused(text(server, "STOP", sender="600111222"), 422)
    assert error["fields"][0]["field"] == "From"
    with server.client() as client:
        answer = client.post("/v1/inbound/sms/dev", json={"From": ANA, "Body": "STOP"})
    refused(answer, 415)
    with server.client() as client:
        answer = client.post("/v1/inbound/sms/dev", content="Body=" + "x" * 20_000,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    refused(answer, 413)


def test_an_edit_of_the_answers_is_taken_without_a_restart_and_a_broken_one_is_not(
        serve, tmp_path, monkeypatch):
    """The API reads config/ and templates/ again after an edit (README), but kept the
    answers file (templates/<lang>/_replies.toml) as first read for the life of the
    process: a corrected answer went out wrong until a restart. And an edit that does not
    load must keep the answers as last loaded, as every other file does, not fail the
    texts (a STOP opted out, then a 500 instead of its one confirmation)."""
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    server = serve(config_dir=write_config(tmp_path / "config"), public_url=PUBLIC,
                   templates_dir=templates, unsubscribe_secret=SECRET,
                   data_dir=tmp_path / "data")
    replies = templates / "en" / "_replies.toml"
    first = message_of(text(server, "HELP"))
    assert first and "STOP" in first
    original = replies.read_text(encoding="utf-8")
    edited = "\n".join(
        'help = "{clinic}: call us on {phone}. Text STOP to stop, START to start again."'
        if line.startswith("help =") else line for line in original.splitlines()) + "\n"
    replies.write_text(edited, encoding="utf-8")
    stamp = replies.stat().st_mtime + 2
    os.utime(replies, (stamp, stamp))
    reply = message_of(text(server, "HELP"))
    assert reply == "Piel & Co <Madrid>: call us on +34910000000. Text STOP to stop, START " \
                    "to start again.", reply
    replies.write_text(edited.replace('help = "', 'help = '), encoding="utf-8")
    os.utime(replies, (stamp + 2, stamp + 2))
    assert message_of(text(server, "HELP")) == reply  # as last loaded
    stop = message_of(text(server, "STOP"))
    assert stop and "Reply START" in stop


def test_an_answer_missing_or_broken_in_the_patients_language_is_given_in_english(
        serve, tmp_path, monkeypatch):
    """templates/es/_replies.toml without its "stop" answer, or with a placeholder the
    route does not fill ({telefono}): `reminders check` says nothing of the answers file,
    and a Spanish patient's BAJA was taken, then answered 500 (KeyError): no confirmation
    (the one message an opted-out number is owed). The English answer goes instead."""
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    replies = templates / "es" / "_replies.toml"
    replies.write_text("\n".join(
        line.replace("{phone}", "{telefono}") if line.startswith("help =") else line
        for line in replies.read_text(encoding="utf-8").splitlines()
        if not line.startswith("stop =")) + "\n", encoding="utf-8")
    server = serve(config_dir=write_config(tmp_path / "config"), public_url=PUBLIC,
                   templates_dir=templates, unsubscribe_secret=SECRET,
                   data_dir=tmp_path / "data")
    with server.client(server.issue_key("tw")) as tw:
        book(tw, "S-1", patient_locale="es")
    english = {what: reply_text(ROOT / "templates", "en", what, SimpleNamespace(
        sms_label="Piel & Co <Madrid>", phone="+34910000000"))  # type: ignore[arg-type]
        for what in ("stop", "help")}
    assert message_of(text(server, "Ayuda")) == english["help"]
    assert message_of(text(server, "BAJA")) == english["stop"]
    assert server.app.state.services.store.opted_out("tw", "sms", ANA)
    assert "vuelves a recibir" in (message_of(text(server, "ALTA")) or "")  # Spanish still


@pytest.mark.parametrize("locale", ["en", "es"])
def test_every_answer_is_one_gsm7_segment_with_a_long_clinic_name(locale):
    clinic = Clinic(id="x", name="Clínica Dermatológica Doctora Montserrat", phone="+34910000000",
                    timezone="Europe/Madrid")
    assert len(clinic.name) == 40
    for what in ("stop", "start", "help", "confirm", "reschedule", "no_visit", "clarify",
                 "change"):
        answer = reply_text(ROOT / "templates", locale, what, clinic, date="28 de sept.",
                            time="18:30")
        assert is_gsm7(answer) and len(answer) <= 160, (what, len(answer), answer)


def test_english_answers_read_right_in_every_variant():
    """The English answers go to American patients too (reminders are respelt for them,
    templates/en/_spelling.toml; answers are not): "Or call us on +1..." is British. The
    answers name the phone in words right in every English variant."""
    clinic = Clinic(id="x", name="Clinic", phone="+12125550100", timezone="America/New_York")
    for what in ("stop", "start", "help", "confirm", "reschedule", "no_visit", "clarify",
                 "change"):
        answer = reply_text(ROOT / "templates", "en-US", what, clinic, date="Sep 28",
                            time="6:30 PM")
        assert " on +1" not in answer, (what, answer)


# --- email unsubscribe --------------------------------------------------------------------

def link_for(server, address: str, clinic: str = "tw") -> str:
    """The link an email to `address` carries (made as the send makes it)."""
    services = server.app.state.services
    ctx = SimpleNamespace(settings=services.settings, store=services.store)
    url = unsubscribe_link(ctx, clinic, address)  # type: ignore[arg-type]
    assert url.startswith(PUBLIC + "/v1/unsubscribe/v1.")
    return url[len(PUBLIC):]


def test_unsubscribe_get_shows_a_page_and_changes_nothing_then_post_unsubscribes(server, tw):
    book(tw, "A-1")
    path = link_for(server, "Ana@Example.com")
    with server.client() as client:
        page = client.get(path)
        assert page.status_code == 200 and 'method="post"' in page.text
        assert "ana@example.com" not in page.text and "a***@example.com" in page.text
        assert server.app.state.services.store.opted_out("tw", "email", "ana@example.com") \
            is None
        done = client.post(path, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "unsubscribed" in done.text
        assert client.post(path, content="List-Unsubscribe=One-Click").status_code == 200
    why = server.app.state.services.store.opted_out("tw", "email", "ana@example.com")
    assert why and why.startswith("the patient unsubscribed from email at ")
    # Care-critical steps (config/protocols/microneedling.toml) stay, to go by SMS.
    critical = {"stop-retinoids", "aftercare", "redness-check"}
    seen = set()
    for r in reminders(tw, "A-1").values():
        if r["channel"] == "email" and r["step"] not in critical:
            assert r["status"] == "skipped" and r["reason"].startswith("opted_out: "), r
        elif r["channel"] == "sms" and r["status"] == "skipped":
            # SMS is another channel; but the SMS cap counts the emails now going by SMS
            # (the unsubscribe caps the booking again, `Store.recap`), saying so.
            assert "SMS limit" in r["reason"] and r["step"] not in critical, r
        else:
            assert r["status"] == "scheduled", r
            seen.add(r["id"])
    assert {"stop-retinoids:email", "aftercare:email", "redness-check:email"} <= seen


def test_the_unsubscribe_page_speaks_the_patients_language(server, tw):
    """A Spanish patient clicks "Darse de baja de estos correos" in a Spanish email: the
    page and its button were in English ("Stop the appointment emails from ...?",
    "Unsubscribe"). They are in the patient's language, as the emails are."""
    book(tw, "S-1", patient_locale="es")
    path = link_for(server, "ana@example.com")
    with server.client() as client:
        page = client.get(path)
        assert page.status_code == 200 and '<html lang="es">' in page.text, page.text
        assert "Darme de baja</button>" in page.text and "a***@example.com" in page.text
        assert ">Unsubscribe<" not in page.text and "Stop the" not in page.text, page.text
        done = client.post(path, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "Te has dado de baja" in done.text, done.text
    assert server.app.state.services.store.opted_out("tw", "email", "ana@example.com")


def test_the_unsubscribe_page_speaks_a_language_a_clinic_adds(serve, tmp_path, monkeypatch):
    """The page's words were written in Python, in English and Spanish: a clinic adding
    templates in French (templates/fr/) got its emails in French and this page in English.
    They are templates/<language>/_unsubscribe.toml: French with a French file, English for
    a text the file lacks; a link that cannot be read, whose patient is unknown, in the
    browser's language."""
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    shutil.copytree(templates / "en", templates / "fr")  # a clinic's French templates
    (templates / "fr" / "_unsubscribe.toml").write_text("""
ask_title = "Se désabonner de {clinic}"
ask = "Ne plus envoyer à {address} les e-mails de {clinic} sur vos rendez-vous ?"
safety = "Les rappels de sécurité vous parviennent toujours par SMS si vous les recevez."
questions = "Questions : {phone}."
done_title = "Vous êtes désabonné"
done = "{address} ne recevra plus d'e-mails de {clinic}, sauf ceux déjà en route."
the_clinic = "la clinique"
invalid_title = "Ce lien n'est pas valide"
invalid = "Ce lien de désabonnement n'est pas valide. Appelez la clinique."
""", encoding="utf-8")
    server = serve(config_dir=write_config(tmp_path / "config"), public_url=PUBLIC,
                   templates_dir=templates, unsubscribe_secret=SECRET,
                   data_dir=tmp_path / "data")
    with server.client(server.issue_key("tw")) as tw:
        book(tw, "F-1", patient_locale="fr")
    path = link_for(server, "ana@example.com")
    with server.client() as client:
        page = client.get(path)
        assert page.status_code == 200 and '<html lang="fr">' in page.text, page.text
        assert "<title>Se désabonner de Piel &amp; Co &lt;Madrid&gt;</title>" in page.text
        assert ("Ne plus envoyer à a***@example.com les e-mails de Piel &amp; Co "
                "&lt;Madrid&gt; sur vos rendez-vous ?") in page.text, page.text
        assert "Questions : +34910000000." in page.text
        assert ">Unsubscribe</button>" in page.text  # "button" is not in the French file
        done = client.post(path, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "Vous êtes désabonné" in done.text, done.text
        assert "ne recevra plus d&#x27;e-mails" in done.text, done.text
        cut = path[:-8]
        for asked, lang, words in [
                ("fr-CA,fr;q=0.9,en;q=0.5", "fr", "Ce lien n&#x27;est pas valide"),
                ("de-DE, es;q=0.8, *;q=0.1", "es", "Este enlace no es válido"),
                ("de, fr;q=0", "en", "This link is not valid"), (None, "en", "not valid")]:
            headers = {"Accept-Language": asked} if asked else {}
            refused = client.get(cut, headers=headers)
            assert refused.status_code == 404, refused.text
            assert f'<html lang="{lang}">' in refused.text and words in refused.text, \
                (asked, refused.text)
    assert server.app.state.services.store.opted_out("tw", "email", "ana@example.com")


def test_an_unsubscribe_token_for_another_patient_or_forged_is_refused(server, tw):
    book(tw, "A-1")
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    ana = link_for(server, "ana@example.com")
    eva = link_for(server, "eva@example.com")
    # Ana's signature over Eva's payload, a token of another secret, an edited clinic.
    prefix, payload, mac = ana.rsplit("/", 1)[1].split(".")
    mixed = f"/v1/unsubscribe/{prefix}.{eva.rsplit('/', 1)[1].split('.')[1]}.{mac}"
    from worker.optout import make_token

    foreign = "/v1/unsubscribe/" + make_token("another-secret", "tw", "email", "eva@example.com")
    unknown = "/v1/unsubscribe/" + make_token(SECRET, "tw", "email", "nobody@example.com")
    other_clinic = "/v1/unsubscribe/" + make_token(SECRET, "dev", "email", "eva@example.com")
    with server.client() as client:
        for path in (mixed, foreign, unknown, other_clinic, "/v1/unsubscribe/garbage"):
            assert client.post(path, content="List-Unsubscribe=One-Click").status_code == 404
            assert client.get(path).status_code == 404
    store = server.app.state.services.store
    assert store.opted_out("tw", "email", "eva@example.com") is None
    assert store.opted_out("dev", "email", "eva@example.com") is None
    assert all(r["status"] == "scheduled" for r in reminders(tw, "E-1").values())


# A worker process of its own (its own data folder, as in another container): it makes the
# link of `argv[1]` as a send does (the send context of worker/tasks.py).
WORKER_SIDE = """
import sys
from worker.dispatch import unsubscribe_link
from worker.tasks import context
print(unsubscribe_link(context(), "tw", sys.argv[1]))
"""


def test_without_a_configured_secret_api_and_worker_processes_share_links(
        serve, redis_server, tmp_path, monkeypatch):
    """The compose default: no REMINDERS_UNSUBSCRIBE_SECRET, and the API and the worker
    each with a data folder of its own. The secret they share lives in Redis, whichever
    process makes it first."""
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    config = write_config(tmp_path / "config")
    api = serve(config_dir=config, public_url=PUBLIC, data_dir=tmp_path / "api-data")
    assert api.settings.unsubscribe_secret is None
    services = api.app.state.services
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_CONFIG_DIR=str(config),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
               REMINDERS_DATA_DIR=str(tmp_path / "worker-data"), REMINDERS_PUBLIC_URL=PUBLIC)

    def worker_side(address: str) -> str:
        done = subprocess.run([sys.executable, "-c", WORKER_SIDE, address], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()[len(PUBLIC):]

    with api.client(api.issue_key("tw")) as tw:
        book(tw, "A-1")
        book(tw, "E-1", phone=EVA, email="eva@example.com")

    def unsubscribed_by(path: str, address: str) -> None:
        with api.client() as client:
            assert client.get(path).status_code == 200, path
            done = client.post(path, content="List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "unsubscribed" in done.text
        assert services.store.opted_out("tw", "email", address)

    secret_key = f"{api.settings.key_prefix}:secret:unsubscribe"
    # The worker process first: it makes the secret; the API accepts its link.
    assert services.redis.get(secret_key) is None
    eva_link = worker_side("eva@example.com")
    unsubscribed_by(eva_link, "eva@example.com")
    assert services.redis.get(secret_key) is not None
    # The API process first (a fresh secret): the worker reads it and makes the very
    # token the API makes.
    services.redis.delete(secret_key)
    with api.client() as client:
        assert client.get("/v1/unsubscribe/v1.x.y").status_code == 404
    assert services.redis.get(secret_key) is not None  # made by the API's request
    api_made = link_for(api, "ana@example.com").rsplit("/", 1)[1]
    ana_link = worker_side("ana@example.com")
    assert ana_link.rsplit("/", 1)[1] == api_made
    unsubscribed_by(ana_link, "ana@example.com")
    # Nothing kept on either process's disk.
    for folder in ("api-data", "worker-data"):
        assert not list((tmp_path / folder).rglob("*secret*")), folder
