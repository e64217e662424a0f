"""START brings back a care-critical email step that goes by SMS: a patient unsubscribed
from email gets a care-critical email step by SMS (_BEGIN_SEND 'ok sms'); while the
patient was also opted out of SMS (STOP), its begin skipped it ("opted_out: "). The
patient texts START with its time still ahead: it goes again, by SMS, as the step's own
SMS would (an email step that is not care-critical stays skipped: the patient has
unsubscribed from email). Real Redis, real Apprise, a real SMTP server and HTTP gateway.
"""

from __future__ import annotations

from tests.test_unsubscribe_send import Rig, rig, sinks  # noqa: F401 (fixtures)

PHONE = "+34600111222"
STOP = "the patient replied STOP by SMS at 2026-11-22T10:00:00Z"


def test_start_brings_back_a_care_critical_email_step_skipped_while_sms_was_opted_out(
        rig: Rig) -> None:  # noqa: F811
    rig.book()
    rig.unsubscribe()  # email: care-critical steps go by SMS
    rig.store.opt_out("uc", "sms", PHONE, STOP, critical=rig.catalog.critical_steps)
    care, plain = "uc/U-1/care:email", "uc/U-1/plain:email"
    assert rig.send("care:email") == "dropped: opted out"  # neither email nor SMS allowed
    before = rig.store.record(care)
    assert before["status"] == "skipped" and before["reason"].startswith("opted_out: ")
    back = rig.store.opt_in("uc", "sms", PHONE, caps=rig.catalog.clinics["uc"].sms,
                            why="the patient replied START by SMS",
                            critical=rig.catalog.critical_steps)
    assert back and back.resumed == 1
    record = rig.store.record(care)
    assert record["status"] == "scheduled", record
    assert record["reason"].startswith("opted in again"), record
    assert rig.store.redis.zscore(rig.store.due_key, care) == float(before["due_epoch"])
    # Not the step that is not care-critical: the patient unsubscribed from email.
    assert rig.store.record(plain)["status"] == "skipped"
    assert rig.store.redis.zscore(rig.store.due_key, plain) is None
    # Its begin sends it by SMS, to the patient's phone; nothing by email.
    assert rig.send("care:email") == "sent"
    assert rig.store.record(care)["status"] == "sent"
    (got,) = rig.sms.posts
    assert got.to.endswith(PHONE[1:])
    assert rig.smtp.snapshot() == []


def test_start_leaves_an_email_step_its_own_sms_carries(rig: Rig) -> None:  # noqa: F811
    """A care-critical step on both channels: its SMS is what START puts back; its email,
    skipped while the patient was opted out of SMS, stays skipped (no second copy)."""
    text = rig.settings.config_dir / "protocols" / "unsub.toml"
    text.write_text(text.read_text(encoding="utf-8").replace(
        'id = "care"\noffset = "-3h"\nchannels = ["email"]',
        'id = "care"\noffset = "-3h"\nchannels = ["sms", "email"]'), encoding="utf-8")
    from worker.catalog import Catalog

    rig.catalog = Catalog.load(rig.settings)
    rig.ctx = type(rig.ctx)(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                            renderer=rig.ctx.renderer)
    rig.book()
    rig.unsubscribe()
    rig.store.opt_out("uc", "sms", PHONE, STOP, critical=rig.catalog.critical_steps)
    assert rig.send("care:email") == "dropped: opted out"
    back = rig.store.opt_in("uc", "sms", PHONE, caps=rig.catalog.clinics["uc"].sms,
                            why="the patient replied START by SMS",
                            critical=rig.catalog.critical_steps)
    assert back.resumed == 1  # care:sms
    assert rig.store.record("uc/U-1/care:sms")["status"] == "scheduled"
    assert rig.store.record("uc/U-1/care:email")["status"] == "skipped"
