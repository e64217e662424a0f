"""The SMS cap on a re-submission of a stored booking (a move, a corrected phone, new
medications): its own SMS already sent count as taken on the day they went, as at send time
(`Store.send_caps_read`); its steps already sent are history, not planned to go again, so
they take no room from the new plan; a message sent for the old date that goes again for the
new one (`again-<step>`, `repause`) is capped as a new SMS.

Real Redis, a real HTTP SMS gateway and SMTP server, the real send path with its clock
fixed, the shipped microneedling protocol (1 SMS a day, 7 in any 7 days: the day counts
here). Dates are ten days or more after the real today (the store's retention reads the real
clock); every upsert's `now` and every send's clock are set by the test, never the real hour.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import ROOT
from tests.sinks import HttpSink, SmtpSink
from tests.test_send_caps import ADVICE, Clock, _Fixed, step
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

TZ = ZoneInfo("Europe/Madrid")
PHONE = "+34600111222"


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield smtp, sms
    smtp.stop()
    sms.stop()


class Rig:
    def __init__(self, folder: Path, redis_client: Any, smtp: SmtpSink, sms: HttpSink) -> None:
        shutil.copytree(ROOT / "config" / "protocols", folder / "protocols")
        # "eve": one SMS the day after the visit, 19:00 (another booking of the patient).
        (folder / "protocols" / "eve.toml").write_text(
            step("evening", 1, "19:00", '["sms"]', "week-check"), encoding="utf-8")
        # "pre": one SMS the day before the visit, 18:00.
        (folder / "protocols" / "pre.toml").write_text(
            step("pre", -1, "18:00", '["sms"]', "spf-morning"), encoding="utf-8")
        # "eve2": the day-before at 10:00, and for a tretinoin user a text at 19:00 that day.
        (folder / "protocols" / "eve2.toml").write_text("""
name = "Two texts"
[[steps]]
id = "day-before"
day = -1
time = "10:00"
channels = ["sms"]
template = "day-before"
late = "send"
late_until = "-12h"
[[steps]]
id = "evening"
day = -1
time = "19:00"
channels = ["sms"]
template = "spf-morning"
only_if_any = ["tretinoin"]
""" + ADVICE, encoding="utf-8")
        (folder / "clinics").mkdir()
        (folder / "clinics" / "rp.toml").write_text(f"""
name = "Replan Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 1
max_per_week = 7
[send_window]
start = "09:00"
end = "20:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@rp.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms.port}/sms?:to={{to}}"
""", encoding="utf-8")
        self.settings = Settings(config_dir=folder, templates_dir=ROOT / "templates",
                                 _env_file=None)
        self.catalog = Catalog.load(self.settings)
        self.store = Store(redis_client, "rp")
        self.ctx = Context(settings=self.settings, store=self.store, catalog=self.catalog,
                           renderer=Renderer(self.catalog.templates_dir))
        self.smtp, self.sms = smtp, sms
        # X: ten days after the real today (patient-local).
        self.x = datetime.now(TZ).date() + timedelta(days=10)
        self.sent: list[tuple[date, str]] = []  # (patient-local day, key) of each SMS sent

    def at(self, days: int, hour: int, minute: int = 0) -> datetime:
        """`hour`:`minute` Madrid, `days` after X, in UTC."""
        return datetime.combine(self.x + timedelta(days=days), time(hour, minute),
                                TZ).astimezone(UTC)

    def book(self, booking_id: str, visit: int, now: datetime, *, treatment: str = "microneedling",
             email: bool = False, phone: str = PHONE, tretinoin: bool = False) -> None:
        """Upsert the booking (a visit at 14:30 Madrid `visit` days after X) at `now`."""
        doc: dict[str, Any] = {
            "clinic": "rp", "booking_id": booking_id, "treatment": treatment,
            "starts_at": datetime.combine(self.x + timedelta(days=visit), time(14, 30),
                                          TZ).isoformat(),
            "patient": {"name": "Ana López", "phone": phone, "timezone": "Europe/Madrid",
                        "locale": "en", "channels": ["sms", "email"] if email else ["sms"]},
            "medications": {"tretinoin": tretinoin, "retinol": False}}
        if email:
            doc["patient"]["email"] = "ana@example.com"
        booking = parse_booking(doc, self.catalog)
        self.store.upsert(booking, plan(booking, self.catalog.protocols[treatment],
                                        self.catalog.clinics["rp"], now), now)

    def send(self, booking_id: str, key: str, at: datetime) -> str:
        """Claim `key` and send it through the real send path, the clock at `at`."""
        ref = f"rp/{booking_id}/{key}"
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        claims = [c for c in self.store.claim_due(100, 300) if c.ref == ref]
        assert len(claims) == 1, claims
        Clock.at = at
        before = len(self.sms.snapshot())
        result = send_claimed(self.ctx, ref, claims[0].version, claims[0].claim)
        self.sent += [(at.astimezone(TZ).date(), key)] * (len(self.sms.snapshot()) - before)
        return result

    def reminders(self, booking_id: str = "M-1") -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in self.store.timeline("rp", booking_id)["reminders"]}

    def due(self, key: str, booking_id: str = "M-1") -> datetime:
        return datetime.fromisoformat(self.reminders(booking_id)[key]["due_at"])

    def sms_days(self, booking_id: str = "M-1") -> Counter[date]:
        """Each patient-local day's SMS sent or still to go, the change notices left out."""
        days: Counter[date] = Counter(d for d, key in self.sent if "#" not in key)
        for key, r in self.reminders(booking_id).items():
            if key.endswith(":sms") and r["status"] == "scheduled" and not key.startswith(
                    ("rescheduled#", "cancelled#")):
                days[self.due(key, booking_id).astimezone(TZ).date()] += 1
        return days


@pytest.fixture
def rig(tmp_path, redis_client, sinks, monkeypatch) -> Rig:
    monkeypatch.setattr("worker.dispatch.datetime", _Fixed)
    return Rig(tmp_path / "config", redis_client, *sinks)


def day(rig: Rig, n: int) -> date:
    return rig.x + timedelta(days=n)


def test_a_move_keeps_the_day_before_the_sent_messages_took_no_room(rig):
    """The reported case. SMS only, visit on X+6: the confirmation went on X, the prep on
    X+3 10:00. At 11:00 that day the visit moves to X+5: the new plan's confirmation (at
    booking) and prep (late: at once) were counted as SMS going today, though both are
    history: the prep was pushed to X+4, and the day-before of X+4 10:00 found no day
    before it expires and was dropped. Now the day-before goes on X+4, one SMS a day."""
    rig.book("M-1", 6, rig.at(0, 9, 30))
    assert rig.send("M-1", "booking-confirmation:sms", rig.at(0, 9, 30)) == "sent"
    assert rig.send("M-1", "prep:sms", rig.at(3, 10)) == "sent"
    rig.book("M-1", 5, rig.at(3, 11))
    shown = rig.reminders()
    assert shown["prep:sms"]["status"] == shown["booking-confirmation:sms"]["status"] == "sent"
    assert shown["day-before:sms"]["status"] == "scheduled", shown["day-before:sms"]
    assert rig.due("day-before:sms") == rig.at(4, 10)
    assert "limit" not in shown["day-before:sms"]["reason"]
    assert not [k for k in shown if k.startswith("again-")]  # not the confirmation, not late
    assert shown["rescheduled#1:sms"]["status"] == "scheduled"
    assert rig.send("M-1", "day-before:sms", rig.at(4, 10)) == "sent"
    assert "14:30" in rig.sms.snapshot()[-1].text
    days = rig.sms_days()
    assert max(days.values()) == 1, sorted(days.items())
    assert days[day(rig, 4)] == 1


def test_a_corrected_phone_on_the_morning_of_the_day_before_keeps_it(rig):
    """Any re-submission: the clinic corrects the phone on X+5 09:30, the day-before due at
    10:00. The confirmation (sent on X, at booking: planned for now) was counted on X+5 and
    the day-before, finding no later day before it expires, was dropped."""
    rig.book("M-1", 6, rig.at(0, 9, 30))
    assert rig.send("M-1", "booking-confirmation:sms", rig.at(0, 9, 30)) == "sent"
    assert rig.send("M-1", "prep:sms", rig.at(3, 10)) == "sent"
    rig.book("M-1", 6, rig.at(5, 9, 30), phone="+34600111333")
    shown = rig.reminders()
    assert shown["day-before:sms"]["status"] == "scheduled", shown["day-before:sms"]
    assert rig.due("day-before:sms") == rig.at(5, 10)
    assert rig.send("M-1", "day-before:sms", rig.at(5, 10)) == "sent"
    assert rig.sms.snapshot()[-1].to == "+34600111333"
    assert max(rig.sms_days().values()) == 1


def test_own_sms_sent_today_caps_a_new_sms_planned_today(rig):
    """The reverse: the day-before SMS went on X+3 10:00; at 11:00 the clinic adds tretinoin
    (same visit, X+4): the pause message (care-critical) is late, due at once. Today holds
    the booking's own SMS: it goes by its email, not as a second SMS today. Before, the
    day-before (history) was counted at its new plan time, after the pause message: the
    pause went by SMS (two that day), and the day-before went to email, a duplicate."""
    rig.book("M-1", 4, rig.at(0, 9), email=True)
    assert rig.send("M-1", "day-before:sms", rig.at(3, 10)) == "sent"
    rig.book("M-1", 4, rig.at(3, 11), email=True, tretinoin=True)
    shown = rig.reminders()
    assert shown["stop-retinoids:sms"]["status"] == "skipped", shown["stop-retinoids:sms"]
    assert shown["stop-retinoids:sms"]["reason"].endswith("; its email goes")
    assert shown["stop-retinoids:email"]["status"] == "scheduled"
    assert "day-before:email" not in shown  # the day-before went: not again by email
    assert shown["day-before:sms"]["status"] == "sent"
    assert rig.send("M-1", "stop-retinoids:email", rig.at(3, 11)) == "sent"
    assert [m.to for m in rig.smtp.snapshot()] == ["ana@example.com"]
    days = rig.sms_days()
    assert days[day(rig, 3)] == 1 and max(days.values()) == 1, sorted(days.items())


def test_a_message_again_for_the_new_date_is_capped_as_a_new_sms(rig):
    """The day-before went on X+2 for a visit on X+3; the visit moves to X+6, whose
    day-before (X+5 10:00) goes again, but the patient's other booking has an SMS on X+5:
    the again is capped as any new SMS (SMS only: no later day before it expires), not
    passed as history."""
    rig.book("M-2", 4, rig.at(0, 9), treatment="eve")  # its SMS on X+5 19:00
    assert rig.due("evening:sms", "M-2") == rig.at(5, 19)
    rig.book("M-1", 3, rig.at(0, 9))
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    rig.book("M-1", 6, rig.at(2, 11))
    shown = rig.reminders()
    assert not [k for k in shown if k.startswith("again-")], shown
    assert shown["day-before:sms"]["status"] == "sent"
    # Without the other booking, it goes again.
    rig.store.cancel("rp", "M-2", rig.at(2, 11))
    rig.book("M-1", 7, rig.at(2, 12))
    again = rig.reminders()["again-day-before#2:sms"]
    assert again["status"] == "scheduled"
    assert rig.due("again-day-before#2:sms") == rig.at(6, 10)


def test_the_moves_own_notice_counts_on_its_day(rig):
    """The notice a move adds is an SMS on its day, as at send time: the visit (X+6, the
    confirmation sent by SMS on X) moves at X+3 08:00 to X+4; the notice goes at the
    window's opening, 09:00. The prep, late, would go at that opening too, a second SMS that
    day: it gives way (SMS only, no later day before it expires), as does the day-before."""
    rig.book("M-1", 6, rig.at(0, 9, 30))
    assert rig.send("M-1", "booking-confirmation:sms", rig.at(0, 9, 30)) == "sent"
    rig.book("M-1", 4, rig.at(3, 8))
    shown = rig.reminders()
    assert rig.due("rescheduled#1:sms") == rig.at(3, 9)
    for key in ("prep:sms", "day-before:sms"):
        assert shown[key]["status"] == "skipped", shown[key]
        assert "limit at this clinic (1 a day, 7 in any 7 days) is reached on " \
            f"{day(rig, 3)}" in shown[key]["reason"], shown[key]["reason"]
    assert rig.send("M-1", "rescheduled#1:sms", rig.at(3, 9)) == "sent"
    assert [d for d, _ in rig.sent] == [day(rig, 0), day(rig, 3)]


def test_a_message_again_still_to_go_counts_on_its_day(rig):
    """After a move the day-before goes again (X+5 10:00, for a visit moved to X+6). The
    clinic then adds tretinoin, no move: the again is kept, and the new evening text on its
    day gives way (SMS only; the next evening is after the visit): one SMS that day."""
    rig.book("M-1", 3, rig.at(0, 9), treatment="eve2")
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    rig.book("M-1", 6, rig.at(2, 11), treatment="eve2")
    assert rig.due("again-day-before#1:sms") == rig.at(5, 10)
    rig.book("M-1", 6, rig.at(2, 12), treatment="eve2", tretinoin=True)
    shown = rig.reminders()
    assert shown["again-day-before#1:sms"]["status"] == "scheduled"
    assert shown["evening:sms"]["status"] == "skipped", shown["evening:sms"]
    assert f"is reached on {day(rig, 5)}" in shown["evening:sms"]["reason"]
    assert rig.send("M-1", "again-day-before#1:sms", rig.at(5, 10)) == "sent"
    assert Counter(d for d, _ in rig.sent) == {day(rig, 2): 1, day(rig, 5): 1}


def test_a_message_again_the_change_cancels_takes_no_room(rig):
    """The same, but the clinic changes the treatment (no move) to one without a
    day-before: the again is cancelled with the old plan, so the new plan's SMS that day
    (18:00) keeps it."""
    rig.book("M-1", 3, rig.at(0, 9), treatment="eve2")
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    rig.book("M-1", 6, rig.at(2, 11), treatment="eve2")
    assert rig.due("again-day-before#1:sms") == rig.at(5, 10)
    rig.book("M-1", 6, rig.at(2, 12), treatment="pre")
    shown = rig.reminders()
    assert shown["again-day-before#1:sms"]["status"] == "cancelled"
    assert shown["pre:sms"]["status"] == "scheduled", shown["pre:sms"]
    assert rig.due("pre:sms") == rig.at(5, 18)


def test_an_sms_sent_between_the_upserts_read_and_its_write_is_counted(rig, monkeypatch):
    """Forced race: the move of the first test has read the booking (its prep still to go)
    when the prep is sent. The apply finds the booking changed since its read (its exact
    hash is checked), reads again and caps with the prep as history sent today: the
    day-before keeps X+4."""
    rig.book("M-1", 6, rig.at(0, 9, 30))
    assert rig.send("M-1", "booking-confirmation:sms", rig.at(0, 9, 30)) == "sent"
    real = rig.store._caps_read
    reads: list[Any] = []

    def parked(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        if len(reads) == 1:  # between the upsert's read and its write: the prep goes
            assert rig.send("M-1", "prep:sms", rig.at(3, 10)) == "sent"
        return real(*args, **kwargs)

    monkeypatch.setattr(rig.store, "_caps_read", parked)
    rig.book("M-1", 5, rig.at(3, 11))
    assert len(reads) == 2
    shown = rig.reminders()
    assert shown["prep:sms"]["status"] == "sent"
    assert shown["day-before:sms"]["status"] == "scheduled", shown["day-before:sms"]
    assert rig.due("day-before:sms") == rig.at(4, 10)
    assert max(rig.sms_days().values()) == 1


def test_an_unchanged_resubmission_keeps_the_again_the_cap_sent_by_email(rig):
    """The day-before went by SMS on X+2 for a visit on X+3; the visit moves to X+6: its
    day-before (X+5 10:00) goes again, by email (the patient's other booking has an SMS on
    X+5). The clinic's system sends the same booking again: it was taken as a change (a new
    version) and the again email cancelled, "no longer in the plan", the day-before for the
    new date never sent (the cap now passed the sent SMS as history, not capped anew)."""
    rig.book("M-2", 4, rig.at(0, 9), treatment="eve", email=True)  # its SMS: X+5 19:00
    rig.book("M-1", 3, rig.at(0, 9), email=True)
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    rig.book("M-1", 6, rig.at(2, 11), email=True)
    moved = rig.store.timeline("rp", "M-1")
    assert rig.reminders()["day-before:email"]["status"] == "scheduled"
    rig.book("M-1", 6, rig.at(2, 11, 30), email=True)  # the same booking again
    again = rig.store.timeline("rp", "M-1")
    assert again["version"] == moved["version"]
    assert again["reminders"] == moved["reminders"]
    assert rig.send("M-1", "day-before:email", rig.at(5, 10)) == "sent"
    assert [m.to for m in rig.smtp.snapshot()] == ["ana@example.com"]


def test_released_from_a_hold_the_again_still_to_go_counts_on_its_day(rig):
    """After a move the day-before goes again (X+5 10:00, visit moved to X+6) and the
    tretinoin user's evening text that day (19:00) gives way. The clinic then enters a
    recent isotretinoin dose (held: the again is out of the schedule) and releases it: the
    cap at the release left out the again (a held booking's reminders still to go count
    nowhere), though the release puts it back: the evening text went too, two SMS on X+5."""
    folder = rig.settings.config_dir / "protocols"
    (folder / "eve3.toml").write_text((folder / "eve2.toml").read_text(encoding="utf-8").replace(
        'name = "Two texts"', 'name = "Two texts"\nisotretinoin_washout_days = 182'),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)

    def book(visit: int, now: datetime, dose: date | None = None, release: bool = False) -> None:
        booking = parse_booking({
            "clinic": "rp", "booking_id": "M-1", "treatment": "eve3",
            "starts_at": datetime.combine(day(rig, visit), time(14, 30), TZ).isoformat(),
            "patient": {"name": "Ana López", "phone": PHONE, "timezone": "Europe/Madrid",
                        "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": True, "retinol": False,
                            "isotretinoin_last_dose": dose and dose.isoformat()}}, rig.catalog)
        rig.store.upsert(booking, plan(booking, rig.catalog.protocols["eve3"],
                                       rig.catalog.clinics["rp"], now), now, release=release)

    book(3, rig.at(0, 9))
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    book(6, rig.at(2, 11))
    assert rig.due("again-day-before#1:sms") == rig.at(5, 10)
    assert rig.reminders()["evening:sms"]["status"] == "skipped"
    book(6, rig.at(2, 12), day(rig, -30))
    assert rig.store.timeline("rp", "M-1")["status"] == "held"
    book(6, rig.at(2, 13), day(rig, -30), release=True)
    shown = rig.reminders()
    assert rig.store.timeline("rp", "M-1")["status"] == "scheduled"
    assert shown["again-day-before#1:sms"]["status"] == "scheduled"
    assert shown["evening:sms"]["status"] == "skipped", shown["evening:sms"]
    assert rig.send("M-1", "again-day-before#1:sms", rig.at(5, 10)) == "sent"
    assert Counter(d for d, _ in rig.sent) == {day(rig, 2): 1, day(rig, 5): 1}


def test_a_corrected_phone_keeps_the_again_the_send_time_cap_sent_by_email(rig):
    """The prep (3 days before, 19:00) went on X+1 for a visit on X+5; the visit moves to
    X+8: the prep goes again on X+5 19:00. Found at 21:00 (a backlog), it would wait for
    X+6 09:00, the day of the patient's other SMS: it goes by email instead. The clinic then
    corrects the phone (no move): the again email was cancelled, "no longer in the plan"
    (its step is on SMS in the plan), and the prep for the new date never went."""
    (rig.settings.config_dir / "protocols" / "p3.toml").write_text(
        step("prep", -3, "19:00", '["sms"]', "spf-morning"), encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    rig.book("M-2", 5, rig.at(0, 9), treatment="eve", email=True)  # its SMS: X+6 19:00
    rig.book("M-1", 4, rig.at(0, 9), treatment="p3", email=True)
    assert rig.send("M-1", "prep:sms", rig.at(1, 19)) == "sent"
    rig.book("M-1", 8, rig.at(2, 11), treatment="p3", email=True)
    assert rig.send("M-1", "again-prep#1:sms", rig.at(5, 21)) == "skipped"
    assert rig.due("again-prep#1:email") == rig.at(6, 9)
    rig.book("M-1", 8, rig.at(5, 21, 30), treatment="p3", email=True, phone="+34600111333")
    assert rig.reminders()["again-prep#1:email"]["status"] == "scheduled"
    assert rig.send("M-1", "again-prep#1:email", rig.at(6, 9)) == "sent"
    assert [m.to for m in rig.smtp.snapshot()] == ["ana@example.com"]


def test_a_held_bookings_again_still_to_go_counts_for_the_patients_other_booking(rig):
    """Another booking, not the held one. After a move the day-before goes again (X+5 10:00,
    visit moved to X+6); the clinic enters a recent isotretinoin dose (held: the again is out
    of the schedule until the release). The patient's other booking, booked while it is held,
    has its evening SMS on X+5 19:00: a held booking's reminders still to go counted for no
    other booking, so it kept X+5; the release puts the again back (the store's own
    reminders are not capped again, only counted), and both went, two SMS on X+5. The
    held booking's own reminders still to go (the again, a notice) count for the others."""
    folder = rig.settings.config_dir / "protocols"
    (folder / "eve3.toml").write_text((folder / "eve2.toml").read_text(encoding="utf-8").replace(
        'name = "Two texts"', 'name = "Two texts"\nisotretinoin_washout_days = 182'),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)

    def book(visit: int, now: datetime, dose: date | None = None, release: bool = False) -> None:
        booking = parse_booking({
            "clinic": "rp", "booking_id": "M-1", "treatment": "eve3",
            "starts_at": datetime.combine(day(rig, visit), time(14, 30), TZ).isoformat(),
            "patient": {"name": "Ana López", "phone": PHONE, "timezone": "Europe/Madrid",
                        "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": False, "retinol": False,
                            "isotretinoin_last_dose": dose and dose.isoformat()}}, rig.catalog)
        rig.store.upsert(booking, plan(booking, rig.catalog.protocols["eve3"],
                                       rig.catalog.clinics["rp"], now), now, release=release)

    book(3, rig.at(0, 9))
    assert rig.send("M-1", "day-before:sms", rig.at(2, 10)) == "sent"
    book(6, rig.at(2, 11))
    assert rig.due("again-day-before#1:sms") == rig.at(5, 10)
    book(6, rig.at(2, 12), day(rig, -30))
    assert rig.store.timeline("rp", "M-1")["status"] == "held"
    rig.book("M-2", 4, rig.at(2, 12, 30), treatment="eve")  # its SMS: X+5 19:00 as planned
    assert rig.reminders("M-2")["evening:sms"]["status"] == "scheduled"
    book(6, rig.at(2, 13), day(rig, -30), release=True)
    assert rig.reminders()["again-day-before#1:sms"]["status"] == "scheduled"
    assert rig.send("M-1", "again-day-before#1:sms", rig.at(5, 10)) == "sent"
    moved = rig.due("evening:sms", "M-2")
    assert rig.send("M-2", "evening:sms", moved) == "sent"
    assert Counter(d for d, _ in rig.sent) == {day(rig, 2): 1, day(rig, 5): 1,
                                               moved.astimezone(TZ).date(): 1}
