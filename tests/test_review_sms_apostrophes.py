"""Review of apostrophe-like marks in SMS names (cold review, revplan).

`normalise` gives typographic apostrophes (’ ‘ ′) their GSM-7 twin "'", but not the other
marks names are written with: the Hawaiian ʻokina (U+02BB, "Kaʻiulani"), the modifier
apostrophe (U+02BC), a grave accent (`) and an acute accent (´, typed for an apostrophe on
Spanish keyboards, "D´Angelo"). The first three stayed as they were and turned the whole SMS
into UCS-2 (three segments instead of one; DOMAIN.md "SMS cost"); the acute accent was folded
to a space ("D Angelo"). Each is now "'"; the real renderer, the SMS the patient gets.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.models import parse_booking
from worker.rendering import Renderer
from worker.sms import sms_segments


@pytest.mark.parametrize(("name", "greeted"), [
    ("Kaʻiulani Kahale", "Ka'iulani"),
    ("Daʼvon Smith", "Da'von"),
    ("O`Brien Kelly", "O'Brien"),
    ("D´Angelo Ruiz", "D'Angelo"),
])
@pytest.mark.parametrize("locale", ["en", "es"])
def test_an_apostrophe_like_mark_in_a_name_keeps_the_sms_one_gsm7_segment(
        catalog, booking_doc, name, greeted, locale):
    booking = parse_booking({**booking_doc, "patient": {
        **booking_doc["patient"], "name": name, "locale": locale}}, catalog)
    due = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
    for clinic in (catalog.clinics["glow"],
                   catalog.clinics["glow"].model_copy(update={"sms_accents": "keep"})):
        message = Renderer(catalog.templates_dir).render(
            template="day-before", channel="sms", booking=booking, clinic=clinic,
            protocol=catalog.protocols["microneedling"], occurrence=1, due_at=due, now=due)
        assert f" {greeted}" in message.text, message.text
        assert sms_segments(message.text)[:1] == ("GSM-7",), message.text
        assert sms_segments(message.text)[2] == 1, message.text
