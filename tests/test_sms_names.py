"""The name an SMS greets the patient by is at most `SMS_NAME_MAX` characters
(worker/rendering.py `sms_name`): a longer preferred name is greeted by its first word, else
the name's first word, else with no name ("Hi," / "Hola:"). `check` renders every SMS with
names of exactly that length and with one too long (worker/checking.py `sample_names`), so
every SMS fits one GSM-7 segment whatever the patient's name (up to the 100 characters a
booking allows). Emails greet by the full preferred name."""

from __future__ import annotations

import copy
from itertools import product
from typing import Any

import pytest

from worker.catalog import Catalog
from worker.checking import (
    SAMPLE_FIRST_NAMES,
    SAMPLE_UNFIT_NAME,
    sample_booking,
    sample_messages,
    sample_names,
    sample_notices,
)
from worker.models import Booking
from worker.rendering import SMS_NAME_MAX, Renderer, sms_name
from worker.sms import sms_segments

LONGEST = "Wolfeschlegelsteinhausenbergerdorffwelchevoralternwarengewissenhaftschaferswessen"
# (A morning message sampled after noon, as the demo protocol's may be, says "Hi." without
# a name: its "Good morning" is only for the morning, templates/README.md `morning`.)
GREETINGS = {"en": ("Hi,", "Good morning.", "Hi."), "es": ("Hola:", "Buenos días.")}


def patient(booking_doc: dict[str, Any], catalog: Catalog, name: str,
            preferred: str | None) -> Booking:
    doc = copy.deepcopy(booking_doc)
    doc["patient"]["name"] = name
    if preferred is not None:
        doc["patient"]["preferred_name"] = preferred
    return Booking.model_validate(doc, context={"catalog": catalog})


@pytest.mark.parametrize(("name", "preferred", "greeted"), [
    ("María José Pérez", "María José", "María José"),
    ("Christabelle Smith", None, "Christabelle"),
    ("María del Carmen Pérez", "María del Carmen", "María"),        # 16: its first word
    (f"Ana {LONGEST}", LONGEST, "Ana"),                               # the name's first word
    (f"{LONGEST} Pérez", None, None),                                 # nothing fits
    (f"{LONGEST} Pérez", f"{LONGEST[:40]} {LONGEST[:59]}", None),     # 100 characters
])
def test_the_name_an_sms_greets_by(catalog, booking_doc, name, preferred, greeted):
    booking = patient(booking_doc, catalog, name, preferred)
    assert sms_name(booking.patient) == greeted


def test_checks_samples_are_the_longest_names_an_sms_greets_by_and_one_longer():
    for names in SAMPLE_FIRST_NAMES.values():
        assert max(len(n) for n in names) == SMS_NAME_MAX
    assert len(SAMPLE_UNFIT_NAME) > SMS_NAME_MAX
    assert SAMPLE_UNFIT_NAME in sample_names("en") and SAMPLE_UNFIT_NAME in sample_names("es")


@pytest.mark.parametrize(("locale", "discreet"), list(product(["en", "es"], [False, True])))
def test_every_sms_is_one_gsm7_segment_with_a_100_character_preferred_name(
        catalog: Catalog, locale: str, discreet: bool) -> None:
    renderer = Renderer(catalog.templates_dir)
    preferred = f"{LONGEST[:40]} {LONGEST[:59]}"
    assert len(preferred) == 100
    seen = 0
    for clinic, protocol in product(catalog.clinics.values(), catalog.protocols.values()):
        wording = clinic.model_copy(update={"discreet": discreet})
        booking = sample_booking(wording, protocol, locale)
        long_named = booking.model_copy(update={"patient": booking.patient.model_copy(
            update={"preferred_name": preferred, "name": f"{LONGEST} Sample"})})
        messages = [m for _, m in sample_messages(renderer, long_named, wording, protocol)]
        messages += [m for _, m in sample_notices(renderer, long_named, wording, protocol)]
        for message in messages:
            if message.channel == "email":
                assert preferred in message.text  # emails greet by the full name
                continue
            seen += 1
            encoding, length, segments = sms_segments(message.text)
            assert (encoding, segments) == ("GSM-7", 1), (length, message.text)
            assert "\ue000" not in message.text and LONGEST[:20] not in message.text
            assert message.text.startswith(GREETINGS[locale]), message.text
    assert seen > 20


def test_without_the_limit_a_long_name_takes_two_segments(catalog: Catalog) -> None:
    """The check above can fail: the same SMS greeting the 100-character name is longer."""
    renderer = Renderer(catalog.templates_dir)
    clinic = catalog.clinics["glow"]
    protocol = catalog.protocols["microneedling"]
    booking = sample_booking(clinic, protocol, "en")
    (_, message), *_ = (x for x in sample_messages(renderer, booking, clinic, protocol, ("sms",))
                        if x[0].template == "stop-retinoids")
    greeted = "Hi " + booking.patient.first_name + ","
    assert greeted in message.text
    longer = message.text.replace(greeted, "Hi " + LONGEST[:40] + " " + LONGEST[:59] + ",")
    assert sms_segments(longer)[2] > 1


@pytest.mark.parametrize(("locale", "name", "preferred", "greeting"), [
    # An emoji in the preferred name: greeted by the name's first word, which folds.
    ("en", "Ana López", "Ana 🌸", "Hi Ana, "),
    ("es", "Ana López", "Ana 🌸", "Hola, Ana: "),
    # A name in a script GSM-7 cannot spell (no base letter to fold to): no name.
    ("en", "Ольга Petrova", None, "Hi, "),
    ("es", "Ελένη Παπαδοπούλου", None, "Hola: "),
    # Its first word folds: "Zoë" -> "Zoe", as before.
    ("en", "Zoë 山田", "Zoë 山田", "Hi Zoe, "),
])
def test_a_name_that_cannot_be_written_in_gsm7_does_not_turn_every_sms_into_ucs2(
        catalog: Catalog, booking_doc: dict[str, Any], locale: str, name: str,
        preferred: str | None, greeting: str) -> None:
    """DOMAIN.md "SMS cost": one character outside GSM-7 (an emoji, "ł" has a base letter,
    "л" has none) turns the whole text to UCS-2, 70 characters a segment: the 140-character
    reminder is three segments. The clinic folds SMS to stay GSM-7 (`sms_accents = "fold"`,
    the default), and the module docstring promises one GSM-7 segment whatever the name.
    Before: "Hi Ana 🌸, ..." and "Hi Ольга, ..." went out as UCS-2, three segments each."""
    renderer = Renderer(catalog.templates_dir)
    clinic = catalog.clinics["glow"]
    protocol = catalog.protocols["microneedling"]
    booking = patient(booking_doc, catalog, name, preferred)
    booking = booking.model_copy(update={"patient": booking.patient.model_copy(
        update={"locale": locale})})
    messages = [m for _, m in sample_messages(renderer, booking, clinic, protocol, ("sms",))]
    messages += [m for _, m in sample_notices(renderer, booking, clinic, protocol, ("sms",))]
    assert len(messages) > 5
    for message in messages:
        assert sms_segments(message.text)[0::2] == ("GSM-7", 1), message.text
        assert message.text.startswith(greeting) or message.text.startswith(
            greeting.replace("Hi", "Good morning").replace(", ", ". ")), message.text
    # A clinic that keeps accents (`sms_accents = "keep"`) chose UCS-2: the name as written.
    keep = clinic.model_copy(update={"sms_accents": "keep"})
    (_, kept), *_ = sample_messages(renderer, booking, keep, protocol, ("sms",))
    assert (preferred or name).split()[0] in kept.text and sms_segments(kept.text)[0] == "UCS-2"
