"""Review of the tretinoin start's first night text (cold review, revplan).

DOMAIN.md "Starting tretinoin": SPF 30+ every morning (seeds/000, seeds/001). The protocol
sends its weekly SPF text only from day 19: "In weeks 1-2 the night texts say it"
(config/protocols/tretinoin-start.toml). The English first night text did ("Morning: SPF
30+"), the Spanish one did not, so a Spanish-speaking patient on SMS heard nothing of
sunscreen by text for the first two and a half weeks.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.models import parse_booking
from worker.rendering import Renderer
from worker.sms import sms_segments


@pytest.mark.parametrize("discreet", [False, True])
@pytest.mark.parametrize("locale", ["en", "es"])
def test_the_first_night_text_says_spf_every_morning(catalog, booking_doc, locale, discreet):
    booking = parse_booking({**booking_doc, "treatment": "tretinoin-start", "patient": {
        **booking_doc["patient"], "name": "Purificación Pérez", "locale": locale}}, catalog)
    clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
    protocol = catalog.protocols["tretinoin-start"]
    night = datetime(2026, 12, 7, 18, 30, tzinfo=UTC)
    message = Renderer(catalog.templates_dir).render(
        template="tretinoin-night", channel="sms", booking=booking, clinic=clinic,
        protocol=protocol, occurrence=1, due_at=night, now=night)
    assert f"SPF {protocol.advice['spf']}+" in message.text, message.text
    assert "spf" in message.claims
    assert sms_segments(message.text)[2] == 1, message.text
