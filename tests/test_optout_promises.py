"""What the email sent at booking promises a patient who texted STOP (review patients).

The confirmation and the tretinoin welcome list the plan's steps with their dates ("we send
you a reminder of the time", "we will remind you that day", "we will remind you on those
nights"). A patient opted out of SMS at the clinic gets none of the steps that go by SMS
only (their begin skips them): the email must not promise them. The shipped protocols and
templates, the real send path, a real SMTP server (aiosmtpd) and a real HTTP SMS gateway.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.sinks import HttpSink, SmtpSink
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

PHONE = "+34600111222"


class Rig:
    def __init__(self, folder: Path, redis_client: Any, smtp: SmtpSink, sms: HttpSink) -> None:
        shutil.copytree(ROOT / "config" / "protocols", folder / "protocols")
        (folder / "clinics").mkdir()
        (folder / "clinics" / "pc.toml").write_text(f"""
name = "Promise Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@pc.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms.port}/sms?:to={{to}}"
""", encoding="utf-8")
        self.settings = Settings(config_dir=folder, templates_dir=ROOT / "templates",
                                 public_url="https://reminders.example",
                                 unsubscribe_secret="promise-secret-for-tests-0123456789",
                                 _env_file=None)
        self.catalog = Catalog.load(self.settings)
        self.store = Store(redis_client, "promise")
        self.ctx = Context(settings=self.settings, store=self.store, catalog=self.catalog,
                           renderer=Renderer(self.catalog.templates_dir))
        self.smtp, self.sms = smtp, sms

    def book(self, treatment: str, locale: str = "en", booking_id: str = "P-1") -> None:
        starts = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
        doc = {"clinic": "pc", "booking_id": booking_id, "treatment": treatment,
               "starts_at": starts.isoformat(),
               "patient": {"name": "Ana López", "email": "ana@example.com", "phone": PHONE,
                           "timezone": "Europe/Madrid", "locale": locale,
                           "channels": ["sms", "email"]},
               "medications": {"tretinoin": True, "retinol": False}}
        booking = parse_booking(doc, self.catalog)
        now = datetime.now(UTC)
        self.store.upsert(booking, plan(booking, self.catalog.protocols[treatment],
                                        self.catalog.clinics["pc"], now), now)

    def send(self, key: str, booking_id: str = "P-1") -> str:
        ref = f"pc/{booking_id}/{key}"
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        (claim,) = [c for c in self.store.claim_due(100, 300) if c.ref == ref]
        return send_claimed(self.ctx, claim.ref, claim.version, claim.claim)

    def stop(self) -> None:
        self.store.opt_out("pc", "sms", PHONE, "the patient replied STOP by SMS at test")


@pytest.fixture
def rig(tmp_path, redis_client) -> Iterator[Rig]:
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield Rig(tmp_path / "config", redis_client, smtp, sms)
    smtp.stop()
    sms.stop()


# (treatment, email step, locale, what the email says of an SMS-only step)
PROMISES = [
    ("microneedling", "booking-confirmation:email", "en", "we send you a reminder of the time"),
    ("microneedling", "booking-confirmation:email", "en", "you may restart tretinoin"),
    ("microneedling", "booking-confirmation:email", "es", "te enviamos un recordatorio de la hora"),
    ("tretinoin-start", "welcome:email", "en", "we will remind you on those nights"),
    ("tretinoin-start", "welcome:email", "es", "te lo recordaremos esas noches"),
]


@pytest.mark.parametrize(("treatment", "key", "locale", "promise"), PROMISES)
def test_the_booking_email_promises_sms_steps_to_a_patient_who_takes_them(
        rig, treatment, key, locale, promise):
    rig.book(treatment, locale)
    assert rig.send(key) == "sent"
    (mail,) = rig.smtp.snapshot()
    assert promise in mail.text and promise in (mail.html or ""), mail.text


@pytest.mark.parametrize(("treatment", "key", "locale", "promise"), PROMISES)
def test_the_booking_email_promises_no_sms_step_to_a_patient_who_texted_stop(
        rig, treatment, key, locale, promise):
    """Opted out of SMS before this booking: its SMS-only steps are skipped at their begin
    (the day-before reminder, "you may restart", the night reminders), so the email sent
    at booking must not say "we send you a reminder" of them: it did, and nothing came."""
    rig.stop()
    rig.book(treatment, locale)
    assert rig.send(key) == "sent"
    (mail,) = rig.smtp.snapshot()
    assert promise not in mail.text and promise not in (mail.html or ""), mail.text
    # The steps that still go by email are listed as before.
    if key.startswith("booking-confirmation"):
        told = {"en": "we email you the preparation checklist",
                "es": "te enviamos por email las indicaciones"}[locale]
        assert told in mail.text, mail.text
    # And indeed no SMS of it goes: the day-before / first night SMS is skipped.
    sms_key = "day-before:sms" if treatment == "microneedling" else "application-night#1:sms"
    assert rig.send(sms_key) == "dropped: opted out"
    assert rig.sms.snapshot() == []
