"""Send-time rules end to end: real worker, beat, Redis and an SMS gateway on 127.0.0.1.

1. A narrow send window: the gateway is down until after the window closes; retries do not
   go out while it is closed; when it reopens each reminder is sent once.
2. The appointment passes during an outage: the pre-visit reminder is skipped with the
   reason, not sent late; the aftercare after it goes out.

A send window has minute resolution and always closes around the patient's local
midnight, so test 1 gives its patient a timezone made for the test (a TZif file on
PYTHONTZPATH) in which midnight falls a minute from now.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_until
from worker.store import Store

pytestmark = pytest.mark.integration

EDGE_PROTOCOL = """
name = "Edge of the window"
[[steps]]
id = "first"
offset = "-192s"
channels = ["sms"]
template = "day-before"
late = "send"
[[steps]]
id = "second"
offset = "-190s"
channels = ["sms"]
template = "spf-morning"
late = "send"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
sun_sensitive = true
clean_skin_on_the_day = true
ask_cold_sore_or_infection = true
"""


def tzif(offset_seconds: int, abbr: str = "EDG") -> bytes:
    """Return a TZif v2 file for a fixed UTC offset (RFC 8536: one type, no transitions)."""
    chars = abbr.encode() + b"\0"
    block = (b"TZif2" + b"\0" * 15 + struct.pack(">6l", 0, 0, 0, 0, 1, len(chars))
             + struct.pack(">lBB", offset_seconds, 0, 0) + chars)
    sign = "-" if offset_seconds >= 0 else "+"  # POSIX TZ strings count west of Greenwich
    a = abs(offset_seconds)
    footer = f"\n<{abbr}>{sign}{a // 3600}:{a % 3600 // 60:02d}:{a % 60:02d}\n"
    return block + block + footer.encode()


def offset_for_local(now: datetime, local_seconds: int) -> int:
    """Return the UTC offset (s) at which `now` reads `local_seconds` after local midnight."""
    utc_seconds = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    offset = round(local_seconds - utc_seconds) % 86400
    return offset - 86400 if offset > 43200 else offset


def test_narrow_window_holds_retries_until_it_reopens_then_sends_each_once(
        service, sms_sink, e2e_config: Path, tmp_path: Path):
    (e2e_config / "protocols" / "edge.toml").write_text(EDGE_PROTOCOL, encoding="utf-8")
    clinic = (e2e_config / "clinics" / "e2e.toml").read_text(encoding="utf-8")
    (e2e_config / "clinics" / "edge.toml").write_text(
        clinic.replace('name = "E2E Skin Clinic"', 'name = "Edge Clinic"')
              .replace('end = "24:00"', 'end = "23:59"'), encoding="utf-8")
    zones = tmp_path / "zones"
    (zones / "Test").mkdir(parents=True)
    service.configure(PYTHONTZPATH=str(zones), REMINDERS_MAX_ATTEMPTS="40")
    sms_sink.status = 503  # the gateway is down
    service.up()

    t0 = datetime.now(UTC)
    # Local 23:58:46 now: the window (00:00-23:59) closes in 14 s and reopens in 74 s.
    (zones / "Test" / "Edge").write_bytes(tzif(offset_for_local(t0, 23 * 3600 + 58 * 60 + 46)))
    closes, reopens = t0.timestamp() + 14, t0.timestamp() + 74
    start = t0 + timedelta(seconds=197)  # local 00:02:03; the steps fall due at +5 s and +7 s
    doc = {"clinic": "edge", "booking_id": "W-1", "treatment": "edge",
           "starts_at": start.isoformat(timespec="milliseconds"),
           "patient": {"name": "Ana López", "phone": "+34600111333", "timezone": "Test/Edge",
                       "locale": "en", "channels": ["sms"]}}
    result = service.cli("book", "--json", "-", stdin=json.dumps(doc))
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert [r["status"] for r in planned["reminders"]] == ["scheduled", "scheduled"], planned

    # Both fail while the window is open; the gateway comes back after it has closed.
    wait_until(lambda: len(sms_sink.requests_snapshot()) >= 2, 20)
    time.sleep(max(0.0, closes + 5 - time.time()))
    sms_sink.status = 200
    time.sleep(max(0.0, reopens - 2 - time.time()))
    assert sms_sink.snapshot() == [], "sent while the send window was closed"
    tried = sms_sink.requests_snapshot()
    assert all(at < closes + 1 for at, _, _ in tried), tried  # no attempt while closed

    wait_until(lambda: len(sms_sink.snapshot()) >= 2, 30)
    time.sleep(3)  # a duplicate would show now
    posts = sms_sink.snapshot()
    assert len(posts) == 2 and len({p.text for p in posts}) == 2, posts
    assert all(p.at >= reopens - 0.5 for p in posts), [p.at - reopens for p in posts]

    shown = service.cli("show", "--json", "--clinic", "edge", "W-1")
    assert shown.returncode == 0, shown.stderr
    reminders = json.loads(shown.stdout)["reminders"]
    assert [r["status"] for r in reminders] == ["sent", "sent"], reminders
    for r in reminders:
        assert r["attempts"] >= 2, r  # failed while open, then sent once it reopened
        assert datetime.fromisoformat(r["sent_at"]).timestamp() >= reopens - 0.5, r


def test_appointment_passing_during_an_outage_skips_the_pre_visit_reminder(
        service, sms_sink, smtp_sink, make_booking, redis_client):
    service.configure(REMINDERS_MAX_ATTEMPTS="40")
    sms_sink.status = 503
    service.up()
    doc = make_booking("P-1", starts_in=12)
    start = datetime.fromisoformat(doc["starts_at"]).timestamp()
    service.book(doc)
    # prep:sms falls due 8 s before the visit and fails until the visit has begun.
    time.sleep(max(0.0, start + 1 - time.time()))
    sms_sink.status = 200

    def settled():
        rs = {r["id"]: r for r in service.show("P-1")["reminders"]}
        return rs if all(r["status"] in ("sent", "skipped") for r in rs.values()) else None

    reminders = wait_until(settled, 40, interval=0.5)
    prep = reminders["prep:sms"]
    assert prep["status"] == "skipped", prep
    # Skipped by the attempt begun after the visit began, or by the last failed attempt
    # before it, whose retry could only come after the visit began.
    begun = "it was meant for before the appointment, which has begun"
    assert prep["reason"] in (
        f"not sent: {begun}",
        "not sent: its retry after a transient failure (HTTP 503 from the provider) would "
        f"come after it expires: {begun}"), prep
    assert prep["attempts"] >= 1 and prep["sent_at"] is None
    assert reminders["spf:sms"]["status"] == "sent"  # after the visit: it goes out
    texts = [p.text for p in sms_sink.snapshot()]
    assert len(texts) == 1, texts  # only spf; the pre-visit SMS never left late
    # The rule is applied as each attempt begins and to each retry's time: every attempt
    # before the visit failed and was retried while its retry came before the visit; the
    # last one's retry would not: skipped then (or, had a retry been due just before the
    # visit and begun after it, by that attempt), and nothing was tried after that.
    log = Store(redis_client, "reminders").attempts("e2e/P-1/prep:sms")
    assert [e["outcome"] for e in log][-1] == "skipped", log
    assert {e["outcome"] for e in log[:-1]} == {"retrying"}, log
    assert all(datetime.fromisoformat(e["at"]).timestamp() < start for e in log[:-1]), log
    if "retry" in prep["reason"]:
        assert datetime.fromisoformat(log[-1]["at"]).timestamp() < start, log
        assert log[-1].get("error", "").startswith("HTTP 503"), log
    else:
        assert datetime.fromisoformat(log[-1]["at"]).timestamp() >= start, log
