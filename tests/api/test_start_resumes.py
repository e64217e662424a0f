"""START after STOP: the patient's SMS still ahead resume; those whose time passed while
the number was opted out are not sent late; a step the booking no longer plans is never
brought back; and the SMS frequency cap holds across the patient's bookings.

Real HTTP (uvicorn on a loopback port, Twilio-signed form posts) against a real Redis, and
the resumed SMS sent through the real send path to a real HTTP gateway.
"""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

from tests import test_send_races as races
from tests.api import test_inbound as inbound
from tests.api.conftest import held_booking
from tests.api.test_inbound import ANA as ANA_PHONE
from tests.api.test_inbound import book, message_of, reminders, text
from tests.raw import set_reminder_fields
from tests.test_send_races import PREP, STOP
from worker.dispatch import send_claimed

server = inbound.server  # the API's fixtures
tw = inbound.tw
gate = races.gate  # the send-path rig's fixtures
rig = races.rig
FUTURE_SMS = ("day-before:sms", "spf:sms", "resume-retinoids:sms", "week-check:sms")
HELD_SMS = ("day-before:sms", "spf:sms", "week-check:sms")  # no retinoid


def test_start_resumes_the_sms_still_ahead_and_not_those_whose_time_passed(server, tw):
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    # The pause SMS came due while the number was opted out (its time is now past).
    past = time.time() - 3600
    set_reminder_fields(store, "tw/A-1/stop-retinoids:sms", planned_epoch=repr(past),
                        due_epoch=repr(past))
    before = reminders(tw, "A-1")
    assert all(before[k]["status"] == "skipped" for k in (*FUTURE_SMS, "stop-retinoids:sms"))

    reply = message_of(text(server, "START"))
    assert reply and "STOP" in reply
    after = reminders(tw, "A-1")
    for key in FUTURE_SMS:
        r = after[key]
        assert r["status"] == "scheduled", r
        assert r["reason"].startswith("opted in again: the patient replied START by SMS at "), r
        assert r["due_at"] == before[key]["due_at"]  # at its planned time, not now
        due = store.redis.zscore(store.due_key, f"tw/A-1/{key}")
        assert due is not None and abs(due - datetime.fromisoformat(
            r["due_at"].replace("Z", "+00:00")).timestamp()) < 1
    # Its time passed while opted out: not sent late.
    gone = after["stop-retinoids:sms"]
    assert gone["status"] == "skipped" and gone["reason"].startswith("opted_out: ")
    assert store.redis.zscore(store.due_key, "tw/A-1/stop-retinoids:sms") is None
    # Emails were never touched; the booking's version (the clinic's ETag) is unchanged.
    assert {k: (r["status"], r["reason"]) for k, r in after.items() if k.endswith(":email")} \
        == {k: (r["status"], r["reason"]) for k, r in before.items() if k.endswith(":email")}
    assert tw.get("/v1/bookings/A-1").headers["ETag"] == '"1"'
    # A second START changes nothing more.
    message_of(text(server, "START"))
    assert reminders(tw, "A-1") == after


def test_start_does_not_bring_back_a_step_the_booking_no_longer_plans(server, tw):
    """Opted out, then the clinic corrects the medications (no retinoid any more): the
    "resume tretinoin" SMS is no longer in the plan. START must not send it."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    doc = store.booking_doc("tw", "A-1")
    doc["medications"] = {"tretinoin": False, "retinol": False, "isotretinoin_last_dose": None}
    answer = tw.put("/v1/bookings/A-1", json=doc)
    assert answer.status_code == 200, answer.text
    message_of(text(server, "START"))
    after = reminders(tw, "A-1")
    for key in ("resume-retinoids:sms", "stop-retinoids:sms"):
        assert after[key]["status"] != "scheduled", after[key]
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if "retinoids" in ref], due
    assert after["day-before:sms"]["status"] == "scheduled"


def test_start_keeps_the_sms_cap_across_the_patients_bookings(server, tw):
    """A-1's SMS are skipped by STOP; A-2, booked while the number is opted out, plans its
    SMS on the same days (A-1's skipped ones take no room). START: the patient still gets
    at most one SMS a day (the clinic's cap), not A-1's and A-2's both."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    book(tw, "A-2")
    message_of(text(server, "START"))
    tz = ZoneInfo("Europe/Madrid")
    days: dict[object, list[str]] = {}
    for booking_id in ("A-1", "A-2"):
        for r in reminders(tw, booking_id).values():
            if r["channel"] == "sms" and r["status"] == "scheduled":
                day = datetime.fromisoformat(r["due_at"].replace("Z", "+00:00")) \
                    .astimezone(tz).date()
                days.setdefault(day, []).append(f"{booking_id}/{r['id']}")
    assert days and all(len(refs) == 1 for refs in days.values()), days


def test_a_resumed_sms_goes_through_the_send_path(rig):
    """Store level, through the real send path to a real HTTP gateway: STOP skips the SMS,
    START puts it back, the pump's claim sends it."""
    rig.book(rig.booking())
    assert rig.store.opt_out("rc", "sms", "+34600111222", "STOP at test") == (2, ["R-1"])
    assert rig.store.opt_in("rc", "sms", "+34600111222",
                            caps=rig.catalog.clinics["rc"].sms, why="START at test")
    for ref in (STOP, PREP):
        assert rig.state(ref)["record"]["status"] == "scheduled"
        assert rig.state(ref)["due"] is not None
    claim = rig.claim_now(PREP)
    rig.gate.answer(200)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "sent"
    assert len(rig.gate.bodies) == 1
    assert rig.state(PREP)["record"]["status"] == "sent"


def test_the_same_booking_again_while_opted_out_changes_nothing(server, tw):
    """The clinic's system sends the same booking again (a daily sync) while the number is
    opted out: the same version, the SMS still skipped for the opt-out (not shown as
    scheduled, not back in the schedule to be skipped and told again at their time)."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    before = reminders(tw, "A-1")
    answer = tw.put("/v1/bookings/A-1", json=store.booking_doc("tw", "A-1"))
    assert answer.status_code == 200 and answer.headers["ETag"] == '"1"', answer.text
    assert reminders(tw, "A-1") == before
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.endswith(":sms")], due
    message_of(text(server, "START"))  # and START still puts them back
    assert all(r["status"] == "scheduled" for k, r in reminders(tw, "A-1").items()
               if k in FUTURE_SMS)


def test_a_held_bookings_sms_resumed_by_start_go_at_its_release(server, tw):
    """STOP and START while the booking is held (isotretinoin under review): its release
    schedules its SMS as any other (the same document again: nothing else re-plans them)."""
    doc = held_booking("H-1")
    doc.update(clinic="tw")
    doc["patient"] = doc["patient"] | {"phone": ANA_PHONE, "locale": "en"}
    assert tw.put("/v1/bookings/H-1", json=doc).json()["status"] == "held"
    message_of(text(server, "STOP"))
    assert all(r["status"] == "skipped" for k, r in reminders(tw, "H-1").items()
               if k in HELD_SMS)
    message_of(text(server, "START"))
    store = server.app.state.services.store
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.startswith("tw/H-1/")], due  # held: nothing due
    released = tw.post("/v1/bookings/H-1/release")
    assert released.status_code == 200, released.text
    after = reminders(tw, "H-1")
    for key in HELD_SMS:
        assert after[key]["status"] == "scheduled", after[key]
        assert store.redis.zscore(store.due_key, f"tw/H-1/{key}") is not None


def test_start_under_bookings_that_keep_changing_still_opts_in(rig, monkeypatch):
    """Every read of the patient's bookings is overtaken by a write (forced: each read is
    followed by a change of the booking's hash): START still opts the number in, putting
    nothing back, instead of failing the provider's request."""
    from worker import store as store_module

    rig.book(rig.booking())
    rig.store.opt_out("rc", "sms", "+34600111222", "STOP at test")
    real = store_module._resumable
    bkey = rig.store.booking_key("rc", "R-1")

    def overtaken(*args, **kwargs):
        rig.store.redis.hincrby(bkey, "smsv", 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "_resumable", overtaken)
    back = rig.store.opt_in("rc", "sms", "+34600111222", caps=rig.catalog.clinics["rc"].sms)
    assert back and back.resumed == 0
    assert rig.store.opted_out("rc", "sms", "+34600111222") is None
    assert rig.state(PREP)["record"]["status"] == "skipped"
