"""Clinic configuration: `config/clinics/<clinic>.toml`.

Channel URLs are Apprise URL templates. `{to}` is replaced by the patient's address
(URL-quoted); `${NAME}` by the environment variable NAME, so secrets stay out of the
file. The local outbox is used only when the clinic says so: `outbox = true` (for the
channels it has no URL for), or no channel URL at all (the embedded/demo default). A
clinic with a URL for one channel but not the other, and without `outbox = true`, is a
configuration error (`reminders check`); its sends on the missing channel fail for good.

An email URL of Apprise's email plugin (`mailto://`, `mailtos://`) that gives its sender no
name (`from=` an address only, or no `from=`) is sent with the clinic's `name` as the From
name (`name=`, `delivery_url`): Apprise would write the bare address, or "Apprise" as the
name of the login's address. A name the URL gives (`name=`, `from=Name <address>`) is kept.
And one sending from an address other than the clinic's `email` (a provider's no-reply) has
Reply-To the clinic's `email` (`reply=`), so a patient's reply reaches the clinic, unless
the URL names its own `reply=`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, quote, urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from .errors import ConfigError
from .models import (
    CHANNELS,
    CLINIC_ID_PATTERN,
    LANGUAGE_TAG_PATTERN,
    Channel,
    Timezone,
    canonical_locale,
    parse_e164,
    safe_text,
)
from .protocols import _pydantic_problem, config_files, read_toml
from .settings import MIN_SECRET_CHARS
from .webhooks import EVENT_TYPES

MINUTES_PER_DAY = 24 * 60
SMS_NAME_MAX = 30  # characters of `sms_name`; `reminders check` decides what fits
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


def _a_place(value: str) -> str:
    """Return a clinic's timezone if it names a place ("Europe/Madrid") or is "UTC". The tz
    database also loads abbreviations and fixed offsets ("CET", "EST", "MST7MDT",
    "Etc/GMT-1"): "EST" stays UTC-5 all summer in New York (invites, patients' replies an
    hour off) and none names a country, whose formats the messages use (°F, dates)."""
    if value in ("UTC", "Etc/UTC") or ("/" in value and not value.startswith("Etc/")):
        return value
    raise ValueError(f"{value!r} is not a place (an abbreviation or a fixed offset: it names "
                     "no country, and may not follow its summer time); write the clinic's "
                     "Area/City zone, e.g. Europe/Madrid or America/New_York, or UTC")


ClinicTimezone = Annotated[Timezone, AfterValidator(_a_place)]


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


class Webhook(BaseModel):
    """Where the clinic's booking software hears about reminders (see worker/webhooks.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000)
    # "${NAME}": the signing secret is read from the environment at send time.
    secret: str = Field(pattern=r"^\$\{[A-Z_][A-Z0-9_]*\}$")
    # "${NAME}" of the secret being rotated out: while set, each event is signed with both
    # (two `v1=` in the header, `secret`'s first), so the clinic's receiver verifies with
    # either while it switches to the new one; removed once it has.
    previous_secret: str | None = Field(None, pattern=r"^\$\{[A-Z_][A-Z0-9_]*\}$")
    # Which events to send (default: all of them).
    events: list[Literal[EVENT_TYPES]] | None = None  # type: ignore[valid-type]

    def secret_value(self, clinic: str, env: Mapping[str, str] | None = None) -> str:
        """Return the signing secret from the environment."""
        return self.secret_values(clinic, env)[0]

    def secret_values(self, clinic: str, env: Mapping[str, str] | None = None) -> list[str]:
        """Return the signing secrets from the environment: `secret`, then `previous_secret`
        if set (a ConfigError if either variable is unset: an event signed with the new
        secret alone would be refused by a receiver not switched yet)."""
        values = []
        for ref in self.secret_refs():
            name = ref[2:-1]
            value = (os.environ if env is None else env).get(name)
            if not value:
                raise ConfigError(f"clinic {clinic}", f"environment variable {name} is not set")
            values.append(value)
        return values

    def secret_refs(self) -> list[str]:
        """Return `secret`, then `previous_secret` if set ("${NAME}" each)."""
        return [self.secret] + ([self.previous_secret] if self.previous_secret else [])

    def short_secret(self, env: Mapping[str, str] | None = None) -> str | None:
        """Return the name of the first secret's environment variable (`secret`, then
        `previous_secret`) set to fewer than MIN_SECRET_CHARS characters (a forgeable
        signature), else None. Sends still use it: `reminders check` fails on it instead."""
        for ref in self.secret_refs():
            name = ref[2:-1]
            value = (os.environ if env is None else env).get(name)
            if value is not None and len(value) < MIN_SECRET_CHARS:
                return name
        return None


def _clinic_email(value: str) -> str:
    """Return the clinic's address (held-booking alerts; the invites' organizer), or raise
    ValueError saying why it is not one. A test domain (`desk@clinic.test`) is allowed."""
    try:
        return str(validate_email(value, check_deliverability=False,
                                  test_environment=True).normalized)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


def _one_line(value: str) -> str:
    value = safe_text(value).strip()
    if not value:
        raise ValueError("must not be blank")
    return value


Address = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_one_line)]


class SmsSettings(BaseModel):
    """The clinic's SMS rules ([sms] in its file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Frequency caps per patient (phone) at this clinic, patient-local, across all of the
    # patient's bookings: DOMAIN.md "healthcare SMS without prior consent (US): at most 1 a
    # day and 3 a week" (FCC 2015 order). A week is any 7 consecutive days. What does not fit
    # goes by email if the patient takes email, else moves to the next day with room before
    # it expires (worker/planner.py `cap_sms`).
    max_per_day: int = Field(1, ge=1, le=10)
    max_per_week: int = Field(3, ge=1, le=70)

    @model_validator(mode="after")
    def _week_holds_a_day(self) -> SmsSettings:
        if self.max_per_week < self.max_per_day:
            raise ValueError("max_per_week must be at least max_per_day")
        return self


class Inbound(BaseModel):
    """Texts from patients (worker/api/inbound.py): how the SMS provider's requests are
    trusted. With `twilio_auth_token` every request must carry Twilio's signature made with
    it; without one, requests are refused unless `allow_unsigned = true` (development only:
    anyone who knows the URL could then opt a number out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "${NAME}": the account's auth token is read from the environment at request time.
    twilio_auth_token: str | None = Field(None, pattern=r"^\$\{[A-Z_][A-Z0-9_]*\}$")
    allow_unsigned: StrictBool = False

    @model_validator(mode="after")
    def _one_way(self) -> Inbound:
        if self.allow_unsigned and self.twilio_auth_token:
            raise ValueError("allow_unsigned is for development without a twilio_auth_token; "
                             "give one or the other")
        return self

    def auth_token(self, clinic: str, env: Mapping[str, str] | None = None) -> str | None:
        """Return the auth token from the environment (None if none is configured)."""
        if self.twilio_auth_token is None:
            return None
        name = self.twilio_auth_token[2:-1]
        value = (os.environ if env is None else env).get(name)
        if not value:
            raise ConfigError(f"clinic {clinic}", f"environment variable {name} is not set")
        return value


_LANGUAGE_TAG = re.compile(LANGUAGE_TAG_PATTERN)


def _language_tag(value: str) -> str:
    """A clinic's locale in its canonical case (`ES` -> `es`), as a patient's is read."""
    if not _LANGUAGE_TAG.match(value):
        raise ValueError(f"{value!r} is not a language tag such as en or es-ES")
    return canonical_locale(value)


class Clinic(BaseModel):
    """A clinic: who it is, how to reach it, when and how its patients are messaged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=CLINIC_ID_PATTERN)
    name: str = Field(min_length=1, max_length=60)
    phone: Annotated[str, AfterValidator(parse_e164)]
    email: Annotated[str, AfterValidator(_clinic_email)] | None = None
    # Where the visit happens, one line ("Calle Mayor 1, 28013 Madrid"): the location of the
    # calendar invite (worker/invites.py). Without it the invite names the clinic only.
    address: Address | None = None
    timezone: ClinicTimezone  # IANA Area/City, or UTC
    # The clinic's language (its alerts; a patient's messages when their own has no
    # templates), read in its canonical case: "ES" is es/ (RFC 5646 2.1.1).
    locale: Annotated[str, AfterValidator(_language_tag)] = "en"
    send_window: SendWindow = SendWindow()
    # Discreet wording: subjects and SMS do not name the treatment or medication.
    discreet: bool = False
    # Letters outside GSM-7 in an SMS (María, Zoë, "Clínica", "tretinoína"): "fold" them to
    # their base letter so the text stays GSM-7 (one segment), or "keep" them (UCS-2: about
    # 2-3 segments; `reminders check` shows the cost). Emails always keep them.
    sms_accents: Literal["fold", "keep"] = "fold"
    # The clinic's name as SMS write it (default: `name`). Every SMS must stay one GSM-7
    # segment with its opt-out line: `reminders check` fails for a clinic whose SMS name
    # makes one longer, and asks for a shorter `sms_name` ("Clinica Sol" for "Clínica
    # Dermatológica Sol de la Costa").
    sms_name: Annotated[str, Field(min_length=1, max_length=SMS_NAME_MAX),
                        AfterValidator(_one_line)] | None = None
    sms: SmsSettings = SmsSettings()
    # Overrides the protocol's isotretinoin washout, in days (at least 1: 0 would hold no
    # booking ever, while the messages still ask about the protocol's months).
    isotretinoin_washout_days: int | None = Field(None, ge=1)
    channels: dict[Channel, str] = {}
    # true: a channel without a URL goes to the local outbox; false: never the outbox;
    # unset: the outbox only when there is no channel URL at all.
    outbox: StrictBool | None = None
    # Signed webhooks to the clinic's booking software ([webhook] url, secret, events).
    webhook: Webhook | None = None
    # Texts from patients: STOP, START, HELP, confirm and reschedule replies ([inbound]).
    inbound: Inbound = Inbound()
    # sha256 hex digests of the clinic's API keys (issued by `reminders issue-key`).
    api_key_sha256: list[str] = []

    @property
    def sms_label(self) -> str:
        """The clinic's name in SMS: `sms_name`, else `name`."""
        return self.sms_name or self.name

    def channel_url(self, channel: Channel, to: str, env: Mapping[str, str] | None = None) -> str:
        """Return the Apprise URL for sending `channel` to `to`, secrets filled in."""
        template = self.channels[channel]
        env = os.environ if env is None else env

        def fill(match: re.Match[str]) -> str:
            name = match[1]
            if name not in env:
                raise ConfigError(f"clinic {self.id}", f"environment variable {name} is not set")
            return quote(env[name], safe="")

        return _ENV_REF.sub(fill, template).replace("{to}", quote(to, safe="+@"))

    def uses_outbox(self, channel: Channel) -> bool:
        """Return whether messages on `channel` go to the local outbox."""
        if channel in self.channels:
            return False
        return self.outbox if self.outbox is not None else not self.channels

    def unreachable_channels(self) -> list[Channel]:
        """Return the channels with neither a URL nor the outbox (a configuration error)."""
        return [c for c in CHANNELS if c not in self.channels and not self.uses_outbox(c)]

    def delivery_url(
        self, channel: Channel, to: str, env: Mapping[str, str] | None = None
    ) -> str | None:
        """Return the Apprise URL for sending `channel` to `to`, or None for the outbox.

        Raises ConfigError if the clinic has no URL for `channel` and does not use the
        outbox, or if a secret the URL needs is not set.
        """
        if channel in self.channels:
            url = self.channel_url(channel, to, env)
            return with_sender(url, self.name, self.email) if channel == "email" else url
        if self.uses_outbox(channel):
            return None
        raise ConfigError(f"clinic {self.id}", unreachable_problem(channel))

    def wants(self, event_type: str) -> bool:
        """Return whether the clinic's webhook takes `event_type`."""
        hook = self.webhook
        return hook is not None and (hook.events is None or event_type in hook.events)

    def missing_secrets(self, env: Mapping[str, str] | None = None) -> list[str]:
        """Return the environment variables the channel URLs and webhook need but are unset."""
        env = os.environ if env is None else env
        names = {m for url in self.channels.values() for m in _ENV_REF.findall(url)}
        if self.webhook:
            names.update(ref[2:-1] for ref in self.webhook.secret_refs())
        if self.inbound.twilio_auth_token:
            names.add(self.inbound.twilio_auth_token[2:-1])
        return sorted(n for n in names if n not in env)


def with_sender(url: str, name: str, reply_to: str | None = None) -> str:
    """Return an Apprise email URL (`mailto://`, `mailtos://`) with `name` as its From name
    if its sender has none of its own (`name=`), and `reply_to` as its Reply-To if it names
    none (`reply=`) and sends from another address (`from=`, else the login); any other URL
    as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mailto", "mailtos"):
        return url
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    senders = [_sender_address(v) for v in query.get("from", [])]
    extra = []
    if not any(v.strip() for v in query.get("name", [])) and not any(
            n.strip() for n, _ in senders):
        # On one line (a name from TOML may hold a line break): a From header never breaks.
        extra.append(f"name={quote(' '.join(name.split()), safe='')}")
    if reply_to and not any(v.strip() for v in query.get("reply", [])) and not any(
            a.strip().lower() == reply_to.lower() for _, a in senders):
        extra.append(f"reply={quote(reply_to, safe='@')}")
    if not extra:
        return url
    return url + ("&" if "?" in rest else "?") + "&".join(extra)


@functools.lru_cache(maxsize=256)
def _sender_address(value: str) -> tuple[str, str]:
    """`parseaddr` of a URL's `from=`, kept: a clinic's sender is the same in every email it
    sends (cProfile: parsing it was about 4 % of an email's CPU in the send path)."""
    return parseaddr(value)


def unreachable_problem(channel: Channel) -> str:
    """Return the problem of a clinic with no URL for `channel` and no outbox."""
    return (
        f"has no URL for {channel} and does not use the outbox "
        f"(add channels.{channel}, or outbox = true to write {channel} to the outbox)"
    )


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
        raise ConfigError(path, _pydantic_problem(exc, Clinic)) from None
    for channel, url in clinic.channels.items():
        if "{to}" not in url:
            raise ConfigError(path, f"channels.{channel}: the URL must contain {{to}}")
        if "${" in _ENV_REF.sub("", url):
            raise ConfigError(path, f"channels.{channel}: an environment variable is written "
                              "${NAME}, NAME in capitals, digits and _ (e.g. ${GLOW_SMS_TOKEN})")
        where = _literal_secret(url)
        if where:
            raise ConfigError(
                path, f"channels.{channel}: put the {where} in ${{ENV_VAR}}, not in the file"
            )
    return clinic


def load_clinics(folder: Path) -> dict[str, Clinic]:
    """Load every `*.toml` clinic in `folder` (`config_files`), keyed by clinic id."""
    if not folder.is_dir():
        raise ConfigError(folder, "clinics folder not found")
    return {p.stem: load_clinic(p) for p in config_files(folder)}
