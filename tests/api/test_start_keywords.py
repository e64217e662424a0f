"""START opts a number back in only when the text asks for that: a START word with at most
courtesy words around it ("START", "Unstop please", "Start again", "Alta por favor"), not
a sentence that merely begins with one ("Resume tretinoin tonight?", "Alta fiebre desde
ayer": a high fever). Since START puts the patient's skipped SMS back into the schedule
(worker/store.py `opt_in`), such a text would send SMS to a patient who opted out."""

from __future__ import annotations

import pytest

from tests.api import test_inbound as inbound
from tests.api.test_inbound import ANA, book, message_of, reminders, text
from worker.api.inbound import reply_text
from worker.optout import classify

server = inbound.server  # the API's fixtures
tw = inbound.tw


@pytest.mark.parametrize("body", [
    "Resume tretinoin tonight?", "resume my retinol now", "Start the cream tomorrow?",
    "Alta fiebre desde ayer", "Alta temperatura, ¿es normal?", "Reanudar el retinol hoy?",
    "Unstop the peeling?", "Don't start", "When do the texts start?",
    "Start tretinoin again. Thanks", "I will start the cream. Alta fiebre",
    "Subscribe to what?", "Opt in to the photos?", "I want my skin back",
    "Quiero volver a recibir el tratamiento",
])
def test_a_sentence_beginning_with_a_start_word_is_not_an_opt_in(body):
    assert classify(body) != "start", body


@pytest.mark.parametrize("body", [
    "START", "Start!", "unstop please", "Start again", "START texts please", "Alta",
    "alta por favor", "Reanudar mensajes", "Resume reminders", "start sending me texts",
    # courtesy words or an assent before it, or a last sentence of its own (review
    # rev-patient): `unknown` or `confirm`, and an opted-out number gets no answer to
    # those: the patient asked for the texts back and heard nothing
    "Please start", "Ok start", "Hi, START", "Yes, start again", "Sorry, START",
    "Thanks. START", "Please unstop", "Por favor alta", "Oops, START",
    "I didn't mean to stop. START", "Sorry I sent stop by mistake. Start",
    # "opt in", "subscribe", "the texts back", "volver a recibir mensajes" (review
    # rev-patient): `unknown`, so an opted-out number heard nothing and stayed opted out
    "Opt in", "Opt-in please", "optin", "Subscribe", "Resubscribe", "I want the texts back",
    "Can I get the reminders back?", "Texts back on please",
    "Quiero volver a recibir mensajes", "Quiero volver a recibir los recordatorios",
])
def test_a_start_word_with_courtesy_words_is_an_opt_in(body):
    assert classify(body) == "start", body


def test_an_opted_out_patient_asking_about_resuming_tretinoin_stays_opted_out(server, tw):
    """Real HTTP: STOP, then the question "Resume tretinoin tonight?": the number stays
    opted out and none of its SMS goes back into the schedule."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    before = reminders(tw, "A-1")
    text(server, "Resume tretinoin tonight?")
    assert store.opted_out("tw", "sms", ANA) is not None
    assert reminders(tw, "A-1") == before
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.endswith(":sms")], due


@pytest.mark.parametrize("body", ["Please start", "I didn't mean to stop. START", "Opt in",
                                  "I want the texts back"])
def test_an_opted_out_patient_asking_for_the_texts_back_gets_them(server, tw, body):
    """Real HTTP: STOP, then a START with courtesy words before it, or as its own last
    sentence: opted in, the SMS back in the schedule, the START answer (it was silence:
    an opted-out number gets no answer to an unknown or clarify text)."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is not None
    answer = message_of(text(server, body))
    assert answer == reply_text(server.settings.templates_dir, "en", "start",
                                server.app.state.services.catalog.clinics["tw"])
    assert store.opted_out("tw", "sms", ANA) is None
    back = [r for r in reminders(tw, "A-1").values() if r["channel"] == "sms"]
    assert back and all(r["status"] == "scheduled" for r in back), back


@pytest.mark.parametrize("body", ["YES", "yes", " Yes \n"])
def test_yes_from_an_opted_out_number_opts_it_in_as_twilio_does(server, tw, body):
    """Real HTTP: STOP, then "YES". Twilio's own STOP filtering (on by default for the
    clinic's long code) takes START, YES and UNSTOP as opt-in keywords: it unblocks the
    number and tells the patient "You have successfully been re-subscribed". YES was a
    confirm here: the number stayed opted out, no answer came from us, and every SMS after
    it was skipped while the patient had been told texts were back on."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is not None
    answer = message_of(text(server, body))
    assert answer == reply_text(server.settings.templates_dir, "en", "start",
                                server.app.state.services.catalog.clinics["tw"])
    assert store.opted_out("tw", "sms", ANA) is None
    back = [r for r in reminders(tw, "A-1").values() if r["channel"] == "sms"]
    assert back and all(r["status"] == "scheduled" for r in back), back
    # An opt-in, not a confirmation of the visit.
    assert not tw.get("/v1/bookings/A-1").json().get("confirmed_at")


@pytest.mark.parametrize("body", ["YES", "Yes, see you then"])
def test_yes_from_a_number_not_opted_out_still_confirms(server, tw, body):
    book(tw, "A-1")
    answer = message_of(text(server, body))
    assert answer and "confirmed" in answer
    assert tw.get("/v1/bookings/A-1").json()["confirmed_at"]


def test_the_providers_opt_out_type_is_followed_for_its_own_keywords(server, tw):
    """Real HTTP, Twilio-signed: a clinic's Messaging Service with Advanced Opt-Out has
    keywords of its own ("FIN", "ALTO" for its Spanish patients; "SI" to opt in) and says
    what it did in `OptOutType` (STOP, START, HELP): it blocked or unblocked the number.
    Those texts were `unknown` or a confirm here: the number stayed opted in while Twilio
    refused every SMS to it (error 21610: dead letters), or stayed opted out while Twilio
    had told the patient the texts were back."""
    book(tw, "A-1")
    store = server.app.state.services.store
    clinic = server.app.state.services.catalog.clinics["tw"]
    answer = message_of(text(server, "FIN", extra={"OptOutType": "STOP"}))
    assert answer == reply_text(server.settings.templates_dir, "en", "stop", clinic)
    assert store.opted_out("tw", "sms", ANA) is not None
    sms = [r for r in reminders(tw, "A-1").values() if r["channel"] == "sms"]
    assert sms and all(r["status"] == "skipped" for r in sms), sms
    answer = message_of(text(server, "Si", extra={"OptOutType": "START"}))
    assert answer == reply_text(server.settings.templates_dir, "en", "start", clinic)
    assert store.opted_out("tw", "sms", ANA) is None
    sms = [r for r in reminders(tw, "A-1").values() if r["channel"] == "sms"]
    assert all(r["status"] == "scheduled" for r in sms), sms
    assert not tw.get("/v1/bookings/A-1").json().get("confirmed_at")


def test_without_the_providers_opt_out_type_its_words_are_read_as_ever(server, tw):
    book(tw, "A-1")
    message_of(text(server, "FIN"))
    assert server.app.state.services.store.opted_out("tw", "sms", ANA) is None
