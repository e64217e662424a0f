"""Clinic configuration: `config/clinics/<clinic>.toml`.

Channel URLs are Apprise URL templates. `{to}` is replaced by the patient's address
(URL-quoted); `${NAME}` by the environment variable NAME, so secrets stay out of the
file. A clinic with no URL for a channel uses the local outbox (the embedded default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import ConfigError
from .models import CLINIC_ID_PATTERN, Channel, Timezone, parse_e164
from .protocols import _pydantic_problem, read_toml

MINUTES_PER_DAY = 24 * 60
DEFAULT_WINDOW = ("09:00", "20:00")  # DOMAIN.md: US quiet hours 08:00-21:00, default narrower
_ENV_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def parse_clock(value: object) -> int:
    """Return "HH:MM" (00:00..24:00) as minutes since midnight."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{2}:\d{2}", value):
        raise ValueError(f"{value!r} is not a clock time HH:MM")
    hours, minutes = int(value[:2]), int(value[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{value!r} is not a clock time between 00:00 and 24:00")
    return hours * 60 + minutes


ClockMinutes = Annotated[int, BeforeValidator(parse_clock)]


class SendWindow(BaseModel):
    """Patient-local hours in which reminders may be delivered: [start, end)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: ClockMinutes = parse_clock(DEFAULT_WINDOW[0])
    end: ClockMinutes = parse_clock(DEFAULT_WINDOW[1])

    @model_validator(mode="after")
    def _ordered(self) -> SendWindow:
        if self.start >= self.end:
            raise ValueError("start must be before end (windows over midnight are not supported)")
        return self

    def contains(self, minute_of_day: float) -> bool:
        return self.start <= minute_of_day < self.end

    def describe(self) -> str:
        def hhmm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"

        return f"{hhmm(self.start)}-{hhmm(self.end)}"


class Clinic(BaseModel):
    """A clinic: who it is, how to reach it, when and how its patients are messaged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=CLINIC_ID_PATTERN)
    name: str = Field(min_length=1, max_length=60)
    phone: Annotated[str, AfterValidator(parse_e164)]
    email: str | None = None
    timezone: Timezone
    locale: str = "en"
    send_window: SendWindow = SendWindow()
    # Discreet wording: subjects and SMS do not name the treatment or medication.
    discreet: bool = False
    # Overrides the protocol's isotretinoin washout, in days.
    isotretinoin_washout_days: int | None = Field(None, ge=0)
    channels: dict[Channel, str] = {}
    # sha256 hex digests of the clinic's API keys (issued by `reminders issue-key`).
    api_key_sha256: list[str] = []

    def channel_url(self, channel: Channel, to: str, env: dict[str, str] | None = None) -> str:
        """Return the Apprise URL for sending `channel` to `to`, secrets filled in."""
        template = self.channels[channel]
        env = os.environ if env is None else env

        def fill(match: re.Match[str]) -> str:
            name = match[1]
            if name not in env:
                raise ConfigError(f"clinic {self.id}", f"environment variable {name} is not set")
            return quote(env[name], safe="")

        return _ENV_REF.sub(fill, template).replace("{to}", quote(to, safe="+@"))

    def missing_secrets(self, env: dict[str, str] | None = None) -> list[str]:
        """Return the environment variables the channel URLs need but are unset."""
        env = os.environ if env is None else env
        names = {m for url in self.channels.values() for m in _ENV_REF.findall(url)}
        return sorted(n for n in names if n not in env)


# Apprise query parameters that carry a secret (mailto ?pass=, twilio ?token=, ...).
_SECRET_PARAMS = {"pass", "password", "pwd", "secret", "token", "key", "apikey"}


def _literal_secret(url: str) -> str | None:
    """Return what in `url` is a secret written literally (not a ${NAME}), or None."""
    rest = url.split("://", 1)[-1]
    authority = re.split(r"[/?#]", _ENV_REF.sub("ENV", rest), maxsplit=1)[0]
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        if ":" in userinfo and _ENV_REF.sub("", rest.split(":", 1)[1].split("@", 1)[0]):
            return "password"
    query = rest.split("?", 1)[1].split("#", 1)[0] if "?" in rest else ""
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower() in _SECRET_PARAMS and _ENV_REF.sub("", value):
            return f"{name} parameter"
    return None


def load_clinic(path: Path) -> Clinic:
    """Load one clinic file; its id is the file name without `.toml`."""
    doc = read_toml(path)
    doc.setdefault("id", path.stem)
    if doc["id"] != path.stem:
        raise ConfigError(path, f"id {doc['id']!r} differs from the file name {path.stem!r}")
    try:
        clinic = Clinic.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(path, _pydantic_problem(exc)) from None
    for channel, url in clinic.channels.items():
        if "{to}" not in url:
            raise ConfigError(path, f"channels.{channel}: the URL must contain {{to}}")
        where = _literal_secret(url)
        if where:
            raise ConfigError(
                path, f"channels.{channel}: put the {where} in ${{ENV_VAR}}, not in the file"
            )
    return clinic


def load_clinics(folder: Path) -> dict[str, Clinic]:
    """Load every `*.toml` clinic in `folder`, keyed by clinic id."""
    if not folder.is_dir():
        raise ConfigError(folder, "clinics folder not found")
    return {p.stem: load_clinic(p) for p in sorted(folder.glob("*.toml"))}
