"""What the SMS cap did to a reminder stays on its timeline once it is sent.

README (SMS caps): an SMS that does not fit the clinic's `[sms]` cap goes by email, or a
care-critical one by SMS beyond the cap, "saying so on the timeline". The timeline said so
only until the reminder went: a delivery cleared its reason, so the step that went by email
instead of SMS, and the care-critical SMS sent although the patient's daily limit was
reached (the one a clinic must be able to account for), then read as plainly sent. Such
a reminder now keeps its planned reason, the cap's note with it, once sent.

Real HTTP (uvicorn on a loopback port) against a real Redis; the reminders sent through the
real send path to a real SMTP server and HTTP SMS gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import QUICK_PROTOCOL
from tests.sinks import HttpSink, SmtpSink
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.timeline import render_table

ADVICE = "[advice]" + QUICK_PROTOCOL.split("[advice]", 1)[1]


def protocol(critical: bool) -> str:
    flag = str(critical).lower()
    return f"""
name = "Two SMS on one day"
[[steps]]
id = "first"
offset = "-3h"
channels = ["sms"]
template = "week-check"
care_critical = {flag}
[[steps]]
id = "second"
offset = "-2h"
channels = ["sms"]
template = "day-before"
care_critical = {flag}
""" + ADVICE


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield smtp, sms
    smtp.stop()
    sms.stop()


def config(folder: Path, smtp: SmtpSink, sms: HttpSink) -> Path:
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    (folder / "protocols" / "two.toml").write_text(protocol(False), encoding="utf-8")
    (folder / "protocols" / "twocrit.toml").write_text(protocol(True), encoding="utf-8")
    (folder / "clinics" / "cc.toml").write_text(f"""
name = "Cap Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[sms]
max_per_day = 1
max_per_week = 3
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@cc.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms.port}/sms?:to={{to}}"
""", encoding="utf-8")
    return folder


def test_the_sms_caps_note_stays_on_a_sent_reminder(tmp_path, sinks, serve):
    smtp, sms = sinks
    server = serve(config_dir=config(tmp_path / "config", smtp, sms))
    svc = server.app.state.services
    store = svc.store
    ctx = Context(settings=svc.settings, store=store, catalog=svc.catalog,
                  renderer=Renderer(svc.catalog.templates_dir))
    # Both steps on one patient-local day (UTC): 12:00 and 13:00 of the day after tomorrow.
    day = (datetime.now(UTC) + timedelta(days=2)).date()
    starts = datetime(day.year, day.month, day.day, 15, tzinfo=UTC)
    over = (f"the patient's SMS limit at this clinic (1 a day, 3 in any 7 days) is reached "
            f"on {day.isoformat()}")

    def doc(booking_id: str, treatment: str, phone: str, email: bool) -> dict:
        patient = {"name": "Ana López", "phone": phone, "timezone": "UTC", "locale": "en",
                   "channels": ["sms", "email"] if email else ["sms"]}
        if email:
            patient["email"] = f"{booking_id.lower()}@example.com"
        return {"booking_id": booking_id, "treatment": treatment,
                "starts_at": starts.isoformat(), "patient": patient}

    def send(ref: str) -> str:
        store.redis.zadd(store.due_key, {ref: 0})
        (claim,) = [c for c in store.claim_due(100, 300) if c.ref == ref]
        return send_claimed(ctx, claim.ref, claim.version, claim.claim)

    with server.client(server.issue_key("cc")) as cc:
        # E-1 takes email: its second SMS goes by email. C-1 takes SMS only and both its
        # steps are care-critical: the second goes by SMS beyond the cap.
        planned = {}
        for booking_id, treatment, phone, email in (("E-1", "two", "+34600111201", True),
                                                    ("C-1", "twocrit", "+34600111202", False)):
            answer = cc.put(f"/v1/bookings/{booking_id}",
                            json=doc(booking_id, treatment, phone, email))
            assert answer.status_code == 201, answer.text
            planned[booking_id] = {r["id"]: r for r in answer.json()["reminders"]}
        by_email = planned["E-1"]["second:email"]["reason"]
        beyond = planned["C-1"]["second:sms"]["reason"]
        assert by_email == f"2h before the start; by email: {over}", by_email
        assert beyond == (f"2h before the start; sent although {over}: care-critical, the "
                          "other SMS give way"), beyond

        assert send("cc/E-1/second:email") == "sent"
        assert send("cc/C-1/second:sms") == "sent"
        assert [m.to for m in smtp.snapshot()] == ["e-1@example.com"]
        assert [m.to for m in sms.snapshot()] == ["+34600111202"]
        got = {b: cc.get(f"/v1/bookings/{b}").json() for b in ("E-1", "C-1")}
    emailed = {r["id"]: r for r in got["E-1"]["reminders"]}["second:email"]
    texted = {r["id"]: r for r in got["C-1"]["reminders"]}["second:sms"]
    assert emailed["status"] == "sent" and emailed["reason"] == by_email, emailed
    assert texted["status"] == "sent" and texted["reason"] == beyond, texted
    # `reminders show`'s table of the same timeline: when it went, and what the cap did.
    (row,) = [line for line in render_table(got["C-1"], "UTC").splitlines()
              if "second:sms" in line]
    assert row.endswith(f"; sent although {over}: care-critical, the other SMS give way"), row
    assert " sent " in row, row
