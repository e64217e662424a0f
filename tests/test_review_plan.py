"""Review of the send-time rules and the words (cold review, rev-plan).

A weekday series ("tretinoin tonight" on Mon/Wed/Fri nights of the tretinoin start) is about
its own night: an occurrence that cannot go that evening (a retry, a backlog or an outage
past the window's close) must not be deferred to the next morning, where it would say
"tonight" on a night that is not an application night.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker.models import parse_booking
from worker.planner import at_send_time, plan
from worker.status import Status

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize("zone", ["Europe/Madrid", "America/New_York", "Australia/Sydney"])
def test_a_night_text_that_misses_its_evening_is_not_sent_on_another_night(
        catalog, booking_doc, zone):
    booking_doc.update(treatment="tretinoin-start", starts_at="2026-11-30T11:00:00+00:00")
    booking_doc["patient"]["timezone"] = zone
    booking = parse_booking(booking_doc, catalog)
    clinic = catalog.clinics["glow"]
    tz = ZoneInfo(zone)
    planned = plan(booking, catalog.protocols["tretinoin-start"], clinic, NOW)
    nights = [r for r in planned.reminders
              if r.step == "application-night" and r.status == Status.SCHEDULED]
    assert len(nights) >= 5, planned.reminders
    for r in nights:
        night = r.due_at.astimezone(tz)
        assert night.strftime("%a") in ("Mon", "Wed", "Fri"), r
        # The attempt finds the window closed that evening (a retry after a 503, a backlog).
        closed = datetime.combine(night.date(), datetime.min.time(), tz).replace(
            hour=20, minute=30).astimezone(UTC)
        rule = at_send_time(closed, clinic.send_window, tz, r.expires_at, r.expires_note)
        if rule.action == "defer":
            assert rule.at is not None
            assert rule.at.astimezone(tz).date() == night.date(), (
                f"{r.key} planned {night:%a %d %H:%M} would say 'tretinoin tonight' on "
                f"{rule.at.astimezone(tz):%a %d %H:%M}")
        else:
            assert rule.action == "skip", rule
        # Sent late the same evening, inside the window, it still goes.
        late = night + timedelta(minutes=15)
        assert at_send_time(late.astimezone(UTC), clinic.send_window, tz, r.expires_at,
                            r.expires_note).action == "send"


def test_a_stored_night_text_found_after_the_windows_close_is_skipped_not_sent_tomorrow(
        catalog, booking_doc, redis_client):
    """Real Redis, the real send path: the stored expiry of a night text is the end of its
    own night, so an attempt after the window's close (a retry, a backlog) skips it."""
    from tests.conftest import ROOT
    from tests.raw import set_reminder_fields
    from worker.dispatch import Context, send_claimed
    from worker.rendering import Renderer
    from worker.settings import Settings
    from worker.store import Store, ref_of

    now = datetime.now(UTC)
    # A zone in which it is now 20:00-23:59, after the glow clinic's 09:00-20:00 window.
    shift = (21 - now.hour) % 24  # local hour 21 (or 20:xx-21:xx)
    shift = shift - 24 if shift > 14 else shift
    zone = f"Etc/GMT{'-' if shift >= 0 else '+'}{abs(shift)}"
    tz = ZoneInfo(zone)
    assert 20 <= now.astimezone(tz).hour <= 23, (zone, now.astimezone(tz))
    booking_doc.update(treatment="tretinoin-start", booking_id="N-1",
                       starts_at=(now + timedelta(days=3)).replace(microsecond=0).isoformat())
    booking_doc["patient"]["timezone"] = zone
    booking = parse_booking(booking_doc, catalog)
    planned = plan(booking, catalog.protocols["tretinoin-start"], catalog.clinics["glow"], now)
    store = Store(redis_client, "revplan")
    store.upsert(booking, planned, now)
    night = next(r for r in planned.reminders
                 if r.step == "application-night" and r.status == Status.SCHEDULED
                 and r.due_at > booking.starts_at)
    ref = ref_of("glow", "N-1", night.key)
    stored = store.record(ref)
    local = night.due_at.astimezone(tz)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tz)
    assert float(stored["expires_epoch"]) == midnight.timestamp(), stored
    # Tonight's text, found after the window closed (as a retry after a 503 would find it).
    tonight = datetime.combine(now.astimezone(tz).date(), datetime.min.time(), tz)
    set_reminder_fields(store, ref,
                        planned_epoch=repr(tonight.replace(hour=19, minute=30).timestamp()),
                        expires_epoch=repr((tonight + timedelta(days=1)).timestamp()))
    settings = Settings(config_dir=ROOT / "config", templates_dir=ROOT / "templates",
                        _env_file=None)
    ctx = Context(settings, store, catalog, Renderer(catalog.templates_dir))
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(100, 30) if c.ref == ref]
    assert send_claimed(ctx, ref, claim.version, claim.claim) == "skipped"
    record = store.record(ref)
    assert record["status"] == "skipped", record
    assert "weekday series" in record["reason"], record
    assert store.redis.zscore(store.due_key, ref) is None


def test_every_sms_fits_one_gsm7_segment_for_a_spanish_speaking_patient_of_a_us_clinic(
        catalog, repo_settings):
    """DOMAIN.md: an SMS is one GSM-7 segment (160). A US clinic's Spanish-speaking patient
    reads the es templates in the es_US variant ("12:30 p.m.", "100.4F"): every template
    (each protocol, each wording, the longest names, the change notices) must still fit."""
    from worker.checking import _render_all
    from worker.rendering import Renderer

    us = catalog.clinics["glow"].model_copy(update={
        "timezone": "America/New_York", "locale": "en-US", "phone": "+12125550100"})
    errors, samples, _, _ = _render_all(Renderer(catalog.templates_dir), catalog, [us],
                                        repo_settings.protocols_dir)
    assert errors == []
    over = [(s.template, s.locale, s.discreet, s.length, s.text) for s in samples
            if s.segments != 1 or s.encoding != "GSM-7"]
    assert over == []
    assert not [s.text for s in samples if "p.m.." in s.text or "a.m.." in s.text]
