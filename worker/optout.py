"""Patients' controls: SMS keywords (STOP, START, HELP, confirm, reschedule), the SMS
provider's request signature, and the email unsubscribe token. Pure functions; the state
they change lives in worker/store.py (`Store.opt_out`, `Store.opt_in`).

Keywords. An inbound text is folded before matching: accents dropped (BAJA == baja ==
Bajá), upper case, every run of characters other than letters and digits is one space
("Opt-out" == "OPT OUT"; the pair OPT OUT counts as one word). Carriers and CTIA treat a
message that IS the keyword as an opt-out; the issue asks for surrounding words to be
tolerated. Both, without opting out a patient who only asked a question ("Can I cancel
Tuesday and come Friday?", "see you at the end of the week"): SMS carries the
care-critical steps, so a wrong opt-out is not free. Two kinds of stop word:

  sure     STOP, STOPALL, UNSUBSCRIBE, UNSUB, OPTOUT / OPT OUT / OPT ME OUT, BAJA,
           DESUSCRIBIR(ME|SE)
  maybe    CANCEL, END, QUIT, REVOKE, CANCELAR, PARAR, DETENER (ordinary words too)

In this order:

  stop        (a) every word is a stop word or a courtesy/messaging word (FILLER_WORDS):
              "STOP", "stop.", "Cancel!", "END thanks", "Quit texting me", "BAJA gracias",
              "cancelar por favor", "STOP STOP", "Please stop texting me", "Stop please
              and thank you";
              (b) a short text (at most SHORT_WORDS words) starting with a sure word,
              unless it asks a question ("?") or names a product the reminders name
              (CARE_WORDS) and not the messages: "STOP please", "stop the reminders",
              "Baja ya" ("Stop the cream?" asks about the cream; "Stop tretinoin
              tonight" echoes the pause reminder);
              (c) a short text with a sure word anywhere, on the same terms:
              "Quiero darme de BAJA", "please stop now", "help me stop these";
              (d) a sure word followed by a messaging word (TEXTS, SMS, MESSAGES,
              MENSAJES ...), with only small words (or products) between, at any length:
              "Stop tretinoin texts", "Please stop sending me these text messages, I
              have what I need"; past a product, only courtesy words after the messaging
              word ("Ok stop retinol, message received" acknowledges the reminder).
              BAJA counts as sure only alone, first before a filler ("Baja ya"), after DE
              ("darme de baja") or among fillers: "tengo la tension baja" is about blood
              pressure, "Baja la fiebre" says the fever goes down.
              (e) natural language (FCC 24-18: opt-out "by any reasonable means"): the
              text holds a phrase of OPT_OUT_PHRASES with only courtesy words or a
              request opener (REQUEST_WORDS: "can you", "I want", "please", "yes", "but",
              "confirmed") before it,
              and, if it asks a question, only courtesy words after it:
                en  no more <texts>; don't / do not / never / no longer text|message|contact
                    me; don't send (me) <texts>; don't want|wish (to receive|get) <texts>;
                    no texts|messages|SMS|reminders (the whole text); don't
                    want you to text|message|contact|send me; remove|take me|this number
                    off|from your|the list; remove|delete|lose my|this (phone) number;
                    cancel|end (my) subscription; cancel|end|quit my|the <texts> (the
                    whole text); leave me alone; and as the whole text
                    (courtesy words after): remove me; don't contact (this number);
                    revoke|withdraw (my) consent (to receive <texts>) (FCC 24-18)
                es  no (quiero|deseo (recibir)) (mas) <mensajes>; no (quiero que) me
                    envien|manden|escriban (mas) (<mensajes>); no envien|mandar (mas)
                    <mensajes>; dejen|deja|paren|para de enviarme|mandarme|escribirme;
                    borrenme|quitenme|eliminenme|sacarme de la|su lista; borren|eliminen|
                    quiten mi numero|telefono; cancelar (mi|la) suscripcion; cancelar|
                    parar|detener mis <mensajes> (the whole text); dejenme en paz;
                    basta (ya) de <mensajes>; nada (mas) de <mensajes> and no mensajes|
                    SMS|recordatorios (the whole text); revoco|retiro mi consentimiento (whole text)
              (<texts>: a messaging word, perhaps just after a product the reminders
              name: "No more retinol reminders", as "Stop tretinoin texts")
              ("No more texts", "Please don't text me anymore", "Can you remove me from
              your list?", "No más mensajes", "No me envíen mensajes"). Not a phrase in
              a sentence about something else ("I got no more messages after Tuesday",
              "the redness won't leave me alone", "Why don't you text me the address?"),
              nor a question going on past it ("No more texts after the peel?"): the
              phrases name the messages, so "Should I stop tretinoin tonight?" or "Is it
              ok to stop using SPF" never match one (they stay clarify).
              (f) a request whose verb is a sure word: only a request's words before it
              (as e), only "me", "from / of this list", the messages and courtesy words
              after it: "I would like to opt out", "Can you please unsubscribe me?",
              "Yes I want to unsubscribe", "Unsubscribe me from this list", "Me quiero
              dar de baja". STOP and BAJA (words with other uses) not in a question: "Can
              I stop?" asks about the cream; "Can I opt out of the peel?" and "I would
              like to stop by on Friday" name something else. (d) takes "receiving" and
              "getting" between: "I want to stop receiving these texts".
              Each rule also past an opening assent: "Sí" (accented), or "Si" / "C" before
              a comma or a stop ("Sí, no más mensajes", "C. No more texts"); "si" run on is
              "if" ("Si no me mandan mensajes llamo yo"). Stop wins over the confirmation.
              (g) a sentence of the text is a sure word with courtesy words only, the
              last or one ended by a stop or "!", not by "?": "Who is this? Stop", "I am
              not a patient, stop" (a wrong number, mostly), "Stop. Who is this?"; not
              "Who is this? Stop?", "Stop, is it normal that my skin is red?", "I don't
              know when to stop".
              A negated keyword counts for none of these: a negation in its sentence a
              few words before it, with only words such as "want to", "say", "quiero
              darme de" between ("Please don't stop the reminders", "I never said STOP",
              "Don't opt me out", "No quiero darme de baja": clarify). Not "Don't worry,
              stop", "Can't you just stop texting me".
  start       the text, or its last sentence (not a question), holds a word of START_WORDS
              and nothing but fillers, "again", and before it an assent or an apology
              ("START", "Unstop please", "Start again", "Alta", "Please start", "Yes,
              start again", "Oops, START", "I didn't mean to stop. START", "Opt in",
              "Subscribe"); or the text asks for the texts back in so many words (after a
              request's words, before courtesy words: "I want the texts back", "Can I
              get the reminders back?", "Quiero volver a recibir mensajes"): not a
              sentence that begins with one ("Resume tretinoin tonight?", "Alta fiebre": a
              high fever), which must not opt the number in (START puts its SMS back).
  help        the text begins with a word of HELP_WORDS, perhaps after courtesy words
              ("HELP", "info?", "Ayuda", "Hi, HELP", "Please help").
  change      a word of CHANGE_WORDS (cancel, cancelar, cambiar, anular, reschedule,
              reprogramar) that is not an opt-out: "Can I cancel Tuesday and come
              Friday?", "Cancel my appointment", "¿Puedo cambiar la cita?". The clinic is
              asked to call (as R), and the answer says how to stop texts too.
  confirm     the text begins with a word of CONFIRM_WORDS ("C", "Confirm", "Sí, confirmo");
              the single letter only alone. Not a question ("Yes?": unknown), and not a
              visit the patient cannot keep or wants changed ("Yes I can't make it", "Si
              pero no puedo ir", "Yes, I need to change the time": change). "YES" alone
              from an opted-out number is an opt-in (the route asks `provider_opt_in`):
              the SMS provider re-subscribes the number on it.
  reschedule  the text begins with a word of RESCHEDULE_WORDS ("R", "Reschedule please",
              "Cambiar"); the single letter only alone.
  clarify     any other text holding a stop word: "see you at the end of the week",
              "Should I stop the cream?". Not an opt-out: one help-style answer ("reply
              STOP to stop texts; call us to change your visit"), at most once a day.
  unknown     anything else.

HELP and the replies match only at the start of the text, START only with the words its
rule names ("when do I start the cream?" is a question, not a request to resume). A
mistaken opt-out costs one reply that says how to resume (START); a missed one is caught
by the clarifying answer.

Signature (Twilio's scheme, https://www.twilio.com/docs/usage/security): base64 of
HMAC-SHA1, keyed with the account's auth token, over the full URL Twilio requested
followed by each POST parameter name and value, sorted by name (and, for a repeated name,
its distinct values sorted). The URL is the public one (behind a proxy the API sees
another), from REMINDERS_PUBLIC_URL. As Twilio's own validators do, the URL is also tried
with the scheme's default port added or removed.

Unsubscribe token: `v1.<payload>.<mac>`, both urlsafe base64 without padding. The payload
is JSON {"c": clinic, "ch": channel, "h": contact hash}, where the contact hash is the
first 16 bytes of HMAC-SHA256(secret, "contact:" + channel + ":" + contact): no address
is readable in the link, and nobody without the secret can make a token for a contact.
The mac is HMAC-SHA256(secret, "unsubscribe:" + payload) over the whole payload, so a
token cannot be edited to another clinic, channel or patient. The token carries no
expiry: a link in an old email must still work (RFC 8058 expects it to), and using it
twice changes nothing the second time. The route finds the address behind the hash in the
clinic's contact index (the bookings it holds for that contact).

The secret (`unsubscribe_key`): REMINDERS_UNSUBSCRIBE_SECRET when set, else the shared
server secret "unsubscribe" kept in Redis (worker/secrets.py), so the API and every
worker sharing the Redis sign and check links alike without a shared disk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

    from .settings import Settings

Intent = Literal["stop", "start", "help", "change", "confirm", "reschedule", "clarify",
                 "unknown"]

# English (CTIA, FCC 24-18) and Spanish words; see the module docstring.
SURE_STOP_WORDS = frozenset({
    "STOP", "STOPALL", "UNSUBSCRIBE", "UNSUB", "OPTOUT",
    # es: "baja" (darse de baja), desuscribir(se).
    "BAJA", "DESUSCRIBIR", "DESUSCRIBIRME", "DESUSCRIBIRSE",
})
MAYBE_STOP_WORDS = frozenset({"CANCEL", "END", "QUIT", "REVOKE", "CANCELAR", "PARAR",
                              "DETENER"})
STOP_WORDS = SURE_STOP_WORDS | MAYBE_STOP_WORDS
# Words that may stand around a stop word in an opt-out: courtesy and "the messages".
MESSAGING_WORDS = frozenset({
    "TEXT", "TEXTS", "TEXTING", "MESSAGE", "MESSAGES", "MESSAGING", "SMS", "SMSS", "REMINDERS",
    "NOTIFICATIONS", "MENSAJE", "MENSAJES", "RECORDATORIOS", "AVISOS", "NOTIFICACIONES",
})
FILLER_WORDS = MESSAGING_WORDS | frozenset({
    "PLEASE", "PLS", "PLZ", "NOW", "THANKS", "THANK", "YOU", "THX", "ALL", "ME", "IT",
    "THIS", "THESE", "THEM", "SENDING", "OK", "OKAY", "NO", "MORE",
    "POR", "FAVOR", "GRACIAS", "YA", "TODO", "TODOS", "TODAS", "LOS", "LAS", "MAS", "MUCHAS",
    "DE", "ESTO", "ESTOS", "HI", "HELLO", "HEY", "HOLA",
    # "OK" in other words: "Vale gracias, BAJA", "Great thanks, can you unsubscribe me?"
    "VALE", "PERFECTO", "GREAT",
    # the number texted: "Stop sending to this number", "Stop texting this phone"
    "TO", "NUMBER", "PHONE",
})
# Words that may stand between a sure stop word and the messages it names (rule d).
_BETWEEN = FILLER_WORDS | frozenset({
    "THE", "YOUR", "THOSE", "ANY", "SEND", "SENT", "US", "FROM", "RECEIVING", "GETTING",
    "ENVIAR", "ENVIARME", "ENVIANDO", "MANDAR", "MANDARME", "MANDANDO", "TUS", "SUS", "EL",
    "LA", "ESTAS", "ESOS", "ESAS",
})
SHORT_WORDS = 4  # "a short text": at most this many words
_AND = frozenset({"AND", "Y"})  # between courtesy words in rule (a) only: not in (d)
# The products the reminders name ("stop tretinoin tonight"): a short text naming one and
# not the messages is about the product ("Stop tretinoin tonight", "Ok stop retinol": the
# reminder's words echoed back), not an opt-out (rules b and c); it gets the clarifying
# answer, which says how to stop texts.
CARE_WORDS = frozenset({
    "TRETINOIN", "TRETINOINA", "RETINOL", "RETINOID", "RETINOIDS", "RETINOIDE", "RETINOIDES",
    "RETIN", "ISOTRETINOIN", "ISOTRETINOINA", "ACCUTANE", "ROACCUTAN", "ROACCUTANE",
    "CREAM", "CREAMS", "CREMA", "CREMAS", "SERUM", "SPF", "SUNSCREEN", "MEDICATION",
    "MEDICINE", "MEDICACION", "MEDICAMENTO", "PILLS", "PASTILLAS",
})
CHANGE_WORDS = frozenset({"CANCEL", "CANCELAR", "CAMBIAR", "ANULAR", "RESCHEDULE",
                          "REPROGRAMAR"})
START_WORDS = frozenset({"START", "UNSTOP", "RESUME", "ALTA", "REANUDAR", "OPTIN",
                         "SUBSCRIBE", "RESUBSCRIBE"})
# What may stand around a start word in an opt-in ("Start again please", "Alta por favor"):
# "Resume tretinoin tonight?" or "Alta fiebre" (a high fever) ask or tell something else.
_START_AROUND = frozenset({"AGAIN", "OTRA", "VEZ", "NUEVO"})
HELP_WORDS = frozenset({"HELP", "INFO", "AYUDA", "INFORMACION"})
CONFIRM_WORDS = frozenset({"C", "CONFIRM", "CONFIRMED", "YES", "SI", "CONFIRMO", "CONFIRMAR",
                           "CONFIRMADO"})
RESCHEDULE_WORDS = frozenset({"R", "RESCHEDULE", "CHANGE", "CAMBIAR", "CAMBIO", "REPROGRAMAR"})
# The SMS provider's own opt-in keywords: Twilio's STOP filtering, on by default for a long
# code, unblocks a number that texts one of these alone (case and surrounding white space
# ignored) and tells it "You have successfully been re-subscribed" (Twilio's error 23002
# page: "Users who reply START, YES, or UNSTOP should be removed from your STOP
# blocklist"). YES is a confirm word; from an opted-out number it is this opt-in
# (`provider_opt_in`), so our record agrees with what the patient was told.
PROVIDER_START_WORDS = frozenset({"START", "YES", "UNSTOP"})
_SINGLE_LETTERS = frozenset({"C", "R"})
_NOT_WORD = re.compile(r"[^A-Z0-9]+")

SIGNATURE_HEADER = "X-Twilio-Signature"
TOKEN_VERSION = "v1"
Channel = Literal["email", "sms"]
Secret = str | bytes  # an HMAC key: a configured text, or the server secret's bytes


def fold(text: str) -> list[str]:
    """Return the text's words: accents dropped, upper case, split at anything else; the
    pairs OPT OUT and OPT IN as the one word OPTOUT / OPTIN, and OPT ME OUT as OPTOUT ME."""
    plain = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in plain if not unicodedata.combining(c)).upper()
    words: list[str] = []
    for word in _NOT_WORD.split(plain):
        if word in ("OUT", "IN") and words and words[-1] == "OPT":
            words[-1] = "OPT" + word  # OPTOUT, OPTIN
        elif word == "OUT" and words[-2:] == ["OPT", "ME"]:
            words[-2:] = ["OPTOUT", "ME"]
        elif word:
            words.append(word)
    return words


def _sure_at(words: list[str], i: int) -> bool:
    """Whether words[i] is a sure stop word where it stands (BAJA only in its stop uses)."""
    word = words[i]
    if word not in SURE_STOP_WORDS:
        return False
    if word != "BAJA":
        return True
    # First only before a courtesy word or nothing ("Baja ya", "Baja de los mensajes"):
    # "Baja la fiebre" / "¿Baja la hinchazón?" say the fever or the swelling goes down.
    first = i == 0 and (len(words) == 1 or words[1] in FILLER_WORDS)
    return first or (i > 0 and words[i - 1] == "DE") or all(
        w in STOP_WORDS or w in FILLER_WORDS for w in words)


def is_opt_out(words: list[str], question: bool = False) -> bool:
    """Whether the folded text asks to stop (rules a-d of the module docstring)."""
    if not words:
        return False
    stops = [i for i, w in enumerate(words) if w in STOP_WORDS]
    if not stops:
        return False
    if all(w in STOP_WORDS or w in FILLER_WORDS or w in _AND for w in words):
        return True  # (a), "and" among the courtesy words ("Stop please and thank you")
    sure = [i for i in stops if _sure_at(words, i)]
    if not sure:
        return False
    # A short text naming a product is one only with the texts and nothing else ("Retinol
    # texts: STOP"), not "Stop retinol, message received" (the reminder acknowledged).
    if len(words) <= SHORT_WORDS and not question and (
            not CARE_WORDS.intersection(words) or (MESSAGING_WORDS.intersection(words) and all(
                w in STOP_WORDS or w in _BETWEEN or w in CARE_WORDS for w in words))):
        return True  # (b), (c): a question ("Stop the cream?") is (a) or (d), or no stop
    for i in sure:  # (d); (b) and (c) of a text naming a product
        named = False
        for j, word in enumerate(words[i + 1:], start=i + 1):
            if word in MESSAGING_WORDS:
                # Past a product, the texts must end it ("Stop tretinoin texts please"):
                # "Ok stop retinol, message received" acknowledges the pause reminder.
                if not named or all(w in FILLER_WORDS for w in words[j + 1:]):
                    return True
                break
            if word in CARE_WORDS:
                named = True
            elif word not in _BETWEEN:
                break
    return False


# Rule (e): natural-language opt-outs, as regular expressions over the folded words joined
# by single spaces ("Don't text me!" -> "DON T TEXT ME"); {msg} is any MESSAGING_WORDS word.
# A messaging word, perhaps just after a product the reminders name ("No more retinol
# reminders", as "Stop tretinoin texts" is one; Spanish names it after: "de retinol").
_MSG = ("(?:(?:" + "|".join(sorted(CARE_WORDS)) + ") )?(?:" + "|".join(sorted(MESSAGING_WORDS))
        + ")")
_NOT = "(?:DON T|DONT|DO NOT|NEVER|NO LONGER)"
# The end of the text, perhaps after courtesy words ("Remove me please").
_END = "(?:(?: (?:PLEASE|PLS|PLZ|NOW|THANKS|THANK YOU|THX|POR FAVOR|GRACIAS|YA))*$)"
_SMALL = ("(?:(?:ANY|MORE|OF|YOUR|THESE|THOSE|THE|THIS|YA|LOS|LAS|ESTOS|ESTAS|ESOS|ESAS|SUS|"
          "TUS|MAS|DE) )*")
OPT_OUT_PHRASES = tuple(re.compile(  # whole words only: a space or an end on either side
    "(?<![^ ])(?:" + p.replace("{msg}", _MSG).replace("{not}", _NOT).replace("{small}", _SMALL)
    .replace("{end}", _END) + ")(?![^ ])") for p in (
    # en
    r"NO MORE {small}{msg}",
    r"{not} (?:TEXT|MESSAGE|SMS|CONTACT) ME",
    # not "want the texts to stop"
    r"{not} (?:SEND(?: ME)?|WANT|NEED|WISH) (?:TO (?:RECEIVE|GET) )?{small}{msg}(?! TO)",
    # "No texts (please)" as the whole text: not "No texts after 8pm please", nor "No
    # message" (none came?)
    r"NO (?:TEXTS|MESSAGES|SMS|REMINDERS|NOTIFICATIONS|MENSAJES|RECORDATORIOS|AVISOS"
    r"|NOTIFICACIONES)(?={end})",
    r"{not} WANT YOU TO (?:TEXT|MESSAGE|SMS|CONTACT|SEND) ME",
    r"(?:CANCEL|END) (?:MY |THE |THIS )?SUBSCRIPTION",
    # the keyword with other uses, naming the texts as the patient's or "the" texts: "Cancel
    # all texts" is rule (a); "cancel my reminder for Friday" (one, about the visit) is not
    r"(?:CANCEL|END|QUIT) (?:MY|THE) (?:TEXT |SMS )?{msg}(?={end})",
    r"(?:REMOVE|TAKE) (?:ME|THIS NUMBER) (?:OFF|FROM|OFF OF) (?:YOUR|THE|THIS|THAT) "
    r"(?:(?:TEXT|TEXTING|SMS|MAILING|CONTACT|MESSAGING) )?LIST",
    r"(?:REMOVE|DELETE|LOSE) (?:MY|THIS) (?:PHONE |MOBILE |CELL )?NUMBER",
    r"LEAVE ME ALONE",
    # "remove me", "do not contact (this number)" as the whole request: not "remove me
    # from the waiting list", "don't contact me about the photos" is the phrase above
    r"(?:REMOVE ME|{not} CONTACT(?: THIS NUMBER)?)(?={end})",
    # consent revoked (FCC 24-18), to the messages or as a whole: not "withdraw consent
    # for the procedure"
    r"(?:REVOKE|WITHDRAW|REVOKING|WITHDRAWING) (?:MY |ALL |THE |YOUR )?CONSENT"
    r"(?: (?:TO|FOR) (?:(?:RECEIVE|RECEIVING|GET|GETTING) )?{small}{msg})?(?={end})",
    # es
    r"NO (?:(?:QUIERO|DESEO) (?:RECIBIR )?)?MAS {small}{msg}",
    r"NO (?:QUIERO|DESEO) (?:RECIBIR )?{small}{msg}",  # ({small} holds MAS, ESTOS ...)
    r"NO (?:(?:QUIERO|DESEO) QUE )?ME (?:ENVIEN|ENVIES|MANDEN|MANDES|ESCRIBAN|ESCRIBAS)"
    r"(?= MAS| {small}{msg}|$)",
    r"NO (?:ENVIEN|ENVIES|MANDEN|MANDES|ENVIAR|MANDAR) {small}{msg}",
    r"(?:DEJEN|DEJA|DEJAD|PAREN|PARA|PARAD|PARE) DE (?:ENVIARME|MANDARME|ESCRIBIRME)",
    r"(?:BORRENME|BORRAME|QUITENME|QUITAME|SAQUENME|SACAME|SACARME|BORRARME|QUITARME"
    r"|ELIMINENME|ELIMINAME|ELIMINARME) DE (?:LA|SU|TU|VUESTRA) LISTA",
    r"(?:BORREN|BORRA|BORRAR|ELIMINEN|ELIMINA|ELIMINAR|QUITEN|QUITA|QUITAR) MI "
    r"(?:NUMERO|TELEFONO|MOVIL|CELULAR)",
    r"(?:CANCELAR|ANULAR) (?:MI |LA |ESTA )?SUSCRIPCION",
    r"(?:CANCELAR|PARAR|DETENER) (?:MIS|TUS|SUS) {msg}(?={end})",
    r"DEJENME EN PAZ",
    r"BASTA (?:YA )?DE {small}{msg}",
    r"NADA (?:MAS )?DE {small}{msg}(?={end})",
    r"(?:REVOCO|RETIRO|REVOCAR|RETIRAR) (?:MI |EL )?CONSENTIMIENTO"
    r"(?: (?:PARA|DE) (?:RECIBIR )?{small}{msg})?(?={end})",
))
# What may come before a phrase: courtesy words and the words of a request ("Can you
# please", "I would like you to", "Por favor, ya").
REQUEST_WORDS = FILLER_WORDS | frozenset({
    "I", "D", "WE", "CAN", "COULD", "WOULD", "WILL", "JUST", "KINDLY", "SO", "LIKE", "TO",
    "WANT", "AND", "PUEDEN", "PUEDES", "PODRIAN", "QUIERO", "QUE", "Y", "PERO",
    # An assent or a "but" before the phrase ("Yes, no more texts please", "Thanks but no
    # more texts"): else the first word made it a visit confirmation, the number kept
    # getting texts and the answer did not say how to stop. (Not SI: also "if" in Spanish.)
    "YES", "YEAH", "YEP", "BUT",
    # A confirmation before it ("Confirmed, but no more texts"): stop wins, as in "C stop".
    "CONFIRM", "CONFIRMED", "CONFIRMO", "CONFIRMADO",
})

# What may follow a phrase in a question, besides courtesy words ("Could you not text me
# anymore?" is not one, "Can you remove me from your list?" is).
_AFTER = frozenset({"ANYMORE", "AGAIN", "EVER", "PORFA", "NUNCA"})


# Rule (f): a request whose verb is the keyword itself ("I would like to opt out", "Can
# you please unsubscribe me?", "Unsubscribe me from this list", "Me quiero dar de baja").
# Before the sure word, only a request's words (and Spanish "dar(me) de" before BAJA);
# after it, only "me", "from / of this list", the messages and courtesy words: "I would
# like to stop by on Friday", "Can I opt out of the peel?" name something else. STOP and
# BAJA, words with other uses, not in a question: "Can I stop?" asks about the cream.
_ASK_BEFORE = REQUEST_WORDS | frozenset({"DAR", "DARME", "DARNOS", "DARSE"})
_ASK_AFTER = _BETWEEN | frozenset({"OF", "LIST", "MAILING"})
_ASK_IN_QUESTIONS = SURE_STOP_WORDS - {"STOP", "BAJA"}


def asked_opt_out(words: list[str], question: bool = False) -> bool:
    """Whether the folded text asks, in a request, to opt out (rule f of the docstring)."""
    for i, word in enumerate(words):
        if not _sure_at(words, i) or (question and word not in _ASK_IN_QUESTIONS):
            continue
        if all(w in _ASK_BEFORE for w in words[:i]) and all(
                w in _ASK_AFTER or w in STOP_WORDS for w in words[i + 1:]):
            return True
    return False


def said_opt_out(words: list[str], question: bool = False) -> bool:
    """Whether the folded text is a natural-language opt-out (rule e of the docstring)."""
    text = " ".join(words)
    for phrase in OPT_OUT_PHRASES:
        for found in phrase.finditer(text):
            before = text[:found.start()].split()
            after = text[found.end():].split()
            # (After a keyword too: "Stop, don't text me again".)
            if all(w in REQUEST_WORDS or w in SURE_STOP_WORDS for w in before) and (
                    not question or all(w in FILLER_WORDS or w in _AFTER for w in after)):
                return True
    return False


# An assent that opens a text: "Sí" (accented), or "Si" / "C" before a comma or a stop
# ("Sí, no más mensajes", "C. No more texts"). Not "si" run on: it is also "if" ("Si no me
# mandan mensajes, llamo yo" says if they send none, the patient calls).
_ASSENT = re.compile(r"[\s\u00a1]*(?:s\u00ed\b|(?:si|c)\s*[,.;:!])", re.IGNORECASE)


# Rule (g): a sentence of a text is a sure keyword with courtesy words only, and it is the
# last ("Who is this? Stop", "I am not a patient, stop": a wrong number, mostly) or ends
# with a stop or an exclamation mark ("Stop. Who is this?", "BAJA. ¿Quién es?"); not a
# question ("Who is this? Stop?"), nor the keyword before a comma ("Stop, is it normal
# that my skin is red?"), nor a sentence ending on the word ("I don't know when to stop").
_SENTENCES = re.compile(r"[.,;:!?\u00a1\u00bf\n]+")
_SENTENCE = re.compile(r"([^.,;:!?\u00a1\u00bf\n]*)([.,;:!?\u00a1\u00bf\n]*)")


def _ends_with_a_keyword(body: str) -> bool:
    parts = [(text, end) for text, end in _SENTENCE.findall(body) if text.strip()]
    if len(parts) < 2:
        return False  # one sentence: rules a-f decided
    for n, (text, end) in enumerate(parts):
        last = n == len(parts) - 1
        if "?" in end or not (last or "." in end or "!" in end or "\n" in end):
            continue
        words = fold(text)
        if words and any(_sure_at(words, i) for i in range(len(words))) and all(
                w in SURE_STOP_WORDS or w in FILLER_WORDS for w in words):
            return True
    return False


def _opts_out(words: list[str], question: bool) -> bool:
    return (is_opt_out(words, question=question) or said_opt_out(words, question=question)
            or asked_opt_out(words, question=question))


# A keyword negated ("Please don't stop the reminders", "I never said STOP", "No quiero
# darme de baja") asks for the opposite of an opt-out: in the same sentence, a negation
# (don't, didn't, doesn't, do not, never, "no" before a Spanish verb or pronoun) up to a
# few words before it, with only such words between ("want to", "say", "quiero darme de"):
# not "Don't worry, stop", "Can't you just stop texting me", "Why won't you stop".
_NEGATION_GAP = frozenset({
    "I", "YOU", "WANT", "WANNA", "TO", "PLEASE", "EVER", "SAY", "SAID", "ASK", "ASKED",
    "REALLY", "JUST", "ME", "US", "LIKE", "NEED", "MEAN", "EVEN",
    "QUIERO", "DESEO", "QUEREMOS", "DAR", "DARME", "DARNOS", "DE", "DES", "DEN", "NOS", "QUE",
})
_NEGATION_BEFORE_T = frozenset({"DON", "DIDN", "DOESN"})  # "don't" folds to DON T
_NEGATIONS = frozenset({"DONT", "DIDNT", "DOESNT", "NOT", "NEVER", "NUNCA"})
_SPANISH_NEGATED = frozenset({"QUIERO", "DESEO", "QUEREMOS", "ME", "NOS", "DES", "DEN"})
_NEGATION_REACH = 5  # words from the negation to the keyword, at most


def _negated(words: list[str]) -> set[int]:
    """The indices of the stop words a negation in `words` (one sentence) applies to."""
    out: set[int] = set()
    for j, word in enumerate(words):
        if not (word in _NEGATIONS or (word == "T" and j and words[j - 1] in _NEGATION_BEFORE_T)
                or (word == "NO" and words[j + 1:j + 2]
                    and words[j + 1] in _SPANISH_NEGATED)):
            continue
        for i in range(j + 1, min(len(words), j + 1 + _NEGATION_REACH)):
            if words[i] in STOP_WORDS:
                out.add(i)
                break
            if words[i] not in _NEGATION_GAP:
                break
    return out


def _unnegated(body: str, words: list[str]) -> list[str]:
    """`words` with each negated stop word masked (a token no rule knows)."""
    clauses = [fold(c) for c in _SENTENCES.split(body)]
    negated: set[int] = set()
    if [w for c in clauses for w in c] == words:  # per sentence (else the whole text)
        base = 0
        for clause in clauses:
            negated |= {base + i for i in _negated(clause)}
            base += len(clause)
    else:
        negated = _negated(words)
    return [f"~{w}" if i in negated else w for i, w in enumerate(words)]


# Before a start word, besides courtesy words: an assent or an apology ("Yes, start again",
# "Oops, START"), which name nothing else.
_START_BEFORE = frozenset({"YES", "YEAH", "YEP", "SI", "SORRY", "OOPS", "PERDON"})


def _is_start(words: list[str]) -> bool:
    """Whether `words` hold a start word and nothing but courtesy words, "again", or an
    assent or an apology before it."""
    seen = False
    for word in words:
        if word in START_WORDS:
            seen = True
        elif not (word in FILLER_WORDS or word in _START_AROUND
                  or (not seen and word in _START_BEFORE)):
            return False
    return seen


# A request for the texts back in so many words ("I want the texts back", "Can I get the
# reminders back?", "Texts back on please", "Quiero volver a recibir mensajes"), after only
# a request's words, before only courtesy words: the text as a whole.
START_PHRASES = tuple(re.compile(
    "^((?:[^ ]+ )*?)(?:" + p.replace("{msg}", _MSG).replace("{small}", _SMALL) + ")((?: [^ ]+)*)$")
    for p in (
        r"(?:WANT|NEED|GET) {small}{msg} BACK(?: ON)?",
        r"{msg} BACK ON",
        r"(?:VOLVER A )?RECIBIR {small}{msg}(?: (?:DE NUEVO|OTRA VEZ))?",
    ))


def _asks_to_start(body: str, words: list[str]) -> bool:
    """The start rule: the text, or its last sentence (not a question), is a start word
    with courtesy words ("Please start", "I didn't mean to stop. START"), or the text is a
    request for the texts back (`START_PHRASES`)."""
    if _is_start(words):
        return True
    text = " ".join(words)
    for phrase in START_PHRASES:
        found = phrase.match(text)
        if found and all(w in REQUEST_WORDS or w in _START_BEFORE
                         for w in found.group(1).split()) and all(
                w in FILLER_WORDS or w in _START_AROUND for w in found.group(2).split()):
            return True
    parts = [(text, end) for text, end in _SENTENCE.findall(body) if text.strip()]
    return len(parts) > 1 and "?" not in parts[-1][1] and _is_start(fold(parts[-1][0]))


# What turns a text beginning with a confirm word into a change: a visit the patient
# cannot keep ("can't", "won't be able", "no puedo") or wants changed ("change the time",
# "another day", "late", "instead").
_CANNOT = frozenset({"CANT", "CANNOT", "WONT", "COULDNT", "UNABLE"})
_CANNOT_BEFORE_T = frozenset({"CAN", "WON", "COULDN"})  # "can't" folds to CAN T
_NOT_ABLE = frozenset({"ABLE", "COMING", "GOING", "MAKE", "ATTEND"})  # after NOT
_SPANISH_CANNOT = frozenset({"PUEDO", "PODRE", "PODEMOS", "PODREMOS", "VOY", "VAMOS",
                             "LLEGO", "LLEGARE", "VENGO", "IRE", "ASISTIRE"})  # after NO
_CHANGED = frozenset({"CHANGE", "RESCHEDULE", "MOVE", "LATE", "INSTEAD", "CAMBIAR",
                      "CAMBIO", "REPROGRAMAR", "MOVER", "TARDE"})
_OTHER = frozenset({"ANOTHER", "DIFFERENT", "OTHER", "OTRO", "OTRA"})
_WHEN = frozenset({"DAY", "TIME", "DATE", "WEEK", "DIA", "HORA", "FECHA", "SEMANA"})


def _keeps_no_visit(words: list[str]) -> bool:
    """Whether the words say the visit will not be kept as it is (see `_CANNOT`)."""
    for j, word in enumerate(words):
        after = words[j + 1] if j + 1 < len(words) else ""
        if (word in _CANNOT or word in _CHANGED
                or (word == "T" and j and words[j - 1] in _CANNOT_BEFORE_T)
                or (word == "NOT" and after in _NOT_ABLE)
                or (word == "NO" and after in _SPANISH_CANNOT)
                or (word in _OTHER and after in _WHEN)):
            return True
    return False


def classify(body: str) -> Intent:
    """Return what an inbound text asks for (see the module docstring)."""
    words = fold(body)
    if not words:
        return "unknown"
    question = "?" in body
    asked = _unnegated(body, words)
    if _opts_out(asked, question) or (
            len(asked) > 1 and _ASSENT.match(unicodedata.normalize("NFC", body))
            and _opts_out(asked[1:], question)) or _ends_with_a_keyword(body):
        return "stop"
    first = words[0]
    if _asks_to_start(body, words):
        return "start"
    # After a greeting or courtesy words too ("Hi, HELP", "Please help"): HELP is always
    # answered, and an opted-out number gets no answer to an unknown text.
    if next((w for w in words if w not in FILLER_WORDS), first) in HELP_WORDS:
        return "help"
    if CHANGE_WORDS.intersection(words) and not (
            first in RESCHEDULE_WORDS and first not in _SINGLE_LETTERS):
        return "change"
    if first in CONFIRM_WORDS:
        # "Yes I can't make it", "Si pero no puedo ir": the clinic is asked to call, as a
        # change; "Yes?" asks something: neither confirms the visit.
        if _keeps_no_visit(words):
            return "change"
        if question:
            return "unknown"
    for intent, table in (("confirm", CONFIRM_WORDS), ("reschedule", RESCHEDULE_WORDS)):
        if first in table and (first not in _SINGLE_LETTERS or len(words) == 1):
            return intent  # type: ignore[return-value]
    if STOP_WORDS.intersection(words):
        return "clarify"
    return "unknown"


def provider_opt_in(body: str) -> bool:
    """Whether the SMS provider itself opts the sender back in on this text: one of
    PROVIDER_START_WORDS alone, in any case, white space around it ("YES", " yes\n")."""
    return body.strip().upper() in PROVIDER_START_WORDS


# --- the SMS provider's signature ------------------------------------------------------

def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Return Twilio's X-Twilio-Signature for a POST of `params` to `url`."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(values)
                         for value in sorted(values[name]))
    mac = hmac.new(auth_token.encode(), data.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def _url_variants(url: str) -> list[str]:
    """`url` as given, and with the scheme's default port added or removed."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    out = [url]
    if default is None or parts.hostname is None:
        return out
    host = parts.hostname
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    elif parts.port == default:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}")))
    return out


def twilio_valid(auth_token: str, url: str, params: Iterable[tuple[str, str]],
                 signature: str | None) -> bool:
    """Return whether `signature` is Twilio's for this request (constant-time compare)."""
    if not signature or not auth_token:
        return False
    pairs = list(params)
    return any(hmac.compare_digest(twilio_signature(auth_token, u, pairs).encode(),
                                   signature.encode())
               for u in _url_variants(url))


# --- email unsubscribe token -------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


UNSUBSCRIBE_SECRET = "unsubscribe"  # the server secret's name (worker/secrets.py)


def unsubscribe_key(settings: Settings, client: redis.Redis, prefix: str, *,
                    stored: str | None = None) -> bytes:
    """Return the key that signs unsubscribe links: REMINDERS_UNSUBSCRIBE_SECRET when set,
    else the server secret "unsubscribe" shared by every process through Redis (`stored`:
    its value as already read, e.g. by the send's begin script)."""
    if settings.unsubscribe_secret is not None:
        return settings.unsubscribe_secret.get_secret_value().encode()
    from .secrets import server_secret

    return server_secret(client, prefix, UNSUBSCRIBE_SECRET, stored=stored)


def _key(secret: Secret) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def normal_contact(channel: str, contact: str) -> str:
    """The form a contact is compared in: an email address in lower case, a phone as is."""
    return contact.strip().lower() if channel == "email" else contact.strip()


def contact_hash(secret: Secret, channel: str, contact: str) -> str:
    """The keyed hash of a contact that a token names instead of the address itself."""
    mac = hmac.new(_key(secret), f"contact:{channel}:{normal_contact(channel, contact)}"
                   .encode(), hashlib.sha256)
    return _b64(mac.digest()[:16])


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token names."""

    clinic: str
    channel: Channel
    contact_hash: str


def make_token(secret: Secret, clinic: str, channel: Channel, contact: str) -> str:
    """Return the unsubscribe token of `contact` at `clinic` for `channel`."""
    payload = _b64(json.dumps({"c": clinic, "ch": channel,
                               "h": contact_hash(secret, channel, contact)},
                              separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(_key(secret), f"unsubscribe:{payload}".encode(), hashlib.sha256)
    return f"{TOKEN_VERSION}.{payload}.{_b64(mac.digest())}"


def read_token(secret: Secret, token: str) -> Unsubscribe | None:
    """Return what `token` names, or None if it is not one this secret made."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION or len(token) > 400:
        return None
    _, payload, given = parts
    mac = hmac.new(_key(secret), f"unsubscribe:{payload}".encode(), hashlib.sha256)
    if not hmac.compare_digest(_b64(mac.digest()).encode(), given.encode()):
        return None
    try:
        data = json.loads(_unb64(payload))
        clinic, channel, digest = data["c"], data["ch"], data["h"]
    except (ValueError, KeyError, TypeError):
        return None
    if channel not in ("email", "sms") or not isinstance(clinic, str) \
            or not isinstance(digest, str):
        return None
    return Unsubscribe(clinic=clinic, channel=channel, contact_hash=digest)


def token_matches(secret: Secret, named: Unsubscribe, contact: str) -> bool:
    """Return whether `contact` is the one the token names."""
    return hmac.compare_digest(contact_hash(secret, named.channel, contact).encode(),
                               named.contact_hash.encode())


def form_pairs(body: bytes) -> list[tuple[str, str]]:
    """Return an application/x-www-form-urlencoded body's (name, value) pairs, in order."""
    from urllib.parse import parse_qsl

    return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def first(pairs: Iterable[tuple[str, str]], name: str) -> str | None:
    for key, value in pairs:
        if key == name:
            return value
    return None


def as_mapping(pairs: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out
