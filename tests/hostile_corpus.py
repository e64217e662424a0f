"""Hostile bookings: each must be refused naming a field, with nothing stored and no traceback.

Reusable by any intake (the CLI, the HTTP API): import `CORPUS`, a list of `Hostile`:

- `name`: a unique id (a pytest id);
- `raw`: the exact bytes of one booking document as a client would send them (a request
  body, or one line / the whole of `reminders book -` input). Every document is one line;
- `field`: the dotted field the refusal must name: an error's field is this one or inside
  it (`patient` is named by an error on `patient.a.a`); "booking" is the document itself;
- `too_large`: refused for its size alone (more than `MAX_BOOKING_BYTES`), which an HTTP
  API may answer with 413 instead of 422.

Each document is DESIGN.md's example booking (clinic "glow", booking id "H-1") with one
thing broken; its appointment is 30 days after the moment this module is imported, so
that nothing but the broken thing is wrong. `base()` returns a fresh copy of it.

What the cases cover: nesting 100,000 deep and just over the limit, in arrays and objects;
huge and overlong strings in every string field; dates that overflow, come before 1900 or
after 2999, lie two years ahead or in the past, Unix times where a date belongs, a last
isotretinoin dose in the future; bidi overrides and isolates, zero-width characters, byte
order marks, line separators, escape sequences and NUL in free text, ids and contacts;
invalid UTF-8 in values and keys, lone surrogates; duplicate keys at every level; numbers
and booleans where strings belong and the other way round; arrays of 100,000 and of 5,000
items; NaN, Infinity, 1e999 and 5,000-digit numbers; wrong types at every level; a thousand
unknown fields.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from worker.models import MAX_BOOKING_BYTES

MADRID = ZoneInfo("Europe/Madrid")
_STARTS = (datetime.now(UTC) + timedelta(days=30)).astimezone(MADRID).replace(
    hour=14, minute=30, second=0, microsecond=0
)
_BASE: dict[str, Any] = {
    "clinic": "glow",
    "booking_id": "H-1",
    "treatment": "microneedling",
    "starts_at": _STARTS.isoformat(),
    "patient": {
        "name": "Ana López",
        "email": "ana@example.com",
        "phone": "+34600111222",
        "timezone": "Europe/Madrid",
        "locale": "es",
        "channels": ["sms", "email"],
    },
    "medications": {"tretinoin": True, "retinol": False, "isotretinoin_last_dose": None},
}


def base() -> dict[str, Any]:
    """A fresh copy of the valid booking every case starts from."""
    return copy.deepcopy(_BASE)


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    field: str
    too_large: bool = False


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _with(path: str, value: Any) -> bytes:
    """The base booking with the dotted `path` set to `value`, as JSON bytes."""
    doc = base()
    *parents, leaf = path.split(".")
    here = doc
    for part in parents:
        here = here[part]
    here[leaf] = value
    return _dump(doc)


def _raw_value(path: str, raw: bytes) -> bytes:
    """The base booking with the value at `path` replaced by raw JSON text (any bytes)."""
    marker = "@@RAW@@"
    return _with(path, marker).replace(f'"{marker}"'.encode(), raw)


def _insert_key(path: str, value: Any) -> bytes:
    """The base booking with the key at `path` inserted first in its object (a second time,
    if the booking has it)."""
    *parents, leaf = path.split(".")
    text = _dump(base())
    if parents:  # insert into the nested object, right after its opening brace
        anchor = f'"{parents[-1]}": {{'.encode()
    else:
        anchor = b"{"
    extra = f"{json.dumps(leaf)}: {json.dumps(value, ensure_ascii=False)}, ".encode()
    at = text.index(anchor) + len(anchor)
    return text[:at] + extra + text[at:]


def _nested(depth: int, inner: str = "1", kind: str = "[") -> bytes:
    if kind == "[":
        return ("[" * depth + inner + "]" * depth).encode()
    return ('{"a": ' * depth + inner + "}" * depth).encode()


BIDI_OVERRIDE = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: "Ana \u202eetsoP" shows reversed text
BIDI_ISOLATE = "\u2066"  # LEFT-TO-RIGHT ISOLATE
ZERO_WIDTH_SPACE = "\u200b"
ZERO_WIDTH_JOINER = "\u200d"
BOM = "\ufeff"
LINE_SEPARATOR = "\u2028"
FAR = (datetime.now(UTC) + timedelta(days=3 * 365)).astimezone(MADRID).isoformat()
PAST = (datetime.now(UTC) - timedelta(days=1)).astimezone(MADRID).isoformat()
TOMORROW = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()

CORPUS: list[Hostile] = [
    # --- nesting ---------------------------------------------------------------------------
    Hostile("nested-100k-arrays-document", _nested(100_000), "booking", too_large=True),
    Hostile("nested-100k-objects-document", _nested(100_000, kind="{"), "booking",
            too_large=True),
    Hostile("nested-5000-in-name", _raw_value("patient.name", _nested(5000)), "patient.name"),
    Hostile("nested-2000-objects-in-patient",
            _raw_value("patient.timezone", _nested(2000, '"x"', "{")), "patient.timezone"),
    Hostile("nested-just-over-the-limit", _raw_value("medications.tretinoin", _nested(7)),
            "medications.tretinoin"),
    # --- size and length -------------------------------------------------------------------
    Hostile("name-of-1-mib", _with("patient.name", "A" * 2**20), "booking", too_large=True),
    Hostile("name-of-10000-chars", _with("patient.name", "A" * 10_000), "patient.name"),
    Hostile("email-of-5000-chars", _with("patient.email", "a" * 5000 + "@example.com"),
            "patient.email"),
    Hostile("phone-of-5000-digits", _with("patient.phone", "+34" + "6" * 5000), "patient.phone"),
    Hostile("timezone-of-5000-chars", _with("patient.timezone", "Europe/" + "M" * 5000),
            "patient.timezone"),
    Hostile("treatment-of-5000-chars", _with("treatment", "m" * 5000), "treatment"),
    Hostile("locale-of-5000-chars", _with("patient.locale", "e" * 5000), "patient.locale"),
    Hostile("booking-id-of-5000-chars", _with("booking_id", "A" * 5000), "booking_id"),
    # --- dates -----------------------------------------------------------------------------
    Hostile("starts-at-year-9999", _with("starts_at", "9999-12-31T23:30:00-05:00"), "starts_at"),
    Hostile("starts-at-year-1", _with("starts_at", "0001-01-01T00:30:00+14:00"), "starts_at"),
    Hostile("starts-at-three-years-ahead", _with("starts_at", FAR), "starts_at"),
    Hostile("starts-at-yesterday", _with("starts_at", PAST), "starts_at"),
    Hostile("starts-at-unix-time-number", _with("starts_at", 1_900_000_000), "starts_at"),
    Hostile("starts-at-unix-time-string", _with("starts_at", "1900000000"), "starts_at"),
    Hostile("starts-at-offset-99-hours", _with("starts_at", "2027-01-05T14:30:00+99:00"),
            "starts_at"),
    Hostile("starts-at-leap-second", _with("starts_at", "2027-01-05T23:59:60+01:00"),
            "starts_at"),
    Hostile("last-dose-in-the-future", _with("medications.isotretinoin_last_dose", TOMORROW),
            "medications.isotretinoin_last_dose"),
    Hostile("last-dose-year-0", _with("medications.isotretinoin_last_dose", "0000-01-01"),
            "medications.isotretinoin_last_dose"),
    Hostile("last-dose-year-1", _with("medications.isotretinoin_last_dose", "0001-01-01"),
            "medications.isotretinoin_last_dose"),
    Hostile("last-dose-a-number", _with("medications.isotretinoin_last_dose", 0),
            "medications.isotretinoin_last_dose"),
    # --- control and format characters ------------------------------------------------------
    Hostile("name-bidi-override", _with("patient.name", f"Ana {BIDI_OVERRIDE}zepóL"),
            "patient.name"),
    Hostile("name-bidi-isolate", _with("patient.name", f"Ana {BIDI_ISOLATE}López"),
            "patient.name"),
    Hostile("name-zero-width-space", _with("patient.name", f"Ana{ZERO_WIDTH_SPACE} López"),
            "patient.name"),
    Hostile("name-zero-width-joiner", _with("patient.name", f"Ana{ZERO_WIDTH_JOINER}López"),
            "patient.name"),
    Hostile("name-only-zero-width", _with("patient.name", ZERO_WIDTH_SPACE * 3), "patient.name"),
    Hostile("name-byte-order-mark", _with("patient.name", f"{BOM}Ana López"), "patient.name"),
    Hostile("name-line-separator", _with("patient.name", f"Ana{LINE_SEPARATOR}López"),
            "patient.name"),
    Hostile("name-terminal-escape", _with("patient.name", "Ana \x1b]0;pwned\x07López"),
            "patient.name"),
    Hostile("treatment-nul", _with("treatment", "microneedling\x00"), "treatment"),
    Hostile("email-bidi-override", _with("patient.email", f"ana{BIDI_OVERRIDE}@example.com"),
            "patient.email"),
    Hostile("phone-zero-width", _with("patient.phone", f"+34600{ZERO_WIDTH_SPACE}111222"),
            "patient.phone"),
    Hostile("timezone-bidi", _with("patient.timezone", f"Europe/Madrid{BIDI_OVERRIDE}"),
            "patient.timezone"),
    Hostile("booking-id-bidi", _with("booking_id", f"H-1{BIDI_OVERRIDE}"), "booking_id"),
    Hostile("locale-path-traversal", _with("patient.locale", "../../etc"), "patient.locale"),
    Hostile("unknown-field-with-escape-in-its-name",
            _insert_key("\x1b[2J\x1b[H", "x"), "\\u001b[2J\\u001b[H"),
    # --- encoding --------------------------------------------------------------------------
    Hostile("name-invalid-utf8", _raw_value("patient.name", b'"Ana \xff L\xf3pez"'),
            "patient.name"),
    Hostile("email-overlong-utf8", _raw_value("patient.email", b'"ana\xc0\xaf@example.com"'),
            "patient.email"),
    Hostile("key-invalid-utf8", _dump(base()).replace(b'"locale"', b'"loc\xe9le"'), "patient"),
    Hostile("name-lone-surrogate", _raw_value("patient.name", b'"Ana \\ud800 L\\u00f3pez"'),
            "patient.name"),
    # --- duplicate keys ----------------------------------------------------------------------
    Hostile("duplicate-clinic", _insert_key("clinic", "other"), "clinic"),
    Hostile("duplicate-booking-id", _insert_key("booking_id", "H-2"), "booking_id"),
    Hostile("duplicate-patient-phone", _insert_key("patient.phone", "+34600999999"),
            "patient.phone"),
    Hostile("duplicate-medication", _insert_key("medications.tretinoin", False),
            "medications.tretinoin"),
    # --- numbers and booleans where strings belong, and the other way round ------------------
    Hostile("name-a-number", _with("patient.name", 42), "patient.name"),
    Hostile("booking-id-a-number", _with("booking_id", 1042), "booking_id"),
    Hostile("phone-a-number", _with("patient.phone", 34600111222), "patient.phone"),
    Hostile("clinic-a-boolean", _with("clinic", True), "clinic"),
    Hostile("treatment-a-number", _with("treatment", 1), "treatment"),
    Hostile("locale-a-number", _with("patient.locale", 12), "patient.locale"),
    Hostile("tretinoin-a-string", _with("medications.tretinoin", "true"),
            "medications.tretinoin"),
    Hostile("tretinoin-a-number", _with("medications.tretinoin", 1), "medications.tretinoin"),
    # --- arrays ----------------------------------------------------------------------------
    Hostile("channels-100k-items", _with("patient.channels", ["sms"] * 100_000), "booking",
            too_large=True),
    Hostile("channels-5000-items", _with("patient.channels", [1] * 5000), "patient.channels"),
    Hostile("channels-three", _with("patient.channels", ["sms", "email", "sms"]),
            "patient.channels"),
    Hostile("channels-an-object", _with("patient.channels", {"sms": True}), "patient.channels"),
    Hostile("channels-nested-list", _with("patient.channels", [["sms"]]), "patient.channels"),
    Hostile("channels-null-item", _with("patient.channels", [None]), "patient.channels"),
    # --- NaN, Infinity and numbers out of range ------------------------------------------
    Hostile("tretinoin-nan", _raw_value("medications.tretinoin", b"NaN"),
            "medications.tretinoin"),
    Hostile("last-dose-infinity", _raw_value("medications.isotretinoin_last_dose", b"Infinity"),
            "medications.isotretinoin_last_dose"),
    Hostile("retinol-minus-infinity", _raw_value("medications.retinol", b"-Infinity"),
            "medications.retinol"),
    Hostile("name-1e999", _raw_value("patient.name", b"1e999"), "patient.name"),
    Hostile("phone-5000-digit-number", _raw_value("patient.phone", b"9" * 5000),
            "patient.phone"),
    # --- wrong types at every level ------------------------------------------------------
    Hostile("document-an-array-of-an-array", b"[[]]", "booking"),
    Hostile("document-null", b"null", "booking"),
    Hostile("document-a-string", b'"booking"', "booking"),
    Hostile("document-a-number", b"12", "booking"),
    Hostile("document-empty-object", b"{}", "clinic"),
    Hostile("patient-a-list", _with("patient", ["Ana López"]), "patient"),
    Hostile("patient-a-string", _with("patient", "Ana López"), "patient"),
    Hostile("patient-null", _with("patient", None), "patient"),
    Hostile("medications-a-number", _with("medications", 3), "medications"),
    Hostile("medications-null", _with("medications", None), "medications"),
    Hostile("starts-at-an-object", _with("starts_at", {"date": "2027-01-05"}), "starts_at"),
    Hostile("thousand-unknown-fields",
            _dump({**base(), **{f"k{i}": 0 for i in range(1000)}}), "k0"),
]

assert len({case.name for case in CORPUS}) == len(CORPUS), "case names must be unique"
assert all(b"\n" not in case.raw for case in CORPUS), "every document is one line"
assert all(case.too_large == (len(case.raw) > MAX_BOOKING_BYTES) for case in CORPUS), [
    (case.name, len(case.raw)) for case in CORPUS
    if case.too_large != (len(case.raw) > MAX_BOOKING_BYTES)
]
