"""The booking a clinic sends us, validated field by field (pydantic).

Checks that need the loaded configuration (does this clinic exist, does the treatment
name a protocol, do we have templates in this locale) read a `Catalog` passed as the
validation context: `Booking.model_validate(doc, context={"catalog": catalog})`.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import BookingRejected

if TYPE_CHECKING:
    from .catalog import Catalog

Channel = Literal["email", "sms"]
CHANNELS: tuple[Channel, ...] = ("email", "sms")

# Booking ids travel in Redis keys, URLs and file names: keep them plain.
BOOKING_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CLINIC_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
PATTERN_HELP = {
    "booking_id": "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "clinic": "must be a clinic id: 1-32 lowercase letters, digits, '_' or '-'",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (Unicode category Cc)


def parse_e164(value: str) -> str:
    """Return `value` as an E.164 phone number, or raise ValueError saying why not."""
    if not value.startswith("+"):
        raise ValueError("must be in E.164 form with the country code, e.g. +34600111222")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number ({exc})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def parse_email(value: str) -> str:
    """Return the normalised email address, or raise ValueError saying why not."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


def parse_timezone(value: str) -> str:
    """Return `value` if it names an IANA timezone."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}, e.g. Europe/Madrid") from None
    return value


def _plain_text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _catalog(info: ValidationInfo) -> Catalog | None:
    return (info.context or {}).get("catalog")


Phone = Annotated[str, AfterValidator(parse_e164)]
Email = Annotated[str, AfterValidator(parse_email)]
Timezone = Annotated[str, AfterValidator(parse_timezone)]


class Patient(BaseModel):
    """Who receives the reminders, where, in which language and on which channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_plain_text)]
    email: Email | None = None
    phone: Phone | None = None
    timezone: Timezone
    locale: str = Field(min_length=2, max_length=10)
    # Last so its validator can see which contacts were given.
    channels: list[Channel] = Field(min_length=1)

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str, info: ValidationInfo) -> str:
        catalog = _catalog(info)
        if catalog is not None and value not in catalog.locales:
            known = ", ".join(sorted(catalog.locales))
            raise ValueError(f"no templates for locale {value!r}; available: {known}")
        return value

    @field_validator("channels")
    @classmethod
    def _contact_for_each_channel(cls, value: list[Channel], info: ValidationInfo) -> list[Channel]:
        if len(set(value)) != len(value):
            raise ValueError("lists a channel twice")
        for channel, contact in (("email", "email"), ("sms", "phone")):
            # A contact that failed its own validation is already reported; don't pile on.
            if channel in value and contact in info.data and info.data[contact] is None:
                raise ValueError(f"{channel!r} needs patient.{contact}")
        return value

    @property
    def first_name(self) -> str:
        return self.name.split()[0]

    def contact(self, channel: Channel) -> str:
        """Return the address for `channel` (email address or E.164 phone)."""
        value = self.email if channel == "email" else self.phone
        if value is None:
            raise KeyError(channel)
        return value


class Medications(BaseModel):
    """What the patient uses that changes the plan or gates the treatment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tretinoin: bool = False
    retinol: bool = False
    isotretinoin_last_dose: date | None = None


class Booking(BaseModel):
    """One appointment of one patient at one clinic, as the clinic sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clinic: str = Field(pattern=CLINIC_ID_PATTERN)
    booking_id: str = Field(pattern=BOOKING_ID_PATTERN)
    treatment: str = Field(min_length=1, max_length=64)
    starts_at: AwareDatetime
    patient: Patient
    medications: Medications = Medications()

    @field_validator("clinic")
    @classmethod
    def _known_clinic(cls, value: str, info: ValidationInfo) -> str:
        catalog = _catalog(info)
        if catalog is not None and value not in catalog.clinics:
            raise ValueError(f"unknown clinic {value!r}")
        return value

    @field_validator("treatment")
    @classmethod
    def _known_treatment(cls, value: str, info: ValidationInfo) -> str:
        catalog = _catalog(info)
        if catalog is not None and value not in catalog.protocols:
            known = ", ".join(sorted(catalog.protocols))
            raise ValueError(f"no protocol for treatment {value!r}; available: {known}")
        return value

    @property
    def key(self) -> tuple[str, str]:
        return (self.clinic, self.booking_id)


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Return (dotted field, message) for each error pydantic found."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "booking"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of a booking)"
        elif err["type"] == "string_pattern_mismatch" and loc in PATTERN_HELP:
            msg = PATTERN_HELP[loc]
        out.append((loc, msg))
    return out


def parse_booking(doc: Any, catalog: Catalog, *, clinic: str | None = None) -> Booking:
    """Validate one booking document; raise BookingRejected naming every bad field.

    `clinic`, when given (the API key's clinic, or the CLI's --clinic), fills a missing
    `clinic` field and must agree with a present one.
    """
    if not isinstance(doc, dict):
        raise BookingRejected([("booking", "must be a JSON object")])
    errors: list[tuple[str, str]] = []
    if clinic is not None:
        given = doc.get("clinic")
        if given is not None and given != clinic:
            errors.append(("clinic", f"is {given!r} but the request is for {clinic!r}"))
        doc = {**doc, "clinic": clinic}
    try:
        booking = Booking.model_validate(doc, context={"catalog": catalog})
    except ValidationError as exc:
        # Every bad field at once; a clinic mismatch already says what is wrong with `clinic`.
        errors += [(f, m) for f, m in field_errors(exc) if not (errors and f == "clinic")]
    if errors:
        raise BookingRejected(errors)
    return booking


def utc_iso(value: datetime | None) -> str | None:
    """Return a UTC instant as `2026-11-28T17:00:00Z` (the timeline's form)."""
    if value is None:
        return None
    return value.astimezone(ZoneInfo("UTC")).isoformat().replace("+00:00", "Z")
