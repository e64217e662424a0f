"""Texts from patients: `POST /v1/inbound/sms/{clinic}`, the SMS provider's inbound webhook.

No API key: Twilio calls it. Its `X-Twilio-Signature` is checked with the clinic's auth
token (`[inbound] twilio_auth_token` in the clinic's config) over the public URL
(REMINDERS_PUBLIC_URL + the path: behind a proxy the API sees another); a request without
a valid one is refused (403). A clinic without a token refuses every request unless its
config says `allow_unsigned = true` (development only). An unknown clinic id gets the
very same 403 (status and body) as a bad signature: the route does not tell which clinic
ids exist.

What a text asks for is decided by worker/optout.py `classify` (keywords in English and
Spanish), unless the provider says it blocked or unblocked the number on it (Twilio's
`OptOutType` STOP or START, sent with Advanced Opt-Out's own keywords: `intent_of`), and the
answer goes back as TwiML in the response, so the provider sends it:

  stop        a keyword or a natural-language opt-out ("No more texts", "don't text me",
              "no más mensajes": worker/optout.py rule e), all alike:
              the number is opted out of SMS from this clinic at once: every reminder by SMS
              still to be sent, in every booking of that number at the clinic, is skipped
              with the reason, and the send-time check refuses any other (worker/store.py).
              One confirmation reply, then nothing else.
              The clinic is told: `patient.replied` (reply "stop") on each of the number's
              bookings, once per change (worker/webhooks.py `tell_consent`), also when no
              SMS was left to skip, and by a STOP sent again if the first could not tell it.
  start       opted in again: the SMS reminders the opt-out skipped whose time is still
              ahead go back into the schedule at their planned time, where the SMS cap has
              room (worker/store.py `opt_in`); those whose time passed are not sent late
              (but a move's or cancel's notice, meant for any time before it expires).
              The clinic is told as of STOP (reply "start"), once per change. Answered
              only if the number is still opted in then: a STOP that landed meanwhile
              (and answered its confirmation) leaves START unanswered.
  help        the clinic's name, phone, and how to stop (answered even when opted out).
  confirm     the number's next visit is confirmed: `confirmed_at` on its timeline and a
              `patient.replied` event (reply "confirm"). "YES" alone from an opted-out
              number is a start instead: Twilio's STOP filtering opts the number in on
              START, YES and UNSTOP and tells the patient so (worker/optout.py
              `provider_opt_in`).
  reschedule  the clinic is asked to call: `call_requested_at` on the timeline, a
              `patient.replied` event (reply "reschedule") and an email to the clinic.
  change      "cancel" or "cambiar" in a sentence ("Can I cancel Tuesday?"): as reschedule,
              and the answer also says how to stop texts. Without a visit: as clarify.
  clarify     a stop word in a text that is not an opt-out ("see you at the end of the
              week"): the clarifying answer (reply STOP to stop texts; call the clinic to
              change a visit), sharing unknown's one answer a day.
  unknown     one help answer per number and clinic every 24 hours (a rolling 24 h, not a
              calendar day: no timezone to guess for an unknown number); else no answer.

A clinic whose file is missing from config/ as the API reads it now (deleted, or for two
looks while a deploy rewrites config/) is served with its configuration as last loaded by
this process (worker/catalog.py `former`): its token checks the signature, and a STOP is
taken and confirmed as always; any other text is not acted on (no answer: nothing is
planned or sent for it). A process started while the file was missing refuses (403).

An opted-out number gets no answer but to HELP and START (a confirm or reschedule is still
recorded). Events carry ids and the kind of reply only: never the text or the number.

Each text is acted on once, by its `MessageSid`: the signature has no timestamp, so a
signed request sent again as it is (captured and replayed, or retried by the provider)
would otherwise act again, and an old START replayed after the patient's later STOP would
put their texts back. The same MessageSid again is answered with no message and changes
nothing. A text's MessageSid is kept `retention` (REMINDERS_RETENTION_DAYS), but a STOP's,
START's, confirm's or reschedule's with no expiry (what it changes is found when it comes:
the opt-out, which has no expiry; the number's next visit): in the number's own record of
its last 100 such texts (worker/store.py `took_inbound`), so an old START replayed after a
later STOP never opts the patient back in, however late, nor an old "C" confirms a later
visit. An old
STOP replayed after a later START does not opt them out either: a replay is not the
patient's word (a new STOP has a MessageSid of its own and always acts), and it would stop
the care reminders the patient asked to get back. A request whose handling failed (Redis
down or refusing writes: 503) is acted on when the provider sends it again.
"""

from __future__ import annotations

import functools
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_skeleton, format_time
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from .. import words
from ..clinics import Clinic
from ..errors import ConfigError
from ..models import parse_e164
from ..optout import (
    SIGNATURE_HEADER,
    classify,
    first,
    form_pairs,
    provider_opt_in,
    twilio_valid,
)
from ..rendering import Renderer
from ..sms import fold_to_gsm7
from ..status import Status
from ..webhooks import consent_told, hooks_of, tell_consent
from .errors import ApiError
from .schemas import ErrorBody
from .services import Services, Svc

log = logging.getLogger(__name__)
router = APIRouter(tags=["patients"])
MAX_BODY_BYTES = 16_384
UNKNOWN_REPLY_SECONDS = 86_400  # one help answer per number and clinic in this time
_SID = re.compile(r"[A-Za-z0-9]{2,64}")  # Twilio's: "SM" + 32 hex digits
# The texts whose MessageSid is kept with no expiry (`handle_once`): each acts on the
# number's state as found when it comes, so one sent again however late would act again.
KEPT_FOR_GOOD = ("stop", "start", "confirm", "reschedule", "change")
# The SMS provider's own verdict on a text, when it sends one (Twilio's `OptOutType`, with
# Advanced Opt-Out on a Messaging Service: a keyword of the clinic's own, "FIN", "SI"): it
# blocked the number (STOP) or unblocked it (START). Followed over `classify`, so the
# opt-out kept here is the provider's: else every SMS to a number it blocks fails (its
# error 21610), or a number it told "you are re-subscribed" gets nothing. (HELP: the text
# is read as ever, and HELP words are answered alike.)
PROVIDER_INTENTS = ("stop", "start")
FORM = "application/x-www-form-urlencoded"
TWIML = "application/xml"


def twiml(message: str | None) -> Response:
    """The TwiML answer: one message back to the sender, or none."""
    body = (f"<Response><Message>{escape(message)}</Message></Response>" if message
            else "<Response/>")
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>{body}', media_type=TWIML)


def _reply_folder(templates_dir: Path, locale: str) -> str:
    """The language the answers are written in: the patient's if it has replies, else en."""
    return words.folder_for(templates_dir, (locale,), words.REPLIES)


@functools.lru_cache(maxsize=8)
def _renderer(templates_dir: Path) -> Renderer:
    """The renderer whose message variants the answers' dates follow (one per folder)."""
    return Renderer(templates_dir)


def date_locale(templates_dir: Path, locale: str, clinic: Clinic) -> Locale:
    """The Babel locale an answer writes the visit's date and time in: the variant the
    patient's reminders are written in (rendering.Renderer.variant: the patient's locale
    region, else the clinic's, else the territory of its timezone: "5 Dec, 14:30" for an
    English patient of a Madrid clinic, as every reminder says it), when the answer is in
    that language; else the patient's locale, else its language's (a tag a booking takes
    because its language has templates, but Babel does not know: "es-LA", "en-EU"), in
    the answer's own language."""
    folder = _reply_folder(templates_dir, locale)
    variant = _renderer(templates_dir).variant(locale, clinic)
    if variant.locale.language == folder:
        return variant.locale
    mine = locale.split("-")[0].split("_")[0] == folder
    for name in ((locale.replace("-", "_"), folder) if mine else (folder,)):
        try:
            return Locale.parse(name)
        except (UnknownLocaleError, ValueError):
            continue
    return Locale.parse("en")


def reply_text(templates_dir: Path, locale: str, what: str, clinic: Clinic, **values: str) -> str:
    """Return the answer `what` in the patient's language (else English), in GSM-7, naming
    the clinic as its SMS do (`sms_name`, else its name). An answer missing or broken in
    that language after `reminders check` read it is given in English (`words.text`): a
    STOP's confirmation is the one message an opted-out number is owed."""
    text = words.text(templates_dir, _reply_folder(templates_dir, locale), words.REPLIES,
                      what, clinic=clinic.sms_label, phone=clinic.phone, **values)
    return fold_to_gsm7(" ".join(text.split()))


def check_signature(request: Request, svc: Services, clinic: Clinic,
                    pairs: list[tuple[str, str]]) -> None:
    """Refuse (403) a request the clinic's auth token did not sign, unless unsigned
    requests are allowed for this clinic (development)."""
    try:
        token = clinic.inbound.auth_token(clinic.id)
    except ConfigError as exc:
        log.error("inbound SMS for clinic %s refused: %s", clinic.id, exc.problem)
        raise ApiError(503, "inbound SMS is not available: the clinic's auth token is not set",
                       headers={"Retry-After": "60"}) from None
    if token is None:
        if clinic.inbound.allow_unsigned:
            return
        log.warning("inbound SMS for clinic %s refused: the clinic has no [inbound] "
                    "twilio_auth_token", clinic.id)
        raise refused()
    url = svc.settings.public_base_url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    if not twilio_valid(token, url, pairs, request.headers.get(SIGNATURE_HEADER)):
        raise refused()


def refused() -> ApiError:
    """The one refusal of a request not signed for a clinic that takes texts: the same for
    a bad signature, a clinic without inbound texts and a clinic that does not exist, so
    the route tells nobody which clinic ids exist."""
    return ApiError(403, f"missing or invalid {SIGNATURE_HEADER}",
                    fields=[(SIGNATURE_HEADER, "does not sign this request with the "
                                               "clinic's auth token")])


def _next_visit(svc: Services, clinic: Clinic, phone: str) -> tuple[str | None, dict[str, Any]]:
    """Return the number's next visit at the clinic (booking id, document) and, either
    way, the latest document (for the patient's language)."""
    store = svc.store
    ids = store.contact_bookings(clinic.id, "sms", phone)
    summaries = [s for s in store.booking_summaries(clinic.id, ids) if s]
    now = datetime.now(UTC)
    upcoming = [s for s in summaries
                if s["status"] in (Status.SCHEDULED, Status.HELD)
                and datetime.fromisoformat(s["starts_at"]) > now]
    upcoming.sort(key=lambda s: datetime.fromisoformat(s["starts_at"]))
    chosen = upcoming[0]["booking_id"] if upcoming else None
    latest = chosen or (max(summaries, key=lambda s: s.get("updated_at") or "")["booking_id"]
                        if summaries else None)
    doc = store.booking_doc(clinic.id, latest) if latest else {}
    return chosen, doc


def intent_of(body: str, provider: str | None = None) -> str:
    """What a text asks for: `provider` (the SMS provider's OptOutType: STOP or START, the
    number blocked or unblocked by it) when it says, else `classify`."""
    said = (provider or "").strip().lower()
    return said if said in PROVIDER_INTENTS else classify(body)


def handle(svc: Services, clinic: Clinic, phone: str, body: str,
           provider: str | None = None) -> tuple[str, str | None]:
    """Act on one text; return (what it asked for, the answer or None). `provider`: the
    provider's OptOutType, if it sent one (`intent_of`)."""
    store = svc.store
    intent = intent_of(body, provider)
    now = datetime.now(UTC)
    stamp = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    booking_id, doc = _next_visit(svc, clinic, phone)
    patient = doc.get("patient") or {}
    locale = str(patient.get("locale") or clinic.locale)
    templates = svc.settings.templates_dir

    def answer(what: str, **values: str) -> str:
        return reply_text(templates, locale, what, clinic, **values)

    opted_out = store.opted_out(clinic.id, "sms", phone) is not None
    if opted_out and intent == "confirm" and provider_opt_in(body):
        # "YES" alone: Twilio's own STOP filtering has just unblocked the number and told
        # the patient they are re-subscribed; a confirm here would leave every SMS skipped.
        intent = "start"
    if intent == "stop":
        # Read before the opt-out: a START that opted the number in and failed before it
        # told the clinic leaves "opted out" told, and this STOP has nothing to tell.
        told_out = consent_told(store, clinic.id, "sms", phone)
        done = store.opt_out(
            clinic.id, "sms", phone, f"the patient replied STOP by SMS at {stamp}",
            critical=svc.catalog.critical_steps)
        skipped, touched = done
        # The clinic is told (patient.replied "stop") by the STOP that changed the number's
        # consent, or by a STOP sent again when that one could not tell it (webhooks.py).
        told = tell_consent(store, clinic.id, "sms", phone, now, hooks=hooks_of(clinic))
        log.info("inbound SMS for clinic %s: opted out (%d SMS reminder(s) skipped in %d "
                 "booking(s))", clinic.id, skipped, len(touched))
        # One confirmation: only the STOP that told the opt-out, not a second one arriving
        # at the same time or later (a STOP whose request failed before it was told is
        # answered when it comes again: its first answer never reached the patient). And
        # the STOP that opted the number out again after an untold START: nothing to tell
        # the clinic (its record says opted out), but the patient is owed the answer.
        confirm = told == "stop" or (done.first and told is None and told_out)
        return intent, answer("stop") if confirm else None
    if intent == "start":
        back = store.opt_in(clinic.id, "sms", phone, caps=clinic.sms,
                            why=f"the patient replied START by SMS at {stamp}",
                            critical=svc.catalog.critical_steps)
        tell_consent(store, clinic.id, "sms", phone, now, hooks=hooks_of(clinic))
        log.info("inbound SMS for clinic %s: opted in again (%d SMS reminder(s) resumed)",
                 clinic.id, back.resumed)
        if back.resumed:  # due as planned, maybe at once: the pump runs now (worker/nudge.py)
            svc.nudge.ask()
        if store.opted_out(clinic.id, "sms", phone) is not None:
            # A STOP landed while this START was at work and opted the number out again;
            # it answered its own confirmation. "Texts are back on" after it would be the
            # patient's last word from us, and wrong: nothing (one confirmation, no more).
            log.info("inbound SMS for clinic %s: START overtaken by a STOP: not answered",
                     clinic.id)
            return intent, None
        return intent, answer("start")
    if intent == "help":
        return intent, answer("help")
    # The key names the number by its contact id: no phone number in a key name.
    once = f"help:{clinic.id}:{store.contact_id('phone', phone)}"
    if intent == "change" and booking_id is None:
        intent = "clarify"  # no visit to change: how to stop, and the clinic's phone
    if intent in ("confirm", "reschedule", "change"):
        if booking_id is None:
            return intent, None if opted_out else answer("no_visit")
        field = "confirmed_at" if intent == "confirm" else "call_requested_at"
        # A confirmation is of the visit as read here (the answer names its date).
        noted = store.note_reply(clinic.id, booking_id, field, now,
                                 "confirm" if intent == "confirm" else "reschedule",
                                 starts_at=str(doc["starts_at"]) if intent == "confirm" else None)
        log.info("inbound SMS for clinic %s: %s for booking %s", clinic.id, intent, booking_id)
        if opted_out:
            return intent, None
        if intent == "confirm" and not noted:
            # Cancelled (or gone) since it was read here: not "your visit is confirmed".
            return intent, answer("no_visit")
        if intent == "reschedule":
            return intent, answer("reschedule")
        if intent == "change":
            # A call request in a sentence ("can I cancel Tuesday?"): the clinic calls, and
            # the answer also says how to stop texts, in case that was meant.
            return intent, answer("change")
        tz = ZoneInfo(str(patient.get("timezone") or clinic.timezone))
        start = datetime.fromisoformat(str(doc["starts_at"])).astimezone(tz)
        babel_locale = date_locale(templates, locale, clinic)
        return intent, answer(
            "confirm", date=format_skeleton("MMMd", start.date(), locale=babel_locale),
            time=format_time(start, "short", tzinfo=tz, locale=babel_locale))
    # unknown, clarify: one help-style answer per number and clinic a day, between them.
    if opted_out or not store.first_in(once, UNKNOWN_REPLY_SECONDS):
        return intent, None
    return intent, answer("clarify" if intent == "clarify" else "help")


def handle_once(svc: Services, clinic: Clinic, phone: str, body: str, sid: str | None,
                provider: str | None = None) -> tuple[str, str | None]:
    """`handle` the text unless its MessageSid `sid` was acted on before (a replay or a
    retry: ("replayed", None)). A text without a usable sid is handled as it comes.

    Noted once acted on, not taken before: a text whose handling failed (Redis refusing
    writes half-way: 503) must be acted on when the provider sends it again, and a mark
    written first could not always be taken back then. Two copies at the very same moment
    may both act, as any two texts at once do."""
    if sid is None or not _SID.fullmatch(sid):
        return handle(svc, clinic, phone, body, provider)
    store = svc.store
    # A text that acts on the number's state as found when it comes (STOP, START, confirm,
    # reschedule) is kept with no expiry, in the number's own record: an old START sent
    # again after the patient's later STOP, however much later, must not opt them back in,
    # nor an old STOP opt out a patient who said START since, nor an old "C" confirm a
    # later visit (worker/store.py `took_inbound`).
    number = phone if intent_of(body, provider) in KEPT_FOR_GOOD else None
    if store.inbound_taken(clinic.id, sid, number):
        log.info("inbound SMS for clinic %s: a text already acted on (the same MessageSid "
                 "again): not acted on again", clinic.id)
        return "replayed", None
    done = handle(svc, clinic, phone, body, provider)
    store.took_inbound(clinic.id, sid, number)
    return done


_REFUSALS = {
    403: "missing or invalid X-Twilio-Signature (also for a clinic that takes no inbound "
         "texts, or that does not exist: the same answer)",
    413: "the body is too large",
    415: "the body is not application/x-www-form-urlencoded",
    422: "From is missing or not a phone number",
    503: "Redis is unreachable or refuses writes, or the clinic's auth token is not set; "
         "see Retry-After",
}
_FORM_FIELDS = {name: {"type": "string"} for name in (
    "MessageSid", "AccountSid", "From", "To", "Body", "NumMedia", "NumSegments",
    "OptOutType")}


@router.post(
    "/v1/inbound/sms/{clinic}",
    summary="The SMS provider's inbound webhook (Twilio): STOP, START, HELP, C, R",
    response_class=Response,
    responses={200: {"content": {TWIML: {"schema": {"type": "string"}}},
                     "description": "TwiML: the answer to send back, if any"},
               **{status: {"model": ErrorBody, "description": why}
                  for status, why in _REFUSALS.items()}},
    openapi_extra={"requestBody": {"required": True, "content": {FORM: {"schema": {
        "type": "object", "properties": _FORM_FIELDS, "required": ["From"]}}}}},
)
async def inbound_sms(clinic: str, request: Request, svc: Svc) -> Response:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != FORM:
        raise ApiError(415, f"the body must be {FORM} (Twilio's form fields)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    pairs = form_pairs(raw)
    config = svc.catalog.clinics.get(clinic)
    gone = config is None
    if config is None:
        # Its file missing from config/ as read now (deleted, or a deploy rewriting it): its
        # configuration as last loaded checks the signature, and a STOP is acted on (a
        # STOP refused is lost: Twilio does not send it again). worker/catalog.py `former`.
        config = svc.catalog.former.get(clinic)
        if config is not None:
            log.warning("inbound SMS for clinic %s, whose file is not in config/ as read "
                        "now: taken with its configuration as last loaded", clinic)
    if config is None:  # answered as a bad signature: no telling which clinic ids exist
        raise refused()
    check_signature(request, svc, config, pairs)
    sender = first(pairs, "From")
    if not sender:
        raise ApiError(422, "the request has invalid parameters",
                       fields=[("From", "is required (the sender's number)")])
    try:
        phone = parse_e164(sender)
    except ValueError as exc:
        raise ApiError(422, "the request has invalid parameters",
                       fields=[("From", str(exc))]) from None
    body = first(pairs, "Body") or ""
    provider = first(pairs, "OptOutType")
    if gone and intent_of(body, provider) != "stop":
        # Nothing but a STOP is acted on for a clinic not in config/: a START would put its
        # SMS back in the schedule, a confirm record and answer for a clinic not configured.
        log.warning("inbound SMS for clinic %s, whose file is not in config/ as read now: "
                    "not a STOP, not acted on", clinic)
        return twiml(None)
    intent, message = await run_in_threadpool(handle_once, svc, config, phone, body,
                                              first(pairs, "MessageSid"), provider)
    log.debug("inbound SMS for clinic %s: %s", clinic, intent)
    return twiml(message)
