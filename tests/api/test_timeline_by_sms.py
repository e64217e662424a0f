"""The timeline says when an email step went by SMS.

A patient unsubscribes from email (the real one-click POST to the link of an email they
got); a care-critical email step then goes by SMS instead (README: "Steps marked
`care_critical = true` still reach an unsubscribed patient, by SMS"). The clinic's
timeline (GET, and `reminders show`'s table of it) showed `care:email  email  sent`, no
reason: the clinic read that the patient who had unsubscribed from email was emailed,
while the message was a text. It now says it went by SMS, and why.

Real HTTP (uvicorn on a loopback port) against a real Redis; the reminders sent through
the real send path to a real SMTP server and a real HTTP SMS gateway.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from tests.test_unsubscribe_send import SECRET, Rig, sinks  # noqa: F401 - fixture
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.timeline import render_table

BY_SMS = "by SMS: the patient unsubscribed from email; a care-critical step"


def test_a_care_critical_email_that_went_by_sms_says_so_on_the_timeline(
        tmp_path, redis_client, sinks, serve):  # noqa: F811 - the fixture
    smtp, sms = sinks
    folder = tmp_path / "config"
    Rig(folder, redis_client, smtp, sms)  # writes the clinic `uc` and its protocol
    server = serve(config_dir=folder, public_url="https://reminders.example",
                   unsubscribe_secret=SECRET)
    svc = server.app.state.services
    store = svc.store
    ctx = Context(settings=svc.settings, store=store, catalog=svc.catalog,
                  renderer=Renderer(svc.catalog.templates_dir))

    def send(key: str) -> str:
        ref = f"uc/U-1/{key}"
        store.redis.zadd(store.due_key, {ref: 0})
        (claim,) = [c for c in store.claim_due(100, 300) if c.ref == ref]
        return send_claimed(ctx, claim.ref, claim.version, claim.claim)

    starts = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
    doc = {"booking_id": "U-1", "treatment": "unsub", "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "email": "ana@example.com",
                       "phone": "+34600111222", "timezone": "UTC", "locale": "en",
                       "channels": ["sms", "email"]}}
    with server.client(server.issue_key("uc")) as uc, server.client() as patient:
        assert uc.put("/v1/bookings/U-1", json=doc).status_code == 201
        assert send("plain:email") == "sent"
        (mail,) = smtp.snapshot()
        link = urlsplit(mail.raw["List-Unsubscribe"][1:-1]).path
        done = patient.post(link, content="List-Unsubscribe=One-Click",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200, done.text

        assert send("care:email") == "sent"
        assert len(smtp.snapshot()) == 1  # no email after the unsubscribe...
        (text,) = sms.snapshot()  # ...the care step went as a text
        assert text.to == "+34600111222"

        timeline = uc.get("/v1/bookings/U-1").json()
    by_id = {r["id"]: r for r in timeline["reminders"]}
    care, plain = by_id["care:email"], by_id["plain:email"]
    assert care["status"] == "sent" and care["channel"] == "email", care
    assert care["via"] == "sms", care
    assert care["reason"] == BY_SMS, care
    assert "via" not in plain and plain["reason"] is None, plain  # emailed, as it says
    # `reminders show` prints this table of the same timeline.
    (row,) = [line for line in render_table(timeline, "UTC").splitlines()
              if "care:email" in line]
    sent_at = datetime.fromisoformat(care["sent_at"])
    assert row.endswith(f"sent {sent_at:%a %Y-%m-%d %H:%M} UTC; {BY_SMS}"), row
