"""The clinic's name in SMS (`sms_name`), proven by `reminders check` to keep every SMS one
GSM-7 segment; and ZERO WIDTH NON-JOINER allowed in patient names (Persian names)."""

from __future__ import annotations

import copy
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.catalog import Catalog
from worker.checking import check
from worker.errors import BookingRejected, ConfigError
from worker.models import parse_booking
from worker.rendering import Renderer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
LONG = "Clínica Dermatológica Integral del Mediterráneo"  # 47 characters


def config_with(tmp_path: Path, name: str, sms_name: str | None) -> Settings:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    glow = config / "clinics" / "glow.toml"
    text = glow.read_text(encoding="utf-8").replace(
        'name = "Glow Skin Clinic"', f'name = "{name}"'
        + (f'\nsms_name = "{sms_name}"' if sms_name else ""))
    glow.write_text(text, encoding="utf-8")
    return Settings(config_dir=config, templates_dir=ROOT / "templates", _env_file=None)


def run_check(settings: Settings):
    catalog = Catalog.load(settings)
    return check(catalog, settings.clinics_dir, env={})


def test_a_name_too_long_for_one_segment_fails_check_until_sms_name_is_set(tmp_path):
    report = run_check(config_with(tmp_path / "a", LONG, None))
    mine = [str(e) for e in report.errors if "glow.toml" in str(e)]
    assert mine and all("set a shorter sms_name" in e for e in mine), report.errors
    assert f"with its name {LONG!r} (47 characters)" in mine[0]
    fixed = run_check(config_with(tmp_path / "b", LONG, "Clinica Medi"))
    assert fixed.errors == [], fixed.errors
    assert all((s.encoding, s.segments) == ("GSM-7", 1) for s in fixed.sms)


def test_sms_use_the_sms_name_and_emails_the_full_name(tmp_path, booking_doc):
    settings = config_with(tmp_path, LONG, "Clinica Medi")
    catalog = Catalog.load(settings)
    renderer = Renderer(catalog.templates_dir)
    booking = parse_booking(booking_doc, catalog)
    clinic, protocol = catalog.clinics["glow"], catalog.protocols["microneedling"]
    sms = renderer.render(template="day-before", channel="sms", booking=booking, clinic=clinic,
                          protocol=protocol, occurrence=1, due_at=NOW).text
    email = renderer.render(template="day-before", channel="email", booking=booking,
                            clinic=clinic, protocol=protocol, occurrence=1, due_at=NOW).text
    assert "Clinica Medi" in sms and "Integral" not in sms
    assert LONG in email


@pytest.mark.parametrize("value", ["", "A" * 31, "Clinic\nSol", "Clinic \u202eSol"])
def test_sms_name_is_validated(tmp_path, value):
    settings = config_with(tmp_path, "Glow Skin Clinic", value.replace("\n", "\\n") or None)
    if not value:  # an empty value is refused too (written out)
        glow = settings.clinics_dir / "glow.toml"
        glow.write_text(glow.read_text(encoding="utf-8").replace(
            'name = "Glow Skin Clinic"', 'name = "Glow Skin Clinic"\nsms_name = ""'),
            encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        Catalog.load(settings)
    assert "sms_name" in str(refused.value)


@pytest.mark.parametrize("name", ["مهر\u200cانگیز رضایی", "Mehr\u200cangiz Rezaei"])
def test_a_zero_width_non_joiner_between_letters_is_part_of_a_name(catalog: Catalog,
                                                                  booking_doc, name):
    doc = copy.deepcopy(booking_doc)
    doc["patient"]["name"] = name
    doc["patient"]["preferred_name"] = name.split()[0]
    booking = parse_booking(doc, catalog)
    assert booking.patient.name == name and "\u200c" in booking.patient.first_name


@pytest.mark.parametrize(("name", "found"), [
    ("Ana\u200c", "U+200C"), ("\u200cAna", "U+200C"), ("Ana \u200cLópez", "U+200C"),
    ("Ana\u200c\u200cLópez", "U+200C"), ("Ana\u200dLópez", "U+200D"),
    ("Ana\u200bLópez", "U+200B"), ("Mehr\u200cangiz \u202eRezaei", "U+202E"),
    ("Mehr\u200cangiz\u2066", "U+2066"), ("Ana\ufeffLópez", "U+FEFF"),
])
def test_other_invisible_characters_stay_refused(catalog: Catalog, booking_doc, name, found):
    doc = copy.deepcopy(booking_doc)
    doc["patient"]["name"] = name
    with pytest.raises(BookingRejected) as refused:
        parse_booking(doc, catalog)
    (field, message), = refused.value.errors
    assert field == "patient.name" and found in message


def test_check_fails_a_name_that_passes_in_the_clinics_variant_but_not_in_a_patients(
        tmp_path):
    """A message is written in the patient's regional variant (an en-US patient of a Madrid
    clinic: "Sep 30 at 12:30 PM", "100.4F"), but check rendered only the clinic's own (en-ES:
    "30 Sept at 12:30", "38C"). With the 17-character "Clinica Piel Sana" check passed, yet
    that patient's SMS were 161 characters: two segments (DOMAIN.md "SMS cost")."""
    from worker.checking import sample_booking, sample_messages, sample_notices
    from worker.sms import sms_segments

    settings = config_with(tmp_path, "Clinica Piel Sana", None)
    catalog = Catalog.load(settings)
    renderer = Renderer(catalog.templates_dir)
    clinic = catalog.clinics["glow"]
    over = []
    for protocol in catalog.protocols.values():
        patient = sample_booking(clinic, protocol, "en-US")
        messages = [m for _, m in sample_messages(renderer, patient, clinic, protocol, ("sms",))]
        messages += [m for _, m in sample_notices(renderer, patient, clinic, protocol, ("sms",))]
        over += [m.text for m in messages if sms_segments(m.text)[2] > 1]
    assert over  # what the patient would get
    report = check(catalog, settings.clinics_dir, env={})
    mine = [str(e) for e in report.errors if "glow.toml" in str(e)]
    assert mine and "set a shorter sms_name" in mine[0], report.errors
