"""Email unsubscribe: `GET|POST /v1/unsubscribe/{token}` (no API key: a patient's link).

Every email carries the patient's link in its footer and in the headers
`List-Unsubscribe: <https://.../v1/unsubscribe/TOKEN>` and `List-Unsubscribe-Post:
List-Unsubscribe=One-Click` (RFC 8058). GET only shows a small page with a button: mail
scanners fetch links, and a fetch must not unsubscribe anyone. POST unsubscribes (the
button, or a mail provider's one-click POST with the body `List-Unsubscribe=One-Click`):
the address is opted out of email from that clinic at once (worker/store.py `opt_out`;
an email already past its last check, being handed to the SMTP server, still goes: the
page says "after any already on the way"),
every email still to be sent is skipped with the reason, and the send-time check refuses
any other; care-critical steps still go by SMS when the patient allows SMS. The clinic is
told (`patient.replied`, reply "unsubscribe", channel "email") once (worker/webhooks.py
`tell_consent`), also while its file is missing from config/ (with its configuration as
last loaded, `Catalog.former`, as a STOP is). Doing it again changes nothing.

The token (worker/optout.py) names the clinic, the channel and a keyed hash of the
address; the address behind the hash is what the send noted in Redis. A token this
service's secret did not make, or one whose hash no email of the clinic was sent to,
answers 404: a token cannot be made, edited or reused for another patient.

The page is in the patient's language, as the emails are: the locale of their latest
booking at the clinic with that address, else the clinic's, else English (`WORDS`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from ..optout import Unsubscribe, read_token, token_matches, unsubscribe_key
from ..webhooks import hooks_of, tell_consent
from .schemas import ErrorBody
from .services import Services, Svc

log = logging.getLogger(__name__)
router = APIRouter(tags=["patients"])

_PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body style="font-family:Helvetica,Arial,sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
<h1 style="font-size:1.3em">{title}</h1>
{body}
</body></html>"""


# The page's words per language ({clinic}, {address}, {phone} filled in, HTML-escaped).
WORDS: dict[str, dict[str, str]] = {
    "en": {
        "done_title": "You are unsubscribed",
        "done": "{address} gets no more emails from {clinic} after any already on the way.",
        "ask_title": "Unsubscribe from {clinic}",
        "ask": "Stop the appointment emails from {clinic} to {address}?",
        "button": "Unsubscribe",
        "safety": "Safety reminders still reach you by text message if you receive them.",
        "questions": " Questions: {phone}.",
        "the_clinic": "the clinic",
    },
    "es": {
        "done_title": "Te has dado de baja",
        "done": "{address} ya no recibirá correos de {clinic}, salvo los que ya estén en "
                "camino.",
        "ask_title": "Darse de baja de {clinic}",
        "ask": "¿Dejar de recibir en {address} los correos de {clinic} sobre tus citas?",
        "button": "Darme de baja",
        "safety": "Los avisos importantes para tu seguridad te seguirán llegando por SMS si "
                  "los recibes.",
        "questions": " Dudas: {phone}.",
        "the_clinic": "la clínica",
    },
}
FALLBACK_LANGUAGE = "en"


def _language(svc: Services, clinic_id: str, clinic: Any, address: str) -> str:
    """The page's language: the patient's latest booking's locale at the clinic (as its
    emails are written), else the clinic's, else English; a language `WORDS` has."""
    store = svc.store
    summaries = [s for s in store.booking_summaries(
        clinic_id, store.contact_bookings(clinic_id, "email", address)) if s]
    locales: list[str] = []
    if summaries:
        latest = max(summaries, key=lambda s: s.get("updated_at") or "")["booking_id"]
        patient = (store.booking_doc(clinic_id, latest) or {}).get("patient") or {}
        locales.append(str(patient.get("locale") or ""))
    if clinic is not None:
        locales.append(clinic.locale)
    for locale in locales:
        language = locale.replace("_", "-").split("-")[0].lower()
        if language in WORDS:
            return language
    return FALLBACK_LANGUAGE


def _page(title: str, body: str, status: int = 200, lang: str = FALLBACK_LANGUAGE
          ) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(lang=lang, title=escape(title), body=body),
                        status_code=status,
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _masked(address: str) -> str:
    """"ana@example.com" -> "a***@example.com": enough for the patient to recognise."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def _resolve(svc: Services, token: str) -> tuple[Unsubscribe, str] | None:
    """Return what the token names and the address behind it, or None if it is not valid."""
    secret = unsubscribe_key(svc.settings, svc.store.redis, svc.store.prefix)
    named = read_token(secret, token)
    if named is None:  # (the clinic's file may be missing a moment: the token still holds)
        return None
    found = svc.store.unsubscribe_address(named.clinic, named.contact_hash)
    if found is None or found[0] != named.channel:
        return None
    if not token_matches(secret, named, found[1]):
        return None
    return named, found[1]


def _not_valid() -> HTMLResponse:
    return _page("This link is not valid",
                 "<p>This unsubscribe link is not valid (it may have been cut short). "
                 "Please use the link in your latest email, or call the clinic.</p>", 404)


_HTML = {"text/html": {"schema": {"type": "string"}}}
_NOT_VALID: dict[int | str, dict[str, Any]] = {
    404: {"content": _HTML, "description": "not a valid link (a page saying so)"},
    503: {"model": ErrorBody, "description": "Redis is unreachable; see Retry-After"},
}


@router.get("/v1/unsubscribe/{token}", summary="The unsubscribe page (a button; GET changes "
            "nothing)", response_class=HTMLResponse, responses=_NOT_VALID)
async def unsubscribe_page(token: str, svc: Svc) -> HTMLResponse:
    found = await run_in_threadpool(_resolve, svc, token)
    if found is None:
        return _not_valid()
    named, address = found
    clinic = svc.catalog.clinics.get(named.clinic)
    lang = await run_in_threadpool(_language, svc, named.clinic, clinic, address)
    words = WORDS[lang]
    name = clinic.name if clinic else words["the_clinic"]
    done = await run_in_threadpool(svc.store.opted_out, named.clinic, named.channel, address)
    if done:
        return _done_page(words, lang, address, name)
    fill = {"clinic": escape(name), "address": escape(_masked(address)),
            "phone": escape(clinic.phone) if clinic else ""}
    return _page(
        words["ask_title"].format(clinic=name),
        f"<p>{words['ask'].format(**fill)}</p>"
        f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">{escape(words["button"])}</button></form>'
        f"<p>{escape(words['safety'])}"
        f"{words['questions'].format(**fill) if clinic else ''}</p>", lang=lang)


def _done_page(words: dict[str, str], lang: str, address: str, name: str) -> HTMLResponse:
    """The page after unsubscribing (or at a link already used)."""
    return _page(words["done_title"],
                 "<p>" + words["done"].format(address=escape(_masked(address)),
                                              clinic=escape(name)) + "</p>", lang=lang)


@router.post("/v1/unsubscribe/{token}", summary="Unsubscribe (RFC 8058 one-click)",
             response_class=HTMLResponse, responses=_NOT_VALID)
async def unsubscribe(token: str, request: Request, svc: Svc) -> HTMLResponse:
    found = await run_in_threadpool(_resolve, svc, token)
    if found is None:
        return _not_valid()
    named, address = found
    clinic = svc.catalog.clinics.get(named.clinic)
    if clinic is None:
        # Its file missing from config/ as read now (deleted by mistake, a deploy rewriting
        # it): the opt-out is taken all the same, and the clinic told through its
        # configuration as last loaded, as a STOP is (worker/catalog.py `former`). Not known
        # to this process either (started while the file was missing): kept as not told yet,
        # and told at a click again once the file is back.
        clinic = svc.catalog.former.get(named.clinic)
        if clinic is not None:
            log.warning("unsubscribe for clinic %s, whose file is not in config/ as read "
                        "now: the clinic told with its configuration as last loaded",
                        named.clinic)
    now = datetime.now(UTC)
    stamp = now.isoformat(timespec="seconds").replace("+00:00", "Z")

    def act() -> tuple[int, list[str]]:
        done: tuple[int, list[str]] = (0, [])
        if not svc.store.opted_out(named.clinic, named.channel, address):
            done = svc.store.opt_out(named.clinic, named.channel, address,
                                     f"the patient unsubscribed from email at {stamp}",
                                     critical=svc.catalog.critical_steps)
        # The clinic is told once (patient.replied "unsubscribe", channel "email"), also by
        # a click again when the first could not tell it (worker/webhooks.py).
        if clinic is not None:  # else kept as not told yet (P:ev:consent "0")
            tell_consent(svc.store, named.clinic, named.channel, address, now,
                         hooks=hooks_of(clinic))
        return done

    skipped, touched = await run_in_threadpool(act)
    log.info("unsubscribe for clinic %s: %s opted out (%d reminder(s) skipped in %d "
             "booking(s))", named.clinic, named.channel, skipped, len(touched))
    lang = await run_in_threadpool(_language, svc, named.clinic, clinic, address)
    words = WORDS[lang]
    return _done_page(words, lang, address, clinic.name if clinic else words["the_clinic"])
