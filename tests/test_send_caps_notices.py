"""The SMS cap at send time and the messages the store adds on a change (real Redis, a real
HTTP SMS gateway, the real send path with its clock fixed; the rig of tests/test_send_caps.py).

A change notice is never capped when it is planned (worker/notices.py `plan_notices`: at the
window's next opening, whatever the day holds): a missing "your visit moved" sends the patient
on the wrong day. The send-time cap must not drop or delay it either when its time moves at
send time (found at 20:00:01 and deferred to the next opening; a retry; a backlog). The pause
message sent again for a new date (`repause`) is as care-critical as the pause step itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

import tests.test_send_caps as caps
from tests.sinks import HttpSink, SmtpSink
from tests.test_send_caps import TZ, Rig, on_the_clock
from worker.models import parse_booking
from worker.planner import plan

# "pre": a day-before SMS (D-1 10:00) whose step carries the invite (so changes make notices).
PRE = """
name = "pre"
[[steps]]
id = "before"
day = -1
time = "10:00"
channels = ["sms"]
template = "day-before"
invite = true
late = "send"
late_until = "-12h"
""" + caps.ADVICE

# "pause": a care-critical pause SMS (D-7 18:00) for a patient on tretinoin.
PAUSE = """
name = "pause"
[[steps]]
id = "stop"
day = -7
time = "18:00"
channels = ["sms"]
template = "stop-retinoids"
pause = true
only_if_any = ["tretinoin"]
care_critical = true
late = "send"
late_until = "-6h"
""" + caps.ADVICE + """retinoids_sensitise = true
no_retinoid_on_the_day = true
retinoid_pause_min_days = 5
"""


@pytest.fixture
def rig(tmp_path, redis_client, monkeypatch) -> Iterator[Rig]:
    monkeypatch.setitem(caps.PROTOCOLS, "pre", PRE)
    monkeypatch.setitem(caps.PROTOCOLS, "pause", PAUSE)
    on_the_clock(monkeypatch)
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield Rig(tmp_path / "config", redis_client, smtp, sms)
    smtp.stop()
    sms.stop()


def book(rig: Rig, booking_id: str, treatment: str, starts: datetime, **meds: Any) -> None:
    doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
           "starts_at": starts.astimezone(TZ).isoformat(),
           "patient": {"name": "Ana López", "phone": "+34600111222",
                       "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]},
           "medications": meds}
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(caps.UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                   rig.catalog.clinics["cap"], now), now)


def keys(rig: Rig, booking_id: str, head: str) -> list[str]:
    return [r["id"] for r in rig.store.timeline("cap", booking_id)["reminders"]
            if r["id"].startswith(head)]


def test_a_move_notice_deferred_onto_a_day_at_the_cap_still_goes(rig):
    """SMS-only patient, 1 SMS a day. A-1's "see you tomorrow" SMS went on D 10:00; at 19:59
    the clinic moves the visit to D+1 18:00; the notice is found at 20:30 and deferred to
    D+1 09:00, a day holding A-2's SMS. Before: capped there, with no later day before the
    visit, it was skipped and the patient came at 14:00. Now it goes at 09:00, as a notice
    planned after 20:00 would have (notices are not capped)."""
    d = rig.day
    d1 = d + timedelta(days=1)
    book(rig, "A-1", "pre", rig.local(d1, 14))
    rig.book("A-2", "morn", d)  # its SMS on D+1 10:00
    assert rig.send("A-1", "before:sms", rig.local(d, 10)) == "sent"
    book(rig, "A-1", "pre", rig.local(d1, 18))
    (notice,) = keys(rig, "A-1", "rescheduled#")
    assert notice.endswith(":sms")
    assert rig.send("A-1", notice, rig.local(d, 20, 30)) == "deferred"
    r = rig.reminder("A-1", notice)
    assert r["status"] == "scheduled" and rig.due("A-1", notice) == rig.local(d1, 9), r
    assert rig.send("A-1", notice, rig.local(d1, 9)) == "sent"
    assert "18:00" in rig.sms.snapshot()[-1].text, rig.sms.snapshot()[-1].text


def test_the_pause_sms_again_for_a_new_date_is_care_critical_at_send_time(rig):
    """The pause SMS ("stop tretinoin tonight") went on D 18:00 for a visit on D+7; the visit
    moves to D+8 and the pause goes again (repause) on D+1 18:00. It fails at 19:55 (503);
    its retry waits for D+2 09:00, a day where A-2 has an SMS. As the pause step itself, it
    goes there beyond the cap (no email), saying so. Before: it was capped as an ordinary
    SMS (the step id "repause" is no protocol step) and moved to D+3."""
    d = rig.day
    book(rig, "A-1", "pause", rig.local(d + timedelta(days=7), 14), tretinoin=True)
    assert rig.send("A-1", "stop:sms", rig.local(d, 18)) == "sent"
    book(rig, "A-1", "pause", rig.local(d + timedelta(days=8), 10), tretinoin=True)
    (again,) = keys(rig, "A-1", "repause#")
    assert rig.due("A-1", again) == rig.local(d + timedelta(days=1), 18)
    # A-2's SMS on D+2 10:00: the day the retry would land on.
    rig.book("A-2", "morn", d + timedelta(days=1))
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 10)
    rig.sms.status = 503
    assert rig.send("A-1", again, rig.local(d + timedelta(days=1), 19, 55)) == "retrying"
    rig.sms.status = 200
    r = rig.reminder("A-1", again)
    assert r["status"] == "retrying", r
    assert rig.due("A-1", again) == rig.local(d + timedelta(days=2), 9), r
    assert "care-critical" in r["reason"], r
