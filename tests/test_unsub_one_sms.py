"""A care-critical step that goes by SMS and by email (stop-retinoids in microneedling,
chemical-peel, demo), to a patient unsubscribed from email: exactly one SMS. The email is
skipped at the fenced begin with the reason "unsubscribed: the SMS of this step carries
it" instead of going by SMS as well; when the step's own SMS does not go (skipped), the
email still goes by SMS. Real Redis, real SMTP server (aiosmtpd), real HTTP SMS gateway.
"""

from __future__ import annotations

import pytest

from tests import test_unsubscribe_send as unsub
from tests.test_unsubscribe_send import Rig, sinks  # noqa: F401 (the SMTP + HTTP sinks)

EMAIL_ONLY = unsub.PROTOCOL  # the care step by email only
BOTH = unsub.PROTOCOL.replace('channels = ["email"]\ntemplate = "microneedling-aftercare"',
                              'channels = ["sms", "email"]\ntemplate = "microneedling-aftercare"',
                              1)
CARRIED = "unsubscribed: the SMS of this step carries it"


@pytest.fixture
def rig(tmp_path, redis_client, sinks, monkeypatch) -> Rig:  # noqa: F811
    assert BOTH != unsub.PROTOCOL
    monkeypatch.setattr(unsub, "PROTOCOL", BOTH)
    return Rig(tmp_path / "config", redis_client, *sinks)


@pytest.mark.parametrize("order", [("care:sms", "care:email"), ("care:email", "care:sms")])
def test_a_both_channel_step_sends_one_sms_to_an_unsubscribed_patient(rig, order):
    rig.book()
    rig.unsubscribe()
    results = {key: rig.send(key) for key in order}
    assert results == {"care:sms": "sent", "care:email": "dropped: carried by its own sms"}
    (sms,) = rig.sms.snapshot()
    assert sms.to == "+34600111222"
    assert rig.smtp.snapshot() == []
    email = rig.store.record("uc/U-1/care:email")
    assert (email["status"], email["reason"]) == ("skipped", CARRIED)
    assert rig.store.record("uc/U-1/care:sms")["status"] == "sent"


def test_without_its_own_sms_going_the_email_still_goes_by_sms(rig):
    rig.book()
    rig.unsubscribe()
    bkey = rig.store.booking_key("uc", "U-1")
    own = rig.store.redis.hget(bkey, "care:sms")
    assert own.startswith("S|")
    rig.store.redis.hset(bkey, "care:sms", "K" + own[1:])  # its SMS skipped (say, the cap)
    assert rig.send("care:email") == "sent"
    (sms,) = rig.sms.snapshot()
    assert sms.to == "+34600111222" and rig.smtp.snapshot() == []
    (line,) = rig.store.attempts("uc/U-1/care:email")
    assert line["via"].startswith("sms: the patient unsubscribed from email")


def test_a_subscribed_patient_gets_both(rig):
    rig.book()
    assert rig.send("care:sms") == "sent"
    assert rig.send("care:email") == "sent"
    assert len(rig.sms.snapshot()) == 1 and len(rig.smtp.snapshot()) == 1


def test_an_email_sent_by_sms_counts_for_the_sms_cap(rig):
    """The fallback SMS (the step has no SMS of its own) is counted by the cap: a second
    booking of the same phone within the week finds the week's one SMS taken."""
    folder = rig.settings.config_dir
    (folder / "protocols" / "unsub.toml").write_text(
        EMAIL_ONLY + '\n[[steps]]\nid = "text"\noffset = "-1h"\nchannels = ["sms"]\n'
        'template = "day-before"\nlate = "send"\n', encoding="utf-8")
    clinic = folder / "clinics" / "uc.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        "[channels]", "[sms]\nmax_per_day = 1\nmax_per_week = 1\n[channels]"), encoding="utf-8")
    from worker.catalog import Catalog
    from worker.dispatch import Context
    from worker.rendering import Renderer
    rig.catalog = Catalog.load(rig.settings)
    rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                      renderer=Renderer(rig.catalog.templates_dir))
    rig.book(channels=["email", "sms"])
    rig.unsubscribe()
    bkey = rig.store.booking_key("uc", "U-1")
    rig.store.redis.hdel(bkey, "text:sms")  # this booking's own SMS aside: only the fallback
    assert rig.send("care:email") == "sent"
    assert len(rig.sms.snapshot()) == 1 and rig.smtp.snapshot() == []
    # A second booking for the same phone, its SMS within the same 7 days.
    from datetime import UTC, datetime, timedelta

    from worker.models import parse_booking
    from worker.planner import plan
    starts = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    doc = {"clinic": "uc", "booking_id": "U-2", "treatment": "unsub",
           "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "phone": "+34600111222", "timezone": "UTC",
                       "email": "ana@example.com", "locale": "en",
                       "channels": ["sms", "email"]}}
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(UTC)
    second = rig.store.upsert(booking, plan(booking, rig.catalog.protocols["unsub"],
                                            rig.catalog.clinics["uc"], now), now)
    by_id = {r["id"]: r for r in second["reminders"]}
    # Its one SMS of the week is taken: not by email either (the patient unsubscribed from
    # it: it would be skipped at its begin), and no later day has room before it expires.
    assert "text:email" not in by_id, by_id
    assert by_id["text:sms"]["status"] == "skipped", by_id["text:sms"]
    assert "SMS limit" in by_id["text:sms"]["reason"], by_id["text:sms"]
