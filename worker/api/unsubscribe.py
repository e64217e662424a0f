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
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body style="font-family:Helvetica,Arial,sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
<h1 style="font-size:1.3em">{title}</h1>
{body}
</body></html>"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=escape(title), body=body), status_code=status,
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
    name = clinic.name if clinic else "the clinic"
    done = await run_in_threadpool(svc.store.opted_out, named.clinic, named.channel, address)
    if done:
        return _page("You are unsubscribed",
                     f"<p>{escape(_masked(address))} gets no more emails from "
                     f"{escape(name)} after any already on the way.</p>")
    return _page(
        f"Unsubscribe from {name}",
        f"<p>Stop the appointment emails from {escape(name)} to "
        f"{escape(_masked(address))}?</p>"
        f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">Unsubscribe</button></form>'
        f"<p>Safety reminders still reach you by text message if you receive them."
        f"{f' Questions: {escape(clinic.phone)}.' if clinic else ''}</p>")


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
    return _page("You are unsubscribed",
                 f"<p>{escape(_masked(address))} gets no more emails from "
                 f"{escape(clinic.name if clinic else 'the clinic')} after any already on "
                 f"the way.</p>")
