"""Intake: every malformed booking is refused with field-level errors and nothing touched.

Each case starts from DESIGN.md's example booking (examples/booking.json), breaks one
thing, and expects `parse_booking` to raise BookingRejected naming exactly that field
(dotted), without mutating the document it was given.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import BookingRejected
from worker.models import Booking, parse_booking

Doc = dict[str, Any]


def set_(path: str, value: Any) -> Callable[[Doc], None]:
    """A mutation setting the dotted `path` of the document to `value`."""
    *parents, leaf = path.split(".")

    def apply(doc: Doc) -> None:
        for part in parents:
            doc = doc[part]
        doc[leaf] = value

    return apply


def drop(path: str) -> Callable[[Doc], None]:
    *parents, leaf = path.split(".")

    def apply(doc: Doc) -> None:
        for part in parents:
            doc = doc[part]
        del doc[leaf]

    return apply


def both(*mutations: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        for mutate in mutations:
            mutate(doc)

    return apply


# (id, mutation, the dotted field that must be named, a word the message must contain)
MALFORMED = [
    # phone
    ("phone-not-e164", set_("patient.phone", "600111222"), "patient.phone", "E.164"),
    ("phone-00-prefix", set_("patient.phone", "0034600111222"), "patient.phone", "E.164"),
    ("phone-invalid-number", set_("patient.phone", "+34123"), "patient.phone", "valid"),
    ("phone-unassigned-country", set_("patient.phone", "+999123456789"), "patient.phone", ""),
    ("phone-garbage", set_("patient.phone", "+call me"), "patient.phone", "phone"),
    ("phone-not-a-string", set_("patient.phone", 34600111222), "patient.phone", "string"),
    # email
    ("email-no-domain", set_("patient.email", "ana@"), "patient.email", ""),
    ("email-no-at", set_("patient.email", "ana.example.com"), "patient.email", "@"),
    ("email-dotless-domain", set_("patient.email", "ana@localhost"), "patient.email", "period"),
    ("email-spaces", set_("patient.email", "ana lopez@example.com"), "patient.email", ""),
    # timezone and locale
    ("timezone-unknown", set_("patient.timezone", "Europe/Atlantis"), "patient.timezone",
     "IANA"),
    ("timezone-offset-not-zone", set_("patient.timezone", "+01:00"), "patient.timezone", "IANA"),
    ("timezone-path", set_("patient.timezone", "../../etc/passwd"), "patient.timezone", "IANA"),
    ("timezone-empty", set_("patient.timezone", ""), "patient.timezone", "IANA"),
    ("timezone-missing", drop("patient.timezone"), "patient.timezone", "required"),
    ("locale-unknown", set_("patient.locale", "xq"), "patient.locale", "xq"),
    ("locale-too-short", set_("patient.locale", "e"), "patient.locale", ""),
    # starts_at
    ("starts-at-naive", set_("starts_at", "2026-12-05T14:30:00"), "starts_at", "timezone"),
    ("starts-at-date-only", set_("starts_at", "2026-12-05"), "starts_at", ""),
    ("starts-at-not-a-date", set_("starts_at", "next Tuesday"), "starts_at", ""),
    ("starts-at-impossible-day", set_("starts_at", "2026-02-30T10:00:00+01:00"), "starts_at",
     ""),
    ("starts-at-missing", drop("starts_at"), "starts_at", "required"),
    ("starts-at-null", set_("starts_at", None), "starts_at", ""),
    # treatment and clinic
    ("treatment-unknown", set_("treatment", "botox"), "treatment", "microneedling"),
    ("treatment-empty", set_("treatment", ""), "treatment", ""),
    ("clinic-unknown", set_("clinic", "shine"), "clinic", "shine"),
    ("clinic-bad-id", set_("clinic", "Glow Clinic"), "clinic", ""),
    ("clinic-missing", drop("clinic"), "clinic", "required"),
    # channels
    ("sms-without-phone", drop("patient.phone"), "patient.channels", "patient.phone"),
    ("email-without-email", drop("patient.email"), "patient.channels", "patient.email"),
    ("sms-with-null-phone", set_("patient.phone", None), "patient.channels", "patient.phone"),
    ("channels-empty", set_("patient.channels", []), "patient.channels", ""),
    ("channels-duplicate", set_("patient.channels", ["sms", "sms"]), "patient.channels",
     "twice"),
    ("channels-unknown", set_("patient.channels", ["email", "whatsapp"]), "patient.channels",
     "sms"),
    ("channels-not-a-list", set_("patient.channels", "sms"), "patient.channels", ""),
    # unknown extra fields, top level and nested
    ("extra-top-level", set_("notes", "VIP"), "notes", "unknown field"),
    ("extra-in-patient", set_("patient.age", 34), "patient.age", "unknown field"),
    ("extra-in-medications", set_("medications.accutane", True), "medications.accutane",
     "unknown field"),
    # booking_id
    ("booking-id-slash", set_("booking_id", "A/1042"), "booking_id", ""),
    ("booking-id-space", set_("booking_id", "A 1042"), "booking_id", ""),
    ("booking-id-too-long", set_("booking_id", "A" * 65), "booking_id", ""),
    ("booking-id-empty", set_("booking_id", ""), "booking_id", ""),
    ("booking-id-leading-dot", set_("booking_id", ".hidden"), "booking_id", ""),
    ("booking-id-redis-glob", set_("booking_id", "A*"), "booking_id", ""),
    ("booking-id-number", set_("booking_id", 1042), "booking_id", "string"),
    # name
    ("name-empty", set_("patient.name", ""), "patient.name", ""),
    ("name-blank", set_("patient.name", "   "), "patient.name", ""),
    ("name-newline-inside", set_("patient.name", "Ana\nLópez"), "patient.name", "control"),
    ("name-nul", set_("patient.name", "Ana\x00"), "patient.name", "control"),
    ("name-escape-sequence", set_("patient.name", "Ana \x1b[31mLópez"), "patient.name",
     "control"),
    ("name-c1-control", set_("patient.name", "Ana\x85López"), "patient.name", "control"),
    ("name-too-long", set_("patient.name", "A" * 101), "patient.name", ""),
    ("patient-not-an-object", set_("patient", "Ana López"), "patient", ""),
    # medications
    ("medications-not-an-object", set_("medications", "tretinoin"), "medications", ""),
    ("medications-a-list", set_("medications", ["tretinoin"]), "medications", ""),
    ("tretinoin-not-a-bool", set_("medications.tretinoin", "sometimes"),
     "medications.tretinoin", "boolean"),
    ("isotretinoin-not-a-date", set_("medications.isotretinoin_last_dose", "last spring"),
     "medications.isotretinoin_last_dose", "date"),
    ("isotretinoin-impossible-date", set_("medications.isotretinoin_last_dose", "2026-13-01"),
     "medications.isotretinoin_last_dose", ""),
    ("isotretinoin-a-bool", set_("medications.isotretinoin_last_dose", True),
     "medications.isotretinoin_last_dose", ""),
    # strict types: nothing is converted (pydantic would read 1 as true, a number as Unix time)
    ("tretinoin-one", set_("medications.tretinoin", 1), "medications.tretinoin", "boolean"),
    ("retinol-yes", set_("medications.retinol", "yes"), "medications.retinol", "boolean"),
    ("starts-at-unix-time", set_("starts_at", 1796466600), "starts_at", "ISO 8601"),
    ("starts-at-unix-time-text", set_("starts_at", "1796466600"), "starts_at", "ISO 8601"),
    ("starts-at-year-9999", set_("starts_at", "9999-12-31T23:30:00-05:00"), "starts_at",
     "1900-2999"),
    ("isotretinoin-unix-time", set_("medications.isotretinoin_last_dose", 0),
     "medications.isotretinoin_last_dose", "YYYY-MM-DD"),
    ("isotretinoin-year-1", set_("medications.isotretinoin_last_dose", "0001-01-01"),
     "medications.isotretinoin_last_dose", "1900-2999"),
    ("locale-a-number", set_("patient.locale", 12), "patient.locale", "string"),
    ("treatment-a-number", set_("treatment", 12), "treatment", "string"),
    # control and format characters in every string field, bounded lengths
    ("name-bidi-override", set_("patient.name", "Ana \u202eLópez"), "patient.name",
     "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("name-zero-width", set_("patient.name", "Ana\u200b"), "patient.name", "U+200B"),
    ("email-bidi", set_("patient.email", "ana\u2066@example.com"), "patient.email", "U+2066"),
    ("phone-zero-width", set_("patient.phone", "+34\u200b600111222"), "patient.phone", "U+200B"),
    ("timezone-nul", set_("patient.timezone", "Europe/Madrid\x00"), "patient.timezone",
     "U+0000"),
    ("treatment-bidi", set_("treatment", "microneedling\u202e"), "treatment", "U+202E"),
    ("locale-path", set_("patient.locale", "../es"), "patient.locale", "language tag"),
    ("email-too-long", set_("patient.email", "a" * 300 + "@example.com"), "patient.email",
     "254"),
    ("channels-three", set_("patient.channels", ["sms", "email", "sms"]), "patient.channels",
     "at most 2"),
]


def names(field: str, expected: str) -> bool:
    """Whether an error's dotted field is `expected` or inside it (patient.channels.1)."""
    return field == expected or field.startswith(expected + ".")


@pytest.mark.parametrize(("mutate", "field", "word"),
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_booking_is_refused_naming_the_field(catalog, booking_doc, mutate, field, word):
    mutate(booking_doc)
    before = copy.deepcopy(booking_doc)
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog)
    errors = exc.value.errors
    assert errors, "a refusal must say why"
    assert all(names(f, field) for f, _ in errors), errors
    assert word.lower() in " ".join(msg for _, msg in errors).lower()
    assert all(msg for _, msg in errors)
    assert booking_doc == before  # the input was not touched
    assert field in str(exc.value)


def test_there_are_at_least_twenty_cases():
    assert len(MALFORMED) >= 20
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("doc", [None, [], ["booking"], "booking", 42, 4.2, True],
                         ids=["null", "empty-list", "list", "string", "int", "float", "bool"])
def test_a_document_that_is_not_an_object_is_refused(catalog, doc):
    before = copy.deepcopy(doc)
    with pytest.raises(BookingRejected) as exc:
        parse_booking(doc, catalog)
    assert exc.value.errors == [("booking", "must be a JSON object")]
    assert doc == before


def test_clinic_mismatch_with_the_request_is_refused(catalog, booking_doc):
    before = copy.deepcopy(booking_doc)
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog, clinic="other")
    fields = [f for f, _ in exc.value.errors]
    assert fields == ["clinic"]
    assert "'glow'" in exc.value.errors[0][1] and "'other'" in exc.value.errors[0][1]
    assert booking_doc == before


def test_clinic_mismatch_is_reported_with_the_other_bad_fields(catalog, booking_doc):
    booking_doc["patient"]["phone"] = "600111222"
    booking_doc["booking_id"] = "A 1042"
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog, clinic="other")
    fields = [f for f, _ in exc.value.errors]
    assert fields.count("clinic") == 1
    assert set(fields) == {"clinic", "patient.phone", "booking_id"}


def test_request_clinic_fills_a_missing_clinic(catalog, booking_doc):
    del booking_doc["clinic"]
    before = copy.deepcopy(booking_doc)
    booking = parse_booking(booking_doc, catalog, clinic="glow")
    assert booking.clinic == "glow"
    assert booking_doc == before  # not added to the caller's dict


def test_request_clinic_must_itself_be_known(catalog, booking_doc):
    del booking_doc["clinic"]
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog, clinic="nowhere")
    assert [f for f, _ in exc.value.errors] == ["clinic"]


def test_several_bad_fields_are_all_reported_at_once(catalog, booking_doc):
    booking_doc["booking_id"] = "A/1042"
    booking_doc["treatment"] = "botox"
    booking_doc["starts_at"] = "2026-12-05T14:30:00"
    booking_doc["notes"] = "VIP"
    booking_doc["patient"].update(phone="600111222", email="ana@", timezone="Mars/Olympus",
                                  locale="xq", name="", channels=["sms", "fax"], age=3)
    booking_doc["medications"]["isotretinoin_last_dose"] = "soon"
    before = copy.deepcopy(booking_doc)
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog)
    fields = {f for f, _ in exc.value.errors}
    expected = {"booking_id", "treatment", "starts_at", "notes", "patient.phone",
                "patient.email", "patient.timezone", "patient.locale", "patient.name",
                "patient.age", "medications.isotretinoin_last_dose"}
    assert expected <= fields
    assert any(names(f, "patient.channels") for f in fields)
    assert booking_doc == before
    message = str(exc.value)
    for field in expected:
        assert field in message


def test_the_example_booking_is_accepted(catalog, booking_doc):
    before = copy.deepcopy(booking_doc)
    booking = parse_booking(booking_doc, catalog)
    assert isinstance(booking, Booking)
    assert booking.key == ("glow", "A-1042")
    assert booking.patient.channels == ["sms", "email"]
    assert booking.medications.tretinoin is True
    assert booking_doc == before


def test_contacts_are_normalised(catalog, booking_doc):
    booking_doc["patient"]["phone"] = "+34 600 111 222"
    booking_doc["patient"]["name"] = "  Ana López "
    booking = parse_booking(booking_doc, catalog)
    assert booking.patient.phone == "+34600111222"
    assert booking.patient.name == "Ana López"
    assert booking.patient.first_name == "Ana"


def test_medications_are_optional(catalog, booking_doc):
    del booking_doc["medications"]
    booking = parse_booking(booking_doc, catalog)
    assert (booking.medications.tretinoin, booking.medications.retinol,
            booking.medications.isotretinoin_last_dose) == (False, False, None)


def test_a_booking_with_thousands_of_problems_reports_twenty(catalog, booking_doc):
    booking_doc.update({f"x{i}": i for i in range(5000)})
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog)
    assert len(exc.value.errors) == 20
    assert exc.value.errors[-1] == ("booking", "and 4981 more problems")


def test_a_mismatched_clinic_is_shown_short(catalog, booking_doc):
    booking_doc["clinic"] = "g" * 10_000
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog, clinic="glow")
    assert max(len(message) for _, message in exc.value.errors) < 120


def test_load_booking_refuses_hostile_json_naming_the_field():
    from worker.models import load_booking

    assert load_booking(b'{"a": 1}') == {"a": 1}
    with pytest.raises(BookingRejected) as exc:
        load_booking(b'{"patient": {"name": "x", "name": "y"}}')
    assert exc.value.errors == [("patient.name", "is given twice in the same object")]
    with pytest.raises(BookingRejected) as exc:
        load_booking(b"{" + b" " * 20000 + b"}")
    assert exc.value.errors[0][0] == "booking"


def test_a_contact_that_failed_is_not_reported_twice(catalog, booking_doc):
    """A bad phone is reported on patient.phone, not also as 'sms needs patient.phone'."""
    booking_doc["patient"]["phone"] = "600111222"
    with pytest.raises(BookingRejected) as exc:
        parse_booking(booking_doc, catalog)
    assert [f for f, _ in exc.value.errors] == ["patient.phone"]


# --- parse_email's memoised common case gives email_validator's own answer ----------------

TRICKY_EMAILS = [
    "ana@example.com", "Ana.Lopez+clinic@Example.COM", "a@b.co", "x@localhost", "x@example",
    "x@example.local", "x@example.test", "x@invalid", "x@sub.example.arpa", "x@1.2.3.4",
    "x@example.123", "x@-example.com", "x@example-.com", "x@exa--mple.com", "x@ab--cd.com",
    "x@xn--bcher-kva.example", "x@XN--BCHER-KVA.example", "x@example..com", "x@.example.com",
    "x@example.com.", ".x@example.com", "x..y@example.com", "x.@example.com",
    "Postmaster@example.com", "ABUSE@Example.com", "info@example.com", "a" * 64 + "@e.com",
    "a" * 200 + "@example.com", "a" * 240 + "@" + "b" * 10 + ".com",
    "x@" + "a" * 63 + ".com", "x@" + "a" * 64 + ".com", "x@" + ("a" * 60 + ".") * 5 + "com",
    "!#$%&'*+/=?^_`{|}~-@example.com", "x@example.com ", "x@exam_ple.com", "x@münchen.de",
    "ñ@example.com", "x@@example.com", "x@example@com", '"x"@example.com',
]


def reference_email(value: str) -> tuple[str, str]:
    from email_validator import EmailNotValidError, validate_email

    try:
        return "ok", validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        return "refused", str(exc)


def fast_email(value: str) -> tuple[str, str]:
    from worker.models import parse_email

    try:
        return "ok", parse_email(value)
    except ValueError as exc:
        return "refused", str(exc)


@pytest.mark.parametrize("value", TRICKY_EMAILS)
def test_parse_email_is_email_validators_answer(value):
    assert fast_email(value) == reference_email(value)
    assert fast_email(value) == reference_email(value)  # memoised the second time


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,70}@[A-Za-z0-9._-]{1,70}",
                     fullmatch=True)
       | st.emails().map(str))
def test_parse_email_is_email_validators_answer_for_random_addresses(value):
    assert fast_email(value) == reference_email(value)
