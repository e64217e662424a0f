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
