"""Treatment protocols as configuration: `config/protocols/<treatment>.toml`.

A protocol is a list of steps. Each step says when it is due relative to the
appointment, on which channels, with which template, for which patients, and what
to do when the booking arrives after the step's time (its late policy).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from .errors import ConfigError
from .models import Channel, Medications

STEP_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,47}$"
# A protocol's file name: the treatment id bookings give, kept in Redis keys and in the
# space-separated "<treatment>/<step>" list of care-critical steps (Catalog.critical_steps).
TREATMENT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
TEMPLATE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
ADVICE_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
# A finite number: `inf` and `nan` are TOML floats, and no message may say "SPF inf".
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
AdviceValue = StrictBool | StrictInt | FiniteFloat | list[StrictInt | FiniteFloat]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
# Boolean medication flags a step may be conditioned on.
MedicationFlag = Literal["tretinoin", "retinol"]
# The notices the store adds when a booking moves or is cancelled after something went out
# (worker/notices.py): step ids and templates of their own, never a protocol step's id.
NOTICE_STEPS = ("rescheduled", "cancelled")
# The pause message sent again for the new date after a move (the pause step's template).
REPAUSE_STEP = "repause"
STORE_STEPS = (*NOTICE_STEPS, REPAUSE_STEP)  # reminders the store adds, never a step's id
# A message before the visit sent again for the new date after a move: its step id is
# "again-<step>" (worker/notices.py), so no protocol step id may begin with it.
AGAIN_PREFIX = "again-"
# The step id (and default template) of a held booking's message (Protocol.hold_template).
HOLD_NOTICE_STEP = "hold-notice"

# How far from the appointment a step may fall, either way (days): a year.
MAX_STEP_DAYS = 366

_DURATION = re.compile(r"^([+-])?((?:\d+[dhms])+)$")
_DURATION_PART = re.compile(r"(\d+)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: object) -> timedelta:
    """Return "-7d", "3h", "1h30m", "90s" as a timedelta (a leading "-" means before)."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a duration string such as '3h', '-2d' or '90s'")
    match = _DURATION.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration such as '3h', '-2d', '1h30m' or '90s'")
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(match[2]))
    if seconds > MAX_STEP_DAYS * 86400:
        raise ValueError(f"{value!r} is more than {MAX_STEP_DAYS} days")
    return timedelta(seconds=-seconds if match[1] == "-" else seconds)


def format_duration(value: timedelta) -> str:
    """Return a timedelta in the protocol file's own notation ("-7d", "3h", "1h30m")."""
    total = int(value.total_seconds())
    sign, total = ("-" if total < 0 else ""), abs(total)
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return sign + ("".join(parts) or "0s")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _time_of_day(value: object) -> object:
    """Refuse a number for a step's time: pydantic reads `time = 18` as 18 seconds after
    midnight. "18:00" (a string) and a TOML local time (18:00:00) are times of day."""
    if isinstance(value, (bool, int, float)):
        raise ValueError(f'{value} is not a time of day: write it as "HH:MM" in quotes, '
                         'e.g. time = "18:00"')
    return value


def _whole_local_minute(value: dt.time) -> dt.time:
    """Refuse what the planner cannot keep: it reads a step's hour and minute, in each
    patient's own timezone. "18:00+02:00" would go at 18:00 patient-local, "18:00:30" at
    18:00."""
    if value.tzinfo is not None:
        raise ValueError(f"{value.isoformat()} has a UTC offset: a step's time is "
                         'patient-local, written without one, e.g. time = "18:00"')
    if value.second or value.microsecond:
        raise ValueError(f"{value.isoformat()} has seconds: a step's time is whole minutes "
                         '(time = "18:00"; use offset = "90s" for seconds)')
    return value


TimeOfDay = Annotated[dt.time, BeforeValidator(_time_of_day), AfterValidator(_whole_local_minute)]


class Repeat(BaseModel):
    """A series: the step recurs on days `day`..`through_day` (appointment-relative)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    through_day: int = Field(ge=-MAX_STEP_DAYS, le=MAX_STEP_DAYS)
    every_days: int | None = Field(None, ge=1)
    weekdays: list[Weekday] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_rule(self) -> Repeat:
        if (self.every_days is None) == (self.weekdays is None):
            raise ValueError("give exactly one of every_days or weekdays")
        return self


class Step(BaseModel):
    """One reminder of a protocol; see config/protocols/README.md for each field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=STEP_ID_PATTERN)
    # When: exactly one of `at = "booking"`, `day` + `time`, or `offset`.
    at: Literal["booking"] | None = None
    day: int | None = Field(None, ge=-MAX_STEP_DAYS, le=MAX_STEP_DAYS)
    time: TimeOfDay | None = None
    offset: Duration | None = None
    channels: list[Channel] = Field(min_length=1)
    template: str = Field(pattern=TEMPLATE_PATTERN)
    only_if_any: list[MedicationFlag] = []
    late: Literal["send", "skip"] = "skip"
    late_until: Duration | None = None
    repeat: Repeat | None = None
    # Its email carries the calendar invite (.ics) of the appointment (worker/invites.py).
    invite: StrictBool = False
    # It tells the patient to pause a product before the visit: once it went out, a move or
    # a cancel tells the patient until when they may go on with it, or that they may resume.
    pause: StrictBool = False
    # It tells the patient they may go on with the product the pause step stopped ("until we
    # say so": this says so). `reminders check` wants one after the visit, care-critical, for
    # every patient the pause applies to, in each protocol with a pause step.
    resume: StrictBool = False
    # Care-critical: its words protect the patient's safety. A patient who unsubscribed
    # from email still gets it, by SMS, when they allow SMS (worker/optout.py).
    care_critical: StrictBool = False

    @model_validator(mode="after")
    def _consistent(self) -> Step:
        kinds = [
            self.at is not None,
            self.day is not None or self.time is not None,
            self.offset is not None,
        ]
        if sum(kinds) != 1:
            raise ValueError('give exactly one of: at = "booking", day + time, or offset')
        if (self.day is None) != (self.time is None):
            raise ValueError("day and time go together")
        if self.repeat is not None:
            if self.day is None:
                raise ValueError("repeat needs day + time")
            if self.repeat.through_day < self.day:
                raise ValueError("repeat.through_day is before day")
        if self.late_until is not None and self.late != "send":
            raise ValueError('late_until only applies with late = "send"')
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels lists a channel twice")
        if self.id in STORE_STEPS:
            raise ValueError(f"step id {self.id!r} is reserved for the change notices")
        if self.id.startswith(AGAIN_PREFIX):
            raise ValueError(f"step ids beginning with {AGAIN_PREFIX!r} are reserved for the "
                             "messages sent again after a move")
        if self.id == HOLD_NOTICE_STEP:
            raise ValueError(f"step id {self.id!r} is reserved for a held booking's message")
        return self

    def applies_to(self, medications: Medications) -> bool:
        """Return whether this step's conditions hold for the patient."""
        return not self.only_if_any or any(getattr(medications, f) for f in self.only_if_any)

    def day_offsets(self) -> list[int]:
        """Return the appointment-relative days this wall-clock step falls on."""
        assert self.day is not None
        if self.repeat is None:
            return [self.day]
        days = range(self.day, self.repeat.through_day + 1)
        if self.repeat.every_days is not None:
            return [d for d in days if (d - self.day) % self.repeat.every_days == 0]
        return list(days)  # filtered by weekday in the planner, which knows the dates


class Protocol(BaseModel):
    """A treatment's whole plan of reminders, plus its safety gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    description: str = ""
    # Days before the appointment within which an isotretinoin dose holds the booking; at
    # least 1 (0 would hold no booking ever: a protocol without the gate leaves it out).
    isotretinoin_washout_days: int | None = Field(None, ge=1)
    # The one message a held booking sends the patient (at booking, on SMS if the patient
    # takes SMS, else email): a neutral "we will call you before your visit" that names no
    # treatment, medication or condition. "" sends nothing while held.
    hold_template: str = Field(HOLD_NOTICE_STEP, pattern=r"^(|[a-z0-9][a-z0-9-]{0,63})$")
    # What the messages state, by name (days, temperatures, strengths; `true` for advice
    # without a number). Each key's comment in the file is its source (`reminders check
    # --sources`); templates read them as `advice.<key>`.
    advice: dict[Annotated[str, Field(pattern=ADVICE_KEY_PATTERN)], AdviceValue] = {}
    # How long the visit is: the end of the calendar invite's event.
    visit_minutes: int = Field(60, ge=5, le=24 * 60)
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_steps(self) -> Protocol:
        ids = [s.id for s in self.steps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"step ids used twice: {', '.join(dupes)}")
        pauses = [s.id for s in self.steps if s.pause]
        if len(pauses) > 1:  # only pause_step()'s pause is corrected on a move or cancel
            raise ValueError(f"pause = true on steps {', '.join(pauses)}: one step per "
                             "protocol may pause a product")
        return self

    def pause_step(self) -> Step | None:
        """Return the step that tells the patient to pause a product (`pause = true`)."""
        return next((s for s in self.steps if s.pause), None)

    def invite_steps(self) -> frozenset[str]:
        """Return the ids of the steps whose email carries the calendar invite."""
        return frozenset(s.id for s in self.steps if s.invite)

    def notice_steps(self) -> str:
        """Return the steps a change notice looks at, as the store keeps them with a
        booking: "<pause step>|<invite step>,<invite step>"; "" if none."""
        pause = self.pause_step()
        invites = sorted(self.invite_steps())
        if pause is None and not invites:
            return ""
        return f"{pause.id if pause else ''}|{','.join(invites)}"


def parse_notice_steps(text: str) -> tuple[str | None, frozenset[str]]:
    """Return (pause step id or None, invite step ids) from `Protocol.notice_steps()`."""
    pause, _, invites = text.partition("|")
    return pause or None, frozenset(i for i in invites.split(",") if i)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the model a field holds (itself, in a list, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """Return the words for a key `model` does not have at `loc`, with the key meant."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if isinstance(part, str):
            model = _model_in(field.annotation) if field else None
    if model is None:
        return "unknown key"
    keys = [k for k in model.model_fields if k != "id"]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return (f"unknown key (did you mean {close[0]}?)" if close
            else f"unknown key (the keys here: {', '.join(keys)})")


def _pydantic_problem(exc: ValidationError, model: type[BaseModel] | None = None,
                      doc: dict[str, Any] | None = None) -> str:
    """Return a validation error as an ops person reads it: each field's dotted place, a
    mistyped key with the key meant (`model`: the file's), a step's id (`doc`: the file)."""
    steps = (doc or {}).get("steps")
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(model, err["loc"])
        where = err["loc"]
        if (len(where) > 1 and where[0] == "steps" and isinstance(where[1], int)
                and isinstance(steps, list) and where[1] < len(steps)
                and isinstance(steps[where[1]], dict)
                and isinstance(steps[where[1]].get("id"), str)):
            msg += f" in step {steps[where[1]]['id']!r}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_toml(path: Path) -> dict[str, Any]:
    """Return a TOML file's table, or raise ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, str(exc)) from None
    except UnicodeDecodeError as exc:  # not UTF-8 (a file saved as Latin-1): tomllib's decode
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start})") from None


def load_protocol(path: Path) -> Protocol:
    """Load one protocol file; its id is the file name without `.toml`."""
    if not re.fullmatch(TREATMENT_ID_PATTERN, path.stem):
        instead = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_") or "treatment"
        raise ConfigError(path, "the file name is the treatment id bookings give: a-z, 0-9, "
                          f"'-' and '_' only (rename it {instead[:64]}.toml)")
    doc = read_toml(path)
    doc.setdefault("id", path.stem)
    if doc["id"] != path.stem:
        raise ConfigError(path, f"id {doc['id']!r} differs from the file name {path.stem!r}")
    try:
        return Protocol.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(path, _pydantic_problem(exc, Protocol, doc)) from None


def config_files(folder: Path) -> list[Path]:
    """Return the `*.toml` files of a config folder, sorted, hidden ones left out: the
    AppleDouble `._x.toml` a macOS copy leaves beside each file, an editor's lock
    `.#x.toml` are no configuration (and no clinic id may begin with ".")."""
    return sorted(p for p in folder.glob("*.toml") if not p.name.startswith("."))


def load_protocols(folder: Path) -> dict[str, Protocol]:
    """Load every `*.toml` protocol in `folder` (`config_files`), keyed by treatment id."""
    if not folder.is_dir():
        raise ConfigError(folder, "protocols folder not found")
    return {p.stem: load_protocol(p) for p in config_files(folder)}
