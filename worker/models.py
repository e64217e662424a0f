"""The booking a clinic sends us, validated field by field (pydantic).

Checks that need the loaded configuration (does this clinic exist, does the treatment
name a protocol, do we have templates in this locale) read a `Catalog` passed as the
validation context: `Booking.model_validate(doc, context={"catalog": catalog})`.

Intake bounds (hostile input gets a refusal naming the field, never a traceback):
- a booking document is at most `MAX_BOOKING_BYTES` of JSON nested at most
  `MAX_BOOKING_DEPTH` deep, without duplicate keys, NaN or invalid UTF-8
  (`load_booking`, through `worker.jsonsafe.load_json`);
- every string is a string (a number or a boolean is refused, not converted), is bounded
  in length, and holds no control or format character (Unicode Cc, Cf — bidi overrides
  and isolates, zero-width characters —, surrogates, line/paragraph separators), except
  a ZERO WIDTH NON-JOINER between two letters of a patient's name (Persian names);
- `starts_at` is an ISO 8601 date-time with its offset in the years 1900-2999 and
  `isotretinoin_last_dose` an ISO date (YYYY-MM-DD) from 1900 (numbers, which pydantic
  would read as Unix times, are refused); the planner, which knows `now`, refuses an
  appointment in the past or more than `MAX_DAYS_AHEAD` days ahead, and a last dose
  after the patient's today;
- `patient.channels` has one or two entries.
"""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from .errors import BookingRejected
from .jsonsafe import JSONRefused, Path, describe_char, dotted, load_json, unsafe_char

if TYPE_CHECKING:
    from .catalog import Catalog

_M = TypeVar("_M", bound=BaseModel)

Channel = Literal["email", "sms"]
CHANNELS: tuple[Channel, ...] = ("email", "sms")

# Booking ids travel in Redis keys, URLs and file names: keep them plain.
BOOKING_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CLINIC_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
PATTERN_HELP = {
    "booking_id": "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "clinic": "must be a clinic id: 1-32 lowercase letters, digits, '_' or '-'",
    "patient.locale": "must be a language tag such as en or es-ES",
}

# Intake bounds (see the module docstring).
MAX_BOOKING_BYTES = 16 * 1024  # a real booking is well under 1 KiB
MAX_BOOKING_DEPTH = 8  # a booking nests 3 deep: booking > patient > channels
MAX_DAYS_AHEAD = 730  # appointments are booked at most two years ahead
MAX_ERRORS = 20  # per booking; more are summed up in one line
YEARS = (1900, 2999)
_ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def safe_text(value: str) -> str:
    """Return `value` if it holds no control or format character, else raise ValueError."""
    bad = unsafe_char(value)
    if bad is not None:
        raise ValueError(
            f"must not contain control or invisible formatting characters "
            f"(found {describe_char(bad)} at position {value.index(bad) + 1})"
        )
    return value


def _iso_datetime(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > 40 or not _ISO_DATETIME.fullmatch(value):
            raise ValueError(
                "must be an ISO 8601 date and time with its UTC offset, "
                "e.g. 2026-12-05T14:30:00+01:00"
            )
    elif not isinstance(value, datetime):  # a number would be read as a Unix time
        raise ValueError(
            "must be an ISO 8601 date-time string such as 2026-12-05T14:30:00+01:00, "
            f"not {_json_type(value)}"
        )
    return value


def _iso_date(value: Any) -> Any:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a date written YYYY-MM-DD, not {_json_type(value)}")
    if not _ISO_DATE.fullmatch(value):
        raise ValueError("must be a date written YYYY-MM-DD")
    return value


def _in_years(value: date) -> date:
    if not YEARS[0] <= value.year <= YEARS[1]:
        raise ValueError(f"must be in the years {YEARS[0]}-{YEARS[1]}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@lru_cache(maxsize=65536)
def parse_e164(value: str) -> str:
    """Return `value` as an E.164 phone number, or raise ValueError saying why not.

    Memoised by the number as given (a pure function of it): a clinic that sends its
    bookings again, or a patient booked twice, is not parsed again. The common form (a
    "+" and ASCII digits) takes `fast_e164`, which gives phonenumbers' answer without its
    general-purpose parsing; anything else, or a case it does not decide, goes to
    phonenumbers itself (`slow_e164`).
    """
    if not value.startswith("+"):
        raise ValueError("must be in E.164 form with the country code, e.g. +34600111222")
    fast = fast_e164(value)
    if fast is None:
        return slow_e164(value)
    if not fast:
        raise ValueError("is not a valid phone number for its country")
    return fast


def slow_e164(value: str) -> str:
    """`parse_e164` through phonenumbers' own parse, validity check and formatting."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number ({exc})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# --- phonenumbers' answer for "+<digits>", fast -------------------------------------------
#
# For a "+" followed by ASCII digits, phonenumbers.parse(value, None) takes the country
# code as the first 1-3 digits that name one, and the rest as the national number, unless
# the rest starts with the country's national prefix (then it may strip it) or with a 0
# (Italian leading zeros): those cases, and any country without metadata, are left to
# phonenumbers. is_valid_number then asks: the number's region (the first of the country's
# regions whose leading digits match, or else whose number types accept it), and whether
# the national number matches the region's general pattern and one of its number types
# (each a set of lengths and a pattern). The same patterns, compiled once per region,
# give the same answer in a few microseconds instead of about 80
# (tests/test_phone_fast.py compares both on every region's example numbers and on
# random digits for every country code).

_PLUS_DIGITS = re.compile(r"\+([1-9][0-9]{2,19})")
_Desc = tuple[frozenset[int], "re.Pattern[str]"]


@dataclass(frozen=True)
class _Region:
    leading: re.Pattern[str] | None  # the region's leading digits, matched at the start
    general: _Desc | None
    types: tuple[_Desc, ...]  # premium rate ... voicemail, fixed line, mobile (as checked)


def _desc(desc: Any) -> _Desc | None:
    """A number description as (its lengths, its pattern anchored at both ends); None if it
    can match nothing (no description, or an empty pattern)."""
    if desc is None or not desc.national_number_pattern:
        return None
    return frozenset(desc.possible_length), re.compile(desc.national_number_pattern)


def _matches(nsn: str, desc: _Desc | None) -> bool:
    return desc is not None and (not desc[0] or len(nsn) in desc[0]) and (
        desc[1].fullmatch(nsn) is not None)


def _region(metadata: Any) -> _Region:
    m = metadata
    types = [m.premium_rate, m.toll_free, m.shared_cost, m.voip, m.personal_number, m.pager,
             m.uan, m.voicemail, m.fixed_line]
    if not m.same_mobile_and_fixed_line_pattern:
        types.append(m.mobile)
    return _Region(
        leading=re.compile(m.leading_digits) if m.leading_digits is not None else None,
        general=_desc(m.general_desc),
        types=tuple(d for d in map(_desc, types) if d is not None),
    )


def _valid_type(nsn: str, region: _Region) -> bool:
    """`_number_type_helper(nsn, metadata) != UNKNOWN`."""
    return _matches(nsn, region.general) and any(_matches(nsn, d) for d in region.types)


@dataclass(frozen=True)
class _Country:
    national_prefix: re.Pattern[str] | None  # national_prefix_for_parsing of the parse region
    # In phonenumbers' order: each region, and whether a number of this country code can be
    # valid in it; a region without metadata is None.
    regions: tuple[tuple[_Region, bool] | None, ...]


_COUNTRIES: dict[int, _Country | None] = {}


def _country(code: int) -> _Country | None:
    """What `fast_e164` needs of a country code (None: leave it to phonenumbers)."""
    if code in _COUNTRIES:
        return _COUNTRIES[code]
    from phonenumbers import phonenumberutil as pnu
    from phonenumbers.phonemetadata import PhoneMetadata

    found: _Country | None = None
    names = pnu.COUNTRY_CODE_TO_REGION_CODE.get(code)
    parse_meta = PhoneMetadata.metadata_for_region_or_calling_code(
        code, pnu.region_code_for_country_code(code))
    if names and parse_meta is not None:
        regions: list[tuple[_Region, bool] | None] = []
        for name in names:
            # One region: it is the number's region. Several: the search reads geographic
            # metadata only (metadata_for_region), skipping a region that has none.
            meta = (PhoneMetadata.metadata_for_region_or_calling_code(code, name.upper())
                    if len(names) == 1 else PhoneMetadata.metadata_for_region(name.upper(), None))
            if meta is None:
                regions.append(None)
                continue
            valid = (name == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY
                     or phonenumbers.country_code_for_valid_region(name) == code)
            regions.append((_region(meta), valid))
        prefix = parse_meta.national_prefix_for_parsing
        found = _Country(re.compile(prefix) if prefix else None, tuple(regions))
    _COUNTRIES[code] = found
    return found


def fast_e164(value: str) -> str | None:
    """phonenumbers' verdict on `value` when it is "+" and ASCII digits, without its parse:
    the E.164 form if valid, "" if it parses but is not a valid number, None if undecided
    here (another form, a national prefix or leading zero to strip, no metadata)."""
    plain = _PLUS_DIGITS.fullmatch(value)
    if plain is None:
        return None
    digits = plain[1]
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in _CODES:
            break
    else:
        return None
    nsn = digits[size:]
    if not 2 <= len(nsn) <= 17 or nsn[0] == "0":
        return None
    country = _country(code)
    if country is None:
        return None
    if country.national_prefix is not None and country.national_prefix.match(nsn):
        return None
    if len(country.regions) == 1:
        only = country.regions[0]
        return value if only is not None and only[1] and _valid_type(nsn, only[0]) else ""
    for entry in country.regions:  # _region_code_for_number_from_list
        if entry is None:
            continue
        region, valid = entry
        if region.leading is not None:
            if region.leading.match(nsn):
                return value if valid and _valid_type(nsn, region) else ""
        elif _valid_type(nsn, region):
            return value if valid else ""
    return ""


_CODES = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def parse_email(value: str) -> str:
    """Return the normalised email address, or raise ValueError saying why not.

    email_validator decides. Its answer for the common address (an ASCII dot-atom before
    the @, a domain it keeps but for case) is the address with the domain lowercased, and
    its domain checks (the costly part) depend on the domain alone: those are memoised per
    domain, which patients share (tests/test_booking_validation.py checks the equivalence).
    """
    plain = _PLAIN_EMAIL.fullmatch(value)
    if (
        plain is not None
        and len(value) <= EMAIL_MAX_LENGTH
        and plain[1].lower() not in CASE_INSENSITIVE_MAILBOX_NAMES
    ):
        domain = _plain_domain(plain[2])
        if domain is not None:
            return f"{plain[1]}@{domain}"
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


_PLAIN_EMAIL = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
                          r"@([A-Za-z0-9.-]+)")


@lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> str | None:
    """The domain as email_validator normalises it, if only its case changes; else None."""
    try:
        normalized = validate_email("x@" + domain, check_deliverability=False).domain
    except EmailNotValidError:
        return None
    return normalized if normalized == domain.lower() else None


# Files of the tz database that ZoneInfo loads but that name no place: the host's own zone
# ("localtime": the API server's, not the patient's), the old POSIX default rules, and the
# placeholder zone "Factory" (offset 0, abbreviation "-00"); `right/...` and `posix/...` are
# copies of the zones under other clocks (leap seconds), not zone names.
NOT_PLACES = frozenset({"localtime", "posixrules", "Factory"})


@lru_cache(maxsize=1)
def iana_timezones() -> frozenset[str]:
    """The IANA zone names a booking may give: `zoneinfo.available_timezones()` (the tzdata
    package's list and the system's), less NOT_PLACES. Read once (about 0.1 s: it walks the
    system's zoneinfo folder), not per booking."""
    import zoneinfo

    return frozenset(name for name in zoneinfo.available_timezones()
                     if name not in NOT_PLACES and not name.startswith(("right/", "posix/")))


def parse_timezone(value: str) -> str:
    """Return `value` if it names an IANA timezone (a place, as "Europe/Madrid", or a fixed
    zone as "UTC"); "localtime", "posixrules", "Factory" and "right/..." are refused."""
    if value in NOT_PLACES or value.startswith(("right/", "posix/")):
        raise ValueError(f"{value!r} is not an IANA timezone name (a file of the server's "
                         f"time zone database, not a place), e.g. Europe/Madrid")
    # The list is read once per process: a zone installed since (a tzdata update, a
    # PYTHONTZPATH folder filled later) is not in it, so a name missing from it is taken if
    # ZoneInfo loads it as a zone, as every name was before the list. A stored booking's zone
    # must stay readable by a worker started before the zone file was there.
    if value not in iana_timezones() and not _zone_file_name(value):
        raise ValueError(f"unknown IANA timezone {value!r}, e.g. Europe/Madrid")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder ("Europe")
        raise ValueError(f"unknown IANA timezone {value!r}, e.g. Europe/Madrid") from None
    return value


_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9][A-Za-z0-9_+-]*)*")


def _zone_file_name(value: str) -> bool:
    """Whether `value` is shaped like a zone name ("Area/Place": letters, digits, "_", "-",
    "+"; no dot, so never a table such as "zone.tab") and loads as a zone."""
    if not _ZONE_NAME.fullmatch(value):
        return False
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a folder of the database ("Europe", "America/Argentina"), which ZoneInfo
        # opens from the tzdata package (IsADirectoryError), or a file it cannot read.
        return False
    return True


def _plain_text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return safe_text(value)


ZWNJ = "\u200c"  # ZERO WIDTH NON-JOINER: part of how Persian (and other) names are spelled


def _plain_name(value: str) -> str:
    """A person's name: as `_plain_text`, but a ZERO WIDTH NON-JOINER (U+200C) between two
    letters is allowed ("مهر\u200cانگیز"); bidi controls and every other invisible
    character are still refused, and so is a ZWNJ anywhere else (it would only hide)."""
    if ZWNJ not in value:
        return _plain_text(value)
    value = value.strip()
    for n, char in enumerate(value):
        if char == ZWNJ and not (0 < n < len(value) - 1 and value[n - 1].isalpha()
                                 and value[n + 1].isalpha()):
            raise ValueError(
                f"must not contain control or invisible formatting characters (found "
                f"{describe_char(char)} at position {n + 1}, not between two letters)")
    _plain_text(value.replace(ZWNJ, ""))  # everything else as any text
    return value


def _catalog(info: ValidationInfo) -> Catalog | None:
    return (info.context or {}).get("catalog")


# Every string field is strict (a number is refused, not converted), bounded, and free of
# control and format characters before anything else looks at it.
Phone = Annotated[str, Strict(), Field(max_length=32), AfterValidator(safe_text),
                  AfterValidator(parse_e164)]
Email = Annotated[str, Strict(), Field(max_length=254), AfterValidator(safe_text),
                  AfterValidator(parse_email)]
Timezone = Annotated[str, Strict(), Field(max_length=64), AfterValidator(safe_text),
                     AfterValidator(parse_timezone)]
StartsAt = Annotated[AwareDatetime, BeforeValidator(_iso_datetime), AfterValidator(_in_years)]
DoseDate = Annotated[date | None, BeforeValidator(_iso_date)]


# A language tag as locales are written: "en", "es-ES", "pt_BR", "zh-Hant-TW".
LANGUAGE_TAG_PATTERN = r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,2}$"


@lru_cache(maxsize=1024)  # a pure function of a short tag: patients share a handful
def canonical_locale(tag: str) -> str:
    """A language tag in its canonical case (BCP 47 tags are case-insensitive: RFC 5646
    2.1.1): the language lower-case, a script title-case, a region upper-case; `EN-gb` ->
    `en-GB`. The templates' folders are named so (`en`, `es`): `EN` was taken, then its
    messages written in the clinic's language, not in English."""
    parts = re.split(r"([-_])", tag)
    out = [parts[0].lower()]
    for sep, part in zip(parts[1::2], parts[2::2], strict=True):
        if len(part) == 4 and part.isalpha():
            part = part.title()
        elif len(part) == 2 and part.isalpha() or len(part) == 3 and part.isdigit():
            part = part.upper()
        else:
            part = part.lower()
        out += [sep, part]
    return "".join(out)

@lru_cache(maxsize=1024)
def _language(tag: str) -> str:
    """The language of a language tag ("es-MX" -> "es")."""
    return re.split(r"[-_]", tag, maxsplit=1)[0]


class Patient(BaseModel):
    """Who receives the reminders, where, in which language and on which channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), Field(min_length=1, max_length=100),
                    AfterValidator(_plain_name)]
    # What the messages greet the patient by ("María José", not the first word "María");
    # unset: the first word of `name`. Validated as `name` is.
    preferred_name: Annotated[str, Strict(), Field(min_length=1, max_length=100),
                              AfterValidator(_plain_name)] | None = None
    email: Email | None = None
    phone: Phone | None = None
    timezone: Timezone
    locale: str = Field(strict=True, pattern=LANGUAGE_TAG_PATTERN,
                        max_length=10)
    # Last so its validator can see which contacts were given.
    channels: list[Channel] = Field(min_length=1, max_length=len(CHANNELS))

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str, info: ValidationInfo) -> str:
        value = canonical_locale(value)
        catalog = _catalog(info)
        language = _language(value)
        if catalog is None or value in catalog.locales or language in catalog.locales:
            return value
        # No templates in it: the messages fall back to the clinic's language, then English
        # (worker/rendering.py), as long as it is a language at all.
        from babel import Locale, UnknownLocaleError  # only for this rare case

        try:
            Locale.parse(value.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            known = ", ".join(sorted(catalog.locales))
            raise ValueError(f"{value!r} is not a known locale; templates exist for: "
                             f"{known}") from None
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

    @model_serializer(mode="wrap")
    def _without_unset_preferred_name(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A booking without a preferred name is stored as before the field existed (the
        same document: re-submitting it changes nothing)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("preferred_name") is None:
            data.pop("preferred_name", None)
        return data

    @property
    def first_name(self) -> str:
        """What the messages greet the patient by: the preferred name, else the first word
        of the name (templates: `patient_first_name`)."""
        return self.preferred_name or self.name.split()[0]

    def contact(self, channel: Channel) -> str:
        """Return the address for `channel` (email address or E.164 phone)."""
        value = self.email if channel == "email" else self.phone
        if value is None:
            raise KeyError(channel)
        return value


class Medications(BaseModel):
    """What the patient uses that changes the plan or gates the treatment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tretinoin: StrictBool = False
    retinol: StrictBool = False
    isotretinoin_last_dose: DoseDate = None

    @field_validator("isotretinoin_last_dose")
    @classmethod
    def _plausible(cls, value: date | None) -> date | None:
        return None if value is None else _in_years(value)


class Booking(BaseModel):
    """One appointment of one patient at one clinic, as the clinic sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clinic: str = Field(strict=True, pattern=CLINIC_ID_PATTERN)
    booking_id: str = Field(strict=True, pattern=BOOKING_ID_PATTERN)
    treatment: Annotated[str, Strict(), Field(min_length=1, max_length=64),
                         AfterValidator(safe_text)]
    starts_at: StartsAt
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
    """Return (dotted field, message) for each error pydantic found (field names printable)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = dotted(err["loc"]) or "booking"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of a booking)"
        elif err["type"] == "string_pattern_mismatch" and loc in PATTERN_HELP:
            msg = PATTERN_HELP[loc]
        out.append((loc, msg))
    return out


def capped(errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """At most MAX_ERRORS errors, the rest summed up (a hostile booking can have thousands)."""
    if len(errors) <= MAX_ERRORS:
        return errors
    rest = len(errors) - MAX_ERRORS + 1
    return [*errors[: MAX_ERRORS - 1], ("booking", f"and {rest} more problems")]


def json_field(path: Path) -> str:
    """The booking field a JSON-level problem at `path` is in (at most 3 levels, a key last)."""
    parts = list(path[:3])
    while parts and isinstance(parts[-1], int):
        parts.pop()
    return dotted(tuple(parts)) or "booking"


def json_refusal(exc: JSONRefused) -> BookingRejected:
    """The refusal of a booking whose JSON was refused (`exc.path` from the booking's root)."""
    return BookingRejected([(json_field(exc.path), exc.problem)])


def load_booking(data: str | bytes) -> Any:
    """Parse one booking document received from outside; raise BookingRejected if refused.

    Bounded by MAX_BOOKING_BYTES and MAX_BOOKING_DEPTH; see `worker.jsonsafe.load_json`.
    A JSON syntax error is refused too, on the field "booking".
    """
    try:
        return load_json(data, max_bytes=MAX_BOOKING_BYTES, max_depth=MAX_BOOKING_DEPTH)
    except JSONRefused as exc:
        raise json_refusal(exc) from None


def _shown(value: Any) -> str:
    """A short, printable form of a value from outside, for an error message."""
    text = repr(value) if isinstance(value, str) else _json_type(value)
    return text if len(text) <= 40 else text[:39] + "…"


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
            errors.append(("clinic", f"is {_shown(given)} but the request is for {clinic!r}"))
        doc = {**doc, "clinic": clinic}
    try:
        booking = Booking.model_validate(doc, context={"catalog": catalog})
    except ValidationError as exc:
        # Every bad field at once; a clinic mismatch already says what is wrong with `clinic`.
        errors += [(f, m) for f, m in field_errors(exc) if not (errors and f == "clinic")]
    if errors:
        raise BookingRejected(capped(errors))
    return booking


def trusted_booking(doc: dict[str, Any]) -> Booking:
    """Rebuild the Booking whose `model_dump(mode="json")` is `doc`, without validating again.

    Only for a document this program validated itself (a batch hands bookings from the
    check to the store in this compact form): nothing is checked here. The models are
    built as `model_construct` builds them (the same fields, the same fields set), without
    its general search for aliases and defaults (tests/test_batch.py compares the two).
    """
    given = doc["patient"]
    patient = _built(Patient, {
        "name": given["name"],
        "preferred_name": given.get("preferred_name"),
        "email": given.get("email"),
        "phone": given.get("phone"),
        "timezone": given["timezone"],
        "locale": given["locale"],
        "channels": given["channels"],
    }, set(given))
    meds = doc["medications"]
    dose = meds["isotretinoin_last_dose"]
    medications = _built(Medications, {
        "tretinoin": meds["tretinoin"],
        "retinol": meds["retinol"],
        "isotretinoin_last_dose": None if dose is None else date.fromisoformat(dose),
    }, _MEDICATION_FIELDS)
    return _built(Booking, {
        "clinic": doc["clinic"],
        "booking_id": doc["booking_id"],
        "treatment": doc["treatment"],
        "starts_at": datetime.fromisoformat(doc["starts_at"]),
        "patient": patient,
        "medications": medications,
    }, _BOOKING_FIELDS)


_MEDICATION_FIELDS = frozenset(("tretinoin", "retinol", "isotretinoin_last_dose"))
_BOOKING_FIELDS = frozenset(("clinic", "booking_id", "treatment", "starts_at", "patient",
                             "medications"))
_set = object.__setattr__


def _built(cls: type[_M], values: dict[str, Any], fields_set: AbstractSet[str]) -> _M:
    """`cls.model_construct(**values)` where `values` names every field of `cls` in order
    and `fields_set` those given (the models have no extra fields, private attributes or
    post-init)."""
    model = cls.__new__(cls)
    _set(model, "__dict__", values)
    _set(model, "__pydantic_fields_set__", set(fields_set))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def utc_iso(value: datetime | None) -> str | None:
    """Return a UTC instant as `2026-11-28T17:00:00Z` (the timeline's form)."""
    if value is None:
        return None
    return value.astimezone(ZoneInfo("UTC")).isoformat().replace("+00:00", "Z")
