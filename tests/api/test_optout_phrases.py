"""A natural-language opt-out opts the number out exactly as STOP does (review).

DOMAIN.md: opt-out keywords "(+ natural language)", FCC 24-18 (opt-out by any reasonable
means). "No more texts", "don't text me", "remove me from your list", "leave me alone",
"no más mensajes" were `unknown`: the patient got a help answer, stayed opted in and kept
getting texts. Now (worker/optout.py rule e) they are `stop`: the STOP confirmation, every
SMS still to go skipped with STOP's reason, the clinic told `patient.replied` "stop". A
clinical question holding "stop" or "cancel" still opts nothing out. Real HTTP (uvicorn),
real Redis, Twilio-signed posts, as tests/api/test_inbound.py.
"""

from __future__ import annotations

import pytest

from tests.api.test_inbound import (  # noqa: F401
    ANA,
    book,
    events,
    message_of,
    reminders,
    server,
    text,
    tw,
)
from worker.api.inbound import reply_text
from worker.optout import classify

OPT_OUTS = [
    # the review's list
    "No more texts", "don't text me", "Please stop texting me", "stop sending me messages",
    "remove me from your list", "leave me alone",
    # the same phrases, otherwise phrased
    "no more messages please", "NO MORE TEXTS!", "Do not text me", "dont text me anymore",
    "Never text me again", "Don't message me", "Do not contact me again",
    "Hi, please don't text me anymore", "I don't want any more texts",
    "don't send me any more reminders", "take me off your list",
    "Can you remove me from your list?", "I'd like you to remove me from your list",
    "Please remove me from your text list, I have finished my treatment",
    "Lose my number", "Please leave me alone!", "No more texts?",
    # Spanish (templates/es)
    "no más mensajes", "No más mensajes, gracias", "no me envíen mensajes",
    "No me envíen más", "no me manden mas mensajes", "No quiero más mensajes",
    "No quiero recibir mas mensajes", "dejen de enviarme mensajes",
    "Dejen de escribirme por favor", "Bórrenme de la lista", "Déjenme en paz",
    # "don't want" with "to receive" / "to get", and its Spanish without "más" (review s20):
    # `unknown`, the patient kept getting texts while "I don't want texts" and "No quiero
    # más mensajes" opted out
    "I do not want to receive messages", "I don't want to get these texts",
    "I dont want to receive any more reminders",
    "No quiero mensajes", "No quiero recibir mensajes", "Ya no quiero recibir estos mensajes",
    "No deseo recibir mensajes", "No deseo recibir más mensajes, gracias",
    # Spanish as the English list has it (review s20): "stop sending me", "remove my number",
    # "remove me from the list", "cancel the subscription" were `unknown` (or `change`: the
    # clinic asked to call) and the texts kept coming
    "Para de enviarme mensajes", "Paren de escribirme por favor", "No envíen más mensajes",
    "No quiero que me manden mensajes", "Borren mi número", "Eliminen mi número por favor",
    "Elimínenme de la lista", "Cancelar suscripción", "Quiero cancelar mi suscripción",
    # English as the Spanish list has it since (review s20, second look): "No envíen más
    # mensajes", "No quiero que me manden mensajes", "Cancelar suscripción" opted out, their
    # English was `unknown` (or `change`) and the texts kept coming
    "Please don't send any more texts", "Don't send texts", "Do not send these messages",
    "I don't want you to text me anymore", "I do not want you to send me messages",
    "Cancel my subscription", "Please cancel my subscription",
    # the product the texts are about before them, as 'Stop tretinoin texts' (7eb47e9) and
    # the Spanish 'No más recordatorios de retinol' opt out (review s20, second look): they
    # were `unknown`, the texts kept coming
    "No more retinol reminders", "No more tretinoin texts please",
    "Don't send me retinol reminders", "I don't want any more tretinoin messages",
    # Spanish as "I don't want these notifications" (review s20, second look): a feminine
    # or distant demonstrative, or "de", before the texts was `unknown`
    "No quiero recibir estas notificaciones", "No me envíen estas notificaciones",
    "No me manden esas notificaciones", "No más de estos mensajes",
    # a request whose verb is the keyword itself (review rev-patient): a sure word after "I
    # would like to", "can you please", "yes I want to" and before nothing but "me", "from
    # this list", courtesy words. They were `clarify` (the patient was told to reply STOP
    # and kept getting texts), and "Yes I want to unsubscribe" `confirm` (the visit
    # confirmed, "thank you, your visit is confirmed" the answer, the texts kept coming);
    # "I want to unsubscribe" and "I want to opt out" opted out.
    "I would like to opt out", "I would like to unsubscribe", "I'd like to unsubscribe please",
    "I want to unsubscribe please", "Yes I want to unsubscribe", "Can you please unsubscribe me",
    "Can you please unsubscribe me?", "Unsubscribe me from this list",
    "Please unsubscribe me from your list", "Please opt me out of texts",
    "I want to opt out of these texts", "I would like to stop please",
    # "stop receiving / getting" the texts, as "stop sending me" the texts
    "I would like to stop receiving these texts", "I want to stop receiving texts",
    "I want to stop getting these messages",
    # Spanish: "darme de baja" after "quiero", with courtesy words after
    "Me quiero dar de baja", "Quiero darme de baja por favor gracias",
    # an opt-out after a confirmation or an assent (review rev-patient): "Sí, no más
    # mensajes" was `confirm` while "Yes, no more texts" opted out; "Confirmed, but no more
    # texts" confirmed the visit, and the texts kept coming. Stop wins, as in "C stop".
    "Confirmed. No more texts please", "Confirmed, but no more texts", "C. No more texts",
    "Sí, no más mensajes", "Si, pero no más mensajes por favor", "Sí, BAJA",
    "Confirmo, pero no me manden más mensajes",
    # after "vale" / "perfecto" / "great" (courtesy words as "ok" and "thanks" are)
    "Vale gracias, BAJA", "Perfecto, baja por favor", "Vale, no más mensajes",
    "Great thanks, can you unsubscribe me?",
    # consent revoked in so many words (FCC 24-18 is the rule on revoking consent), "remove
    # me", "this number", "do not contact" (review rev-patient): `clarify` or `unknown`,
    # and the texts kept coming
    "Revoke consent", "I revoke my consent", "I revoke consent to receive texts",
    "I withdraw my consent", "Revoco mi consentimiento", "Retiro mi consentimiento",
    "remove me", "Please remove me", "Remove me please", "Please remove this number",
    "Take this number off your list", "Delete this number", "Do not contact",
    "Please do not contact this number", "Basta de mensajes", "Basta ya de mensajes",
    # a last sentence that is a sure keyword alone, after a question or a remark: a wrong
    # number, mostly (`clarify`: the texts kept coming)
    "Who is this? Stop", "I am not a patient, stop", "This number is not Ana, please stop",
    "Wrong number. STOP", "No conozco a Ana. BAJA",
    # a negation that is not of the keyword: these stay opt-outs
    "Don't worry, stop", "Don't worry stop the texts", "Can't you just stop texting me",
    "Why won't you stop texting me", "No stop texting me", "No, stop", "No please stop",
    "Don't text me stop", "Stop, don't text me again", "No, no quiero mas mensajes. BAJA",
    # a first sentence that is the keyword, ended by a stop, then a question or a remark
    # (review rev-patient): `clarify`, the texts kept coming
    "Stop. Who is this?", "STOP! I never signed up for this", "stop it. I don't want it",
    "BAJA. ¿Quién es?", "Please stop. I finished my treatment last month and I am fine",
    # "and" among courtesy words, and "unsub" (review rev-patient): `clarify` / `unknown`
    "Stop please and thank you", "Baja por favor y gracias", "Unsub", "unsub please",
    # the number named with "to" (`clarify`: the texts kept coming)
    "Stop sending to this number", "Stop texting this phone", "stop sending texts to this number",
    # CANCEL, END, QUIT (and their Spanish) with "my" / "the" before the texts (review
    # patients): "Cancel all texts" and "Cancelar los mensajes" opted out, while "Cancel my
    # texts" and "Cancelar mis mensajes" were `change` (the clinic emailed to call the
    # patient about their visit) and "End my texts" `clarify`: the texts kept coming
    "Cancel my texts", "Cancel the texts", "Cancel my reminders", "Cancel my sms",
    "Cancel my text messages please", "Please cancel my texts", "Can you cancel my texts?",
    "End my texts", "Quit my texts", "Cancel the reminders please, thanks",
    "Cancelar mis mensajes", "Cancelar mis SMS por favor", "Parar mis mensajes",
    # "no longer want", "don't wish to receive", and "no texts" as the whole text (review
    # patients): `unknown`, one help answer a day at most and the texts kept coming
    "I no longer want these texts", "I no longer want to receive messages",
    "I no longer wish to receive these texts", "I don't wish to receive texts",
    "No texts please", "No texts", "No SMS", "No sms por favor", "Nada de mensajes",
    "No mensajes, gracias",
]

# (text, what it is instead): questions and reports that must not opt anybody out.
NOT_OPT_OUTS = [
    # clinical questions (the review's list)
    ("Should I stop tretinoin tonight?", "clarify"), ("can I stop the cream", "clarify"),
    ("stop bleeding?", "clarify"), ("When do I stop retinol", "clarify"),
    ("Is it ok to stop using SPF", "clarify"),
    # a request to the clinic: it is asked to call (the answer says how to stop texts)
    ("cancel my appointment", "change"),
    # a phrase's words in a sentence about something else
    ("I got no more messages after Tuesday", "unknown"),
    ("No more texts after the peel?", "unknown"), ("No more tretinoin?", "unknown"),
    ("Is there no more retinol after the peel?", "unknown"),
    ("No more redness, thanks for the messages", "unknown"),
    ("the redness won't leave me alone", "unknown"),
    ("Why don't you text me the address?", "unknown"),
    ("I don't want the texts to stop", "clarify"),
    ("remove me from the waiting list", "unknown"),
    ("¿No más retinol?", "unknown"), ("No me envíen la factura", "unknown"),
    ("Dejé de usar la crema", "unknown"), ("No más dolor, gracias por los mensajes", "unknown"),
    ("Para de sangrar, ¿es normal?", "unknown"), ("Borren mi cita del martes", "unknown"),
    ("¿Quiero cancelar mi suscripción al gimnasio?", "change"),
    ("Don't send the texts to my old number", "unknown"),
    ("Why don't you send me the texts by email?", "unknown"),
    ("Can I cancel my subscription to the newsletter?", "change"),
    ("No more retinol texts after the peel?", "unknown"),
    ("No more tretinoin, the texts said so", "unknown"),
    ("No quiero más de tres mensajes al día", "unknown"),
    # a request with the keyword about something else, or a question holding STOP
    ("Can I stop?", "clarify"), ("I would like to stop by on Friday", "clarify"),
    ("I want to stop the cream", "clarify"), ("Can I opt out of the peel?", "clarify"),
    ("I would like to unsubscribe from the newsletter", "clarify"),
    ("Quiero darme de baja del gimnasio", "clarify"),
    ("C you tomorrow, no more texts needed after", "unknown"),
    # consent to something else; a removal of something else; a question ending on STOP
    ("I want to withdraw consent for the procedure", "unknown"),
    ("Please remove my appointment", "unknown"),
    ("remove me from the waiting list please", "unknown"),
    ("Is the redness normal? When should I stop?", "clarify"),
    ("My skin burns, should I stop", "clarify"),
    ("I don't know when to stop", "clarify"), ("Who is this? Stop?", "clarify"),
    ("Stop, is it normal that my skin is red?", "clarify"),
    # the keyword negated (review rev-patient): the patient asked NOT to stop, and was
    # opted out of every SMS, the care-critical ones too
    ("Don't stop", "clarify"), ("Dont stop", "clarify"),
    ("Please don't stop the reminders", "clarify"), ("Do not stop texting me", "clarify"),
    ("Don't stop the texts, they help", "clarify"), ("Never stop", "clarify"),
    ("Do not unsubscribe me", "clarify"), ("Don't opt me out", "clarify"),
    ("I never said STOP", "clarify"), ("I didn't say stop", "clarify"),
    ("I don't want to unsubscribe", "clarify"), ("I do not want to opt out", "clarify"),
    ("No quiero darme de baja", "clarify"), ("No me des de baja", "clarify"),
    # "cancel my ..." about the visit or one reminder: the clinic is asked to call
    ("Cancel my reminder for Friday", "change"), ("Cancel my texts for Friday's visit", "change"),
    ("Cancelar mi cita", "change"), ("Cancel my texts and my appointment?", "change"),
    # "no texts" in a sentence about something else
    ("No texts received yet", "unknown"), ("No texts after 8pm please", "unknown"),
    ("No texts needed, see you Friday", "unknown"), ("Nada de mensajes todavía?", "unknown"),
]


@pytest.mark.parametrize("body", OPT_OUTS)
def test_a_natural_language_opt_out_is_stop(body):
    assert classify(body) == "stop", body


@pytest.mark.parametrize("body,intent", NOT_OPT_OUTS)
def test_a_question_or_a_phrase_in_another_sentence_is_not_an_opt_out(body, intent):
    assert classify(body) == intent, body


def test_si_without_a_comma_or_an_accent_is_if_not_an_assent():
    """"Si no me mandan mensajes, llamo yo": "if you send me no messages, I will call" (the
    words of an opt-out after "si", which is "yes" only as "sí" or "si," before them)."""
    assert classify("Si no me mandan mensajes llamo yo") != "stop"
    assert classify("si no me envian mensajes como se la hora") != "stop"


@pytest.mark.parametrize("body,locale", [
    ("No more texts", "en"), ("don't text me", "en"), ("remove me from your list", "en"),
    ("leave me alone", "en"), ("no más mensajes", "es"), ("no me envíen mensajes", "es"),
    ("I do not want to receive these messages", "en"), ("No quiero recibir mensajes", "es"),
    ("Para de enviarme mensajes", "es"), ("Cancelar suscripción", "es"),
    ("Please don't send any more texts", "en"), ("Cancel my subscription", "en"),
    ("No more retinol reminders", "en"), ("No quiero recibir estas notificaciones", "es"),
    ("Yes I want to unsubscribe", "en"), ("I would like to opt out", "en"),
    ("Me quiero dar de baja", "es"), ("Sí, no más mensajes", "es"),
    ("Confirmed, but no more texts", "en"), ("I revoke my consent", "en"),
    ("Who is this? Stop", "en"), ("remove me", "en"),
    ("Cancel my texts", "en"), ("Cancelar mis mensajes", "es"),
    ("I no longer want these texts", "en"), ("No sms por favor", "es"),
])
def test_a_natural_language_opt_out_does_what_stop_does(server, tw, body, locale):  # noqa: F811
    book(tw, "N-1", patient_locale=locale)
    book(tw, "N-2", days=30, patient_locale=locale)
    before = {b: reminders(tw, b) for b in ("N-1", "N-2")}
    assert any(r["channel"] == "sms" and r["status"] == "scheduled"
               for r in before["N-1"].values())

    services = server.app.state.services
    # The one confirmation STOP gets, in the patient's language.
    assert message_of(text(server, body)) == reply_text(
        server.settings.templates_dir, locale, "stop", services.catalog.clinics["tw"])
    # Every SMS still to go skipped with STOP's reason; email untouched.
    for booking_id in ("N-1", "N-2"):
        for r in reminders(tw, booking_id).values():
            was = before[booking_id][r["id"]]
            if r["channel"] == "sms" and was["status"] == "scheduled":
                assert r["status"] == "skipped", r
                assert r["reason"].startswith("opted_out: the patient replied STOP by SMS at ")
            else:
                assert (r["status"], r["reason"]) == (was["status"], was["reason"]), r
    store = services.store
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.endswith(":sms")], due
    assert store.opted_out("tw", "sms", ANA).startswith("the patient replied STOP")
    # The clinic is told as for STOP, without the number or the words.
    replied = [e for e in events(server) if e.type == "patient.replied"]
    assert {e.fields["booking_id"] for e in replied} == {"N-1", "N-2"}
    assert all(e.fields["reply"] == "stop" for e in replied)
    assert all(ANA not in str(e.fields) and body not in str(e.fields) for e in events(server))
    # And then nothing else: a second one gets no answer.
    assert message_of(text(server, body)) is None


@pytest.mark.parametrize("body", [
    "Should I stop tretinoin tonight?", "can I stop the cream", "Is it ok to stop using SPF",
    "Please don't stop the reminders", "No quiero darme de baja",
    "I got no more messages after Tuesday", "the redness won't leave me alone",
])
def test_a_clinical_question_opts_nothing_out(server, tw, body):  # noqa: F811
    book(tw, "Q-1")
    before = reminders(tw, "Q-1")
    reply = message_of(text(server, body))
    assert reply and "STOP" in reply, reply  # a help-style answer, not the confirmation
    assert server.app.state.services.store.opted_out("tw", "sms", ANA) is None
    assert reminders(tw, "Q-1") == before
    assert not [e for e in events(server) if e.type == "patient.replied"]
