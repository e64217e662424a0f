"""`reminders check`: every template rendered against every protocol and clinic.

Validates that each template a protocol step names exists in every locale, compiles and
renders with realistic long values, and reports each SMS template's encoding, length and
segments. The renderer itself is worker/rendering.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from itertools import product
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateSyntaxError

from .catalog import Catalog
from .clinics import Clinic, unreachable_problem
from .errors import ConfigError
from .models import CHANNELS, Booking
from .planner import plan
from .protocols import Protocol
from .rendering import RenderedMessage, Renderer, file_name, syntax_error
from .sms import Encoding, non_gsm7, sms_segments

# Realistic long values, so that a template that fits here fits for real patients.
SAMPLE_FIRST_NAME = "Christabelle"  # 12 letters, the long end of first names
SAMPLE_PATIENT_PHONE = "+34600111222"
# 12:30 gives "12:30 PM", the longest English short time; September the longest "MMMd".
SAMPLE_APPOINTMENT = (date(2026, 9, 30), time(12, 30))
SAMPLE_BOOKED_DAYS_BEFORE = 30  # booked before any step of any protocol is due


@dataclass(frozen=True)
class SmsSample:
    """The longest rendering of one SMS template in one locale and wording."""

    template: str
    locale: str
    discreet: bool
    encoding: Encoding
    length: int
    segments: int
    text: str


@dataclass
class CheckReport:
    """What `reminders check` found: any error makes the configuration unusable."""

    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sms: list[SmsSample] = field(default_factory=list)

    def table(self) -> str:
        """Return the SMS samples as an aligned text table."""
        rows = [("TEMPLATE", "LOCALE", "WORDING", "ENCODING", "LENGTH", "SEGMENTS")]
        rows += [(s.template, s.locale, "discreet" if s.discreet else "plain", s.encoding,
                  str(s.length), str(s.segments)) for s in self.sms]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                 for row in rows)
        return "\n".join(line.rstrip() for line in lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "errors": [str(e) for e in self.errors],
            "warnings": self.warnings,
            "sms": [asdict(s) for s in self.sms],
        }


def sample_booking(clinic: Clinic, protocol: Protocol, locale: str,
                   first_name: str = SAMPLE_FIRST_NAME) -> Booking:
    """Return a booking with long, realistic values, in the clinic's timezone."""
    starts_at = datetime.combine(*SAMPLE_APPOINTMENT, tzinfo=ZoneInfo(clinic.timezone))
    return Booking.model_validate({
        "clinic": clinic.id, "booking_id": "CHECK-1", "treatment": protocol.id,
        "starts_at": starts_at,
        "patient": {"name": f"{first_name} Sample", "email": "patient@example.com",
                    "phone": SAMPLE_PATIENT_PHONE, "timezone": clinic.timezone,
                    "locale": locale, "channels": ["sms", "email"]},
        # Both flags, so that every conditional step is planned and rendered.
        "medications": {"tretinoin": True, "retinol": True},
    })


def sample_messages(renderer: Renderer, booking: Booking, clinic: Clinic,
                    protocol: Protocol) -> Iterator[tuple[str, RenderedMessage]]:
    """Yield (template, message) for every reminder planned for `booking`, on both channels.

    Raises ConfigError for the first template that does not render.
    """
    booked_at = booking.starts_at - timedelta(days=SAMPLE_BOOKED_DAYS_BEFORE)
    reminders = plan(booking, protocol, clinic, booked_at).reminders
    plan_dates: dict[str, datetime] = {}
    for reminder in reminders:
        plan_dates.setdefault(reminder.step, reminder.due_at)
    for reminder in reminders:
        for channel in CHANNELS:
            yield reminder.template, renderer.render(
                template=reminder.template, channel=channel, booking=booking, clinic=clinic,
                protocol=protocol, occurrence=reminder.occurrence, due_at=reminder.due_at,
                plan_dates=plan_dates)


def check(catalog: Catalog, clinics_dir: Path, *, env: Mapping[str, str] | None = None,
          clinic_ids: list[str] | None = None) -> CheckReport:
    """Check templates against protocols and clinics, rendering each with sample values."""
    renderer = Renderer(catalog.templates_dir)
    clinics = [catalog.clinics[c] for c in sorted(clinic_ids or catalog.clinics)]
    report = CheckReport()
    errors = _file_errors(renderer, catalog) + _clinic_errors(catalog, clinics, clinics_dir)
    report.warnings += _unused_templates(renderer, catalog)
    for clinic in clinics:
        for name in clinic.missing_secrets(None if env is None else dict(env)):
            report.warnings.append(f"{clinics_dir / f'{clinic.id}.toml'}: environment variable "
                                   f"{name} is not set (channel URLs read it at send time)")
    if not errors:  # rendering a missing or broken file would only repeat those errors
        render_errors, report.sms = _render_all(renderer, catalog, clinics)
        errors += render_errors
        report.warnings += [_sms_warning(catalog.templates_dir, s) for s in report.sms
                            if s.segments != 1 or s.encoding != "GSM-7"]
    # One broken file fails many renders: report each distinct problem once, sorted.
    report.errors = list({str(e): e for e in sorted(errors, key=str)}.values())
    return report


def _templates_in_use(catalog: Catalog) -> dict[str, str]:
    """Return {template: the first step that names it}."""
    used: dict[str, str] = {}
    for protocol in catalog.protocols.values():
        for step in protocol.steps:
            used.setdefault(step.template, f"step {step.id!r} of protocol {protocol.id!r}")
    return used


def _file_errors(renderer: Renderer, catalog: Catalog) -> list[ConfigError]:
    """Return missing files, syntax errors and locale folders Babel does not know."""
    errors = []
    for locale in sorted(catalog.locales):
        try:
            renderer.locale(locale)
        except ConfigError as exc:
            errors.append(exc)
        for template, user in sorted(_templates_in_use(catalog).items()):
            errors += [ConfigError(catalog.templates_dir / name, f"missing (needed by {user})")
                       for name in renderer.missing_files(locale, template)]
    for name in renderer.env.list_templates(extensions=["j2"]):
        try:
            renderer.env.get_template(name)
        except TemplateSyntaxError as exc:
            errors.append(syntax_error(exc, catalog.templates_dir / name))
    return errors


def _clinic_errors(catalog: Catalog, clinics: list[Clinic],
                   clinics_dir: Path) -> list[ConfigError]:
    """Return clinics whose locale has no templates or a channel with no URL and no outbox."""
    errors = [ConfigError(clinics_dir / f"{c.id}.toml",
                          f"locale {c.locale!r} has no templates folder")
              for c in clinics if c.locale not in catalog.locales]
    # The worker still loads such a clinic (one bad clinic must not stop the others),
    # but its sends on that channel fail permanently.
    errors += [ConfigError(clinics_dir / f"{c.id}.toml", unreachable_problem(channel))
               for c in clinics for channel in c.unreachable_channels()]
    # The held-booking alert is emailed to a clinic with an address, in the clinic's locale.
    errors += [ConfigError(catalog.templates_dir / name, f"missing (needed by clinic {c.id}'s "
                           "held-booking alert)")
               for c in clinics if c.email and c.locale in catalog.locales
               for name in clinic_alert_files(c.locale)
               if not (catalog.templates_dir / name).is_file()]
    return errors


def clinic_alert_files(locale: str) -> list[str]:
    """Return the template files of the alerts the clinic itself receives, in `locale`."""
    return [f"{locale}/clinic/held.email.{part}.j2" for part in ("subject", "txt")]


def _unused_templates(renderer: Renderer, catalog: Catalog) -> list[str]:
    used = _templates_in_use(catalog)
    return [f"{catalog.templates_dir / locale}: template {name!r} is used by no protocol step"
            for locale in sorted(catalog.locales)
            for name in sorted(renderer.template_names(locale) - set(used))]


def _render_all(renderer: Renderer, catalog: Catalog,
                clinics: list[Clinic]) -> tuple[list[ConfigError], list[SmsSample]]:
    """Render every template for every clinic, locale and wording; keep each SMS's longest."""
    errors: list[ConfigError] = []
    longest: dict[tuple[str, str, bool], SmsSample] = {}
    for clinic, locale, protocol, discreet in product(
            clinics, sorted(catalog.locales), catalog.protocols.values(), (False, True)):
        wording = clinic.model_copy(update={"discreet": discreet})
        booking = sample_booking(wording, protocol, locale)
        try:
            for template, message in sample_messages(renderer, booking, wording, protocol):
                errors += [ConfigError(catalog.templates_dir / file_name(locale, template, part),
                                       "renders empty") for part in _empty_parts(message)]
                if message.channel != "sms":
                    continue
                sample = SmsSample(template, locale, discreet, *sms_segments(message.text),
                                   text=message.text)
                key = (template, locale, discreet)
                if key not in longest or sample.length > longest[key].length:
                    longest[key] = sample
        except ConfigError as exc:
            errors.append(exc)
    return errors, [longest[k] for k in sorted(longest)]


def _empty_parts(message: RenderedMessage) -> list[str]:
    if message.channel == "sms":
        return [] if message.text else ["sms.txt"]
    return [part for part, value in (("email.subject", message.subject),
                                     ("email.txt", message.text.strip())) if not value]


def _sms_warning(templates_dir: Path, sample: SmsSample) -> str:
    path = templates_dir / file_name(sample.locale, sample.template, "sms.txt")
    wording = "discreet" if sample.discreet else "plain"
    problem = f"{sample.segments} segments ({sample.encoding}, {sample.length} units)"
    if sample.encoding != "GSM-7":
        problem += f"; not GSM-7 because of {' '.join(non_gsm7(sample.text))}"
    return f"{path} ({wording}): {problem}"
