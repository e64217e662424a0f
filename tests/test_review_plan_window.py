"""Review of the planner against a clinic's send window (cold review, revplan).

A step placed by the send window at or after its own expiry can never be sent: the
send-time rules skip it when it comes due (worker/planner.py `at_send_time`). A clinic whose
window closes before a tretinoin night text's 19:30 (09:00-18:00, say) had every "tretinoin
tonight" planned as scheduled for the next morning, past the end of its own night: the
timeline showed messages that would never go, and the SMS cap counted each of them on that
next day against the patient's other bookings, whose SMS then went by email or moved.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from worker.clinics import SendWindow
from worker.models import parse_booking
from worker.planner import cap_plan, plan
from worker.status import Status

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
MADRID = ZoneInfo("Europe/Madrid")


def _closing_early(catalog):
    return catalog.clinics["glow"].model_copy(
        update={"send_window": SendWindow(start="10:00", end="18:00")})


def _tretinoin_start(catalog, booking_doc):
    # Consultation on Monday 30 Nov 2026, 11:00 Madrid: nights Mon/Wed/Fri, 30 Nov - 11 Dec.
    doc = {**booking_doc, "treatment": "tretinoin-start", "booking_id": "T-1",
           "starts_at": "2026-11-30T11:00:00+01:00"}
    return parse_booking(doc, catalog)


def test_a_night_text_the_window_cannot_hold_that_night_is_not_planned_for_the_next_morning(
        catalog, booking_doc):
    clinic = _closing_early(catalog)
    planned = plan(_tretinoin_start(catalog, booking_doc),
                   catalog.protocols["tretinoin-start"], clinic, NOW)
    for r in planned.reminders:
        if r.status == Status.SCHEDULED:
            assert r.expires_at is None or r.due_at < r.expires_at, (
                f"{r.key} scheduled {r.due_at.astimezone(MADRID):%a %d %H:%M}, never sendable: "
                f"it expires {r.expires_at.astimezone(MADRID):%a %d %H:%M} ({r.expires_note})")
    nights = [r for r in planned.reminders if r.step == "application-night"]
    assert len(nights) == 6
    for r in nights:
        assert r.status == Status.SKIPPED, r
        assert "10:00-18:00" in r.reason and "weekday series" in r.reason, r.reason
        # Skipped at the night it was meant for (what the timeline shows as its time).
        assert r.due_at.astimezone(MADRID).strftime("%a %H:%M") in (
            "Mon 19:30", "Wed 19:30", "Fri 19:30"), r
    # The rest of the plan is untouched: the welcome, step-ups, SPF texts and review go.
    assert [r.key for r in planned.reminders if r.status == Status.SCHEDULED] == [
        "welcome:email", "step-up#1:email", "morning-spf#1:sms", "step-up#2:email",
        "morning-spf#2:sms", "step-up#3:email", "morning-spf#3:sms", "step-up#4:email",
        "morning-spf#4:sms", "six-week-review:email"]


def test_the_default_window_still_sends_every_night_text_on_its_night(catalog, booking_doc):
    planned = plan(_tretinoin_start(catalog, booking_doc),
                   catalog.protocols["tretinoin-start"], catalog.clinics["glow"], NOW)
    nights = [r for r in planned.reminders if r.step == "application-night"]
    assert [(r.status, r.due_at.astimezone(MADRID).strftime("%a %d %H:%M")) for r in nights] == [
        (Status.SCHEDULED, d) for d in ("Mon 30 19:30", "Wed 02 19:30", "Fri 04 19:30",
                                        "Mon 07 19:30", "Wed 09 19:30", "Fri 11 19:30")]


def test_a_night_text_that_cannot_go_takes_no_sms_slot_from_the_patients_other_booking(
        catalog, booking_doc):
    """The same patient's microneedling on Wednesday 2 Dec: its day-before SMS (Tuesday 1 Dec,
    10:00) must stay an SMS; a never-sent Monday night text must not take Tuesday's slot."""
    clinic = _closing_early(catalog)
    start = plan(_tretinoin_start(catalog, booking_doc),
                 catalog.protocols["tretinoin-start"], clinic, NOW)
    taken = [r.due_at for r in start.reminders
             if r.channel == "sms" and r.status == Status.SCHEDULED]
    doc = {**booking_doc, "booking_id": "M-1", "starts_at": "2026-12-02T14:30:00+01:00",
           "medications": {"tretinoin": False, "retinol": False,
                           "isotretinoin_last_dose": None}}
    booking = parse_booking(doc, catalog)
    needling = cap_plan(plan(booking, catalog.protocols["microneedling"], clinic, NOW),
                        booking, taken)
    (day_before,) = [r for r in needling.reminders if r.step == "day-before"]
    assert (day_before.channel, day_before.status) == ("sms", Status.SCHEDULED), day_before
    assert day_before.due_at.astimezone(MADRID).strftime("%a %d %H:%M") == "Tue 01 10:00"


def test_a_moves_notice_names_the_day_the_pause_message_goes_again(catalog, booking_doc):
    """A window closing at 18:00 places the 18:00 "stop tretinoin" on the next morning (the
    planner; the confirmation lists that date). After a move, the rescheduled notice says
    "you may go on using them until <day>: from that evening, stop them again ... We will
    remind you that day": that day must be the one the pause message goes again (the new
    plan's reminder of the pause step), not the step's nominal day before the window."""
    from worker.notices import notice_and_invite
    from worker.rendering import Renderer

    clinic = _closing_early(catalog)
    protocol = catalog.protocols["microneedling"]
    booking = parse_booking({**booking_doc, "patient": {**booking_doc["patient"], "locale": "en"}},
                            catalog)  # 5 Dec 2026, 14:30 Madrid, a tretinoin user
    (pause,) = [r for r in plan(booking, protocol, clinic, NOW).reminders
                if r.key == "stop-retinoids:sms"]
    assert pause.due_at.astimezone(MADRID).strftime("%a %d %H:%M") == "Sun 29 10:00"
    stored = {"seq": "1", "moved_from": str(int(NOW.timestamp()) + 86400 * 30), "paused": "1"}
    record = {"step": "rescheduled", "channel": "email", "occurrence": "1"}
    extras = notice_and_invite(record, "email", booking, protocol, stored, NOW,
                               window=clinic.send_window)
    message = Renderer(catalog.templates_dir).render(
        template="rescheduled", channel="email", booking=booking, clinic=clinic,
        protocol=protocol, occurrence=1, due_at=NOW, now=NOW, **extras)
    assert "until Sunday, 29 November 2026: from that evening" in message.text, message.text


def test_a_moves_sms_notice_sent_through_the_real_send_path_names_the_repause_day(
        tmp_path, redis_client):
    """Real Redis, the real send path, a real HTTP SMS gateway: a clinic open 09:00-18:00; a
    patient whose clock reads about noon now (an Etc/GMT zone), so the send window is open.
    The stop-tretinoin SMS went out; the clinic moves the visit; the rescheduled SMS names
    the day the pause message goes again, which is the day the store planned it for."""
    import shutil

    from tests.conftest import ROOT
    from tests.test_send_races import Gate
    from worker.catalog import Catalog
    from worker.dispatch import Context, send_claimed
    from worker.rendering import Renderer
    from worker.settings import Settings
    from worker.store import Store

    now = datetime.now(UTC)
    shift = 12 - now.hour
    shift = shift - 24 if shift > 12 else shift + 24 if shift < -12 else shift
    zone = f"Etc/GMT{'-' if shift >= 0 else '+'}{abs(shift)}"
    tz = ZoneInfo(zone)
    assert 11 <= now.astimezone(tz).hour <= 12, (zone, now.astimezone(tz))
    gate = Gate()
    gate.answer(200)
    try:
        config = tmp_path / "config"
        shutil.copytree(ROOT / "config" / "protocols", config / "protocols")
        (config / "clinics").mkdir()
        (config / "clinics" / "sk.toml").write_text(f"""
name = "Skin Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 1
max_per_week = 7
[send_window]
start = "09:00"
end = "18:00"
[channels]
sms = "json://127.0.0.1:{gate.port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate.port}/email?:to={{to}}"
""", encoding="utf-8")
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            lease_seconds=8, send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(redis_client, "revplanw")
        ctx = Context(settings=settings, store=store, catalog=catalog,
                      renderer=Renderer(catalog.templates_dir))
        protocol = catalog.protocols["microneedling"]

        def book(days: int) -> None:
            day = (now.astimezone(tz) + timedelta(days=days)).date()
            booking = parse_booking({
                "clinic": "sk", "booking_id": "M-1", "treatment": "microneedling",
                "starts_at": datetime(day.year, day.month, day.day, 14, 30,
                                      tzinfo=tz).isoformat(),
                "patient": {"name": "Ana Ruiz", "phone": "+34600111222", "timezone": zone,
                            "locale": "en", "channels": ["sms"]},
                "medications": {"tretinoin": True}}, catalog)
            at = datetime.now(UTC)
            store.upsert(booking, plan(booking, protocol, catalog.clinics["sk"], at), at)

        def send(key: str) -> str:
            ref = f"sk/M-1/{key}"
            store.redis.zadd(store.due_key, {ref: 0})
            claims = store.claim_due(100, settings.lease_seconds)
            for c in claims:
                if c.ref != ref:
                    assert store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                         "not in this test", c.claim)
            (claim,) = [c for c in claims if c.ref == ref]
            return send_claimed(ctx, ref, claim.version, claim.claim)

        book(9)
        assert send("stop-retinoids:sms") == "sent"
        book(20)
        reminders = {r["id"]: r for r in store.timeline("sk", "M-1")["reminders"]}
        (notice,) = [k for k in reminders if k.startswith("rescheduled#")]
        (repause,) = [k for k in reminders if k.startswith("repause#")]
        again = datetime.fromisoformat(reminders[repause]["due_at"].replace("Z", "+00:00"))
        again = again.astimezone(tz)
        assert (again.hour, again.minute) == (9, 0)  # 18:00 is outside: the next morning
        assert send(notice) == "sent"
        text = gate.bodies[-1]["message"]
        assert f"until {again.day} {again:%b}, then stop again" in text, (text, again)
    finally:
        gate.close()


def test_the_welcome_promises_no_night_reminders_the_window_cannot_send(
        catalog, booking_doc, redis_client):
    """A clinic closing at 18:00 sends none of the 19:30 "tretinoin tonight" texts (above),
    yet the welcome email said "we will remind you on those nights" ("te lo recordaremos
    esas noches"): the patient waits for reminders that never come. The welcome renders
    with the dates the store keeps for the booking (`Store.plan_dates`, as the send path
    reads them): no night reminder among them, no promise of one."""
    from worker.rendering import Renderer
    from worker.store import Store

    protocol = catalog.protocols["tretinoin-start"]
    renderer = Renderer(catalog.templates_dir)
    store = Store(redis_client, "welcomew")
    promises = {"en": ("we will remind you on those nights", "2 or 3 nights a week only"),
                "es": ("te lo recordaremos esas noches", "2 o 3 noches por semana")}
    for clinic, nights_go in ((_closing_early(catalog), False), (catalog.clinics["glow"], True)):
        for locale, (promise, advice) in promises.items():
            booking = _tretinoin_start(catalog, {
                **booking_doc, "patient": {**booking_doc["patient"], "locale": locale}})
            store.upsert(booking, plan(booking, protocol, clinic, NOW), NOW)
            dates = store.plan_dates("glow", "T-1")
            assert ("application-night" in dates) is nights_go
            welcome = renderer.render(
                template="tretinoin-welcome", channel="email", booking=booking, clinic=clinic,
                protocol=protocol, occurrence=1, due_at=NOW, now=NOW, plan_dates=dates)
            for part in (welcome.text, welcome.html or ""):
                assert advice in part, part  # the advice itself stays
                assert (promise in part) is nights_go, (clinic.send_window, part)
