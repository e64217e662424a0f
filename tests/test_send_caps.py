"""The SMS cap at send time (real Redis, a real HTTP SMS gateway and SMTP server, the real
send path with its clock fixed): an SMS whose time moves when it is sent (deferred to the
send window's next opening; a retry's backoff) onto a patient-local day that already holds
one of the patient's SMS at the clinic is capped there as the planner caps: moved to a
day with room, by email, or skipped, saying why; care-critical SMS never dropped.

Dates are a few weeks after the real today (bookings must be ahead of the real clock for
the store's retention); the send path's clock is fixed (`Clock`), never the real hour."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import QUICK_PROTOCOL
from tests.sinks import HttpSink, SmtpSink
from worker.catalog import Catalog
from worker.clock import RedisClock
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

TZ = ZoneInfo("Europe/Madrid")
ADVICE = "[advice]" + QUICK_PROTOCOL.split("[advice]", 1)[1]
CAPS = ("the patient's SMS limit at this clinic (1 a day, 3 in any 7 days) is reached on "
        "{day}")


def step(step_id: str, day: int, at: str, channels: str, template: str,
         critical: bool = False) -> str:
    return f"""
name = "{step_id}"
[[steps]]
id = "{step_id}"
day = {day}
time = "{at}"
channels = {channels}
template = "{template}"
late = "send"
late_until = "10d"
care_critical = {str(critical).lower()}
""" + ADVICE


# "eve": one SMS the day after the visit, 19:00; "morn": one the day after, 10:00.
PROTOCOLS = {
    "eve": step("evening", 1, "19:00", '["sms"]', "week-check"),
    "evemail": step("evening", 1, "19:00", '["sms", "email"]', "week-check"),
    "evecrit": step("evening", 1, "19:00", '["sms"]', "week-check", critical=True),
    "morn": step("morning", 1, "10:00", '["sms"]', "spf-morning"),
    "critmail": step("check", 1, "09:00", '["email"]', "week-check", critical=True),
    "prev": step("evening", -2, "19:00", '["sms"]', "week-check"),  # two days before
}


class Clock:
    """The send path's clock (worker.dispatch.datetime), set by the test."""

    at = datetime(2026, 1, 1, tzinfo=UTC)


class _Fixed(datetime):
    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return Clock.at.astimezone(tz) if tz is not None else Clock.at.replace(tzinfo=None)


def on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the send path at `Clock.at`: the host's clock (worker.dispatch.datetime: send
    windows, patient-local days) and Redis's as the send path reads it (dispatch `CLOCK`,
    never measured here: it reads its host clock, `Clock.at`; a retry's backoff counts
    from it)."""
    monkeypatch.setattr("worker.dispatch.datetime", _Fixed)
    monkeypatch.setattr("worker.dispatch.CLOCK", RedisClock(lambda: Clock.at.timestamp()))


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield smtp, sms
    smtp.stop()
    sms.stop()


class Rig:
    def __init__(self, folder: Path, redis_client: Any, smtp: SmtpSink, sms: HttpSink) -> None:
        (folder / "protocols").mkdir(parents=True)
        (folder / "clinics").mkdir()
        for name, text in PROTOCOLS.items():
            (folder / "protocols" / f"{name}.toml").write_text(text, encoding="utf-8")
        (folder / "clinics" / "cap.toml").write_text(f"""
name = "Cap Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 1
max_per_week = 3
[send_window]
start = "09:00"
end = "20:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@cap.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms.port}/sms?:to={{to}}"
""", encoding="utf-8")
        self.settings = Settings(config_dir=folder, templates_dir=ROOT / "templates",
                                 backoff_base_seconds=600, _env_file=None)
        self.catalog = Catalog.load(self.settings)
        self.store = Store(redis_client, "sc")
        self.ctx = Context(settings=self.settings, store=self.store, catalog=self.catalog,
                           renderer=Renderer(self.catalog.templates_dir))
        self.smtp, self.sms = smtp, sms
        # D: a day three weeks after the real today (patient-local).
        self.day = datetime.now(TZ).date() + timedelta(days=21)
        self.sent_days: list[date] = []  # the clock's patient-local day of every SMS sent

    def local(self, day: date, hour: int, minute: int = 0) -> datetime:
        return datetime.combine(day, time(hour, minute), TZ).astimezone(UTC)

    def book(self, booking_id: str, treatment: str, visit: date, *, email: bool = False) -> None:
        doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
               "starts_at": datetime.combine(visit, time(14, 0), TZ).isoformat(),
               "patient": {"name": "Ana López", "phone": "+34600111222",
                           "timezone": "Europe/Madrid", "locale": "en",
                           "channels": ["sms", "email"] if email else ["sms"]}}
        if email:
            doc["patient"]["email"] = "ana@example.com"
        booking = parse_booking(doc, self.catalog)
        now = datetime.now(UTC)
        self.store.upsert(booking, plan(booking, self.catalog.protocols[treatment],
                                        self.catalog.clinics["cap"], now), now)

    def send(self, booking_id: str, key: str, at: datetime) -> str:
        """Claim `key` of `booking_id` and send it through the send path at clock `at`."""
        ref = f"cap/{booking_id}/{key}"
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        claims = [c for c in self.store.claim_due(100, 300) if c.ref == ref]
        assert len(claims) == 1, claims
        Clock.at = at
        before = len(self.sms.snapshot())
        result = send_claimed(self.ctx, ref, claims[0].version, claims[0].claim)
        self.sent_days += [at.astimezone(TZ).date()] * (len(self.sms.snapshot()) - before)
        return result

    def reminder(self, booking_id: str, key: str) -> dict[str, Any]:
        (r,) = [r for r in self.store.timeline("cap", booking_id)["reminders"]
                if r["id"] == key]
        return r

    def due(self, booking_id: str, key: str) -> datetime:
        return datetime.fromisoformat(self.reminder(booking_id, key)["due_at"])

    def deliver_the_rest(self) -> None:
        """Send every SMS still to go, each at its stored due time (in due order)."""
        while True:
            pending = [(self.due(b, r["id"]), b, r["id"])
                       for b in self.store.booking_ids("cap")
                       for r in self.store.timeline("cap", b)["reminders"]
                       if r["status"] in ("scheduled", "retrying") and r["id"].endswith(":sms")]
            if not pending:
                return
            at, booking_id, key = min(pending)
            result = self.send(booking_id, key, at)
            assert result == "sent", (booking_id, key, at, self.reminder(booking_id, key))


@pytest.fixture
def rig(tmp_path, redis_client, sinks, monkeypatch) -> Rig:
    on_the_clock(monkeypatch)
    return Rig(tmp_path / "config", redis_client, *sinks)


def two_bookings(rig: Rig, first: str = "eve", *, email: bool = False) -> date:
    """A-1's SMS on D 19:00, A-2's on D+1 10:00 (planned on different days: both fit)."""
    d = rig.day
    rig.book("A-1", first, d - timedelta(days=1), email=email)
    rig.book("A-2", "morn", d, email=email)
    assert rig.due("A-1", "evening:sms") == rig.local(d, 19)
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=1), 10)
    return d


def test_deferred_at_21h_onto_a_day_holding_another_bookings_sms_moves_on(rig):
    """A backlog: A-1's 19:00 SMS is found at 21:00, outside the window. Its next opening
    (D+1 09:00) is the day of A-2's SMS: it moves to D+2 09:00 (no email), saying why; the
    patient gets one SMS a day."""
    d = two_bookings(rig)
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
    r = rig.reminder("A-1", "evening:sms")
    due = rig.due("A-1", "evening:sms")
    rig.deliver_the_rest()  # each SMS sent at its stored time, to the gateway
    assert Counter(rig.sent_days) == {d + timedelta(days=1): 1, d + timedelta(days=2): 1}
    assert due == rig.local(d + timedelta(days=2), 9)
    assert r["status"] == "scheduled"
    assert r["reason"].endswith(
        f"moved to {d + timedelta(days=2)}: {CAPS.format(day=d + timedelta(days=1))} and the "
        "patient takes no email"), r["reason"]


def test_a_transient_failure_whose_backoff_crosses_into_a_taken_day_moves_on(rig):
    """A-1's SMS fails at 19:55 (HTTP 503); its backoff (5-10 min) passes 20:00, so the
    retry would wait for D+1 09:00, A-2's SMS day: it is retried on D+2 09:00 instead."""
    d = two_bookings(rig)
    rig.sms.status = 503
    assert rig.send("A-1", "evening:sms", rig.local(d, 19, 55)) == "retrying"
    rig.sms.status = 200
    r = rig.reminder("A-1", "evening:sms")
    due = rig.due("A-1", "evening:sms")
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d + timedelta(days=1): 1, d + timedelta(days=2): 1}
    assert r["status"] == "retrying" and r["attempts"] == 1
    assert due == rig.local(d + timedelta(days=2), 9)
    assert r["reason"].startswith("retrying at ") and r["reason"].endswith(
        f"; moved to {d + timedelta(days=2)}: {CAPS.format(day=d + timedelta(days=1))} and "
        "the patient takes no email"), r["reason"]


def test_a_patient_who_takes_email_gets_it_by_email(rig):
    """With email (and no email copy of the step): the SMS is skipped and an email of the
    step goes at the deferred time instead; the day keeps its one SMS."""
    d = two_bookings(rig, email=True)
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "skipped"
    r = rig.reminder("A-1", "evening:sms")
    over = CAPS.format(day=d + timedelta(days=1))
    assert (r["status"], r["reason"]) == ("skipped", f"not sent by SMS: {over}; by email instead")
    e = rig.reminder("A-1", "evening:email")
    assert e["status"] == "scheduled" and rig.due("A-1", "evening:email") == \
        rig.local(d + timedelta(days=1), 9)
    assert e["reason"].endswith(f"; by email: {over}"), e["reason"]
    assert rig.send("A-1", "evening:email", rig.local(d + timedelta(days=1), 9)) == "sent"
    (mail,) = rig.smtp.snapshot()
    assert mail.to == "ana@example.com"
    rig.deliver_the_rest()
    assert rig.sent_days == [d + timedelta(days=1)]


def test_a_step_with_its_own_email_drops_the_sms_saying_so(rig):
    d = two_bookings(rig, "evemail", email=True)
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "skipped"
    r = rig.reminder("A-1", "evening:sms")
    assert r["reason"] == (f"not sent by SMS: {CAPS.format(day=d + timedelta(days=1))}; its "
                           "email goes")
    assert rig.reminder("A-1", "evening:email")["status"] == "scheduled"


def test_a_care_critical_sms_is_never_dropped(rig):
    """Without email a care-critical SMS goes at its deferred time all the same, saying it
    goes beyond the cap."""
    d = two_bookings(rig, "evecrit")
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
    r = rig.reminder("A-1", "evening:sms")
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 9)
    assert r["reason"].endswith(f"sent although {CAPS.format(day=d + timedelta(days=1))}: "
                                "care-critical, the other SMS give way"), r["reason"]


def test_a_deferral_on_a_free_day_is_not_touched(rig):
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))
    rig.book("A-2", "morn", d + timedelta(days=1))  # its SMS on D+2
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 9)
    assert "limit" not in rig.reminder("A-1", "evening:sms")["reason"]


def test_a_change_to_the_other_booking_after_the_read_is_not_lost(rig, monkeypatch):
    """Forced race: the deferral has read the patient's SMS (D+1 free: A-2's SMS is on D+2)
    when the clinic moves A-2 a day earlier (its SMS now on D+1; A-1's SMS still counts on
    D). The finish sees what it read changed, reads again and moves A-1's SMS to D+2."""
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))
    rig.book("A-2", "morn", d + timedelta(days=1))
    real = rig.store.send_caps_read
    reads: list[list[datetime]] = []

    def parked(*args: Any, **kwargs: Any) -> Any:
        read = real(*args, **kwargs)
        reads.append(read.taken)
        if len(reads) == 1:  # between the read and the finish: the clinic's move lands
            rig.book("A-2", "morn", d)
            assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=1), 10)
        return read

    monkeypatch.setattr(rig.store, "send_caps_read", parked)
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
    assert len(reads) == 2
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=2), 9)
    rig.deliver_the_rest()
    assert sorted(rig.sent_days) == [d + timedelta(days=1), d + timedelta(days=2)]


def test_an_email_that_went_by_email_after_all_is_not_counted_as_an_sms(rig):
    """An unsubscribed patient's care-critical email goes by SMS (flag "s": the cap counts
    it); the SMS fails (HTTP 503) and is retried; the patient subscribes again, and the
    retry goes by email. The patient got no SMS that day, so another booking's SMS on that
    day keeps its day: the flag was left behind and counted a phantom SMS (it went by email)."""
    d = rig.day
    rig.book("A-1", "critmail", d - timedelta(days=1), email=True)
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed",
                      critical=rig.catalog.critical_steps)
    rig.sms.status = 503
    assert rig.send("A-1", "check:email", rig.local(d, 9)) == "retrying"  # tried by SMS
    rig.sms.status = 200
    assert rig.store.opt_in("cap", "email", "ana@example.com")
    assert rig.send("A-1", "check:email", rig.local(d, 9, 30)) == "sent"
    (mail,) = rig.smtp.snapshot()
    assert mail.to == "ana@example.com" and rig.sms.snapshot() == []
    rig.book("A-2", "morn", d - timedelta(days=1), email=True)  # its SMS on D 10:00
    ids = {r["id"]: r for r in rig.store.timeline("cap", "A-2")["reminders"]}
    assert set(ids) == {"morning:sms"}, ids  # not "morning:email: by email: the limit ..."
    assert ids["morning:sms"]["status"] == "scheduled"
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10)


def test_an_upsert_that_read_an_sms_before_its_send_time_move_sees_the_move(rig, monkeypatch):
    """Forced race, the other way: A-2's upsert has read the patient's SMS (A-1's on D 19:00;
    D+1 free) when A-1's SMS, found at 21:00, is deferred to D+1 09:00 (A-2 not stored yet:
    D+1 is free for it). The upsert's write sees A-1's SMS moved since its read (the booking's
    version did not change): it reads again and A-2's SMS leaves D+1."""
    d = rig.day
    rig.book("A-1", "eve", d - timedelta(days=1))
    real = rig.store._caps_read
    reads: list[Any] = []

    def parked(*args: Any, **kwargs: Any) -> Any:
        read = real(*args, **kwargs)
        reads.append(read)
        if len(reads) == 1:  # between the upsert's read and its write: A-1's deferral
            assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
            assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=1), 9)
        return read

    monkeypatch.setattr(rig.store, "_caps_read", parked)
    rig.book("A-2", "morn", d)  # its SMS planned on D+1 10:00
    assert len(reads) == 2
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 10)
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d + timedelta(days=1): 1, d + timedelta(days=2): 1}


def test_a_backlog_sms_found_the_next_day_inside_the_window_is_capped_there(rig):
    """An outage: A-1's SMS of D 19:00 is first claimed on D+1 at 11:00, inside the window,
    after A-2's SMS went at 10:00. It is not sent that day: it moves to D+2 11:00."""
    d = two_bookings(rig)
    d1 = d + timedelta(days=1)
    assert rig.send("A-2", "morning:sms", rig.local(d1, 10)) == "sent"
    assert rig.send("A-1", "evening:sms", rig.local(d1, 11)) == "deferred"
    r = rig.reminder("A-1", "evening:sms")
    due = rig.due("A-1", "evening:sms")
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d1: 1, d + timedelta(days=2): 1}
    assert due == rig.local(d + timedelta(days=2), 11)
    assert r["reason"] == (
        f"found after its patient-local day had passed (a backlog, a replay); moved to "
        f"{d + timedelta(days=2)}: {CAPS.format(day=d1)} and the patient takes no email")


def test_a_backlog_sms_whose_free_day_is_taken_meanwhile_moves_on(rig, monkeypatch):
    """Forced race: A-1's late SMS (D 19:00, found on D+1 09:30) has read D+1 free when the
    clinic moves A-2 so that its SMS lands on D+1 10:00 (A-1's SMS still counted on D). The
    late SMS's count on D+1 checks what it read: it reads again and moves to D+2 instead."""
    d = rig.day
    d1 = d + timedelta(days=1)
    rig.book("A-1", "eve", d - timedelta(days=1))
    rig.book("A-2", "morn", d1)  # its SMS on D+2
    real = rig.store.send_caps_read
    reads: list[Any] = []

    def parked(*args: Any, **kwargs: Any) -> Any:
        read = real(*args, **kwargs)
        reads.append(read)
        if len(reads) == 1:
            rig.book("A-2", "morn", d)
            assert rig.due("A-2", "morning:sms") == rig.local(d1, 10)
        return read

    monkeypatch.setattr(rig.store, "send_caps_read", parked)
    assert rig.send("A-1", "evening:sms", rig.local(d1, 9, 30)) == "deferred"
    assert len(reads) == 2
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=2), 9, 30)
    monkeypatch.setattr(rig.store, "send_caps_read", real)
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d1: 1, d + timedelta(days=2): 1}


def test_a_backlog_sms_on_a_free_day_goes_and_is_counted_on_it(rig):
    """Found the next day with that day free: it goes at once, and it is counted on the
    day it went (a booking planned after it gives way on that day, not on its old one)."""
    d = rig.day
    d1 = d + timedelta(days=1)
    rig.book("A-1", "eve", d - timedelta(days=1))
    assert rig.send("A-1", "evening:sms", rig.local(d1, 9, 30)) == "sent"
    rig.book("A-2", "morn", d)  # its SMS planned on D+1 10:00: the day A-1's went
    assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=2), 10)



def test_a_patient_unsubscribed_from_email_gets_it_on_a_later_day(rig):
    """Email taken but unsubscribed from: not by email (it would be skipped as opted out),
    moved to the next day with room as for a patient without email."""
    d = two_bookings(rig, email=True)
    rig.store.opt_out("cap", "email", "ana@example.com", "unsubscribed")
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "deferred"
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=2), 9)
    assert "evening:email" not in {r["id"] for r in rig.store.timeline("cap", "A-1")["reminders"]}


def test_two_backlog_sms_of_two_bookings_claimed_at_once_one_goes_that_day(rig, monkeypatch):
    """Forced race between two attempts: after an outage A-1's SMS (D 19:00) and A-2's (D+1
    10:00) are both found on D+2 11:00 and claimed at once. A-1's attempt has read D+2 free
    when A-2's attempt reads it free too, is counted on D+2 and goes. A-1's count on D+2
    (`Store.restamp`) checks what it read: it reads again and moves to D+3: one SMS a day."""
    d = two_bookings(rig)
    d2 = d + timedelta(days=2)
    real = rig.store.send_caps_read
    read_a1, go_on = threading.Event(), threading.Event()

    def parked(ref: str, *args: Any, **kwargs: Any) -> Any:
        read = real(ref, *args, **kwargs)
        if ref.endswith("/A-1/evening:sms") and not read_a1.is_set():
            read_a1.set()
            assert go_on.wait(10)
        return read

    monkeypatch.setattr(rig.store, "send_caps_read", parked)
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(
        rig.send("A-1", "evening:sms", rig.local(d2, 11))))
    first.start()
    assert read_a1.wait(10)
    assert rig.send("A-2", "morning:sms", rig.local(d2, 11)) == "sent"
    go_on.set()
    first.join(10)
    assert results == ["deferred"]
    assert len(rig.sms.snapshot()) == 1
    rig.sent_days = [d2]  # the parked attempt's count saw A-2's SMS: it sent none
    assert rig.due("A-1", "evening:sms") == rig.local(d + timedelta(days=3), 11)
    monkeypatch.setattr(rig.store, "send_caps_read", real)
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d2: 1, d + timedelta(days=3): 1}


def test_two_backlog_care_critical_sms_claimed_at_once_both_go(rig):
    """The cap-exempt ones: two care-critical SMS (no email) found late on the same day
    both go, each saying it goes beyond the cap."""
    d = rig.day
    rig.book("A-1", "evecrit", d - timedelta(days=1))
    rig.book("A-2", "evecrit", d)
    d2 = d + timedelta(days=2)
    assert rig.send("A-1", "evening:sms", rig.local(d2, 11)) == "sent"
    assert rig.send("A-2", "evening:sms", rig.local(d2, 11)) == "sent"
    assert rig.sent_days == [d2, d2]


def _book_at(rig: Rig, booking_id: str, treatment: str, visit: date, now: datetime,
             channels: tuple[str, ...] = ("sms", "email")) -> None:
    """`Rig.book` (a patient with email) at `now` instead of the real clock."""
    doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
           "starts_at": datetime.combine(visit, time(14, 0), TZ).isoformat(),
           "patient": {"name": "Ana López", "phone": "+34600111222", "email": "ana@example.com",
                       "timezone": "Europe/Madrid", "locale": "en", "channels": list(channels)}}
    booking = parse_booking(doc, rig.catalog)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                   rig.catalog.clinics["cap"], now), now)


def test_an_sms_sent_by_email_instead_is_not_sent_again_once_its_day_frees_up(rig):
    """A-1's SMS (two days before its visit, D 19:00), deferred at 21:00 onto D+1 (A-2's SMS
    day), went by email on D+1 09:00. A-2 is then cancelled (D+1 free) and the clinic sends
    A-1 again at 09:30: its plan's SMS, late, now fits D+1, but the patient has the step by
    email: not sent again by SMS (`sent_elsewhere`)."""
    d = rig.day
    d1 = d + timedelta(days=1)
    rig.book("A-1", "prev", d + timedelta(days=2), email=True)  # its SMS: D 19:00
    rig.book("A-2", "morn", d, email=True)  # its SMS: D+1 10:00
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "skipped"
    assert rig.send("A-1", "evening:email", rig.local(d1, 9)) == "sent"
    rig.store.cancel("cap", "A-2", rig.local(d1, 9, 10))
    _book_at(rig, "A-1", "prev", d + timedelta(days=2), rig.local(d1, 9, 30))
    r = rig.reminder("A-1", "evening:sms")
    assert r["status"] == "skipped", r
    assert r["reason"] == f"not sent: already sent by email on {d1}", r
    # The fault drill takes such a record for what it is, no notice (no message of its own).
    from benchmarks.fault_drill import _went_elsewhere
    assert _went_elsewhere(r) and not _went_elsewhere(rig.reminder("A-1", "evening:email"))
    rig.deliver_the_rest()
    assert rig.sent_days == [] and len(rig.smtp.snapshot()) == 1


def test_an_sms_sent_by_email_instead_whose_email_is_at_the_provider_when_its_day_frees_up(
        rig, monkeypatch):
    """Forced race: the same, but the clinic's cancel of A-2 and its re-submission of A-1
    land while the email is at its provider (parked at the hand-over). The re-submission
    cancelled the email as not in the plan (it went all the same) and put the SMS back (the
    email not sent yet): the patient had both. The step stays on the channel of the copy at
    its provider, left to its attempt (retried there should it fail)."""
    d = rig.day
    d1 = d + timedelta(days=1)
    rig.book("A-1", "prev", d + timedelta(days=2), email=True)  # its SMS: D 19:00
    rig.book("A-2", "morn", d, email=True)  # its SMS: D+1 10:00
    assert rig.send("A-1", "evening:sms", rig.local(d, 21)) == "skipped"
    at_provider, go_on = park_sends(monkeypatch, "email")
    sending, results = send_in_thread(rig, "A-1", "evening:email", rig.local(d1, 9))
    assert at_provider.wait(10)
    rig.store.cancel("cap", "A-2", rig.local(d1, 9, 10))
    _book_at(rig, "A-1", "prev", d + timedelta(days=2), rig.local(d1, 9, 30))
    assert rig.reminder("A-1", "evening:email")["status"] == "sending"  # left to its attempt
    go_on.set()
    sending.join(10)
    assert results == ["sent"] and len(rig.smtp.snapshot()) == 1
    assert rig.reminder("A-1", "evening:email")["status"] == "sent"
    rig.sent_days = []
    rig.deliver_the_rest()
    assert rig.sent_days == [], rig.reminder("A-1", "evening:sms")


def test_an_sms_at_the_provider_when_the_patients_sms_is_withdrawn_is_not_kept(
        rig, monkeypatch):
    """The other way: A-1's SMS is at its provider when the clinic withdraws the patient's
    SMS (channels ["email"]): the step goes by email, the SMS is not kept in its place (it
    fails, HTTP 503: it is not retried by SMS)."""
    from worker import dispatch

    d = rig.day
    rig.book("A-1", "prev", d + timedelta(days=2), email=True)  # its SMS: D 19:00
    real = dispatch.deliver
    at_provider, go_on = threading.Event(), threading.Event()

    def parked(*args: Any, **kwargs: Any) -> Any:
        if args[1].channel == "sms":
            at_provider.set()
            assert go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", parked)
    results: list[str] = []
    sending = threading.Thread(target=lambda: results.append(
        rig.send("A-1", "evening:sms", rig.local(d, 19))))
    sending.start()
    assert at_provider.wait(10)
    _book_at(rig, "A-1", "prev", d + timedelta(days=2), rig.local(d, 19, 1), ("email",))
    rig.sms.status = 503
    go_on.set()
    sending.join(10)
    assert results == ["retrying"]
    assert rig.reminder("A-1", "evening:sms")["status"] == "cancelled"
    assert rig.reminder("A-1", "evening:email")["status"] == "scheduled"


def test_a_backlog_sms_handed_back_unbegun_is_still_capped_on_the_day_it_goes(rig):
    """An outage: A-1's SMS of D 19:00 is first claimed on D+1 at 11:00, after A-2's SMS
    went at 10:00, but its attempt does not start in time and hands the claim back (due
    now). The hand-back wrote "now" as its due, as if it had been counted on D+1: the next
    attempt found it on its own day, not late, and sent it, two SMS on D+1. A hand-back
    changes only when it is tried again, not the day it is counted on."""
    from worker.dispatch import attempt

    d = two_bookings(rig)
    d1 = d + timedelta(days=1)
    assert rig.send("A-2", "morning:sms", rig.local(d1, 10)) == "sent"
    ref = "cap/A-1/evening:sms"
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    (claim,) = [c for c in rig.store.claim_due(100, 300) if c.ref == ref]
    Clock.at = rig.local(d1, 11)
    assert attempt(rig.ctx, ref, claim.version, claim.claim, start_by=0) == "handed back"
    assert rig.send("A-1", "evening:sms", rig.local(d1, 11, 1)) == "deferred"
    rig.deliver_the_rest()
    assert Counter(rig.sent_days) == {d1: 1, d + timedelta(days=2): 1}


def test_a_dead_sms_replayed_the_next_day_is_capped_on_that_day(rig):
    """A-1's SMS of yesterday 19:00 was dead-lettered (HTTP 400); A-2's SMS went today at
    10:00; ops replay A-1's SMS at noon. The replay wrote "now" as its due, as if it had been
    counted on today: its attempt found it on its own day, not late, and sent it, two SMS
    today. It is capped on today as any SMS found after its day (moved to tomorrow).
    A replay's due is the real clock's (Redis's): the patient lives where it is about noon."""
    real = datetime.now(UTC)
    offset = 12 - real.hour  # hours east of UTC: about noon there now
    tz = ZoneInfo(f"Etc/GMT{-offset:+d}" if offset else "UTC")
    today = real.astimezone(tz).date()

    def book(booking_id: str, treatment: str, visit: date) -> None:
        doc = {"clinic": "cap", "booking_id": booking_id, "treatment": treatment,
               "starts_at": datetime.combine(visit, time(14, 0), tz).isoformat(),
               "patient": {"name": "Ana López", "phone": "+34600111222", "timezone": tz.key,
                           "locale": "en", "channels": ["sms"]}}
        booking = parse_booking(doc, rig.catalog)
        now = datetime.combine(today - timedelta(days=3), time(9), tz)
        rig.store.upsert(booking, plan(booking, rig.catalog.protocols[treatment],
                                       rig.catalog.clinics["cap"], now), now)

    def at(day: date, hour: int) -> datetime:
        return datetime.combine(day, time(hour), tz).astimezone(UTC)

    book("A-1", "eve", today - timedelta(days=2))  # its SMS: yesterday 19:00
    book("A-2", "morn", today - timedelta(days=1))  # its SMS: today 10:00
    rig.sms.status = 400
    assert rig.send("A-1", "evening:sms", at(today - timedelta(days=1), 19)) == "failed"
    rig.sms.status = 200
    assert rig.send("A-2", "morning:sms", at(today, 10)) == "sent"
    assert rig.store.replay(["cap/A-1/evening:sms"], real) == ["cap/A-1/evening:sms"]
    assert rig.send("A-1", "evening:sms", datetime.now(UTC)) == "deferred"
    assert rig.due("A-1", "evening:sms").astimezone(tz).date() == today + timedelta(days=1)
    assert len(rig.sms.snapshot()) == 1


def park_sends(monkeypatch: pytest.MonkeyPatch, channel: str,
               ) -> tuple[threading.Event, threading.Event]:
    """Park each send on `channel` at the hand-over to its provider until `go_on` is set;
    `at_provider` is set once one is there."""
    from worker import dispatch

    real = dispatch.deliver
    at_provider, go_on = threading.Event(), threading.Event()

    def parked(*args: Any, **kwargs: Any) -> Any:
        if args[1].channel == channel:
            at_provider.set()
            assert go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", parked)
    return at_provider, go_on


def send_in_thread(rig: Rig, booking: str, key: str, at: datetime,
                   ) -> tuple[threading.Thread, list[str]]:
    """`rig.send` in a thread of its own (started); its outcome lands in the list."""
    results: list[str] = []
    sending = threading.Thread(target=lambda: results.append(rig.send(booking, key, at)))
    sending.start()
    return sending, results


def test_a_stand_in_email_handed_to_a_send_task_when_its_booking_moves_is_not_sent_then(rig):
    """A-2's SMS (D+1 19:00) has no room (A-1's SMS takes D+1): it goes by email instead.
    The pump has claimed that email (handed to a send task, not begun) when the clinic
    moves A-2 a week on. The move must reschedule the step for the new date and the task
    in the queue must find its claim stale: `sent_elsewhere` took the claimed email for one
    at its provider and kept it at its old time ("its copy on that channel was being
    sent"), the move wrote it so, and the task sent it at the old time (since `daf7eba`
    also from the plan before the cap: the fault drill's CHANGE VIOLATED, a moved
    booking's message 56 s before its new time)."""
    d = rig.day
    rig.book("A-1", "morn", d, email=True)  # its SMS: D+1 10:00
    rig.book("A-2", "eve", d, email=True)  # its SMS: D+1 19:00, no room: by email
    assert rig.reminder("A-2", "evening:email")["status"] == "scheduled"
    ref = "cap/A-2/evening:email"
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    (claim,) = [c for c in rig.store.claim_due(100, 300) if c.ref == ref]
    _book_at(rig, "A-2", "eve", d + timedelta(days=7), datetime.now(UTC))
    Clock.at = rig.local(d + timedelta(days=1), 19)
    assert send_claimed(rig.ctx, ref, claim.version, claim.claim).startswith("dropped")
    assert rig.smtp.snapshot() == [] and rig.sms.snapshot() == []
    steps = {r["id"]: r for r in rig.store.timeline("cap", "A-2")["reminders"]}
    going = [r for r in steps.values() if r["status"] in ("scheduled", "retrying")]
    assert len(going) == 1, steps
    assert datetime.fromisoformat(going[0]["due_at"]) == rig.local(d + timedelta(days=8), 19)
    rig.deliver_the_rest()
    # A-1's SMS on D+1, A-2's on its new day; no email.
    assert rig.sent_days == [d + timedelta(days=1), d + timedelta(days=8)]
    assert rig.smtp.snapshot() == []
