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
booking at the clinic with that address, else the clinic's, else English; its words are
templates/<language>/_unsubscribe.toml (worker/words.py). A link that cannot be read is
answered in the browser's language (Accept-Language), the patient being unknown.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from .. import words
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


def _language(svc: Services, clinic_id: str, clinic: Any, address: str) -> str:
    """The page's language: the patient's latest booking's locale at the clinic (as its
    emails are written), else the clinic's, else English; one whose templates folder has
    the page's words (templates/<language>/_unsubscribe.toml)."""
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
    return words.folder_for(svc.settings.templates_dir, locales, words.UNSUBSCRIBE)


def _say(svc: Services, lang: str, key: str, **values: str) -> str:
    """The page's text `key` in `lang` (in English when that one does not load or
    format), written with those of `values` it may name; plain text, to be escaped."""
    given = {k: v for k, v in values.items() if k in words.VALUES[words.UNSUBSCRIBE][key]}
    return words.text(svc.settings.templates_dir, lang, words.UNSUBSCRIBE, key, **given)


def _page(title: str, body: str, status: int = 200, lang: str = words.FALLBACK
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


def _browser_languages(request: Request) -> list[str]:
    """The languages of the request's Accept-Language, most wanted first ("*" and those
    with q=0 left out)."""
    ranked = []
    for n, part in enumerate(request.headers.get("accept-language", "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag and tag != "*" and q > 0:
            ranked.append((-q, n, tag.strip()))
    return [tag for _, _, tag in sorted(ranked)]


def _not_valid(svc: Services, request: Request) -> HTMLResponse:
    """The page for a link this service cannot read: the patient is not known, so in the
    browser's language (Accept-Language) when templates/ has the page's words in it."""
    lang = words.folder_for(svc.settings.templates_dir, _browser_languages(request),
                            words.UNSUBSCRIBE)
    return _page(_say(svc, lang, "invalid_title"),
                 f"<p>{escape(_say(svc, lang, 'invalid'))}</p>", 404, lang=lang)


def _ask_page(svc: Services, lang: str, address: str, clinic: Any) -> HTMLResponse:
    """The page before unsubscribing: a button (GET changes nothing)."""
    values = {"clinic": clinic.name if clinic else _say(svc, lang, "the_clinic"),
              "address": _masked(address), "phone": clinic.phone if clinic else ""}
    questions = f" {escape(_say(svc, lang, 'questions', **values))}" if clinic else ""
    return _page(
        _say(svc, lang, "ask_title", **values),
        f"<p>{escape(_say(svc, lang, 'ask', **values))}</p>"
        f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">{escape(_say(svc, lang, "button"))}</button></form>'
        f"<p>{escape(_say(svc, lang, 'safety'))}{questions}</p>", lang=lang)


def _done_page(svc: Services, lang: str, address: str, clinic: Any) -> HTMLResponse:
    """The page after unsubscribing (or at a link already used)."""
    values = {"clinic": clinic.name if clinic else _say(svc, lang, "the_clinic"),
              "address": _masked(address)}
    return _page(_say(svc, lang, "done_title", **values),
                 f"<p>{escape(_say(svc, lang, 'done', **values))}</p>", lang=lang)


_HTML = {"text/html": {"schema": {"type": "string"}}}
_NOT_VALID: dict[int | str, dict[str, Any]] = {
    404: {"content": _HTML, "description": "not a valid link (a page saying so)"},
    503: {"model": ErrorBody, "description": "Redis is unreachable; see Retry-After"},
}


@router.get("/v1/unsubscribe/{token}", summary="The unsubscribe page (a button; GET changes "
            "nothing)", response_class=HTMLResponse, responses=_NOT_VALID)
async def unsubscribe_page(token: str, request: Request, svc: Svc) -> HTMLResponse:
    found = await run_in_threadpool(_resolve, svc, token)
    if found is None:
        return await run_in_threadpool(_not_valid, svc, request)
    named, address = found
    clinic = svc.catalog.clinics.get(named.clinic)

    def page() -> HTMLResponse:
        lang = _language(svc, named.clinic, clinic, address)
        if svc.store.opted_out(named.clinic, named.channel, address):
            return _done_page(svc, lang, address, clinic)
        return _ask_page(svc, lang, address, clinic)

    return await run_in_threadpool(page)


@router.post("/v1/unsubscribe/{token}", summary="Unsubscribe (RFC 8058 one-click)",
             response_class=HTMLResponse, responses=_NOT_VALID)
async def unsubscribe(token: str, request: Request, svc: Svc) -> HTMLResponse:
    found = await run_in_threadpool(_resolve, svc, token)
    if found is None:
        return await run_in_threadpool(_not_valid, svc, request)
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
        # The patient's bookings at the clinic capped again as re-submitted now (after a
        # visit, its steps still ahead): an SMS the cap sent by email instead goes by SMS
        # where there is room, or says why not (`Store.recap`); again at a click again,
        # should the first have stopped midway.
        if not svc.store.opted_out(named.clinic, named.channel, address):
            done = svc.store.opt_out(named.clinic, named.channel, address,
                                     f"the patient unsubscribed from email at {stamp}",
                                     critical=svc.catalog.critical_steps,
                                     replan=svc.catalog.replan)
        elif named.channel == "email":
            svc.store.recap(named.clinic, address, svc.catalog.replan)
        # The clinic is told once (patient.replied "unsubscribe", channel "email"), also by
        # a click again when the first could not tell it (worker/webhooks.py).
        if clinic is not None:  # else kept as not told yet (P:ev:consent "0")
            tell_consent(svc.store, named.clinic, named.channel, address, now,
                         hooks=hooks_of(clinic))
        return done

    skipped, touched = await run_in_threadpool(act)
    log.info("unsubscribe for clinic %s: %s opted out (%d reminder(s) skipped in %d "
             "booking(s))", named.clinic, named.channel, skipped, len(touched))

    def page() -> HTMLResponse:
        return _done_page(svc, _language(svc, named.clinic, clinic, address), address, clinic)

    return await run_in_threadpool(page)
