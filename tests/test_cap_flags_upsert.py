"""The SMS cap's flags of a stored reminder survive a re-submission that keeps its time
(real Redis, a real HTTP SMS gateway, the real send path; see tests/test_send_caps.py for
the rig): a pending email going by SMS (flag "s", counted as an SMS) and a replayed dead
SMS (flag "r", capped even on its own day) whose expiry alone the clinic's re-submission
rewrites (its protocol's `late_until` changed; its visit moved by an hour, the SMS at
booking keeping its time) are still counted, and capped, as before. And START sends by
email a care-critical SMS without room only to a patient not unsubscribed from email."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, time, timedelta

from tests.test_send_caps import TZ, Rig, step
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.store import decode_reminder


def _stored(rig: Rig, booking_id: str, key: str) -> dict[str, str]:
    """The reminder as stored, its cap flags too ("by_sms", "replayed")."""
    main, attempt = rig.store.redis.hmget(rig.store.booking_key("cap", booking_id),
                                          [key, key + "+"])
    return decode_reminder(key, main, attempt, {})


def _shorter_expiry(rig: Rig, treatment: str) -> None:
    """The clinic's protocol now lets a late step go 9 days after the visit, not 10: a
    re-submission rewrites the expiry of its reminders still to go, keeping their time."""
    path = rig.settings.config_dir / "protocols" / f"{treatment}.toml"
    path.write_text(path.read_text(encoding="utf-8").replace(
        'late_until = "10d"', 'late_until = "9d"'), encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)


def test_an_email_going_by_sms_stays_counted_after_an_expiry_only_resubmission(rig):
    """A-1's care-critical email of D 09:00 goes by SMS (the patient unsubscribed from
    email) and the gateway fails it for now: retrying, counted as an SMS on D. The clinic
    sends A-1 again under a protocol with a shorter expiry: its time is kept, its expiry
    rewritten, and its flag "s" was dropped, so A-2, booked then, kept its SMS on D 10:00
    beside it (two SMS on D). It stays counted: A-2's SMS moves to D+1."""
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)  # its email: D 09:00
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.sms.status = 500
    assert rig.send("A-1", "check:email", rig.local(d, 9)) == "retrying"
    rig.sms.status = 200
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1"
    expires = rig.reminder("A-1", "check:email")["expires_at"]
    _shorter_expiry(rig, "critmail")
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)  # the same, new expiry
    record = rig.reminder("A-1", "check:email")
    assert record["expires_at"] != expires and record["status"] == "retrying"
    assert _stored(rig, "A-1", "check:email").get("by_sms") == "1", record
    rig.book("A-2", "morn", d - timedelta(days=1))  # its SMS: D 10:00, unless D is taken
    assert rig.send("A-1", "check:email", rig.due("A-1", "check:email")) == "sent"
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}


# "booked": one SMS when the booking arrives (its time kept by every re-submission).
BOOKED = step("booked", 0, "10:00", '["sms"]', "week-check").replace(
    "day = 0\ntime = \"10:00\"", 'at = "booking"')


def _book(rig: Rig, booking_id: str, treatment: str, starts_at: datetime,
          now: datetime) -> None:
    """`Rig.book` (an SMS-only patient) at `now` instead of the real clock."""
    doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
           "starts_at": starts_at.isoformat(),
           "patient": {"name": "Ana López", "phone": "+34600111222",
                       "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]}}
    booking = parse_booking(doc, rig.catalog)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                   rig.catalog.clinics["cap"], now), now)


def test_a_replayed_dead_sms_stays_capped_after_an_expiry_only_resubmission(rig):
    """A-1's SMS at its booking (D 10:00) is dead-lettered (HTTP 400); A-2, booked then,
    sends its own at once (D 10:30: a dead SMS is not counted). Ops replay A-1's SMS at
    noon D (flag "r": capped even on its own day). The clinic moves A-1's visit by an hour:
    its SMS at booking keeps its time, its expiry (the visit) is rewritten, and the flag
    was dropped: A-1's SMS went at once beside A-2's (two SMS on D). It is still capped."""
    (rig.settings.config_dir / "protocols" / "booked.toml").write_text(BOOKED,
                                                                        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    d = rig.day
    visit = datetime.combine(d + timedelta(days=7), time(14), TZ)
    _book(rig, "A-1", "booked", visit, rig.local(d, 10))  # its SMS: D 10:00
    assert rig.due("A-1", "booked:sms") == rig.local(d, 10)
    rig.sms.status = 400
    assert rig.send("A-1", "booked:sms", rig.local(d, 10)) == "failed"
    rig.sms.status = 200
    _book(rig, "A-2", "booked", visit + timedelta(days=1), rig.local(d, 10, 30))
    assert rig.due("A-2", "booked:sms") == rig.local(d, 10, 30)  # D looks free
    assert rig.send("A-2", "booked:sms", rig.local(d, 10, 30)) == "sent"
    assert rig.store.replay(["cap/A-1/booked:sms"], rig.local(d, 12)) == ["cap/A-1/booked:sms"]
    assert _stored(rig, "A-1", "booked:sms").get("replayed") == "1"
    expires = rig.reminder("A-1", "booked:sms")["expires_at"]
    _book(rig, "A-1", "booked", visit + timedelta(hours=1), rig.local(d, 12))  # moved
    record = rig.reminder("A-1", "booked:sms")
    assert record["expires_at"] != expires and record["status"] == "scheduled", record
    assert rig.due("A-1", "booked:sms") == rig.local(d, 10)  # its time kept
    assert _stored(rig, "A-1", "booked:sms").get("replayed") == "1", record
    assert rig.send("A-1", "booked:sms", rig.local(d, 12)) == "deferred"
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}


def test_start_for_a_patient_unsubscribed_from_email_sends_the_capped_step_by_sms(rig):
    """A-1's care-critical SMS two days before its visit (D 19:00) went; the clinic moves
    the visit three days on: the step goes again for the new date (again-evening, D+3
    19:00). The patient replies STOP (it is skipped) and unsubscribes from email; A-2,
    booked meanwhile, takes D+3 19:00. START finds no room for A-1's step again: it went
    "by email", and that email was skipped at its begin as opted out (its step is no
    protocol step the send time takes by SMS): the step was lost. For a patient who does not
    take email it goes beyond the cap by SMS, saying so, as for a patient without email."""
    (rig.settings.config_dir / "protocols" / "prevcrit.toml").write_text(
        step("evening", -2, "19:00", '["sms"]', "week-check", critical=True),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    critical = rig.catalog.critical_steps
    d = rig.day
    rig.book("A-1", "prevcrit", d + timedelta(days=2), email=True)  # its SMS: D 19:00
    assert rig.send("A-1", "evening:sms", rig.local(d, 19)) == "sent"
    rig.book("A-1", "prevcrit", d + timedelta(days=5), email=True)  # moved: again D+3
    again = "again-evening#1:sms"
    assert rig.due("A-1", again) == rig.local(d + timedelta(days=3), 19)
    rig.store.opt_out("cap", "sms", "+34600111222", "STOP", critical=critical)
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed", critical=critical)
    assert rig.reminder("A-1", again)["status"] == "skipped"
    rig.book("A-2", "prev", d + timedelta(days=5), email=True)  # its SMS: D+3 19:00
    assert rig.due("A-2", "evening:sms") == rig.local(d + timedelta(days=3), 19)
    assert rig.store.opt_in("cap", "sms", "+34600111222", caps=rig.catalog.clinics["cap"].sms,
                            why="START", critical=critical)
    resumed = rig.reminder("A-1", again)
    assert resumed["status"] == "scheduled", resumed
    assert "sent although" in resumed["reason"] and "care-critical" in resumed["reason"]
    for r in rig.store.timeline("cap", "A-1")["reminders"]:
        if r["status"] == "scheduled" and r["id"].startswith("again-evening"):
            rig.send("A-1", r["id"], datetime.fromisoformat(r["due_at"]))
    rig.deliver_the_rest()
    steps = {r["id"]: (r["status"], r["reason"])
             for r in rig.store.timeline("cap", "A-1")["reminders"]
             if r["id"].startswith("again-evening")}
    assert [k for k, (status, _) in steps.items() if status == "sent"] == [again], steps
    assert Counter(rig.sent_days)[d + timedelta(days=3)] == 2, steps  # beyond the cap


def test_start_for_a_patient_unsubscribed_from_email_sends_the_capped_step_once(rig):
    """A-1's care-critical SMS (D 19:00) is skipped by STOP; the patient also unsubscribed
    from email; A-2, booked while opted out, takes D 19:00. START finds no room on D for
    A-1's SMS: its step must still reach the patient once (by SMS: email is refused),
    not be lost as an email skipped for the unsubscribe (a control: before the fix its
    "by email" copy went by SMS at its begin, as a care-critical email does)."""
    d = rig.day
    critical = rig.catalog.critical_steps
    rig.book("A-1", "evecrit", d - timedelta(days=1), email=True)  # its SMS: D 19:00
    rig.store.opt_out("cap", "sms", "+34600111222", "STOP", critical=critical)
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed", critical=critical)
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)  # its SMS: D 19:00
    assert rig.due("A-2", "evening:sms") == rig.local(d, 19)
    assert rig.store.opt_in("cap", "sms", "+34600111222", caps=rig.catalog.clinics["cap"].sms,
                            why="START", critical=critical)
    steps = {r["id"]: (r["status"], r["reason"])
             for r in rig.store.timeline("cap", "A-1")["reminders"]}
    for r in rig.store.timeline("cap", "A-1")["reminders"]:
        if r["status"] == "scheduled" and r["channel"] == "email":
            rig.send("A-1", r["id"], datetime.fromisoformat(r["due_at"]))
    rig.deliver_the_rest()
    after = {r["id"]: (r["status"], r["reason"])
             for r in rig.store.timeline("cap", "A-1")["reminders"]}
    assert len(rig.sms.snapshot()) == 2, (steps, after)  # A-2's, and A-1's step once
    assert not rig.smtp.snapshot(), (steps, after)
