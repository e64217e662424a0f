"""Review (rv-late2): the unknown-outcome finish keeps the stored due (1308ea7); an upsert of
another booking of the patient made while the retry waits for its ledger counts that SMS on
its old day (real Redis, real HTTP SMS gateway, real send path; the rig of
tests/test_send_caps_edges.py)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from tests.test_send_caps import rig as rig  # noqa: F401  (the fixtures)
from tests.test_send_caps import sinks as sinks  # noqa: F401
from tests.test_send_caps_edges import _hanging
from worker.catalog import Catalog
from worker.models import parse_booking
from worker.planner import plan
from worker.settings import Settings


def test_a_booking_made_while_a_critical_retry_waits_past_midnight_gives_way(rig):
    """All-day window. A-1's care-critical SMS of D 19:00 goes at about 23:00 and its gateway
    never answers: outcome unknown, retried once its ledger expires (an hour: on D+1). The
    clinic books A-2 meanwhile (its SMS D+1 10:00). The finish kept A-1's due on D, so A-2's
    cap saw D+1 free and kept its SMS there; A-1's retry, care-critical, went beyond the cap
    on D+1: two SMS on D+1. A-1's retry is counted on D+1, so A-2 gives way."""
    real = datetime.now(UTC)
    offset = (23 - real.hour) % 24
    offset = offset - 24 if offset > 14 else offset
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

    book("A-1", "evecrit", d - timedelta(days=1))  # care-critical SMS: D 19:00
    hang, freed = _hanging(rig)
    hang.set()
    assert rig.send("A-1", "evening:sms", datetime.now(UTC)) == "unknown"
    hang.clear()
    freed.set()
    ref = "cap/A-1/evening:sms"
    retry_at = datetime.fromtimestamp(rig.store.redis.zscore(rig.store.due_key, ref), UTC)
    assert retry_at.astimezone(tz).date() == d + timedelta(days=1)
    # While it waits for its ledger (it goes on D+1), the clinic books A-2: its SMS D+1 10:00.
    book("A-2", "morn", d)
    rig.store.redis.delete(rig.store.ledger_key(ref))  # its ledger expired
    sent: list[date] = []
    todo = [("A-1", "evening:sms", retry_at),
            ("A-2", "morning:sms", rig.due("A-2", "morning:sms"))]
    for booking_id, key, when in sorted(todo, key=lambda t: t[2]):
        before = len(rig.sms.snapshot())
        rig.send(booking_id, key, when)
        sent += [when.astimezone(tz).date()] * (len(rig.sms.snapshot()) - before)
    assert Counter(sent)[d + timedelta(days=1)] <= 1, (
        sent, rig.reminder("A-1", "evening:sms"), rig.reminder("A-2", "morning:sms"))
