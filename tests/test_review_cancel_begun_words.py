"""Review of a cancel notice's words once the visit has begun (cold review, revplan).

A booking cancelled after its start (a no-show, or the clinic stopping the aftercare of a
visit that took place: worker/notices.py) still tells a patient whose "stop tretinoin"
message went out that they may resume (notices `plan_notices`). It said "you may resume
them as before" at once: hours after a microneedling or a peel that did take place, that
contradicts DOMAIN.md (no tretinoin on the day of microneedling, seeds/000; resume after at
least 24-48 h, seeds/000 and seeds/001; after a peel, 1-2 weeks) and the protocol's own
resume message, which the cancel removes. Once the visit has begun the notice asks the
patient to call the clinic before resuming; before it, "as before" stays.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT
from worker.models import parse_booking
from worker.notices import Notice
from worker.rendering import Renderer
from worker.sms import fold_to_gsm7, sms_segments

AS_BEFORE = {"en": "as before", "es": "como antes"}
CALL_FIRST = {"en": "Before you resume tretinoin/retinol, call +34910000000",
              "es": "Antes de retomar tretinoína/retinol, llama al +34910000000"}
CALL_FIRST_EMAIL = {"en": "If you had the treatment, please call us on +34910000000 before "
                          "you use them again",
                    "es": "Si te hiciste el tratamiento, llámanos al +34910000000 antes de "
                          "volver a usarlos"}


def _render(catalog, booking_doc, locale, treatment, channel, now):
    booking = parse_booking({**booking_doc, "treatment": treatment, "patient": {
        **booking_doc["patient"], "locale": locale}}, catalog)  # 5 Dec 2026, 14:30 Madrid
    clinic = catalog.clinics["glow"]
    return booking, Renderer(catalog.templates_dir).render(
        template="cancelled", channel=channel, booking=booking, clinic=clinic,
        protocol=catalog.protocols[treatment], occurrence=1, due_at=now, now=now,
        notice=Notice(paused=True))


@pytest.mark.parametrize("treatment", ["microneedling", "chemical-peel"])
@pytest.mark.parametrize("locale", ["en", "es"])
def test_a_cancel_after_the_visit_began_does_not_say_resume_as_before(
        catalog, booking_doc, locale, treatment):
    after = datetime(2026, 12, 5, 16, 30, tzinfo=UTC)  # 17:30 Madrid, 3 h after the start
    for channel in ("sms", "email"):
        _, message = _render(catalog, booking_doc, locale, treatment, channel, after)
        assert AS_BEFORE[locale] not in message.text, message.text
        if channel == "sms":
            assert fold_to_gsm7(CALL_FIRST[locale]) in message.text, message.text
            assert sms_segments(message.text)[2] == 1, message.text
        else:
            assert CALL_FIRST_EMAIL[locale] in message.text, message.text
            assert message.html is not None and AS_BEFORE[locale] not in message.html


@pytest.mark.parametrize("locale", ["en", "es"])
def test_a_cancel_before_the_visit_still_says_resume_as_before(catalog, booking_doc, locale):
    before = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    for channel in ("sms", "email"):
        _, message = _render(catalog, booking_doc, locale, "microneedling", channel, before)
        assert AS_BEFORE[locale] in message.text, message.text
        assert fold_to_gsm7(CALL_FIRST[locale]) not in message.text, message.text


def test_a_cancel_after_the_visit_began_sent_through_the_real_send_path(
        tmp_path, redis_client):
    """Real Redis, the real send path, a real HTTP SMS gateway: the demo protocol (steps
    seconds apart) on a clinic open all day. The pause SMS goes, the visit begins, the
    clinic cancels: the cancel SMS the gateway receives asks the patient to call first."""
    from tests.test_send_races import Gate
    from worker.catalog import Catalog
    from worker.dispatch import Context, send_claimed
    from worker.planner import plan
    from worker.settings import Settings
    from worker.store import Store

    gate = Gate()
    gate.answer(200)
    try:
        config = tmp_path / "config"
        shutil.copytree(ROOT / "config" / "protocols", config / "protocols")
        (config / "clinics").mkdir()
        (config / "clinics" / "sk.toml").write_text(f"""
name = "Skin Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 10
max_per_week = 70
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "json://127.0.0.1:{gate.port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate.port}/email?:to={{to}}"
""", encoding="utf-8")
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            lease_seconds=8, send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(redis_client, "revcancel")
        ctx = Context(settings=settings, store=store, catalog=catalog,
                      renderer=Renderer(catalog.templates_dir))
        start = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
        booking = parse_booking({
            "clinic": "sk", "booking_id": "D-1", "treatment": "demo",
            "starts_at": start.isoformat(),
            "patient": {"name": "Ana Ruiz", "phone": "+34600111222",
                        "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": True}}, catalog)
        now = datetime.now(UTC)
        store.upsert(booking, plan(booking, catalog.protocols["demo"],
                                   catalog.clinics["sk"], now), now)

        def send(key: str) -> str:
            ref = f"sk/D-1/{key}"
            store.redis.zadd(store.due_key, {ref: 0})
            claims = store.claim_due(100, settings.lease_seconds)
            for c in claims:
                if c.ref != ref:
                    assert store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                         "not in this test", c.claim)
            (claim,) = [c for c in claims if c.ref == ref]
            return send_claimed(ctx, ref, claim.version, claim.claim)

        assert send("stop-retinoids:sms") == "sent"
        time.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()) + 0.5)
        store.cancel("sk", "D-1", datetime.now(UTC))
        reminders = {r["id"]: r for r in store.timeline("sk", "D-1")["reminders"]}
        (notice,) = [k for k in reminders if k.startswith("cancelled#")]
        assert send(notice) == "sent"
        text = gate.bodies[-1]["message"]
        assert "as before" not in text and CALL_FIRST["en"] in text, text
    finally:
        gate.close()
