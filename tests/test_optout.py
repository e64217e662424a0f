"""Patients' controls, the pure parts: keywords, Twilio's signature, the unsubscribe token."""

from __future__ import annotations

import pytest

from worker.optout import (
    classify,
    contact_hash,
    make_token,
    read_token,
    token_matches,
    twilio_signature,
    twilio_valid,
)

STOPS = ["STOP", "STOPALL", "QUIT", "END", "REVOKE", "OPT OUT", "OPTOUT", "CANCEL",
         "UNSUBSCRIBE", "BAJA", "PARAR", "DETENER", "CANCELAR", "DESUSCRIBIR"]
SURE = ["STOP", "STOPALL", "OPT OUT", "OPTOUT", "UNSUBSCRIBE", "BAJA", "DESUSCRIBIR"]


def variants(word: str) -> list[str]:
    """The keyword alone: case, punctuation, whitespace, repeats, courtesy words."""
    return [word, word.lower(), word.title(), f"  {word}  ", f"{word}!", f"{word}.",
            f"'{word}'", f"¡{word}!", f"{word}?", f"{word}\n", f"{word} {word}",
            f"please {word.lower()} now", f"{word} thanks", f"Hola, {word.lower()} por favor.",
            f"{word.lower()} gracias", f"{word} all texts"]


@pytest.mark.parametrize("word", STOPS)
def test_every_stop_keyword_alone_or_with_courtesy_words(word):
    for text in variants(word):
        assert classify(text) == "stop", text


@pytest.mark.parametrize("text", [
    # a short text starting with a sure word
    "STOP please", "stop texting me", "Stop the reminders", "BAJA gracias", "Baja ya",
    "Unsubscribe me now please",
    # a sure word anywhere in a short text
    "Opt-out", "opt_out please", "Quiero darme de BAJA", "dar de baja", "Bája",
    "Please stop texting me", "no más, BAJA", "please stop now", "help me stop these",
    "START STOP", "C stop", "ok STOPALL",
    # a sure word naming the messages, at any length
    "Please stop sending me these text messages, I have everything I need",
    "Quiero darme de baja de los mensajes, ya terminé el tratamiento",
    # an ambiguous word alone or among courtesy words
    "Cancel", "cancel.", "END", "Quit texting me", "cancelar por favor", "Parar",
])
def test_stop_in_natural_phrasing(text):
    assert classify(text) == "stop", text


@pytest.mark.parametrize("text,intent", [
    # CANCEL / CAMBIAR in a sentence: the clinic is asked to call, nobody opted out
    ("Can I cancel Tuesday and come Friday?", "change"),
    ("¿Puedo cancelar el martes y venir el viernes?", "change"),
    ("Cancel my appointment", "change"), ("Cancelar mi cita", "change"),
    ("I need to cancel, something came up", "change"),
    ("Quiero cambiar la cita al jueves", "change"), ("¿Puedo anular la cita?", "change"),
    ("Yes but can I cancel the peel?", "change"),  # a cancel wins over a confirm
    # any other stop word in a sentence, or a question: a clarifying answer, no opt-out
    ("see you at the end of the week", "clarify"),
    ("Nos vemos el fin de semana, hasta el final", "unknown"),  # no keyword at all
    ("Should I stop the cream?", "clarify"), ("Should I stop?", "clarify"),
    ("¿Tengo que parar la crema?", "clarify"), ("¿Debo parar?", "clarify"),
    ("I quit smoking last month, is that ok", "clarify"),
    ("Dejé de fumar, ¿es un problema para el peeling? End", "clarify"),
    ("I will stop the retinol tonight, thanks for the text", "clarify"),
    ("stop the cream and text me", "clarify"),
    ("tengo la tensión baja", "clarify"),  # "baja": low blood pressure, not an opt-out
    ("Confirmed, see you at the end of the week", "confirm"),
])
def test_a_stop_word_in_a_sentence_is_not_an_opt_out(text, intent):
    assert classify(text) == intent, text


@pytest.mark.parametrize("word", SURE)
def test_a_sure_word_in_a_long_question_is_not_an_opt_out(word):
    assert classify(f"do I {word.lower()} the cream two days before the peel?") == "clarify"


@pytest.mark.parametrize("text,intent", [
    ("START", "start"), ("start", "start"), ("Start!", "start"), ("UNSTOP", "start"),
    ("unstop please", "start"), ("ALTA", "start"), ("Alta.", "start"), ("álta", "start"),
    ("HELP", "help"), ("help?", "help"), ("Info", "help"), ("AYUDA", "help"),
    ("ayuda por favor", "help"), ("Información", "help"),
    ("C", "confirm"), ("c", "confirm"), ("C.", "confirm"), ("CONFIRM", "confirm"),
    ("confirmed, thanks", "confirm"), ("Sí", "confirm"), ("si, confirmo", "confirm"),
    ("CONFIRMO", "confirm"), ("yes", "confirm"),
    ("R", "reschedule"), ("r", "reschedule"), ("RESCHEDULE", "reschedule"),
    ("Reschedule please", "reschedule"), ("cambiar", "reschedule"),
    ("Reprogramar la cita", "reschedule"),
])
def test_start_help_and_replies(text, intent):
    assert classify(text) == intent


@pytest.mark.parametrize("text,intent", [
    # a confirmation stays one with what usually follows it
    ("Yes see you then", "confirm"), ("Yes, I'll be there", "confirm"),
    ("Sí, allí estaré", "confirm"), ("Confirmed, thanks!", "confirm"),
    ("Yes no problem", "confirm"), ("Yes, don't worry", "confirm"),
    # not a visit the patient can keep: the clinic is asked to call (review rev-patient)
    ("Yes I can't make it", "change"), ("Yes I cannot come", "change"),
    ("Yes, I need to change the time", "change"), ("Yes I will be late", "change"),
    ("Yes I won't be able to come", "change"), ("Si pero no puedo ir", "change"),
    ("Sí, pero no podré llegar a esa hora", "change"), ("C, but I'd like another day", "change"),
    # a question: no confirmation
    ("Yes?", "unknown"), ("C?", "unknown"), ("Yes, can I come at 5 instead?", "change"),
])
def test_a_confirm_word_first_confirms_only_a_visit_the_patient_keeps(text, intent):
    assert classify(text) == intent


@pytest.mark.parametrize("text", [
    "", "   ", "?!", "Hello", "C you tomorrow",  # a lone letter counts only alone
    "R u open?", "when do I start the cream?",  # START/HELP only at the start
    "I need help with the cream" , "Gracias", "stopped", "backend", "quitting",
    "see you at the weekend", "cancellation policy?",
])
def test_unknown(text):
    assert classify(text) == "unknown"


def test_stop_wins_over_everything():
    assert classify("START STOP") == "stop"
    assert classify("help me stop these") == "stop"
    assert classify("C stop") == "stop"
    assert classify("cancel") == "stop"  # the keyword alone is an opt-out, not a change


# --- Twilio's signature ---------------------------------------------------------------------

URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = [("CallSid", "CA1234567890ABCDE"), ("Caller", "+14158675309"), ("Digits", "1234"),
          ("From", "+14158675309"), ("To", "+18005551212")]


def test_twilio_documented_example():
    # Twilio's documented example (its validators' tests): auth token "12345".
    assert twilio_signature("12345", URL, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_valid("12345", URL, list(reversed(PARAMS)), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # Repeated names: each distinct value, sorted (twilio-python's rule).
    repeated = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"),
                ("Digits", "1234"), ("Digits", "1234")]
    assert twilio_signature("12345", URL, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_twilio_port_variants_are_accepted():
    signed_with_port = twilio_signature("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                                        PARAMS)
    assert twilio_valid("12345", URL, PARAMS, signed_with_port)
    assert twilio_valid("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", PARAMS,
                        "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


@pytest.mark.parametrize("change", ["token", "url", "param", "extra", "signature", "none"])
def test_twilio_refuses_anything_else(change):
    token, url, params, sig = "12345", URL, list(PARAMS), "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    if change == "token":
        token = "12346"
    elif change == "url":
        url = URL + "&x=1"
    elif change == "param":
        params[2] = ("Digits", "9999")
    elif change == "extra":
        params.append(("Body", "STOP"))
    elif change == "signature":
        sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8"
    else:
        sig = None
    assert not twilio_valid(token, url, params, sig)
    assert not twilio_valid("", URL, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


# --- unsubscribe token ------------------------------------------------------------------------

SECRET = "s3cret-for-tests"


def test_token_round_trip_names_clinic_channel_and_contact_without_showing_it():
    token = make_token(SECRET, "glow", "email", "Ana@Example.com")
    assert "ana" not in token.lower() and "example" not in token.lower()
    named = read_token(SECRET, token)
    assert named is not None and (named.clinic, named.channel) == ("glow", "email")
    assert token_matches(SECRET, named, "ana@example.com")  # any case: the same address
    assert not token_matches(SECRET, named, "eva@example.com")
    assert named.contact_hash == contact_hash(SECRET, "email", "ana@example.com")


def test_token_cannot_be_forged_or_edited():
    token = make_token(SECRET, "glow", "email", "ana@example.com")
    other = make_token(SECRET, "glow", "email", "eva@example.com")
    version, payload, mac = token.split(".")
    assert read_token("another-secret", token) is None
    assert read_token(SECRET, f"{version}.{other.split('.')[1]}.{mac}") is None  # swapped
    assert read_token(SECRET, f"{version}.{payload}.{mac[:-2]}AA") is None
    assert read_token(SECRET, f"v2.{payload}.{mac}") is None
    assert read_token(SECRET, "not-a-token") is None
    assert read_token(SECRET, "v1..") is None
    # Another clinic's or channel's token is another token.
    assert make_token(SECRET, "demo", "email", "ana@example.com") != token
    assert make_token(SECRET, "glow", "sms", "ana@example.com") != token
