"""The fast phone check (`fast_e164`) gives phonenumbers' own answer (`slow_e164`).

Every number is checked both ways: the fast path must either leave a number to
phonenumbers (None) or give exactly what phonenumbers gives (its E.164 form, or "" where
phonenumbers parses it but finds it invalid). Numbers: every region's example numbers of
every type (valid ones), the same with digits changed or added or dropped (mostly
invalid), random digits after every country code, and hypothesis' choice.
"""

from __future__ import annotations

import random

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.models import fast_e164, parse_e164, slow_e164

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def phonenumbers_answer(value: str) -> str | None:
    """What `slow_e164` says: the E.164 form, "" if invalid for its country, None if it is
    not a phone number at all (another refusal)."""
    try:
        return slow_e164(value)
    except ValueError as exc:
        return "" if "valid phone number for its country" in str(exc) else None


def same(value: str) -> bool | None:
    """True: the fast path decided, as phonenumbers does; None: it left the number alone."""
    fast = fast_e164(value)
    if fast is None:
        return None
    assert fast == phonenumbers_answer(value), value
    return True


def example_numbers() -> list[str]:
    out = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                out.append(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164))
    for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        example = phonenumbers.example_number_for_non_geo_entity(code)
        if example is not None:
            out.append(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164))
    return out


def test_every_example_number_and_its_neighbours() -> None:
    rng = random.Random(5)
    examples = example_numbers()
    assert len(examples) > 1000
    decided = valid = 0
    for number in examples:
        variants = [number, number + str(rng.randrange(10)), number[:-1]]
        for _ in range(3):
            at = rng.randrange(2, len(number))
            variants.append(number[:at] + str(rng.randrange(10)) + number[at + 1 :])
        for value in variants:
            if same(value):
                decided += 1
                valid += bool(fast_e164(value))
    # The fast path decides most numbers, valid and invalid ones (else it proves nothing).
    assert decided > 0.8 * 6 * len(examples)
    assert valid > len(examples)


def test_random_digits_after_every_country_code() -> None:
    rng = random.Random(11)
    decided = 0
    for code in CODES:
        for _ in range(40):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 16)))
            decided += bool(same(f"+{code}{digits}"))
    assert decided > 0.5 * 40 * len(CODES)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(CODES), st.text("0123456789", min_size=0, max_size=18))
def test_hypothesis_country_code_and_digits(code: int, digits: str) -> None:
    same(f"+{code}{digits}")


@settings(max_examples=500, deadline=None)
@given(st.text("+0123456789 -()", min_size=1, max_size=22))
def test_hypothesis_any_dialling_text(value: str) -> None:
    same(value)


@pytest.mark.parametrize("value", [
    "+34600111222", "+447911123456", "+12125550123", "+61412345678", "+4915112345678",
    "+440123456789", "+3906123456", "+999123456789", "+34123", "+1", "+12", "+123",
    "+0034600111222", "+34 600 111 222", "+34600111222x12", "+٣٤600111222",
])
def test_parse_e164_is_unchanged(value: str) -> None:
    """parse_e164 (fast where it can) answers exactly as phonenumbers alone."""
    try:
        expected: str | tuple[str, str] = slow_e164(value)
    except ValueError as exc:
        expected = ("refused", str(exc))
    parse_e164.cache_clear()
    try:
        got: str | tuple[str, str] = parse_e164(value)
    except ValueError as exc:
        got = ("refused", str(exc))
    assert got == expected
