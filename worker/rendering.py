"""Message templates: render a reminder for one channel.

Templates live in `<templates_dir>/<locale>/` as `<template>.email.subject.j2`,
`<template>.email.html.j2`, `<template>.email.txt.j2` and `<template>.sms.txt.j2`
(files starting with "_" are layouts and macros). They run in a Jinja2 sandbox with
StrictUndefined; only `.html.j2` files are autoescaped.

Variables (all dates and times in the patient's timezone and locale):
    patient_first_name      first word of the patient's name
    clinic_name, clinic_phone   the clinic's name and E.164 phone
    treatment, treatment_id     the protocol's name and id ("microneedling")
    discreet                the clinic's flag: subjects and SMS name no treatment or medication
    appointment_date        long date, "5 de diciembre de 2026" / "December 5, 2026"
    appointment_date_short  "5 dic" / "Dec 5"
    appointment_time        short time, "14:30" / "2:30 PM"
    days_until              calendar days from the moment of sending (the due date in previews)
                            to the appointment (0 today, 1 tomorrow)
    occurrence              1-based number within a repeating step
    week                    1-based week since the appointment date (day 0-6 is week 1;
                            0 or less before the appointment)
    plan_dates              step id -> full date of that step, in plan order (may be empty)
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_skeleton, format_time
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from .clinics import Clinic
from .errors import ConfigError
from .models import CHANNELS, Booking, Channel
from .protocols import Protocol
from .sms import normalise

# The files one template needs for each channel (the planner may fall back to either).
PARTS: dict[Channel, tuple[str, ...]] = {
    "email": ("email.subject", "email.txt", "email.html"),
    "sms": ("sms.txt",),
}
TEMPLATE_FILE = re.compile(
    r"^(?P<template>[a-z0-9][a-z0-9_-]*)\.(?P<part>email\.subject|email\.txt|email\.html|sms\.txt)\.j2$"
)


@dataclass(frozen=True)
class RenderedMessage:
    """One message ready for a channel."""

    channel: Channel
    subject: str | None  # email only
    text: str  # email plain-text body, or the SMS text
    html: str | None  # email only


def file_name(locale: str, template: str, part: str) -> str:
    """Return the loader name of one template file, e.g. "es/day-before.sms.txt.j2"."""
    return f"{locale}/{template}.{part}.j2"


def syntax_error(exc: TemplateSyntaxError, path: Path) -> ConfigError:
    """Return a Jinja syntax error as a ConfigError naming "file:line"."""
    return ConfigError(f"{exc.filename or path}:{exc.lineno}", f"syntax error: {exc.message}")


class Renderer:
    """Renders reminders from one templates folder."""

    def __init__(self, templates_dir: Path) -> None:
        self.templates_dir = templates_dir
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(templates_dir),
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(
        self, *, template: str, channel: Channel, booking: Booking, clinic: Clinic,
        protocol: Protocol, occurrence: int, due_at: datetime,
        plan_dates: Mapping[str, datetime] | None = None, now: datetime | None = None,
    ) -> RenderedMessage:
        """Render `template` for `channel`; raise ConfigError naming the file at fault.

        `now`: the moment of sending; words such as "tomorrow" count from it (default: due_at).
        """
        locale = booking.patient.locale
        context = self.context(booking=booking, clinic=clinic, protocol=protocol,
                               occurrence=occurrence, due_at=due_at, plan_dates=plan_dates,
                               now=now)

        def part(name: str) -> str:
            return self._render(file_name(locale, template, name), context)

        if channel == "sms":
            return RenderedMessage(channel="sms", subject=None, text=normalise(part("sms.txt")),
                                   html=None)
        # A subject is one header line: never let a template break it.
        return RenderedMessage(channel="email", subject=" ".join(part("email.subject").split()),
                               text=part("email.txt").strip() + "\n", html=part("email.html"))

    def context(
        self, *, booking: Booking, clinic: Clinic, protocol: Protocol, occurrence: int,
        due_at: datetime, plan_dates: Mapping[str, datetime] | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Return the template variables (see the module docstring)."""
        tz = ZoneInfo(booking.patient.timezone)
        locale = self.locale(booking.patient.locale)
        start = booking.starts_at.astimezone(tz)
        days_until = (start.date() - (now or due_at).astimezone(tz).date()).days
        ordered = sorted((plan_dates or {}).items(), key=lambda item: item[1])
        return {
            "patient_first_name": booking.patient.first_name,
            "clinic_name": clinic.name,
            "clinic_phone": clinic.phone,
            "treatment": protocol.name,
            "treatment_id": protocol.id,
            "discreet": clinic.discreet,
            "appointment_date": format_date(start.date(), "long", locale=locale),
            "appointment_date_short": format_skeleton("MMMd", start.date(), locale=locale),
            "appointment_time": format_time(start, "short", tzinfo=tz, locale=locale),
            "days_until": days_until,
            "occurrence": occurrence,
            "week": -days_until // 7 + 1,
            "plan_dates": {
                step: format_date(when.astimezone(tz).date(), "full", locale=locale)
                for step, when in ordered
            },
        }

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
            return self.env.get_template(name).render(context)
        except TemplateNotFound:
            raise ConfigError(self.templates_dir / name, "template file not found") from None
        except TemplateSyntaxError as exc:
            raise syntax_error(exc, self.templates_dir / name) from None
        except TemplateError as exc:  # undefined variable, sandbox refusal, bad filter use
            raise ConfigError(self._failing_file(exc, name), str(exc)) from None

    def _failing_file(self, exc: Exception, name: str) -> str:
        """Return "file:line" of the innermost template frame (a layout or macro file)."""
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
        if not frames:
            return str(self.templates_dir / name)
        return f"{frames[-1].filename}:{frames[-1].lineno}"
