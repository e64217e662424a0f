"""A patient told the visit's date by SMS only hears of a move or a cancel by SMS (real Redis,
real Apprise, a real HTTP SMS gateway on 127.0.0.1; the shipped microneedling protocol).

An SMS-only patient without retinoids gets no pause message and no invite email: before,
only those made a change notice, so "see you tomorrow at 14:30" by SMS followed by a move
told the patient nothing, and they came on the old day. Bookings are relative to the real
clock, under a send window open all day (no dependence on the hour the tests run at).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import ROOT
from tests.test_send_races import Gate
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

TZ = ZoneInfo("Europe/Madrid")
PREFIX = "msms"
DAY_BEFORE = "sk/M-1/day-before:sms"


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    g.answer(200)  # passes every request through unless a test resets it to park one
    yield g
    g.close()


@dataclass
class Rig:
    store: Store
    ctx: Context
    catalog: Catalog
    gate: Gate

    def doc(self, days: int, *, channels: tuple[str, ...] = ("sms",)) -> dict[str, Any]:
        """The booking: a visit at 14:30 Madrid `days` from today, SMS only, no retinoids."""
        day = (datetime.now(TZ) + timedelta(days=days)).date()
        return {
            "clinic": "sk", "booking_id": "M-1", "treatment": "microneedling",
            "starts_at": datetime(day.year, day.month, day.day, 14, 30, tzinfo=TZ).isoformat(),
            "patient": {"name": "Ana Ruiz", "phone": "+34600111222", "email": "ana@example.com",
                        "timezone": "Europe/Madrid", "locale": "en",
                        "channels": list(channels)},
            "medications": {"tretinoin": False, "retinol": False},
        }

    def book(self, doc: dict[str, Any]) -> dict[str, Any]:
        booking = parse_booking(doc, self.catalog)
        now = datetime.now(UTC)
        planned = plan(booking, self.catalog.protocols["microneedling"],
                       self.catalog.clinics["sk"], now)
        return self.store.upsert(booking, planned, now)

    def claim(self, ref: str):
        """Make `ref` due now and claim it, as the pump would (the others wait)."""
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        claims = self.store.claim_due(100, self.ctx.settings.lease_seconds)
        for c in claims:
            if c.ref != ref:
                assert self.store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                          "not in this test", c.claim)
        (claim,) = [c for c in claims if c.ref == ref]
        return claim

    def send(self, ref: str) -> str:
        """Send `ref` now through the real send path."""
        claim = self.claim(ref)
        return send_claimed(self.ctx, ref, claim.version, claim.claim)

    def reminders(self) -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in self.store.timeline("sk", "M-1")["reminders"]}

    def texts(self) -> list[str]:
        return [b["message"] for b in self.gate.bodies]


@pytest.fixture
def rig(tmp_path: Path, redis_client, gate: Gate) -> Rig:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config" / "protocols", config / "protocols")
    (config / "clinics").mkdir()
    (config / "clinics" / "sk.toml").write_text(f"""
name = "Skin Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]  # one a day, but not 3 a week: an SMS-only patient's day-before is not capped away
max_per_day = 1
max_per_week = 7
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "json://127.0.0.1:{gate.port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate.port}/email?:to={{to}}"
""", encoding="utf-8")
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX)
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


def names(text: str, start: str) -> bool:
    """Whether an SMS names the short date of an ISO start ("27 Nov" or "Nov 27", as the
    patient's English reads it)."""
    day = datetime.fromisoformat(start).astimezone(TZ).date()
    return f"{day.day} {day:%b}" in text or f"{day:%b} {day.day}" in text


def notices(reminders: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in reminders.items() if k.startswith(("rescheduled#", "cancelled#"))}


def test_a_move_after_the_day_before_sms_tells_the_patient_by_sms(rig):
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"
    assert names(rig.texts()[-1], first["starts_at"])  # "see you on <date> at 14:30"
    rig.book(moved)
    told = notices(rig.reminders())
    assert set(told) == {"rescheduled#1:sms"}
    notice = told["rescheduled#1:sms"]
    assert notice["status"] == "scheduled"
    assert notice["reason"] == "the appointment moved after messages had gone out"
    assert notice["expires_at"] == datetime.fromisoformat(moved["starts_at"]).astimezone(
        UTC).isoformat().replace("+00:00", "Z")
    before = len(rig.texts())
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert names(text, moved["starts_at"]) and "14:30" in text, text
    assert rig.reminders()["rescheduled#1:sms"]["status"] == "sent"
    # The same booking again adds nothing.
    rig.book(moved)
    assert set(notices(rig.reminders())) == {"rescheduled#1:sms"}


def test_a_cancel_after_the_day_before_sms_tells_the_patient_by_sms(rig):
    first = rig.doc(5)
    rig.book(first)
    assert rig.send(DAY_BEFORE) == "sent"
    timeline = rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert timeline["status"] == "cancelled"
    told = notices(rig.reminders())
    assert set(told) == {"cancelled#1:sms"}
    assert told["cancelled#1:sms"]["reason"] == (
        "the booking was cancelled after messages had gone out")
    before = len(rig.texts())
    assert rig.send("sk/M-1/cancelled#1:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert names(text, first["starts_at"]) and "cancelled" in text, text


def test_nothing_sent_by_sms_nothing_told(rig):
    """The SMS before the visit never went: no notice (as before)."""
    rig.book(rig.doc(5))
    rig.book(rig.doc(12))
    assert notices(rig.reminders()) == {}
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    assert notices(rig.reminders()) == {}


def test_an_sms_after_the_visit_names_no_date_and_tells_nothing(rig):
    """The aftercare SMS of a visit that took place (planned after its start) does not make
    a later change of the booking a notice: it told no date."""
    rig.book(rig.doc(1))
    rig.store.redis.zadd(rig.store.due_key, {"sk/M-1/spf:sms": 0})  # its time, a day after
    assert rig.send("sk/M-1/spf:sms") == "sent"
    rig.book(rig.doc(12))
    assert notices(rig.reminders()) == {}


@pytest.mark.parametrize("outcome", ["sent", "not sent"])
def test_the_day_before_sms_in_flight_at_the_move_makes_one_notice(rig, outcome):
    """The day-before SMS is parked at the gateway (handed over, not yet answered) when the
    move lands; then the gateway answers. It may have gone out: the patient is told once,
    whichever way it went, and the day-before goes again for the new date."""
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    rig.gate.reset()
    claim = rig.claim(DAY_BEFORE)
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.update(
        outcome=send_claimed(rig.ctx, DAY_BEFORE, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), "the day-before SMS never reached the gateway"
    rig.book(moved)
    assert set(notices(rig.reminders())) == {"rescheduled#1:sms"}
    rig.gate.answer(200 if outcome == "sent" else 400)
    thread.join(20)
    assert result["outcome"] == ("sent" if outcome == "sent" else "failed")
    rig.gate.answer(200)
    # The finish after the move changes nothing of the notices; the same booking again neither.
    rig.book(moved)
    told = notices(rig.reminders())
    assert set(told) == {"rescheduled#1:sms"} and told["rescheduled#1:sms"]["status"] == (
        "scheduled")
    before = len(rig.texts())
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert names(text, moved["starts_at"]), text
    # Exactly once: nothing of the notice is due or leased any more.
    ref = "sk/M-1/rescheduled#1:sms"
    assert rig.store.redis.zscore(rig.store.due_key, ref) is None
    assert rig.store.redis.zscore(rig.store.lease_key, ref) is None
    assert sum(names(t, moved["starts_at"]) and "moved" in t for t in rig.texts()) == 1
    # The day-before itself waits for the new date (it was pending at the move).
    day_before = rig.reminders()["day-before:sms"]
    assert day_before["status"] == "scheduled"
    assert day_before["due_at"][:10] == (
        datetime.fromisoformat(moved["starts_at"]) - timedelta(days=1)).date().isoformat()


# --- a message before the visit sent for the old date goes again for the new one ------------

def madrid(day_iso: str, days: int, hour: int) -> str:
    """The timeline's UTC form of `hour`:00 Madrid, `days` from the date of `day_iso`."""
    day = datetime.fromisoformat(day_iso).astimezone(TZ).date() + timedelta(days=days)
    at = datetime(day.year, day.month, day.day, hour, tzinfo=TZ).astimezone(UTC)
    return at.isoformat().replace("+00:00", "Z")


def test_the_messages_sent_for_the_old_date_go_again_for_the_new_one(rig):
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    assert rig.send("sk/M-1/prep:sms") == "sent"
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(moved)
    shown = rig.reminders()
    # The ones sent stay history; each goes again at the new plan's time for it.
    assert shown["prep:sms"]["status"] == shown["day-before:sms"]["status"] == "sent"
    again = {k: r for k, r in shown.items() if k.startswith("again-")}
    assert set(again) == {"again-prep#1:sms", "again-day-before#1:sms"}
    day_before = again["again-day-before#1:sms"]
    assert day_before["status"] == "scheduled"
    assert day_before["due_at"] == madrid(moved["starts_at"], -1, 10)
    assert day_before["reason"] == (
        "the appointment moved after it had gone out for the old date: again for the new "
        "date (1 day before, 10:00 patient-local)")
    # Its expiry is the step's for the new date (late_until = "-12h"): 02:30 Madrid that night.
    start = datetime.fromisoformat(moved["starts_at"])
    assert day_before["expires_at"] == (start - timedelta(hours=12)).astimezone(UTC).isoformat(
        ).replace("+00:00", "Z")
    assert again["again-prep#1:sms"]["due_at"] == madrid(moved["starts_at"], -3, 10)
    for key, r in again.items():
        assert rig.store.redis.zscore(rig.store.due_key, f"sk/M-1/{key}") == datetime.fromisoformat(
            r["due_at"]).timestamp()
    # The notice now, the day-before at its time: through the real send path.
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    before = len(rig.texts())
    assert rig.send("sk/M-1/again-day-before#1:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert names(text, moved["starts_at"]) and "14:30" in text and "see you" in text, text
    assert rig.reminders()["again-day-before#1:sms"]["status"] == "sent"


def test_a_later_move_or_cancel_supersedes_them(rig):
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12))
    latest = rig.doc(19)
    rig.book(latest)
    shown = rig.reminders()
    assert shown["again-day-before#1:sms"]["status"] == "cancelled"
    assert shown["again-day-before#1:sms"]["reason"] == "superseded by a later change"
    assert rig.store.redis.zscore(rig.store.due_key, "sk/M-1/again-day-before#1:sms") is None
    assert shown["again-day-before#2:sms"]["status"] == "scheduled"
    assert shown["again-day-before#2:sms"]["due_at"] == madrid(latest["starts_at"], -1, 10)
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    shown = rig.reminders()
    assert shown["again-day-before#2:sms"]["status"] == "cancelled"
    assert not [r for r in rig.store.redis.zrange(rig.store.due_key, 0, -1)
                if "again-" in r]
    assert shown["cancelled#3:sms"]["status"] == "scheduled"


def test_not_again_when_its_new_time_has_passed(rig):
    """Moved to the day after tomorrow: the prep email (3 days before) is past for the new
    date (the late rules would send it at once, beside the notice, which names the new
    date): not again; the day-before SMS (tomorrow 10:00) is still ahead: again."""
    both = ("sms", "email")
    rig.book(rig.doc(5, channels=both))
    assert rig.send("sk/M-1/prep:email") == "sent"
    assert rig.send(DAY_BEFORE) == "sent"
    moved = rig.doc(2, channels=both)
    rig.book(moved)
    shown = rig.reminders()
    assert sorted(k for k in shown if k.startswith("again-")) == ["again-day-before#1:sms"]
    assert shown["prep:email"]["status"] == "sent"
    assert shown["again-day-before#1:sms"]["due_at"] == madrid(moved["starts_at"], -1, 10)
    # told the date by the prep email and the day-before SMS: told of the move on both
    assert set(notices(shown)) == {"rescheduled#1:sms", "rescheduled#1:email"}


def test_an_email_before_the_visit_goes_again_but_not_the_confirmation(rig):
    """A patient with both channels: the prep email went for the old date; the new date's
    prep email goes again (its own key), and the confirmation does not (the notice, with the
    invite update, replaces it)."""
    first, moved = rig.doc(5, channels=("sms", "email")), rig.doc(12, channels=("sms", "email"))
    rig.book(first)
    assert rig.send("sk/M-1/booking-confirmation:email") == "sent"
    assert rig.send("sk/M-1/prep:email") == "sent"
    rig.book(moved)
    shown = rig.reminders()
    assert sorted(k for k in shown if k.startswith("again-")) == ["again-prep#1:email"]
    assert set(notices(shown)) == {"rescheduled#1:email"}
    assert shown["again-prep#1:email"]["due_at"] == madrid(moved["starts_at"], -3, 10)


def test_an_again_sms_in_flight_at_the_next_move(rig):
    """The day-before, again for the second date, is parked at the gateway when the visit
    moves a third time, then delivered: its delivery is recorded, and the third date gets
    its own day-before; the notice of the third date goes once."""
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.book(rig.doc(12))
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    rig.gate.reset()
    ref = "sk/M-1/again-day-before#1:sms"
    claim = rig.claim(ref)
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.update(
        outcome=send_claimed(rig.ctx, ref, claim.version, claim.claim)))
    thread.start()
    assert rig.gate.arrived.wait(10), "the SMS never reached the gateway"
    latest = rig.doc(19)
    rig.book(latest)
    shown = rig.reminders()
    assert shown["again-day-before#1:sms"]["status"] == "cancelled"
    assert shown["again-day-before#2:sms"]["status"] == "scheduled"
    assert set(notices(shown)) == {"rescheduled#1:sms", "rescheduled#2:sms"}
    rig.gate.answer(200)
    thread.join(20)
    assert result["outcome"] == "sent"
    record = rig.store.record(ref)
    assert record["status"] == "sent" and record["sent_at"]  # it went: recorded
    assert rig.store.redis.zscore(rig.store.due_key, ref) is None
    assert rig.store.redis.zscore(rig.store.lease_key, ref) is None
    shown = rig.reminders()
    assert shown["again-day-before#2:sms"]["status"] == "scheduled"
    assert shown["again-day-before#2:sms"]["due_at"] == madrid(latest["starts_at"], -1, 10)
    before = len(rig.texts())
    assert rig.send("sk/M-1/rescheduled#2:sms") == "sent"
    (text,) = rig.texts()[before:]
    assert names(text, latest["starts_at"]), text


def test_the_day_before_by_email_goes_again_with_the_invite_of_the_new_date(rig):
    """An email-only patient gets the day-before by email with the calendar invite
    (`invite = true`): again for the new date, it carries the invite at the new time with
    the move's SEQUENCE, as the step's own email would."""
    import icalendar

    from worker.dispatch import _render
    from worker.models import Booking

    first, moved = rig.doc(5, channels=("email",)), rig.doc(12, channels=("email",))
    rig.book(first)
    assert rig.send("sk/M-1/day-before:email") == "sent"
    rig.book(moved)
    shown = rig.reminders()
    assert shown["again-day-before#1:email"]["status"] == "scheduled"
    assert shown["again-day-before#1:email"]["due_at"] == madrid(moved["starts_at"], -1, 10)
    ref = "sk/M-1/again-day-before#1:email"
    stored = {k: v for k, v in rig.store.redis.hgetall(rig.store.booking_key("sk", "M-1")).items()
              if ":" not in k}
    doc = rig.store.redis.get(rig.store.doc_key("sk", "M-1"))
    _, _, message, _, _ = _render(rig.ctx, ref, rig.store.record(ref),
                                  Booking.model_validate_json(doc), datetime.now(UTC), stored)
    (event,) = icalendar.Calendar.from_ical(message.attachments[0].data).walk("VEVENT")
    assert event["SEQUENCE"] == 1
    assert event["DTSTART"].dt == datetime.fromisoformat(moved["starts_at"])


def test_a_protocol_step_id_may_not_begin_with_again():
    from pydantic import ValidationError

    from worker.protocols import Step

    with pytest.raises(ValidationError, match="reserved for the messages sent again"):
        Step(id="again-day-before", day=-1, time="10:00", channels=["sms"],
             template="day-before")


def test_the_day_before_overtaken_at_the_fence_makes_one_notice(rig):
    """The day-before SMS is rendered and at the seam before the hand-over when the move
    lands: it is dropped unsent, the patient is told once (it counted as gone out: it might
    have), and the day-before itself waits for the new date."""
    first, moved = rig.doc(5), rig.doc(12)
    rig.book(first)
    claim = rig.claim(DAY_BEFORE)
    real = rig.store.still_owned
    landed: list[dict[str, Any]] = []

    def park(*args: Any, **kwargs: Any) -> bool:
        if not landed:
            landed.append(rig.book(moved))
        return real(*args, **kwargs)

    rig.store.still_owned = park  # type: ignore[method-assign]
    try:
        outcome = send_claimed(rig.ctx, DAY_BEFORE, claim.version, claim.claim)
    finally:
        rig.store.still_owned = real  # type: ignore[method-assign]
    assert outcome == "dropped: overtaken before sending"
    assert rig.gate.bodies == []  # nothing reached the gateway
    shown = rig.reminders()
    assert set(notices(shown)) == {"rescheduled#1:sms"}
    assert not [k for k in shown if k.startswith("again-")]  # never sent: no again
    assert shown["day-before:sms"]["status"] == "scheduled"
    assert shown["day-before:sms"]["due_at"] == madrid(moved["starts_at"], -1, 10)
    assert rig.send("sk/M-1/rescheduled#1:sms") == "sent"
    (text,) = rig.texts()
    assert names(text, moved["starts_at"]), text
    assert rig.store.redis.zscore(rig.store.due_key, "sk/M-1/rescheduled#1:sms") is None


def test_booked_again_after_a_cancel_the_day_before_goes_again(rig):
    rig.book(rig.doc(5))
    assert rig.send(DAY_BEFORE) == "sent"
    rig.store.cancel("sk", "M-1", datetime.now(UTC))
    again = rig.doc(12)
    rig.book(again)
    shown = rig.reminders()
    assert shown["cancelled#1:sms"]["status"] == "cancelled"  # superseded, not yet sent
    assert shown["rescheduled#2:sms"]["status"] == "scheduled"
    assert shown["again-day-before#2:sms"]["status"] == "scheduled"
    assert shown["again-day-before#2:sms"]["due_at"] == madrid(again["starts_at"], -1, 10)
