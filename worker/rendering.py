"""Message templates: render a reminder for one channel.

Templates live in `<templates_dir>/<locale>/` as `<template>.email.subject.j2`,
`<template>.email.html.j2`, `<template>.email.txt.j2` and `<template>.sms.txt.j2`
(files starting with "_" are layouts and macros). They run in a Jinja2 sandbox with
StrictUndefined; only `.html.j2` files are autoescaped.

Variables (all dates and times in the patient's timezone, in the message's variant):
    patient_first_name      the patient's preferred name, else the first word of the name
                            (in SMS at most `SMS_NAME_MAX` characters: see `sms_name`)
    clinic_name, clinic_phone   the clinic's name (in SMS its `sms_name`, if set) and E.164
                            phone
    treatment, treatment_id     the protocol's name and id ("microneedling")
    discreet                the clinic's flag: subjects and SMS name no treatment, medication
                            or condition
    appointment_date        long date, "5 de diciembre de 2026" / "5 December 2026"
    appointment_date_short  "5 dic" / "5 Dec"
    appointment_time        short time, "14:30" / "2:30 PM"
    appointment_when        day, month and time (Babel's pattern): "5 de diciembre, 14:30" /
                            "December 5, 2:30 PM" (en-US) / "5 December, 14:30" (en-GB)
    appointment_when_full   the same with the year: "5 de diciembre de 2026, 14:30"
    days_until              calendar days from the moment of sending (the due date in previews)
                            to the appointment (0 today, 1 tomorrow, negative after)
    days_since              -days_until: 0 on the day, 1 the day after the appointment
    visit_begun             the appointment has begun at the moment of sending (the visit
                            may have taken place: a cancel then names no "resume as before")
    morning                 the moment of sending is before noon, patient-local: a message
                            planned for the morning that goes later (a backlog, a retry)
                            says "Hi", not "Good morning"
    occurrence              1-based number within a repeating step
    week                    1-based week since the appointment date (day 0-6 is week 1;
                            0 or less before the appointment)
    plan_dates              step id -> full date of that step, in plan order (may be empty);
                            in an email at booking, not a step going only by SMS to a
                            patient who texted STOP (worker/dispatch.py `_render`)
    advice                  the protocol's [advice] values (each sourced in the protocol file);
                            every one a message reads is recorded in `RenderedMessage.claims`
    region                  the variant's region ("GB", "US", "ES") or None
    number(x)               x formatted for the variant ("0.025" / "0,025")
    temperature(celsius)    "38 °C" / "100.4 °F" (US); in SMS "38C" / "100.4F" (GSM-7)
    unsubscribe_url         the patient's email unsubscribe link ("" in previews)
  Change notices (templates `rescheduled`, `cancelled`; worker/notices.py); elsewhere
  None / false:
    previous_when, previous_date_short   the appointment before a move
    paused                  the message to pause a product before the visit had gone out
    continue_until, continue_until_short after a move: the full / short date from which the
                            product is paused again (None: the pause goes on now)

The language: the patient's locale if templates exist for it or its language, else the
clinic's, else English (`FALLBACK_LOCALE`).

The variant: the patient's locale region if it has one ("en-GB"), else the clinic's locale
region when it is the same language, else the territory of the clinic's timezone (Babel),
else the bare language. It picks date formats, Fahrenheit (US) and the spelling table
`<locale>/_spelling.toml` (English templates are written in British spelling; the `[US]`
table turns them American). Only our wording is respelt: the text written in the templates,
never a value they print (a clinic's name or address, a patient's name, a protocol's
advice): "The Colour Clinic" stays "The Colour Clinic" in an American message. A template
is compiled once per spelling (see `_Respell`).

SMS: every text ends with `<locale>/_opt_out.sms.txt.j2`, is put on one line with plain
typography, and letters outside GSM-7 are folded (María -> Maria, tretinoína -> tretinoina)
unless the clinic has `sms_accents = "keep"` and the patient's first name or the clinic's
name already needs UCS-2: then the whole text keeps its accents.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.core import get_global
from babel.dates import format_date, format_skeleton, format_time, get_datetime_format
from babel.numbers import format_decimal
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from jinja2.sandbox import SandboxedEnvironment

from .clinics import Clinic
from .errors import ConfigError
from .invites import Attachment, build_invite
from .models import CHANNELS, Booking, Channel
from .notices import Invite, Notice
from .protocols import AdviceValue, Protocol
from .sms import fold_to_gsm7, is_gsm7, normalise

# The files one template needs for each channel (the planner may fall back to either).
PARTS: dict[Channel, tuple[str, ...]] = {
    "email": ("email.subject", "email.txt", "email.html"),
    "sms": ("sms.txt",),
}
TEMPLATE_FILE = re.compile(
    r"^(?P<template>[a-z0-9][a-z0-9_-]*)\.(?P<part>email\.subject|email\.txt|email\.html|sms\.txt)\.j2$"
)
# Shared pieces of a locale folder.
OPT_OUT_FILE = "_opt_out.sms.txt.j2"  # the line every SMS ends with
INVITE_FILE = "_invite.txt.j2"  # the calendar invite's summary (first line) and description
SPELLING_FILE = "_spelling.toml"  # [REGION] written word -> that region's spelling
# A loader name "en+US/x.j2" is the file "en/x.j2" with its wording in US spelling.
SPELLING_MARK = "+"
# The last fallback of a message's language (patient's -> clinic's -> this).
FALLBACK_LOCALE = "en"
NOON = 12  # patient-local hour from which a message no longer greets "Good morning"
# The longest name an SMS greets the patient by (characters): `check` proves every SMS fits
# one GSM-7 segment with names this long (worker/checking.py SAMPLE_FIRST_NAMES). A longer
# preferred name is greeted by its first word, else the name's first word, if one fits;
# else the SMS greets with no name ("Hi," / "Hola:"). Emails always use the full name.
# At a clinic that folds SMS to GSM-7 (`sms_accents = "fold"`), a name that cannot be
# folded (an emoji, Cyrillic, Greek, CJK) does not fit either: it would turn the whole
# text into UCS-2, two or three segments (DOMAIN.md "SMS cost").
SMS_NAME_MAX = 12
# Stands for "no name" while an SMS renders; removed with the separator before it.
_NO_NAME = "\ue000"
_NO_NAME_GAP = re.compile(r"[ ,]*\ue000")


def sms_name(patient: Any, gsm7: bool = False) -> str | None:
    """The name an SMS greets `patient` (a models.Patient) by, or None: no name fits
    (`SMS_NAME_MAX`; with `gsm7`, a name must also fold to GSM-7)."""
    preferred = patient.first_name
    for candidate in (preferred, preferred.split()[0], patient.name.split()[0]):
        if len(candidate) <= SMS_NAME_MAX and (
                not gsm7 or is_gsm7(fold_to_gsm7(normalise(candidate)))):
            return str(candidate)
    return None
# Territories that measure fever in Fahrenheit.
FAHRENHEIT_TERRITORIES = frozenset({"US", "PR", "GU", "VI", "AS", "MP", "UM", "BS", "BZ",
                                    "KY", "PW", "LR"})


@dataclass(frozen=True)
class RenderedMessage:
    """One message ready for a channel."""

    channel: Channel
    subject: str | None  # email only
    text: str  # email plain-text body, or the SMS text
    html: str | None  # email only
    # The protocol's advice keys the message states (its clinical claims; see --sources).
    claims: frozenset[str] = frozenset()
    attachments: tuple[Attachment, ...] = ()  # email only: the calendar invite


@dataclass(frozen=True)
class Variant:
    """The language variant of one message: its templates folder, Babel locale, region."""

    folder: str  # "en"
    locale: Locale  # en_GB: dates, times and numbers
    region: str | None  # "GB"; None for a bare language


class Advice:
    """A protocol's advice values as templates read them (`advice.makeup_free_days`).

    Every key read is recorded in `_used`; a key the protocol does not define is
    undefined (an error under StrictUndefined, unless the template asks `is defined`).
    No other attribute is visible to templates: Jinja falls back to item access.
    """

    __slots__ = ("_used", "_values")

    def __init__(self, values: Mapping[str, AdviceValue]) -> None:
        self._values = values
        self._used: set[str] = set()

    def __getitem__(self, key: str) -> AdviceValue:
        value = self._values[key]
        self._used.add(key)
        return value


# A full stop right after one that ends an abbreviation, with at most tags between them: a
# template's "{{ appointment_time }}." after "12:30 p.m." (es-US, es-MX, en-CA) or a short
# date's "30 set." (es-PE). Not an ellipsis ("...").
_DOUBLE_STOP = re.compile(r"(?<=[^.\s]\.)((?:</?[a-zA-Z][^>]*>)*)\.(?!\.)")


def one_stop(text: str) -> str:
    """Return `text` with a sentence that ends in an abbreviation ending in one full stop:
    "a las 12:30 p.m.." -> "a las 12:30 p.m.", "p.m.</strong>." -> "p.m.</strong>"."""
    return _DOUBLE_STOP.sub(r"\1", text) if ".." in text or ".<" in text else text


def washout_months(days: int) -> int:
    """An isotretinoin washout in days as the whole months a message names: 182 -> 6,
    365 -> 12; a part of a month over a tenth counts as one more (270 -> 9, 190 -> 7)."""
    return max(1, math.ceil(round(days * 12 / 365.25, 1)))


def clinic_advice(protocol: Protocol, clinic: Clinic) -> Mapping[str, AdviceValue]:
    """The protocol's advice as `clinic` gives it: a clinic's own isotretinoin washout
    (`isotretinoin_washout_days`, which the planner holds by) is the months the messages
    ask the patient about (`isotretinoin_months`)."""
    days = clinic.isotretinoin_washout_days
    if (not days or protocol.isotretinoin_washout_days is None
            or "isotretinoin_months" not in protocol.advice):
        return protocol.advice
    return {**protocol.advice, "isotretinoin_months": washout_months(days)}


# Babel's words for dates and times, cached per value: formatting is a pure function of
# its arguments and costs tens of microseconds each, and a burst of reminders shares a few
# dates and times. (lru_cache is thread-safe. A local time is keyed as its wall clock,
# its `fold` and its timezone: aware datetimes compare by their instant, which two zones
# share.)
_FORMATS_CACHED = 4096


@functools.lru_cache(maxsize=_FORMATS_CACHED)
def _date_text(day: date, width: str, locale: Locale) -> str:
    return format_date(day, width, locale=locale)


@functools.lru_cache(maxsize=_FORMATS_CACHED)
def _skeleton_text(skeleton: str, day: date, locale: Locale) -> str:
    return format_skeleton(skeleton, day, locale=locale)


@functools.lru_cache(maxsize=_FORMATS_CACHED)
def _time_text(wall: datetime, fold: int, tz: tzinfo, locale: Locale) -> str:
    """The short time of the wall clock `wall` (naive) in `tz`: "14:30" / "2:30 PM"."""
    return format_time(wall.replace(tzinfo=tz, fold=fold), "short", tzinfo=tz, locale=locale)


@functools.lru_cache(maxsize=_FORMATS_CACHED)
def _when_text(wall: datetime, fold: int, tz: tzinfo, with_year: bool, locale: Locale) -> str:
    """Day, month (and year) and time of the wall clock `wall` (naive) in `tz`."""
    local = wall.replace(tzinfo=tz, fold=fold)
    day = (format_date(local.date(), "long", locale=locale) if with_year
           else format_skeleton("MMMMd", local, locale=locale))
    return (str(get_datetime_format("long", locale=locale))
            .replace("{1}", day)
            .replace("{0}", format_time(local, "short", locale=locale)))


class LocaleFolderLoader(FileSystemLoader):
    """A FileSystemLoader where "en-GB/x.j2" falls back to "en/x.j2" when there is no
    "en-GB" folder, so a clinic or patient locale with a region shares its language's
    templates."""

    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        template = unmarked(template)
        try:
            return super().get_source(environment, template)
        except TemplateNotFound:
            folder, sep, rest = template.partition("/")
            language = language_of(folder)
            if not sep or language == folder:
                raise
            return super().get_source(environment, f"{language}/{rest}")


def language_of(locale: str) -> str:
    """Return the language part of a locale: "en-GB" -> "en"."""
    return re.split(r"[-_]", locale, maxsplit=1)[0]


def region_of(locale: str) -> str | None:
    """Return the region part of a locale in upper case: "en-gb" -> "GB"; None if none."""
    parts = re.split(r"[-_]", locale)
    return parts[-1].upper() if len(parts) > 1 and len(parts[-1]) == 2 else None


def spelt(name: str) -> tuple[str, str | None]:
    """Split a loader name's spelling mark off its folder: ("en/x.j2", "US") for
    "en+US/x.j2", (name, None) for an unmarked name."""
    folder, sep, rest = name.partition("/")
    base, mark, region = folder.partition(SPELLING_MARK)
    if not sep or not mark:
        return name, None
    return f"{base}/{rest}", region


def unmarked(name: str) -> str:
    """Return the file a loader name stands for: "en+US/x.j2" -> "en/x.j2"."""
    return spelt(name)[0]


Rules = Sequence[tuple[re.Pattern[str], str]]


def respelt(text: str, rules: Rules) -> str:
    """Return `text` with each whole-word pattern of `rules` replaced."""
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


class _Respell(Extension):
    """Respell a template's own wording when it is compiled under a marked name.

    The text written between a template's tags (Jinja's "data" tokens) of "en+US/x.j2"
    goes through the US table of en/_spelling.toml; what its expressions print at render
    time (names, addresses, advice values) never does. A template a marked one extends,
    includes or imports is loaded under the same mark (`_Templates.join_path`).
    """

    def filter_stream(self, stream: TokenStream) -> Iterator[Token]:
        name, region = spelt(stream.name or "")
        rules: Rules = ()
        if region is not None:
            rules = cast(_Templates, self.environment).spelling_rules(
                name.partition("/")[0], region)
        for token in stream:
            if rules and token.type == "data":
                yield Token(token.lineno, token.type, respelt(token.value, rules))
            else:
                yield token


def file_name(locale: str, template: str, part: str) -> str:
    """Return the loader name of one template file, e.g. "es/day-before.sms.txt.j2"."""
    return f"{locale}/{template}.{part}.j2"


def syntax_error(exc: TemplateSyntaxError, path: Path) -> ConfigError:
    """Return a Jinja syntax error as a ConfigError naming "file:line"."""
    return ConfigError(f"{exc.filename or path}:{exc.lineno}", f"syntax error: {exc.message}")


def not_utf8(exc: UnicodeDecodeError, path: Path) -> ConfigError:
    """Return a template file that is not UTF-8 as a ConfigError naming it (the file
    `path` asked for; a layout or macro file it uses is not known by name here)."""
    return ConfigError(path, f"not UTF-8 text (byte {exc.start}), or a file it uses is not")


TEMPLATE_NOT_FOUND = "template file not found"  # a ConfigError's problem
# How long a compiled template is used without looking at its file again (seconds).
TEMPLATES_RECHECK_SECONDS = 1.0


class _Templates(SandboxedEnvironment):
    """The sandbox, with its compiled templates checked against their files at most once
    every TEMPLATES_RECHECK_SECONDS rather than at every use.

    Jinja's `auto_reload` stats a template's file each time it is used, its layouts,
    includes and macro files too (each `extends` and `import` runs at render time): some
    ten files an email, about half the CPU of rendering one. Here a file edited while the
    process runs is still picked up, within a second: then every compiled template is
    dropped and compiled again from the files as they are. So is an edited spelling table
    (`_spelling.toml`, read again; the templates respelt with it compiled again).
    """

    def __init__(self, spelling_rules: Callable[[str, str], Rules],
                 spelling_changed: Callable[[], bool] = lambda: False, **options: Any) -> None:
        super().__init__(auto_reload=False, extensions=[_Respell], **options)
        self.spelling_rules = spelling_rules  # (folder, region) -> rules; see _Respell
        # Whether a spelling table read changed since (it is then read again): the
        # templates respelt with it are compiled again too.
        self.spelling_changed = spelling_changed
        self._checked_at = time.monotonic()
        self._check_lock = threading.Lock()

    def join_path(self, template: str, parent: str) -> str:
        """A template named by a respelt one ("en/_common.j2" from "en+US/x.j2") is
        respelt the same way ("en+US/_common.j2")."""
        region = spelt(parent)[1]
        folder, sep, rest = template.partition("/")
        if region is None or not sep or SPELLING_MARK in folder:
            return template
        return f"{folder}{SPELLING_MARK}{region}/{rest}"

    def get_template(self, name: str | Template, parent: str | None = None,
                     globals: Any = None) -> Template:  # noqa: A002  # Jinja's name
        self.look()
        return super().get_template(name, parent, globals)

    def look(self) -> None:
        """Look at the files again if the last look is TEMPLATES_RECHECK_SECONDS old."""
        now = time.monotonic()
        if now - self._checked_at >= TEMPLATES_RECHECK_SECONDS:
            self._recheck(now)

    def _recheck(self, now: float) -> None:
        if not self._check_lock.acquire(blocking=False):
            return  # another thread is looking
        try:
            if now - self._checked_at < TEMPLATES_RECHECK_SECONDS:
                return
            cache = self.cache
            respelt = self.spelling_changed()
            if cache is not None and (respelt or not all(t.is_up_to_date
                                                         for t in cache.values())):
                cache.clear()
            self._checked_at = time.monotonic()
        finally:
            self._check_lock.release()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """A file's (mtime, ctime, size), or None if it cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size


class Renderer:
    """Renders reminders from one templates folder."""

    def __init__(self, templates_dir: Path) -> None:
        self.templates_dir = templates_dir
        self._spelling: dict[str, dict[str, list[tuple[re.Pattern[str], str]]]] = {}
        # Each spelling table as read: its file's (mtime, ctime, size), None if absent.
        self._spelling_stamps: dict[str, tuple[int, int, int] | None] = {}
        # The folders of templates_dir the variants were worked out with (`_changed`).
        self._folders = self._folder_names()
        # (patient locale, clinic locale, clinic timezone) -> Variant (see `variant`); the
        # sender threads share it: written under the lock, read without (a dict read is
        # atomic, and a value once there never changes).
        self._variants: dict[tuple[str, str, str], Variant] = {}
        self._lock = threading.Lock()
        self.env: SandboxedEnvironment = _Templates(
            self.rules,
            self._changed,
            loader=LocaleFolderLoader(templates_dir),
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(
        self, *, template: str, channel: Channel, booking: Booking, clinic: Clinic,
        protocol: Protocol, occurrence: int, due_at: datetime,
        plan_dates: Mapping[str, datetime] | None = None, now: datetime | None = None,
        notice: Notice | None = None, invite: Invite | None = None,
        unsubscribe_url: str | None = None,
    ) -> RenderedMessage:
        """Render `template` for `channel`; raise ConfigError naming the file at fault.

        `now`: the moment of sending; words such as "tomorrow" count from it (default: due_at).
        `notice`: what a change notice says. `invite`: an email carries the calendar invite.
        `unsubscribe_url`: the patient's email unsubscribe link (the email footer shows it).
        """
        cast(_Templates, self.env).look()  # before the variant: a folder added or removed
        variant = self.variant(booking.patient.locale, clinic)
        context = self.context(booking=booking, clinic=clinic, protocol=protocol,
                               occurrence=occurrence, due_at=due_at, plan_dates=plan_dates,
                               now=now, channel=channel, notice=notice)
        context["unsubscribe_url"] = unsubscribe_url or ""
        advice: Advice = context["advice"]

        folder = self.spelt_folder(variant)

        def part(name: str) -> str:
            return self._render(file_name(folder, template, name), context)

        if channel == "sms":
            name = sms_name(booking.patient, gsm7=clinic.sms_accents == "fold")
            context["patient_first_name"] = _NO_NAME if name is None else name
            body = part("sms.txt")
            if name is None:
                body = _NO_NAME_GAP.sub("", body)
            opt_out = self._render(f"{folder}/{OPT_OUT_FILE}", context)
            text = normalise(f"{body} {opt_out}")
            names = (name or "", clinic.sms_label)
            if clinic.sms_accents == "fold" or all(is_gsm7(normalise(n)) for n in names):
                text = fold_to_gsm7(text)
            return RenderedMessage(channel="sms", subject=None, text=text, html=None,
                                   claims=frozenset(advice._used))
        # A subject is one header line: never let a template break it.
        subject = " ".join(part("email.subject").split())
        text = part("email.txt").strip() + "\n"
        html = part("email.html")
        attachments: tuple[Attachment, ...] = ()
        if invite is not None:
            words = self._render(f"{folder}/{INVITE_FILE}", context).strip().split("\n", 1)
            attachments = (build_invite(
                booking=booking, clinic=clinic, protocol=protocol,
                summary=" ".join(words[0].split()),
                description=words[1].strip() if len(words) > 1 else "",
                sequence=invite.sequence, method=invite.method, now=now or due_at),)
        return RenderedMessage(channel="email", subject=subject, text=text, html=html,
                               claims=frozenset(advice._used), attachments=attachments)

    def context(
        self, *, booking: Booking, clinic: Clinic, protocol: Protocol, occurrence: int,
        due_at: datetime, plan_dates: Mapping[str, datetime] | None = None,
        now: datetime | None = None, channel: Channel = "email", notice: Notice | None = None,
    ) -> dict[str, Any]:
        """Return the template variables (see the module docstring)."""
        tz = ZoneInfo(booking.patient.timezone)
        variant = self.variant(booking.patient.locale, clinic)
        locale = variant.locale
        start = booking.starts_at.astimezone(tz)
        days_until = (start.date() - (now or due_at).astimezone(tz).date()).days
        ordered = sorted((plan_dates or {}).items(), key=lambda item: item[1])

        def number(value: float) -> str:
            return format_decimal(value, locale=locale)

        def when(instant: datetime, with_year: bool = False) -> str:
            """Day, month and time the locale's way: "5 de diciembre, 14:30"."""
            local = instant.astimezone(tz)
            return _when_text(local.replace(tzinfo=None), local.fold, tz, with_year, locale)

        def day(instant: datetime | None, skeleton: str) -> str | None:
            if instant is None:
                return None
            return _skeleton_text(skeleton, instant.astimezone(tz).date(), locale)

        notice = notice or Notice()

        def temperature(celsius: float) -> str:
            if variant.region in FAHRENHEIT_TERRITORIES:
                value, unit = round(celsius * 9 / 5 + 32, 1), "F"
            else:
                value, unit = celsius, "C"
            # "°" is not GSM-7: an SMS writes "38C".
            return f"{number(value)}{unit}" if channel == "sms" else f"{number(value)} °{unit}"

        return {
            "patient_first_name": booking.patient.first_name,
            "clinic_name": clinic.sms_label if channel == "sms" else clinic.name,
            "clinic_phone": clinic.phone,
            "treatment": protocol.name,
            "treatment_id": protocol.id,
            "discreet": clinic.discreet,
            "appointment_date": _date_text(start.date(), "long", locale),
            "appointment_date_short": _skeleton_text("MMMd", start.date(), locale),
            "appointment_time": _time_text(start.replace(tzinfo=None), start.fold, tz, locale),
            "appointment_when": when(start),
            "appointment_when_full": when(start, with_year=True),
            "previous_when": when(notice.previous_start) if notice.previous_start else None,
            "previous_date_short": day(notice.previous_start, "MMMd"),
            "paused": notice.paused,
            "continue_until": (_date_text(notice.pause_from.astimezone(tz).date(), "full",
                                          locale) if notice.pause_from else None),
            "continue_until_short": day(notice.pause_from, "MMMd"),
            "days_until": days_until,
            "days_since": -days_until,
            "visit_begun": (now or due_at) >= booking.starts_at,
            "morning": (now or due_at).astimezone(tz).hour < NOON,
            "occurrence": occurrence,
            "week": -days_until // 7 + 1,
            "plan_dates": {
                step: _date_text(when.astimezone(tz).date(), "full", locale)
                for step, when in ordered
            },
            "advice": Advice(clinic_advice(protocol, clinic)),
            "region": variant.region,
            "number": number,
            "temperature": temperature,
        }

    def variant(self, patient_locale: str, clinic: Clinic) -> Variant:
        """Return the variant a message to this patient from this clinic is written in
        (see the module docstring). Worked out once per patient locale and clinic locale
        and timezone, until a folder is added to or removed from templates/ (`_changed`)."""
        key = (patient_locale, clinic.locale, clinic.timezone)
        found = self._variants.get(key)
        if found is None:
            found = self._variant(patient_locale, clinic)
            with self._lock:
                self._variants[key] = found
        return found

    def _variant(self, patient_locale: str, clinic: Clinic) -> Variant:
        locale = self.fallback(patient_locale, clinic)
        language = language_of(locale)
        folder = locale if (self.templates_dir / locale).is_dir() else language
        region = region_of(locale)
        if region is None and language_of(clinic.locale) == language:
            region = region_of(clinic.locale)
        if region is None:
            territories: Mapping[str, str] = get_global("zone_territories")
            region = territories.get(clinic.timezone)
        if region is not None:
            try:
                return Variant(folder, Locale.parse(f"{language}_{region}"), region)
            except (UnknownLocaleError, ValueError):
                pass
        return Variant(folder, self.locale(folder), None)

    def fallback(self, patient_locale: str, clinic: Clinic) -> str:
        """Return the locale a message is written in: the patient's if there are templates
        for it (or its language), else the clinic's, else English."""
        for locale in (patient_locale, clinic.locale, FALLBACK_LOCALE):
            if self.has_folder(locale):
                return locale
        return FALLBACK_LOCALE

    def has_folder(self, locale: str) -> bool:
        """Return whether `locale` or its language has a templates folder."""
        return any((self.templates_dir / name).is_dir()
                   for name in (locale, language_of(locale)) if name and "/" not in name
                   and not name.startswith((".", "_")))

    def spelt_folder(self, variant: Variant) -> str:
        """Return the loader folder of the variant's templates: "en+US" when the folder's
        spelling table has rules for the variant's region (its wording is respelt), else
        the folder itself."""
        if variant.region is None or not self.rules(variant.folder, variant.region):
            return variant.folder
        return f"{variant.folder}{SPELLING_MARK}{variant.region}"

    def rules(self, folder: str, region: str) -> Rules:
        """Return the spelling rules of `region` in `folder`'s table (none: empty)."""
        return self.spelling(folder).get(region, [])

    def spelling(self, folder: str) -> dict[str, list[tuple[re.Pattern[str], str]]]:
        """Return {region: [(whole-word pattern, replacement)]} from a folder's spelling
        table, longest words first; each word also matches with a capital first letter."""
        if folder not in self._spelling:
            path = self.templates_dir / folder / SPELLING_FILE
            stamp = _file_stamp(path)  # before reading: an edit meanwhile is read again
            try:
                table = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(path, str(exc)) from None
            rules: dict[str, list[tuple[re.Pattern[str], str]]] = {}
            for region, words in table.items():
                if not isinstance(words, dict) or not all(
                        isinstance(v, str) for v in words.values()):
                    raise ConfigError(path, f"[{region}] must map words to their spelling")
                pairs = sorted(words.items(), key=lambda kv: -len(kv[0]))
                rules[region] = [
                    (re.compile(rf"\b{re.escape(w[:1].upper() + w[1:])}\b"),
                     r[:1].upper() + r[1:])
                    for w, r in pairs] + [
                    (re.compile(rf"\b{re.escape(w)}\b"), r) for w, r in pairs]
            self._spelling_stamps[folder] = stamp
            self._spelling[folder] = rules
        return self._spelling[folder]

    def _folder_names(self) -> frozenset[str]:
        try:
            return frozenset(p.name for p in self.templates_dir.iterdir() if p.is_dir())
        except OSError:
            return frozenset()

    def _changed(self) -> bool:
        """The templates' once-a-second look (`_Templates`): forget the variants when a
        language folder was added or removed (a patient's language gets its templates, or
        falls back, from the next message on), and each spelling table edited; return
        whether the compiled templates must be dropped."""
        folders = self._folder_names()
        if folders != self._folders:
            with self._lock:
                self._folders = folders
                self._variants = {}
        return self._spelling_changed()

    def _spelling_changed(self) -> bool:
        """Forget each spelling table whose file changed since it was read (it is read
        again at its next use, as edited templates are: `_Templates`); return whether any
        did."""
        changed = [folder for folder, stamp in list(self._spelling_stamps.items())
                   if _file_stamp(self.templates_dir / folder / SPELLING_FILE) != stamp]
        for folder in changed:
            self._spelling.pop(folder, None)
            self._spelling_stamps.pop(folder, None)
        return bool(changed)

    def locale(self, name: str) -> Locale:
        """Return the Babel locale of a locale folder ("es", "pt-BR", "en_GB")."""
        try:
            return Locale.parse(name.replace("-", "_"))
        except (UnknownLocaleError, ValueError) as exc:
            problem = f"not a locale Babel knows ({exc})"
            raise ConfigError(self.templates_dir / name, problem) from None

    def template_files(self, locale: str) -> dict[str, set[str]]:
        """Return {step template: parts present} for the files in one locale folder."""
        found: dict[str, set[str]] = {}
        folder = self.templates_dir / locale
        for path in sorted(folder.glob("*.j2")) if folder.is_dir() else ():
            match = TEMPLATE_FILE.match(path.name)
            if match:  # "_layout…" and other shared pieces do not match
                found.setdefault(match["template"], set()).add(match["part"])
        return found

    def template_names(self, locale: str) -> set[str]:
        """Return the step templates that have at least one file in `locale`."""
        return set(self.template_files(locale))

    def missing_files(self, locale: str, template: str) -> list[str]:
        """Return the loader names of the files `template` lacks in `locale` (both channels)."""
        present = self.template_files(locale).get(template, set())
        return [file_name(locale, template, part)
                for channel in CHANNELS for part in PARTS[channel] if part not in present]

    def _render(self, name: str, context: dict[str, Any]) -> str:
        try:
            return one_stop(self.env.get_template(name).render(context))
        except TemplateNotFound:
            raise ConfigError(self.templates_dir / unmarked(name), TEMPLATE_NOT_FOUND) from None
        except TemplateSyntaxError as exc:
            raise syntax_error(exc, self.templates_dir / unmarked(name)) from None
        except UnicodeDecodeError as exc:  # a file saved as Latin-1 (this one, or one it uses)
            raise not_utf8(exc, self.templates_dir / unmarked(name)) from None
        except TemplateError as exc:  # undefined variable, sandbox refusal, bad filter use
            raise ConfigError(self._failing_file(exc, name), str(exc)) from None

    def _failing_file(self, exc: Exception, name: str) -> str:
        """Return "file:line" of the innermost template frame (a layout or macro file)."""
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
        if not frames:
            return str(self.templates_dir / unmarked(name))
        return f"{frames[-1].filename}:{frames[-1].lineno}"
