"""The en-US spelling table respells our template wording only, never a name a clinic or a
patient gave us ("The Colour Clinic" stays "The Colour Clinic" in an American message)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from worker.catalog import Catalog
from worker.models import CHANNELS, Booking
from worker.planner import plan
from worker.rendering import Renderer

CLINIC_NAME = "The Colour Clinic & Moisturiser Bar"
SMS_NAME = "Colour Clinic"
PATIENT_NAME = "Moisturiser Colour"  # a name is a name, whatever it spells


@pytest.fixture(scope="module")
def renderer(catalog: Catalog) -> Renderer:
    return Renderer(catalog.templates_dir)


def everything(renderer: Renderer, catalog: Catalog, doc: dict[str, Any],
               treatment: str) -> list[tuple[str, str]]:
    """Every message of one booking's plan for an en-US patient of an en-US clinic."""
    clinic = catalog.clinics["demo"].model_copy(update={
        "locale": "en-US", "timezone": "America/New_York", "name": CLINIC_NAME,
        "sms_name": SMS_NAME, "address": "12 Colour Street, Moisturiser Falls"})
    doc = {**doc, "treatment": treatment, "starts_at": "2026-12-05T14:30:00-05:00",
           "medications": {"tretinoin": True, "retinol": True},
           "patient": {**doc["patient"], "name": PATIENT_NAME, "locale": "en-US",
                       "timezone": "America/New_York"}}
    booking = Booking.model_validate(doc, context={"catalog": catalog})
    protocol = catalog.protocols[treatment]
    reminders = plan(booking, protocol, clinic, booking.starts_at - timedelta(days=30)).reminders
    plan_dates: dict[str, datetime] = {}
    for reminder in reminders:
        plan_dates.setdefault(reminder.step, reminder.due_at)
    out = []
    for reminder in reminders:
        if reminder.status != "scheduled":
            continue
        for channel in CHANNELS:
            message = renderer.render(
                template=reminder.template, channel=channel, booking=booking, clinic=clinic,
                protocol=protocol, occurrence=reminder.occurrence, due_at=reminder.due_at,
                plan_dates=plan_dates)
            out.append((channel,
                        f"{message.subject or ''}\n{message.text}\n{message.html or ''}"))
    return out


def test_names_keep_their_spelling_in_an_american_message(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
) -> None:
    messages = [message for treatment in ("microneedling", "tretinoin-start")
                for message in everything(renderer, catalog, booking_doc, treatment)]
    text = "\n".join(m for _, m in messages)
    # Our wording is American ...
    assert "moisturizer" in text and "call us at" in text
    assert "call us on" not in text
    # ... the names are as given, in every message that names them.
    assert "The Colour Clinic &amp; Moisturiser Bar" in text  # HTML
    assert "The Colour Clinic & Moisturiser Bar" in text  # subjects and plain text
    assert "Colour Clinic" in text and "Moisturiser" in text  # SMS name, first name
    for wrong in ("Color Clinic", "Moisturizer Bar", "Hi Moisturizer", "Moisturizer,"):
        assert wrong not in text, wrong
    # The SMS name the clinic by its sms_name, unchanged.
    sms = [m for channel, m in messages if channel == "sms"]
    assert any("Colour Clinic" in m for m in sms)
    assert not any("Color" in m for m in sms)
