"""The SMS cap at send time where a reminder's stored due is not the day it is counted on by
a cap decision (real Redis, a real HTTP SMS gateway, the real send path; see
tests/test_send_caps.py for the rig): an attempt of unknown outcome near the patient's
midnight, an email going by SMS found after its day, a dead SMS replayed on its own day;
and, when planned, an SMS over the cap of a patient unsubscribed from email."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests.test_send_caps import Rig
from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.settings import Settings


def _hanging(rig: Rig) -> tuple[threading.Event, threading.Event]:
    """The SMS gateway reads each request and, while `hang` is set, answers it only once
    `freed` is set (and does not count it delivered): the sender's read times out first,
    outcome unknown."""
    hang, freed = threading.Event(), threading.Event()
    server = rig.sms._server
    answering = server.RequestHandlerClass

    class Handler(answering):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:  # noqa: N802
            if hang.is_set():
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                freed.wait(10)
                self.close_connection = True
                return
            super().do_POST()

    server.RequestHandlerClass = Handler
    return hang, freed


def test_an_unknown_outcome_near_the_patients_midnight_is_capped_on_the_day_it_goes(rig):
    """All-day send window. A-1's SMS of D 19:00 goes at about 23:00 (patient-local; the
    finish reads Redis's real clock, so the patient lives where it is about 23:00 now) and
    its gateway never answers: outcome unknown, retried once its ledger expires (the lease,
    here an hour: past midnight). The finish wrote that retry time as its due, on D+1,
    without a cap decision: the retry, no longer late, went beside A-2's SMS of D+1 10:00
    (two SMS on D+1). The retry is capped on the day it goes (moved to D+2)."""
    real = datetime.now(UTC)
    offset = (23 - real.hour) % 24
    offset = offset - 24 if offset > 14 else offset  # hours east of UTC: about 23:00 there
    tz = ZoneInfo(f"Etc/GMT{-offset:+d}" if offset else "UTC")
    d = real.astimezone(tz).date()
    clinic = rig.settings.config_dir / "clinics" / "cap.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'start = "09:00"\nend = "20:00"', 'start = "00:00"\nend = "24:00"'), encoding="utf-8")
    rig.settings = Settings(config_dir=rig.settings.config_dir,
                            templates_dir=rig.settings.templates_dir, backoff_base_seconds=600,
                            lease_seconds=3600, send_timeout_seconds=1, _env_file=None)
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    rig.ctx.settings = rig.settings

    def book(booking_id: str, treatment: str, visit: date) -> None:
        doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
               "starts_at": datetime.combine(visit, time(14, 0), tz).isoformat(),
               "patient": {"name": "Ana López", "phone": "+34600111222", "timezone": tz.key,
                           "locale": "en", "channels": ["sms"]}}
        booking = parse_booking(doc, rig.catalog)
        now = datetime.combine(d - timedelta(days=3), time(9), tz)
        rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                       rig.catalog.clinics["cap"], now), now)

    def at(day: date, hour: int) -> datetime:
        return datetime.combine(day, time(hour), tz).astimezone(UTC)

    book("A-1", "eve", d - timedelta(days=1))  # its SMS: D 19:00
    book("A-2", "morn", d)  # its SMS: D+1 10:00
    assert rig.due("A-1", "evening:sms") == at(d, 19)
    assert rig.due("A-2", "morning:sms") == at(d + timedelta(days=1), 10)
    hang, freed = _hanging(rig)
    hang.set()
    assert rig.send("A-1", "evening:sms", datetime.now(UTC)) == "unknown"
    hang.clear()
    freed.set()
    ref = "cap/A-1/evening:sms"
    retry_at = datetime.fromtimestamp(rig.store.redis.zscore(rig.store.due_key, ref), UTC)
    assert retry_at.astimezone(tz).date() == d + timedelta(days=1)
    rig.store.redis.delete(rig.store.ledger_key(ref))  # its ledger expired
    sent: list[date] = []
    results = []
    for booking_id, key, when in [("A-1", "evening:sms", retry_at),
                                  ("A-2", "morning:sms", at(d + timedelta(days=1), 10))]:
        before = len(rig.sms.snapshot())
        results.append(rig.send(booking_id, key, when))
        sent += [when.astimezone(tz).date()] * (len(rig.sms.snapshot()) - before)
    assert results == ["deferred", "sent"]
    moved = rig.due("A-1", "evening:sms")
    assert moved.astimezone(tz).date() == d + timedelta(days=2)
    before = len(rig.sms.snapshot())
    assert rig.send("A-1", "evening:sms", moved) == "sent"
    sent += [moved.astimezone(tz).date()] * (len(rig.sms.snapshot()) - before)
    assert Counter(sent) == {d + timedelta(days=1): 1, d + timedelta(days=2): 1}


def test_a_late_email_going_by_sms_is_counted_on_the_day_it_goes(rig, monkeypatch):
    """A-1's care-critical email of D 09:00 goes by SMS (the patient unsubscribed from
    email: the cap counts it as an SMS). An outage: it is first claimed on D+1 at 09:30 and
    goes at once (care-critical), still counted on D: the clinic books A-2 while it is at
    the gateway, and A-2's SMS took D+1 10:00 (its day looked free): two SMS on D+1. Found
    late, it is counted on D+1 before it goes, as a late SMS is, and A-2's SMS gives way."""
    from worker import dispatch

    d = rig.day
    d1 = d + timedelta(days=1)
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)  # its email: D 09:00
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)
    real = dispatch.deliver
    at_gateway, go_on = threading.Event(), threading.Event()

    def parked(*args: Any, **kwargs: Any) -> Any:
        if args[1].channel == "sms" and not at_gateway.is_set():
            at_gateway.set()
            assert go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", parked)
    results: list[str] = []
    sending = threading.Thread(target=lambda: results.append(
        rig.send("A-1", "check:email", rig.local(d1, 9, 30))))
    sending.start()
    assert at_gateway.wait(10)
    rig.book("A-2", "morn", d)  # its SMS: D+1 10:00, unless D+1 is taken
    go_on.set()
    sending.join(10)
    assert results == ["sent"] and len(rig.sms.snapshot()) == 1
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d1: 1, d + timedelta(days=2): 1}, \
        rig.reminder("A-2", "morning:sms")


def test_a_dead_sms_replayed_on_its_own_day_is_capped_on_that_day(rig):
    """A-1's SMS of D 10:00 is dead-lettered (HTTP 400): a dead SMS is not counted, so A-2,
    booked then, keeps its SMS on D 19:00. Ops replay A-1's SMS at noon, its own day: not
    late, it went at once, beside A-2's (two SMS on D). Back from the dead letters it is
    capped on the day it goes, as a new SMS (moved to D+1)."""
    d = rig.day
    rig.book("A-1", "morn", d - timedelta(days=1))  # its SMS: D 10:00
    rig.sms.status = 400
    assert rig.send("A-1", "morning:sms", rig.local(d, 10)) == "failed"
    rig.sms.status = 200
    rig.book("A-2", "eve", d - timedelta(days=1))  # its SMS: D 19:00 (D looks free)
    assert rig.due("A-2", "evening:sms") == rig.local(d, 19)
    assert rig.store.replay(["cap/A-1/morning:sms"], rig.local(d, 12)) == [
        "cap/A-1/morning:sms"]
    assert rig.send("A-1", "morning:sms", rig.local(d, 12)) == "deferred"
    assert rig.due("A-1", "morning:sms") == rig.local(d + timedelta(days=1), 12)
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}


def test_an_sms_over_the_cap_of_a_patient_unsubscribed_from_email_moves_on_when_planned(rig):
    """A-1's SMS is on D 19:00; the patient unsubscribed from email; A-2 is then booked with
    its SMS on D 19:00 too. The cap sent it by email (the patient lists email): skipped at
    its begin as opted out, the patient got nothing of that step. As at send time, an
    unsubscribed patient's SMS moves to the next day with room instead."""
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1), email=True)  # its SMS: D 19:00
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed")
    rig.book("A-2", "eve", d - timedelta(days=1), email=True)  # its SMS: D 19:00, capped
    for booking_id in ("A-1", "A-2"):
        for r in rig.store.timeline("cap", booking_id)["reminders"]:
            if r["status"] == "scheduled" and r["channel"] == "email":
                rig.send(booking_id, r["id"], datetime.fromisoformat(r["due_at"]))
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d: 1, d + timedelta(days=1): 1}


def test_an_sms_at_its_provider_is_not_capped_again_by_a_resubmission(rig, monkeypatch):
    """Forced race: A-1's SMS (D 19:00) is at the gateway when the clinic books A-2, whose
    care-critical SMS takes D too (beyond the cap: the others give way), and then sends A-1
    again unchanged. The re-submission capped A-1's SMS again and moved it to D+1: its
    delivery was recorded beside the new plan, which sent the step again on D+1 (A-1's one
    message twice). An SMS at its provider is left to its attempt, counted where it goes."""
    from worker import dispatch

    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))  # its SMS: D 19:00
    real = dispatch.deliver
    at_gateway, go_on = threading.Event(), threading.Event()

    def parked(*args: Any, **kwargs: Any) -> Any:
        if not at_gateway.is_set():
            at_gateway.set()
            assert go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", parked)
    results: list[str] = []
    sending = threading.Thread(target=lambda: results.append(
        rig.send("A-1", "evening:sms", rig.local(d, 19))))
    sending.start()
    assert at_gateway.wait(10)
    rig.book("A-2", "evecrit", d - timedelta(days=1))  # care-critical: D 19:00, beyond the cap
    rig.book("A-1", "eve", d - timedelta(days=1))  # the same booking again
    go_on.set()
    sending.join(10)
    assert results == ["sent"]
    assert rig.reminder("A-1", "evening:sms")["status"] == "sent"
    rig.deliver_the_rest()
    assert [p.to for p in rig.sms.snapshot()] == ["+34600111222"] * 2  # A-1's once, A-2's
