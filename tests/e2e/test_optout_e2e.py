"""Opt-outs end to end: real worker and beat processes, the real API over HTTP, real sinks.

A patient texts STOP: their pending SMS never reach the SMS gateway while their emails do,
each with the unsubscribe link in its footer and the List-Unsubscribe headers as the real
SMTP server received them. A one-click POST to that link stops their email too: a later
booking's emails never reach the SMTP server. As in the compose stack, no unsubscribe
secret is configured and the API and the worker each have a data folder of their own: the
links' secret is the one they share through Redis.
"""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import urlencode

import httpx
import pytest

from tests.api.conftest import ApiServer, api_settings
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.integration
PHONE = "+34600111222"


def terminal(service, booking_id: str) -> dict | None:
    timeline = service.show(booking_id)
    done = all(r["status"] in ("sent", "skipped", "failed", "cancelled")
               for r in timeline["reminders"])
    return timeline if done else None


def test_opted_out_sms_never_reach_the_gateway_while_email_does(
        service, e2e_config, redis_server, smtp_sink, sms_sink, make_booking, tmp_path):
    clinic_file = e2e_config / "clinics" / "e2e.toml"
    clinic_file.write_text(clinic_file.read_text() + "\n[inbound]\nallow_unsigned = true\n")
    api = ApiServer(api_settings(config_dir=e2e_config, data_dir=tmp_path / "api-data"),
                    redis_server.url).start()
    try:
        service.configure(REMINDERS_PUBLIC_URL=api.url)
        service.up()
        # Booked over HTTP, not by a `reminders book` process: on a loaded machine that took
        # longer than the prep's lead, and the prep SMS went before the STOP came.
        doc = make_booking("B-1", starts_in=12)  # prep due in 4 s
        prep_due = datetime.fromisoformat(doc["starts_at"]).timestamp() - 8
        del doc["clinic"]  # the key says which clinic
        with api.client(api.issue_key("e2e")) as client:
            booked = client.put("/v1/bookings/B-1", json=doc)
            assert booked.status_code == 201, booked.text
            stop = client.post("/v1/inbound/sms/e2e",
                               content=urlencode({"From": PHONE, "Body": "Stop please"}),
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert stop.status_code == 200 and "<Message>" in stop.text
        assert time.time() < prep_due, "the STOP came after the prep SMS was due"

        timeline = wait_until(lambda: terminal(service, "B-1"), 25, interval=0.5)
        by_id = {r["id"]: r for r in timeline["reminders"]}
        for key in ("prep:sms", "spf:sms"):
            assert by_id[key]["status"] == "skipped", by_id[key]
            assert by_id[key]["reason"].startswith("opted_out: the patient replied STOP")
        assert sms_sink.requests_snapshot() == []  # not one SMS reached the gateway
        emails = smtp_sink.snapshot()
        assert sorted(r["id"] for r in timeline["reminders"] if r["status"] == "sent") == [
            "aftercare:email", "confirm:email", "prep:email"]
        assert len(emails) == 3
        links = set()
        for mail in emails:
            header = mail.raw["List-Unsubscribe"]
            assert header.startswith(f"<{api.url}/v1/unsubscribe/v1.") and header.endswith(">")
            assert mail.raw["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            link = header[1:-1]
            assert f'href="{link}"' in mail.html  # the footer (Apprise derives the text)
            links.add(link)
        assert len(links) == 1  # one patient, one link

        # The mail provider's one-click POST (RFC 8058) unsubscribes; a GET would not.
        link = links.pop()
        with httpx.Client(timeout=30) as client:
            assert client.get(link).status_code == 200
            done = client.post(link, content="List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200
        # Another booking of the same patient: its emails never reach the SMTP server.
        # (Stored after the unsubscribe: the fenced begin itself refuses them.)
        service.book(make_booking("B-2", starts_in=9, email="b-1@example.com"))

        def skipped_emails() -> dict | None:
            by_id = {r["id"]: r for r in service.show("B-2")["reminders"]}
            wanted = [by_id["confirm:email"], by_id["prep:email"]]
            return by_id if all(r["status"] == "skipped" for r in wanted) else None

        by_id = wait_until(skipped_emails, 15, interval=0.5)
        for key in ("confirm:email", "prep:email"):
            assert by_id[key]["reason"].startswith(
                "opted_out: the patient unsubscribed from email"), by_id[key]
        assert len(smtp_sink.snapshot()) == 3 and sms_sink.requests_snapshot() == []
    finally:
        api.stop()
