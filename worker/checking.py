"""`reminders check`: every template rendered against every protocol and clinic.

Validates that each template a protocol step names exists in every locale, compiles and
renders with realistic long values (the longest and the most accented first names of each
language, every configured clinic's name), and reports each SMS template's encoding,
length and segments. Each protocol is planned for each clinic (sample bookings made well
ahead, for visits at 08:00, 12:30 and 19:30): a step that would never be sent (its
`late_until` ends before its own time, or the clinic's send window opens only after it
expires), a pause step after the visit and a resume step before it are errors; so is a
pause step with no care-critical resume step for every patient it pauses. Every protocol
`[advice]` value must have a source comment in its
file; `--sources` lists, per protocol step, the clinical claims its messages make and
where each comes from. The renderer itself is worker/rendering.py.

`--redis` (the only part that reads Redis; `check` alone touches none) also looks at the
reminders still to be sent (the due and lease sets, read with ZSCAN) and names each clinic
or protocol they are of that config/ does not have: their sends fail as "not configured",
are retried with backoff and given up (dead-lettered) after max_attempts
(worker/dispatch.py `_unconfigured`); an error, so a deploy can run it before switching.
It also warns of each Redis setting that can lose or evict the schedule (AOF off,
appendfsync no, a maxmemory-policy that evicts, a replica: worker/durability.py), a
warning only: ops may run such a Redis on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateSyntaxError

from . import words
from .catalog import Catalog
from .clinics import Clinic, parse_clock, unreachable_problem
from .errors import ConfigError
from .models import CHANNELS, Booking, Channel
from .notices import Invite, Notice
from .planner import PlannedReminder, hold_notice, plan
from .protocols import NOTICE_STEPS, AdviceValue, Protocol, format_duration
from .rendering import (
    FAHRENHEIT_TERRITORIES,
    RenderedMessage,
    Renderer,
    file_name,
    language_of,
    not_utf8,
    syntax_error,
)
from .settings import MIN_SECRET_CHARS, Settings
from .sms import Encoding, fold_to_gsm7, non_gsm7, normalise, sms_segments
from .status import Status

if TYPE_CHECKING:
    from .durability import Finding
    from .store import Store

# Realistic worst-case first names per language: the longest, and letters outside GSM-7
# (folded by default, see `sms_accents`), so that a template that fits here fits for real
# patients. Other languages use the English list.
SAMPLE_FIRST_NAMES: dict[str, tuple[str, ...]] = {
    "en": ("Christabelle", "Zoë"),  # 12 letters; "ë" is not GSM-7
    "es": ("Purificación", "María José"),  # 12 letters; "ó", "í" are not GSM-7
}
SAMPLE_FIRST_NAME = "Christabelle"  # the longest English sample (kept for callers)
SAMPLE_PATIENT_PHONE = "+34600111222"
# 12:30 gives "12:30 PM", the longest English short time; September the longest "MMMd".
SAMPLE_APPOINTMENT = (date(2026, 9, 30), time(12, 30))
SAMPLE_BOOKED_DAYS_BEFORE = 30  # booked before any step of any protocol is due


# DOMAIN.md "US quiet hours": SMS only from 08:00 to 21:00 patient-local.
QUIET_HOURS = ("08:00", "21:00")

# A name longer than any SMS greets by (`SMS_NAME_MAX`): its SMS greet with no name.
SAMPLE_UNFIT_NAME = "Wolfeschlegelsteinhausenbergerdorff"


def sample_names(locale: str) -> tuple[str, ...]:
    """Return the sample first names `check` renders a locale's templates with: the longest
    an SMS greets by (`SMS_NAME_MAX`), letters outside GSM-7, and one too long to greet by
    (the SMS without a name)."""
    return SAMPLE_FIRST_NAMES.get(language_of(locale), SAMPLE_FIRST_NAMES["en"]) + (
        SAMPLE_UNFIT_NAME,)


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


@dataclass(frozen=True)
class Claim:
    """One clinical claim a message makes: a protocol advice key, its value and source."""

    key: str
    value: AdviceValue
    source: str


@dataclass(frozen=True)
class StepSources:
    """What one protocol step's messages claim, and where each claim comes from."""

    protocol: str
    step: str
    template: str
    timing: str  # the step's own comments: why it is sent when it is
    claims: list[Claim]


@dataclass(frozen=True)
class Unconfigured:
    """Reminders still to be sent (or being sent) that name a clinic or protocol config/
    does not have (`check --redis`)."""

    kind: str  # "clinic" or "protocol"
    name: str
    path: str  # the file config/ lacks
    reminders: int
    bookings: int

    def error(self, max_attempts: int, retry_minutes: int) -> ConfigError:
        whose = (f"of clinic {self.name!r}" if self.kind == "clinic"
                 else f"of treatment {self.name!r}")
        return ConfigError(Path(self.path), (
            f"missing, yet {self.reminders} reminder(s) of {self.bookings} booking(s) still "
            f"to be sent in Redis are {whose}: each fails as 'not configured' when due, is "
            f"retried with backoff and dead-lettered after {max_attempts} attempts (about "
            f"{retry_minutes} minutes of backoff); put the file back, or cancel those "
            f"bookings"))


@dataclass
class CheckReport:
    """What `reminders check` found: any error makes the configuration unusable."""

    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sms: list[SmsSample] = field(default_factory=list)
    sources: list[StepSources] = field(default_factory=list)
    # `--redis` only: pending reminders of clinics or protocols config/ does not have.
    unconfigured: list[Unconfigured] | None = None
    # `--redis` only: Redis settings that can lose or evict the schedule (warnings).
    redis_settings: list[Finding] | None = None
    redis_summary: str = ""  # the settings as read, when none is found

    def table(self) -> str:
        """Return the SMS samples as an aligned text table."""
        rows = [("TEMPLATE", "LOCALE", "WORDING", "ENCODING", "LENGTH", "SEGMENTS")]
        rows += [(s.template, s.locale, "discreet" if s.discreet else "plain", s.encoding,
                  str(s.length), str(s.segments)) for s in self.sms]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                 for row in rows)
        return "\n".join(line.rstrip() for line in lines)

    def sources_text(self) -> str:
        """Return the claims of every protocol step's messages with their sources."""
        lines: list[str] = []
        protocol = None
        for entry in self.sources:
            if entry.protocol != protocol:
                protocol = entry.protocol
                lines += ["", protocol] if lines else [protocol]
            lines.append(f"  {entry.step} ({entry.template})")
            lines.append(f"    when: {entry.timing or '(no comment on the step)'}")
            for claim in entry.claims:
                lines.append(f"    {claim.key} = {_toml_value(claim.value)}: {claim.source}")
            if not entry.claims:
                lines.append("    (no clinical claim: logistics only)")
        return "\n".join(lines)

    def as_json(self, *, sources: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ok": not self.errors,
            "errors": [str(e) for e in self.errors],
            "warnings": self.warnings,
            "sms": [asdict(s) for s in self.sms],
        }
        if sources:
            doc["sources"] = [asdict(s) for s in self.sources]
        if self.unconfigured is not None:
            doc["unconfigured"] = [asdict(u) for u in self.unconfigured]
        if self.redis_settings is not None:
            doc["redis_settings"] = [f.as_json() for f in self.redis_settings]
        return doc


def _toml_value(value: AdviceValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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


def regional_variants(renderer: Renderer, clinic: Clinic, language: str) -> tuple[str, ...]:
    """The widest regional variants of `language` (patient locales "es-CO", "en-US"): one
    per width of what an SMS writes the variant's way (the time, a short date, the date
    and time, a fever) that no other variant's widths all reach or pass. `check` renders
    SMS in them too, as patients of those regions get them at any clinic."""
    from babel.dates import format_skeleton, format_time
    from babel.localedata import locale_identifiers

    start = datetime.combine(*SAMPLE_APPOINTMENT)
    widths: dict[tuple[int, ...], str] = {}
    for ident in sorted(locale_identifiers()):
        lang, _, territory = ident.partition("_")
        if lang != language or not territory.isalpha():
            continue
        patient_locale = f"{lang}-{territory}"
        variant = renderer.variant(patient_locale, clinic)
        if variant.folder != language:
            continue
        time_text = format_time(start.time(), "short", locale=variant.locale)
        width = (len(normalise(time_text)),
                 *(len(normalise(format_skeleton("MMMd", start.date() + timedelta(days=d),
                                                 locale=variant.locale))) for d in (0, 7, 14)),
                 len(normalise(format_skeleton("MMMMd", start.date(), locale=variant.locale))),
                 len("100.4F") if variant.region in FAHRENHEIT_TERRITORIES else len("38C"))
        widths.setdefault(width, patient_locale)
    return tuple(sorted(
        name for width, name in widths.items()
        if not any(other != width and all(a >= b for a, b in zip(other, width, strict=True))
                   for other in widths)))


def sample_messages(renderer: Renderer, booking: Booking, clinic: Clinic, protocol: Protocol,
                    channels: tuple[Channel, ...] = CHANNELS,
                    ) -> Iterator[tuple[PlannedReminder, RenderedMessage]]:
    """Yield (reminder, message) for every reminder planned for `booking`, on `channels`.

    Raises ConfigError for the first template that does not render.
    """
    booked_at = booking.starts_at - timedelta(days=SAMPLE_BOOKED_DAYS_BEFORE)
    reminders = plan(booking, protocol, clinic, booked_at).reminders
    plan_dates: dict[str, datetime] = {}
    for reminder in reminders:
        plan_dates.setdefault(reminder.step, reminder.due_at)
    if protocol.hold_template:  # what a held booking sends instead (planner `hold_notice`)
        reminders = [*reminders, hold_notice(protocol.hold_template, CHANNELS, booked_at,
                                             booking.starts_at, clinic.send_window,
                                             ZoneInfo(booking.patient.timezone))]
    for reminder in reminders:
        for channel in channels:
            yield reminder, renderer.render(
                template=reminder.template, channel=channel, booking=booking, clinic=clinic,
                protocol=protocol, occurrence=reminder.occurrence, due_at=reminder.due_at,
                plan_dates=plan_dates)


def sample_notices(renderer: Renderer, booking: Booking, clinic: Clinic, protocol: Protocol,
                   channels: tuple[Channel, ...] = CHANNELS,
                   ) -> Iterator[tuple[str, RenderedMessage]]:
    """Yield (template, message) for the change notices (worker/notices.py) of a protocol
    that can send them, in their longest forms: after the pause went out, a move with a
    date to go on until, a move within the pause, and a cancel, before the visit and once
    it has begun (then it asks the patient to call before resuming)."""
    if not protocol.notice_steps():
        return
    start = booking.starts_at
    sent_at = start - timedelta(days=SAMPLE_BOOKED_DAYS_BEFORE - 1)
    moved = booking.model_copy(update={"starts_at": start + timedelta(days=14)})
    pause = protocol.pause_step() is not None
    begun = start + timedelta(hours=3)
    forms = [("rescheduled", moved, Notice(previous_start=start, paused=pause,
                                           pause_from=start + timedelta(days=7)), sent_at),
             ("rescheduled", moved, Notice(previous_start=start, paused=pause), sent_at),
             ("cancelled", booking, Notice(paused=pause), sent_at),
             ("cancelled", booking, Notice(paused=pause), begun)]
    for template, which, notice, at in forms:
        for channel in channels:
            yield template, renderer.render(
                template=template, channel=channel, booking=which, clinic=clinic,
                protocol=protocol, occurrence=1, due_at=at, now=at, notice=notice,
                invite=Invite(1, "CANCEL" if template == "cancelled" else "REQUEST")
                if channel == "email" else None)


def check(catalog: Catalog, clinics_dir: Path, *, env: Mapping[str, str] | None = None,
          clinic_ids: list[str] | None = None,
          protocols_dir: Path | None = None) -> CheckReport:
    """Check templates against protocols and clinics, rendering each with sample values."""
    protocols_dir = protocols_dir or clinics_dir.parent / "protocols"
    renderer = Renderer(catalog.templates_dir)
    clinics = [catalog.clinics[c] for c in sorted(clinic_ids or catalog.clinics)]
    report = CheckReport()
    comments = {p: protocol_comments(protocols_dir / f"{p}.toml") for p in catalog.protocols}
    errors = (_file_errors(renderer, catalog) + _clinic_errors(catalog, clinics, clinics_dir)
              + _channel_url_errors(clinics, clinics_dir, env)
              + _reply_errors(catalog, clinics)
              + _unsourced_advice(catalog, comments, protocols_dir))
    report.warnings += _unused_templates(renderer, catalog)
    for clinic in clinics:
        if clinic.address is None:
            report.warnings.append(f"{clinics_dir / f'{clinic.id}.toml'}: no address: the "
                                   "calendar invites name the clinic only as the location")
        for name in clinic.missing_secrets(None if env is None else dict(env)):
            report.warnings.append(f"{clinics_dir / f'{clinic.id}.toml'}: environment variable "
                                   f"{name} is not set (channel URLs read it at send time)")
    # A webhook signing secret set but short (set, since unset is only warned about above):
    # anyone could forge the clinic's event signatures. Named, never shown.
    secret_errors = [
        ConfigError(clinics_dir / f"{c.id}.toml", webhook_secret_problem(
            var, "webhook.secret" if c.webhook.secret == f"${{{var}}}"
            else "webhook.previous_secret"))
        for c in clinics if c.webhook and (var := c.webhook.short_secret(env))]
    # A webhook URL whose host no request can be made to (a typo: "hooks..clinic.example"):
    # it loads, and every delivery fails until the clinic's events are given up.
    secret_errors += [
        ConfigError(clinics_dir / f"{c.id}.toml", problem)
        for c in clinics if c.webhook and (problem := webhook_url_problem(c.webhook.url))]
    if not errors:  # rendering a missing or broken file would only repeat those errors
        render_errors, report.sms, claims, too_long = _render_all(renderer, catalog, clinics,
                                                                  protocols_dir)
        errors += render_errors
        errors += [_clinic_sms_error(clinics_dir, catalog.clinics[c], s)
                   for c, s in sorted(too_long.items())]
        report.warnings += [_sms_warning(catalog.templates_dir, s) for s in report.sms
                            if s.segments != 1 or s.encoding != "GSM-7"]
        report.sources = _sources(catalog, comments, claims)
        report.warnings += _unstated_advice(catalog, claims, protocols_dir)
    errors += secret_errors
    errors += _plan_errors(catalog, clinics, protocols_dir)
    errors += _pause_errors(catalog, protocols_dir)
    # One broken file fails many renders: report each distinct problem once, sorted.
    report.errors = list({str(e): e for e in sorted(errors, key=str)}.values())
    return report


# --- plans: steps a clinic's patients would never get -------------------------------------


# The appointment times (clinic-local) `check` plans each protocol for: a step's `late_until`
# or a clinic's window may keep it from the morning's or the evening's patients only.
SAMPLE_VISIT_TIMES = (time(8, 0), SAMPLE_APPOINTMENT[1], time(19, 30))


def _plan_errors(catalog: Catalog, clinics: list[Clinic],
                 protocols_dir: Path) -> list[ConfigError]:
    """Return what the planner would do wrong for a clinic's patients, from the plans of
    sample bookings made SAMPLE_BOOKED_DAYS_BEFORE days ahead (both channels, both
    medications: every step applies), for a visit at each of SAMPLE_VISIT_TIMES: a step
    skipped although booked in time (its `late_until` ends before its own time, or the
    clinic's send window opens only after it expires: it could never be sent), a pause step
    (`pause = true`) after the visit, and a step ending the pause (`resume = true`) before
    it. Each names the visit times it happens for, unless it happens for all of them."""
    errors: list[ConfigError] = []
    for clinic, protocol in product(clinics, catalog.protocols.values()):
        path = protocols_dir / f"{protocol.id}.toml"
        index = {step.id: (n, step) for n, step in enumerate(protocol.steps)}
        # (step, problem) -> (the field, the words around "{when}", the visit times)
        found: dict[tuple[str, str], tuple[str, str, list[str]]] = {}

        def note(step_id: str, problem: str, field: str, text: str, at: str,
                 found: dict[tuple[str, str], tuple[str, str, list[str]]] = found) -> None:
            found.setdefault((step_id, problem), (field, text, []))[2].append(at)

        for visit in SAMPLE_VISIT_TIMES:
            at = f"{visit:%H:%M}"
            booking = sample_booking(clinic, protocol, clinic.locale)
            start = booking.starts_at.replace(hour=visit.hour, minute=visit.minute)
            booking = booking.model_copy(update={"starts_at": start})
            planned = plan(booking, protocol, clinic,
                           start - timedelta(days=SAMPLE_BOOKED_DAYS_BEFORE))
            seen: set[str] = set()
            for reminder in planned.uncapped or planned.reminders:
                if reminder.step not in index or reminder.step in seen:
                    continue
                seen.add(reminder.step)  # its first occurrence (a series: the first night)
                n, step = index[reminder.step]
                if step.pause and reminder.due_at >= start:
                    note(step.id, "pause", f"steps.{n}.pause", (
                        f"step {step.id!r} pauses a product but is due after the visit"
                        "{when}: the pause step tells the patient to stop it before the "
                        "visit; give it a time before the appointment"), at)
                if step.resume and reminder.due_at < start:
                    note(step.id, "resume", f"steps.{n}.resume", (
                        f"step {step.id!r} tells the patient they may resume the paused "
                        "product but is due before the visit{when}; give it a time after "
                        "the appointment"), at)
                if reminder.status != Status.SKIPPED:
                    continue
                expires = reminder.expires_at
                if (step.late_until is not None and expires is not None
                        and expires <= reminder.due_at):
                    note(step.id, "late_until", f"steps.{n}.late_until", (
                        f"step {step.id!r} is never sent{{when}}: it may be sent only until "
                        f"{_from_start(step.late_until)}, which is not after its own time; "
                        "give a late_until after the step's time, or leave it out"), at)
                else:
                    field = ("time" if step.time is not None
                             else "offset" if step.offset is not None else "at")
                    note(step.id, "window", f"steps.{n}.{field}", (
                        f"step {step.id!r} is never sent at clinic {clinic.id} (send_window "
                        f"{clinic.send_window.describe()}){{when}}: "
                        + reminder.reason.replace("{", "{{").replace("}", "}}")
                        + "; move the step's time into the window, or widen the clinic's "
                        "send_window"), at)
        for field, text, times in found.values():
            when = ("" if len(times) == len(SAMPLE_VISIT_TIMES)
                    else f" for an appointment at {' or '.join(times)}")
            errors.append(ConfigError(path, f"{field}: {text.format(when=when)}"))
    return errors


def _pause_errors(catalog: Catalog, protocols_dir: Path) -> list[ConfigError]:
    """Return each protocol whose pause is never ended: the pause step (`pause = true`) tells
    the patient to stop a product "until we say so"; a step with `resume = true` says so. It
    must exist, be care-critical (the SMS cap never drops it, worker/planner.py `cap_sms`)
    and go to every patient the pause goes to (`only_if_any`); `resume = true` without a
    pause step ends nothing. (That it is due after the visit: `_plan_errors`.)"""
    errors = []
    for pid, protocol in sorted(catalog.protocols.items()):
        path = protocols_dir / f"{pid}.toml"
        numbered = list(enumerate(protocol.steps))
        pause = next(((n, s) for n, s in numbered if s.pause), None)
        resumes = [(n, s) for n, s in numbered if s.resume]
        if pause is None:
            errors += [ConfigError(path, f"steps.{n}.resume: step {s.id!r} has resume = true "
                                   "but no step of this protocol pauses a product "
                                   "(pause = true)") for n, s in resumes]
            continue
        p, step = pause
        if not resumes:
            errors.append(ConfigError(path, (
                f"steps.{p}.pause: step {step.id!r} tells the patient to stop a product "
                "until told they may resume, and no step tells them: add a step after the "
                "visit with resume = true and care_critical = true (or leave out pause)")))
        paused = set(step.only_if_any)
        for n, resume in resumes:
            if not resume.care_critical:
                errors.append(ConfigError(path, (
                    f"steps.{n}.care_critical: step {resume.id!r} ends the pause of step "
                    f"{step.id!r} (resume = true) but is not care_critical = true: the SMS "
                    "cap may drop its SMS, and the patient would never hear they may resume")))
            if resume.only_if_any and not (paused and paused <= set(resume.only_if_any)):
                who = " or ".join(step.only_if_any) if paused else "every patient"
                errors.append(ConfigError(path, (
                    f"steps.{n}.only_if_any: step {resume.id!r} (resume = true) goes only to "
                    f"patients using {' or '.join(resume.only_if_any)}, but step {step.id!r} "
                    f"pauses for {who}: give it the pause step's only_if_any")))
    return errors


def _from_start(gap: timedelta) -> str:
    """"6h before the start", "1h after the start"."""
    side = "before" if gap < timedelta(0) else "after"
    return f"{format_duration(abs(gap))} {side} the start"


# --- --redis: pending reminders config/ cannot send ---------------------------------------

SCAN_COUNT = 1000  # ZSCAN's COUNT, and bookings read per round trip


def pending_unconfigured(store: Store, catalog: Catalog, clinics_dir: Path,
                         protocols_dir: Path, clinic_ids: list[str] | None = None,
                         ) -> list[Unconfigured]:
    """Return each clinic and protocol that reminders still to be sent (the due set) or
    being sent (the lease set) name and `catalog` does not have, with how many reminders
    and bookings; only of `clinic_ids` if given. Reads the sets with ZSCAN (no long
    command) and, for the bookings of configured clinics, their treatment, SCAN_COUNT
    bookings a round trip (no patient data kept)."""
    from .store import split_ref

    counts: dict[tuple[str, str], int] = {}  # (clinic, booking id) -> reminders
    for key in (store.due_key, store.lease_key):
        for ref, _ in store.redis.zscan_iter(key, count=SCAN_COUNT):
            clinic, booking_id, _ = split_ref(ref)
            if clinic_ids is None or clinic in clinic_ids:
                counts[clinic, booking_id] = counts.get((clinic, booking_id), 0) + 1
    found: dict[tuple[str, str], list[int]] = {}  # (kind, name) -> [reminders, bookings]

    def count(kind: str, name: str, reminders: int) -> None:
        tally = found.setdefault((kind, name), [0, 0])
        tally[0] += reminders
        tally[1] += 1

    configured: dict[str, list[str]] = {}
    for (clinic, booking_id), n in counts.items():
        if clinic in catalog.clinics:
            configured.setdefault(clinic, []).append(booking_id)
        else:
            count("clinic", clinic, n)
    for clinic, ids in configured.items():
        for start in range(0, len(ids), SCAN_COUNT):
            part = ids[start:start + SCAN_COUNT]
            for booking_id, summary in zip(part, store.booking_summaries(clinic, part),
                                           strict=True):
                treatment = summary and summary.get("treatment")
                if treatment and treatment not in catalog.protocols:
                    count("protocol", str(treatment), counts[clinic, booking_id])
    folders = {"clinic": clinics_dir, "protocol": protocols_dir}
    return [Unconfigured(kind, name, str(folders[kind] / f"{name}.toml"), n, b)
            for (kind, name), (n, b) in sorted(found.items())]


# --- sources: the comments of a protocol file ------------------------------------------

_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z0-9_-]+)\s*=\s*(?P<value>.*?)\s*$")
_TRAILING_COMMENT = re.compile(r"\s+#\s?(?P<comment>.*)$")


@dataclass(frozen=True)
class ProtocolComments:
    """The comments of one protocol file: per advice key, and per step."""

    advice: dict[str, str]
    steps: dict[str, str]


def protocol_comments(path: Path) -> ProtocolComments:
    """Return the comments of a protocol file, attached to what they describe.

    A comment block directly above a key (no blank line between), plus the key's own
    trailing comment, belongs to that key; in `[[steps]]` every comment of the step's
    block belongs to the step. The TOML itself is read by worker/protocols.py: this only
    reads the project's one-key-per-line layout, for `--sources`.
    """
    advice: dict[str, str] = {}
    steps: dict[str, list[str]] = {}
    section, step_comments, step_id = "", [], None
    pending: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ProtocolComments({}, {})

    def close_step() -> None:
        if step_id is not None:
            steps[step_id] = step_comments

    for raw in lines:
        line = raw.strip()
        if not line:
            pending = []
            continue
        if line.startswith("#"):
            pending.append(line.lstrip("#").strip())
            continue
        if line.startswith("["):
            line = line.split("#", 1)[0].strip()  # a header's trailing comment (TOML allows it)
            if line == "[[steps]]":
                close_step()
                section, step_comments, step_id = "steps", list(pending), None
            elif line.startswith("[steps."):
                step_comments += pending
            else:
                close_step()
                section, step_id = line.strip("[]").strip(), None
            pending = []
            continue
        match = _KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        key, value = match["key"], match["value"]
        trailing = _TRAILING_COMMENT.search(value)
        own = [*pending, trailing["comment"]] if trailing else list(pending)
        if section == "advice":
            advice[key] = " ".join(c for c in own if c)
        elif section == "steps":
            step_comments += [c for c in own if c]
            if key == "id":
                step_id = value.split("#", 1)[0].strip().strip('"')
        pending = []
    close_step()
    return ProtocolComments(advice, {k: " ".join(v) for k, v in steps.items()})


def _unsourced_advice(catalog: Catalog, comments: Mapping[str, ProtocolComments],
                      protocols_dir: Path) -> list[ConfigError]:
    """Return an error for every advice value whose source is not written next to it."""
    return [ConfigError(protocols_dir / f"{pid}.toml",
                        f"advice.{key} has no source comment (write where the value comes "
                        "from in a comment above it)")
            for pid, protocol in sorted(catalog.protocols.items())
            for key in sorted(protocol.advice) if not comments[pid].advice.get(key)]


def _unstated_advice(catalog: Catalog, claims: Mapping[tuple[str, str], set[str]],
                     protocols_dir: Path) -> list[str]:
    """Return a warning for every advice value that no message of its protocol states."""
    warnings = []
    for pid, protocol in sorted(catalog.protocols.items()):
        stated = set().union(*(keys for (p, _), keys in claims.items() if p == pid))
        for key in sorted(set(protocol.advice) - stated):
            if protocol.advice[key] is not False:  # `false` says "not said": not a claim
                warnings.append(f"{protocols_dir / f'{pid}.toml'}: advice.{key} is stated "
                                "by no message of this protocol")
    return warnings


def _sources(catalog: Catalog, comments: Mapping[str, ProtocolComments],
             claims: Mapping[tuple[str, str], set[str]]) -> list[StepSources]:
    """Return, per protocol step in file order, the claims its messages make."""
    out = []
    for pid, protocol in sorted(catalog.protocols.items()):
        for step in protocol.steps:
            keys = sorted(claims.get((pid, step.id), set()))
            out.append(StepSources(
                protocol=pid, step=step.id, template=step.template,
                timing=comments[pid].steps.get(step.id, ""),
                claims=[Claim(k, protocol.advice[k], comments[pid].advice.get(k, ""))
                        for k in keys]))
    return out


# --- files, clinics, rendering ---------------------------------------------------------


def _templates_in_use(catalog: Catalog) -> dict[str, str]:
    """Return {template: the first step that names it} (and the change notices')."""
    used: dict[str, str] = {}
    if any(p.notice_steps() for p in catalog.protocols.values()):
        used.update((name, "the change notices (worker/notices.py)") for name in NOTICE_STEPS)
    for protocol in catalog.protocols.values():
        for step in protocol.steps:
            used.setdefault(step.template, f"step {step.id!r} of protocol {protocol.id!r}")
        if protocol.hold_template:
            used.setdefault(protocol.hold_template,
                            f"the held-booking message of protocol {protocol.id!r}")
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
        if any(part.startswith(".") for part in name.split("/")):
            continue  # a macOS ._x.j2 beside each file, .git: never a template
        try:
            renderer.env.get_template(name)
        except TemplateSyntaxError as exc:
            errors.append(syntax_error(exc, catalog.templates_dir / name))
        except UnicodeDecodeError as exc:
            errors.append(not_utf8(exc, catalog.templates_dir / name))
    return errors


def _clinic_errors(catalog: Catalog, clinics: list[Clinic],
                   clinics_dir: Path) -> list[ConfigError]:
    """Return clinics whose locale has no templates or a channel with no URL and no outbox."""
    errors = [ConfigError(clinics_dir / f"{c.id}.toml",
                          f"locale {c.locale!r} has no templates folder")
              for c in clinics if template_folder(catalog, c.locale) is None]
    # The worker still loads such a clinic (one bad clinic must not stop the others),
    # but its sends on that channel fail permanently.
    errors += [ConfigError(clinics_dir / f"{c.id}.toml", unreachable_problem(channel))
               for c in clinics for channel in c.unreachable_channels()]
    # DOMAIN.md "US quiet hours": no texts before 08:00 or after 21:00 patient-local (47 CFR
    # 64.1200(c)(1)). A clinic whose SMS go to the outbox (the demo) texts nobody.
    errors += [ConfigError(clinics_dir / f"{c.id}.toml", f"send_window: "
                           f"{c.send_window.describe()} lets SMS arrive in US quiet hours "
                           f"(before {QUIET_HOURS[0]} or after {QUIET_HOURS[1]} patient-local, "
                           "DOMAIN.md); keep start and end within them")
               for c in clinics if not c.uses_outbox("sms")
               and (c.send_window.start < parse_clock(QUIET_HOURS[0])
                    or c.send_window.end > parse_clock(QUIET_HOURS[1]))]
    # The clinic's alerts are emailed to a clinic with an address, in the clinic's locale.
    errors += [ConfigError(catalog.templates_dir / name, f"missing (needed by clinic {c.id}'s "
                           f"{CLINIC_ALERTS[name.split('/')[-1].split('.')[0]]})")
               for c in clinics if c.email and (folder := template_folder(catalog, c.locale))
               for name in clinic_alert_files(folder)
               if not (catalog.templates_dir / name).is_file()]
    return errors


# The patient's address a channel URL's {to} is filled with when `check` loads it.
SAMPLE_CONTACTS: dict[Channel, str] = {"sms": SAMPLE_PATIENT_PHONE,
                                       "email": "patient@example.com"}


def _channel_url_errors(clinics: list[Clinic], clinics_dir: Path,
                        env: Mapping[str, str] | None) -> list[ConfigError]:
    """Return each channel URL Apprise cannot load as the worker loads it at every send
    (worker/delivery.py `load_services`; it dead-letters the message, a permanent failure):
    a scheme no plugin takes, or a URL its plugin refuses (a part missing or malformed).
    The URL is loaded with a sample address and its ${NAME}s from the environment; with one
    unset (warned about) only its scheme is asked. Names the field, never the URL."""
    from .apprise_plugins import has_plugin, schema_of  # Apprise: only when checking
    from .delivery import load_services

    errors = []
    for clinic in clinics:
        for channel, template in sorted(clinic.channels.items()):
            schema = schema_of(template)
            if schema not in ("http", "https") and not has_plugin(schema):
                problem = (f"no plugin for the scheme {schema!r}" if schema
                           else "it has no scheme")
            else:
                try:
                    url = clinic.channel_url(channel, SAMPLE_CONTACTS[channel], env)
                except ConfigError:
                    continue  # a ${NAME} unset: warned about, loaded at send time
                try:
                    loaded = load_services(url)
                except Exception:  # a plugin's parser may raise on a malformed URL
                    loaded = None
                if loaded:
                    continue
                problem = (f"its {schema} plugin refuses it: a part missing or malformed, "
                           "such as an email URL's sender")
            errors.append(ConfigError(
                clinics_dir / f"{clinic.id}.toml",
                f"channels.{channel}: Apprise cannot load this URL ({problem}); every "
                f"{channel} message would be dead-lettered"))
    return errors


def webhook_url_problem(url: str) -> str | None:
    """Return why no request can be made to the webhook `url` (its host or port), or None.
    The host is checked as the HTTP client encodes it (IDNA: no empty label, none over 63
    characters); the URL itself is never shown (it may hold a token)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return "webhook.url: the host or port cannot be read"
    if not host:
        return "webhook.url: the host is missing"
    try:
        host.encode("idna")
    except UnicodeError:
        return ("webhook.url: the host cannot be used (an empty label, as in 'a..b', or "
                "one longer than 63 characters): no delivery can reach it")
    return None


def _reply_errors(catalog: Catalog, clinics: list[Clinic]) -> list[ConfigError]:
    """Return each plain text beside the templates the API cannot write (worker/words.py:
    the answers to a patient's text, `_replies.toml`, and the unsubscribe page's words,
    `_unsubscribe.toml`; it gives English instead, and fails the request when English
    fails, a STOP after taking it): a file that is not TOML, a text left out, or a
    placeholder the text is not given; per language folder, English always."""
    import tomllib

    errors = []
    folders = sorted({f for f in catalog.locales if language_of(f) == f} | {words.FALLBACK})
    sample = {"clinic": "Clinic", "phone": SAMPLE_PATIENT_PHONE, "date": "Sep 30",
              "time": "12:30 PM", "address": "a***@example.com"}
    for name, texts in words.VALUES.items():
        what = ("the answer to a patient's text" if name == words.REPLIES
                else "the unsubscribe page's text")
        for folder in folders:
            path = catalog.templates_dir / folder / name
            if folder != words.FALLBACK and not path.is_file():
                continue  # its patients are answered in English
            try:
                table = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                errors.append(ConfigError(path, f"cannot be read: {exc}"))
                continue
            for key, given_names in texts.items():
                value = table.get(key)
                if not isinstance(value, str) or not value.strip():
                    errors.append(ConfigError(path, f"{key}: missing ({what}; the API fails "
                                              "the request without it)"))
                    continue
                given = {k: sample[k] for k in given_names}
                try:
                    value.format(**given)
                except KeyError as exc:
                    has = ", ".join("{" + k + "}" for k in given) or "none"
                    errors.append(ConfigError(path, f"{key}: the placeholder "
                                              f"{{{exc.args[0]}}} is not one this text has "
                                              f"(it has {has})"))
                except (IndexError, ValueError) as exc:
                    errors.append(ConfigError(path, f"{key}: {exc} (write a brace as {{{{ or "
                                              "}}}})"))
    return errors


def webhook_secret_problem(name: str, field: str = "webhook.secret") -> str:
    """Return the problem of a webhook secret shorter than MIN_SECRET_CHARS (no value)."""
    return (f"{field}: environment variable {name} must be at least "
            f"{MIN_SECRET_CHARS} characters of random text (a short one makes the clinic's "
            "webhook signatures forgeable); make one with: python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"")


def unsubscribe_link_warnings(settings: Settings, clinics: list[Clinic]) -> list[str]:
    """A warning when a clinic emails patients through a real channel (an email URL, not
    the outbox) and their unsubscribe link (the footer and the List-Unsubscribe header,
    worker/dispatch.py) is not an https address: unset, it is the API's own address
    (http://127.0.0.1:8000), which no patient can open; mail providers' one-click
    unsubscribe (RFC 8058) takes https links only."""
    if not any("email" in c.channels for c in clinics):
        return []
    base = settings.public_base_url
    if not settings.public_url:
        return [f"REMINDERS_PUBLIC_URL is not set: the unsubscribe link of every email (its "
                f"footer and List-Unsubscribe header) is {base}/v1/unsubscribe/..., an "
                "address patients cannot open; set it to the https address patients reach "
                "the API at"]
    if not base.lower().startswith("https://"):
        return [f"REMINDERS_PUBLIC_URL is {base}: mail providers' one-click unsubscribe "
                "(RFC 8058) takes https links only; set it to the https address patients "
                "reach the API at"]
    return []

def template_folder(catalog: Catalog, locale: str) -> str | None:
    """Return the templates folder a locale uses ("en-GB" -> "en"), or None if none."""
    for folder in (locale, language_of(locale)):
        if folder in catalog.locales:
            return folder
    return None


# The alerts the clinic itself is emailed (worker/webhooks.py `render_alert`: the event
# type's second part names the template): a held booking, a booking too late for the full
# retinoid pause, and a patient's reply asking for a call (`patient.replied`, "reschedule").
CLINIC_ALERTS = {"held": "held-booking alert", "late_pause": "late-pause alert",
                 "replied": "patient-reply alert"}


def clinic_alert_files(locale: str) -> list[str]:
    """Return the template files of the alerts the clinic itself receives, in `locale`."""
    return [f"{locale}/clinic/{name}.email.{part}.j2" for name in CLINIC_ALERTS
            for part in ("subject", "txt")]


def _unused_templates(renderer: Renderer, catalog: Catalog) -> list[str]:
    used = _templates_in_use(catalog)
    return [f"{catalog.templates_dir / locale}: template {name!r} is used by no protocol step"
            for locale in sorted(catalog.locales)
            for name in sorted(renderer.template_names(locale) - set(used))]


def _render_all(
    renderer: Renderer, catalog: Catalog, clinics: list[Clinic], protocols_dir: Path,
) -> tuple[list[ConfigError], list[SmsSample], dict[tuple[str, str], set[str]],
           dict[str, SmsSample]]:
    """Render every template for every clinic, locale, wording and sample first name.

    Returns the errors, each SMS template's worst rendering (most segments, then longest),
    the advice keys each (protocol, step)'s messages stated, and per clinic the worst SMS
    its name (`sms_label`) makes longer than one segment.
    """
    errors: list[ConfigError] = []
    worst: dict[tuple[str, str, bool], SmsSample] = {}
    claims: dict[tuple[str, str], set[str]] = {}
    # Per clinic, its worst SMS over one segment that its name makes so (with a short name
    # in its place the text would fit).
    too_long: dict[str, SmsSample] = {}

    def keep(clinic: Clinic, template: str, locale: str, discreet: bool, text: str) -> None:
        sample = SmsSample(template, locale, discreet, *sms_segments(text), text=text)
        key = (template, locale, discreet)
        if key not in worst or ((sample.segments, sample.length)
                                > (worst[key].segments, worst[key].length)):
            worst[key] = sample
        if sample.segments == 1:
            return
        label = clinic.sms_label
        for written in (label, fold_to_gsm7(normalise(label))):
            if written in text and sms_segments(text.replace(written, "Clinic"))[2] == 1:
                was = too_long.get(clinic.id)
                if was is None or (sample.segments, sample.length) > (was.segments, was.length):
                    too_long[clinic.id] = sample
                return
    # A patient is written to in their own regional variant ("12:30 PM", "100.4F" for en-US
    # at a Madrid clinic): each language's widest variants too, their SMS with the longest
    # sample name.
    regional = ({language: regional_variants(renderer, clinics[0], language)
                 for language in catalog.locales} if clinics else {})
    for clinic, locale, protocol, discreet in product(
            clinics, sorted(catalog.locales), catalog.protocols.values(), (False, True)):
        wording = clinic.model_copy(update={"discreet": discreet})
        names = sample_names(locale)
        for n, (patient_locale, name) in enumerate(
                [(locale, name) for name in names]
                + [(variant, names[0]) for variant in regional.get(locale, ())]):
            booking = sample_booking(wording, protocol, patient_locale, first_name=name)
            # Emails do not depend on the name's letters: render them once.
            channels: tuple[Channel, ...] = CHANNELS if n == 0 else ("sms",)
            try:
                for reminder, message in sample_messages(renderer, booking, wording, protocol,
                                                         channels):
                    template = reminder.template
                    claims.setdefault((protocol.id, reminder.step), set()).update(
                        message.claims)
                    errors += [
                        ConfigError(catalog.templates_dir / file_name(locale, template, part),
                                    "renders empty") for part in _empty_parts(message)]
                    if message.channel == "sms":
                        keep(clinic, template, locale, discreet, message.text)
                for template, message in sample_notices(renderer, booking, wording, protocol,
                                                        channels):
                    errors += [
                        ConfigError(catalog.templates_dir / file_name(locale, template, part),
                                    "renders empty") for part in _empty_parts(message)]
                    if message.channel == "sms":
                        keep(clinic, template, locale, discreet, message.text)
            except ConfigError as exc:
                errors.append(_advice_undefined(exc, protocol, protocols_dir) or exc)
            except Exception as exc:  # a template's own Python error ({{ 1 / 0 }}): its file
                errors.append(ConfigError(_template_frame(exc, catalog.templates_dir),
                                          f"{type(exc).__name__}: {exc}"))
    return errors, [worst[k] for k in sorted(worst)], claims, too_long


_ADVICE_UNDEFINED = re.compile(r"'[\w.]*Advice object' has no attribute '(?P<key>\w+)'")


def _advice_undefined(exc: ConfigError, protocol: Protocol,
                      protocols_dir: Path) -> ConfigError | None:
    """A message reading an advice key its protocol lacks: an error of the protocol's file,
    naming the key and the step (Jinja's own words name a Python class and the template,
    which several protocols may share)."""
    found = _ADVICE_UNDEFINED.search(exc.problem)
    if found is None:
        return None
    template = Path(str(exc.path).rsplit(":", 1)[0]).name.split(".", 1)[0]
    steps = [s.id for s in protocol.steps if s.template == template]
    reader = (f"the messages of step {steps[0]!r} read it (template {template})" if steps
              else f"template {template} reads it")
    return ConfigError(protocols_dir / f"{protocol.id}.toml",
                       f"advice.{found['key']}: not defined, and {reader}")


def _template_frame(exc: Exception, templates_dir: Path) -> str:
    """"file:line" of the innermost template frame of `exc`'s traceback (else the folder):
    the send path gives such a reminder up as "could not prepare the message"."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(templates_dir)


def _empty_parts(message: RenderedMessage) -> list[str]:
    if message.channel == "sms":
        return [] if message.text else ["sms.txt"]
    return [part for part, value in (("email.subject", message.subject),
                                     ("email.txt", message.text.strip())) if not value]


def _clinic_sms_error(clinics_dir: Path, clinic: Clinic, sample: SmsSample) -> ConfigError:
    """A configured clinic whose name in SMS makes one longer than a GSM-7 segment."""
    wording = "discreet" if sample.discreet else "plain"
    field = "sms_name" if clinic.sms_name else "name"
    return ConfigError(
        clinics_dir / f"{clinic.id}.toml",
        f"with its {field} {clinic.sms_label!r} ({len(clinic.sms_label)} characters) the SMS "
        f"{sample.template} ({sample.locale}, {wording}) is {sample.segments} segments "
        f"({sample.encoding}, {sample.length} units): set a shorter sms_name")


def _sms_warning(templates_dir: Path, sample: SmsSample) -> str:
    path = templates_dir / file_name(sample.locale, sample.template, "sms.txt")
    wording = "discreet" if sample.discreet else "plain"
    problem = f"{sample.segments} segments ({sample.encoding}, {sample.length} units)"
    if sample.encoding != "GSM-7":
        problem += f"; not GSM-7 because of {' '.join(non_gsm7(sample.text))}"
    return f"{path} ({wording}): {problem}"
