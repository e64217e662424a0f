"""Clinic events given up (a clinic's endpoint down past REMINDERS_WEBHOOK_MAX_ATTEMPTS)
show in the metrics and fire an alert: otherwise nobody learns of them until someone runs
`reminders events dead`, and after the retention they expire unsent. Real Redis, the
metrics as a scrape reads them, the shipped alert rules."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.metrics import ScheduleCollector
from worker.webhooks import Events

ROOT = Path(__file__).resolve().parent.parent


def scrape(redis_client) -> dict[str, float]:
    return {sample.name: sample.value
            for family in ScheduleCollector(redis_client, "reminders").collect()
            for sample in family.samples if not sample.labels}


def test_clinic_events_given_up_and_waiting_are_gauges_and_given_up_ones_alert(redis_client):
    events = Events(redis_client, "reminders")
    for n in range(3):
        events.emit("glow", "webhook", "booking.held", {"booking_id": f"A-{n}"})
    for event_id, claim in events.claim(2, 30):
        assert events.give_up(event_id, claim, "webhook answered HTTP 500") == "dead"
    metrics = scrape(redis_client)
    assert metrics["reminders_clinic_events_given_up"] == 2
    assert metrics["reminders_clinic_events_waiting"] == 1
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = [str(rule.get("expr", "")) for group in rules["groups"] for rule in group["rules"]]
    assert any("reminders_clinic_events_given_up" in e for e in exprs)
