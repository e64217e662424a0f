"""An email step that went by SMS is told as such to the clinic's webhook and dead letters.

A patient unsubscribed from email: a care-critical email step goes by SMS instead. The
`reminder.sent` webhook said `"channel": "email"`, nothing else: the clinic's system read
that the patient who had unsubscribed from email was emailed, while the message was a text.
And when the SMS gateway refused it, `reminder.failed` and the dead letter said "email" with
the SMS gateway's "HTTP 400": ops looked at the mail server. Each now says `"via": "sms"`.

Real Redis, the real send path, a real HTTP SMS gateway (and SMTP server, which gets nothing).
"""

from __future__ import annotations

from dataclasses import replace

from tests.test_unsubscribe_send import Rig, rig, sinks  # noqa: F401 - fixtures
from worker.store import Store
from worker.webhooks import Events


def told(rig: Rig) -> list[tuple[str, dict]]:  # noqa: F811 - the fixture's type
    events = Events(rig.store.redis, rig.store.prefix)
    return [(e.type, e.fields) for e in sorted(events.pending(), key=lambda e: int(e.id))]


def with_hooks(rig: Rig) -> Rig:  # noqa: F811
    rig.store = Store(rig.store.redis, "unsub", hooks=lambda clinic: "reminder.sent "
                      "reminder.failed reminder.skipped")
    rig.ctx = replace(rig.ctx, store=rig.store)
    return rig


def test_the_sent_event_of_an_email_step_that_went_by_sms_says_via_sms(rig):  # noqa: F811
    with_hooks(rig).book()
    rig.unsubscribe()
    assert rig.send("care:email") == "sent"
    assert rig.smtp.snapshot() == [] and len(rig.sms.snapshot()) == 1
    (sent,) = [fields for kind, fields in told(rig) if kind == "reminder.sent"]
    assert sent["reminder"] == "care:email" and sent["channel"] == "email", sent
    assert sent.get("via") == "sms", sent
    # The plain email the unsubscribe skipped went by no channel at all.
    (skipped,) = [fields for kind, fields in told(rig) if kind == "reminder.skipped"]
    assert skipped["reminder"] == "plain:email" and "via" not in skipped, skipped


def test_a_dead_letter_of_an_email_step_that_went_by_sms_says_via_sms(rig):  # noqa: F811
    with_hooks(rig).book()
    rig.unsubscribe()
    rig.sms.status = 400  # the SMS gateway refuses it for good
    assert rig.send("care:email") == "failed"
    assert rig.smtp.snapshot() == []
    (failed,) = [fields for kind, fields in told(rig) if kind == "reminder.failed"]
    assert failed["channel"] == "email" and failed.get("via") == "sms", failed
    (dead,) = rig.store.dead_letters("uc")
    assert dead["id"] == "care:email" and dead.get("via") == "sms", dead
