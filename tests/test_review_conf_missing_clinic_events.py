"""Review (config read again while running): a clinic file missing from config/ as read now
(deleted by mistake, or missing for two looks while a deploy rewrites config/) made every
clinic event due meanwhile 'dropped: clinic ... is no longer configured', deleted: a held
booking's alert lost, the clinic never told. As for the clinic's reminders, it is retried
with backoff (given up after webhook_max_attempts, kept with the dead events to replay),
naming the missing file; once the file is back it is delivered. Real Redis, the outbox."""

from __future__ import annotations

import logging

from tests.test_webhooks import ENV, ROOT, STARTS, events, glow, settings
from worker.rendering import Renderer
from worker.webhooks import deliver_event, pump_events

__all__ = ["events"]  # the fixture, used by name


def test_a_held_alert_of_a_clinic_whose_file_is_missing_is_retried(events, tmp_path,
                                                                   redis_client, caplog) -> None:
    clinic = glow(outbox=True)
    event_id = events.emit("glow", "alert", "booking.held", {
        "booking_id": "A-7", "treatment": "microneedling", "starts_at": STARTS, "reason": "r"})
    conf = settings(tmp_path)
    results: list[str] = []

    def deliver(clinics: dict) -> None:
        redis_client.zadd(events.due_key, {event_id: 0})
        pump_events(events, lambda i, c: results.append(deliver_event(
            events, i, c, clinics=clinics, renderer=Renderer(ROOT / "templates"),
            settings=conf, env=ENV)), batch=10, lease_seconds=30)

    with caplog.at_level(logging.INFO):
        deliver({})  # the clinic's file is missing as config/ is read now
    missing = str(conf.clinics_dir / "glow.toml")
    assert len(results) == 1 and results[0].startswith("retrying") and missing in results[0], \
        results
    (pending,) = events.pending()
    assert pending.id == event_id and pending.attempts == 1
    assert any(missing in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    deliver({"glow": clinic})  # the file is back
    assert results[1] == "delivered", results
    (written,) = (tmp_path / "outbox").iterdir()
    assert "A-7" in written.read_text(encoding="utf-8")
    assert events.pending() == []
