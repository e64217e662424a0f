"""The en-US spelling table respells our template wording only, never a name a clinic or a
patient gave us ("The Colour Clinic" stays "The Colour Clinic" in an American message)."""

from __future__ import annotations

import html
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.test_send_batches import Rig, gateway, wait_for  # noqa: F401  (gateway: fixture)
from tests.test_send_races import PROTOCOL
from worker.catalog import Catalog
from worker.dispatch import Context, Lanes, Watchdog, hand_over
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


def test_a_real_send_to_an_american_patient_names_the_clinic_and_patient_as_given(
        tmp_path, redis_client, gateway) -> None:  # noqa: F811
    # Through the real send path (claim, senders, render, Apprise) to a real HTTP gateway.
    protocol = ('name = "Race protocol"\n[[steps]]\nid = "stop"\noffset = "-3h"\n'
                'channels = ["email"]\ntemplate = "stop-retinoids"\nlate = "send"\n'
                + PROTOCOL[PROTOCOL.index("[advice]"):])
    rig = Rig(tmp_path, redis_client, gateway, protocol=protocol)
    clinic_file = tmp_path / "config" / "clinics" / "rc.toml"
    clinic_file.write_text(clinic_file.read_text(encoding="utf-8").replace(
        'name = "Race Clinic"', f'name = "{CLINIC_NAME}"').replace(
        'timezone = "UTC"', 'timezone = "America/New_York"').replace(
        'locale = "en"', 'locale = "en-US"'), encoding="utf-8")
    rig.catalog = Catalog.load(rig.settings)
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))
    rig.lanes = Lanes(rig.ctx, watchdog=Watchdog())
    doc = rig.doc(1, channel="email")
    doc["patient"].update(name=PATIENT_NAME, timezone="America/New_York", locale="en-US")
    rig.book(doc)
    ref = "rc/R-1/stop:email"
    try:
        claim = rig.claim(ref)[0]
        hand_over(rig.ctx, rig.lanes, "email", [[claim.ref, claim.version, claim.claim]],
                  time.time())
        wait_for(lambda: rig.store.record(ref).get("status") == "sent")
    finally:
        rig.drain()
    [body] = gateway.bodies
    sent = html.unescape(f"{body.get('title')}\n{body.get('message')}")  # the HTML body
    assert CLINIC_NAME in sent and "Hi Moisturiser," in sent, sent
    assert "moisturizer" in sent and "Call us at" in sent, sent
    assert "Color" not in sent and "Moisturizer Bar" not in sent, sent
