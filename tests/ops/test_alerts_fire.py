"""The heartbeat alerts of deploy/prometheus/alerts.yml fire for the failure they name, as
Prometheus would evaluate them on a real scrape (`ScheduleCollector` on a real Redis,
through prometheus-client's exposition): a gauge the scrape leaves out makes `max(...) > N`
empty, which never fires, so a rule must also say `absent(...)`."""

from __future__ import annotations

import os
import re

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from worker.health import pump_key, stamp
from worker.metrics import ScheduleCollector

PREFIX = "alerts"
PART = re.compile(r"max\((\w+)\) > (\d+)|absent\((\w+)\)")


def scrape(client) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(ScheduleCollector(client, PREFIX))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


def fires(expr: str, samples: dict[str, float]) -> bool:
    """`max(M) > N`, `absent(M)`, joined by `or`: the forms the heartbeat rules take."""
    fired = False
    for part in expr.split(" or "):
        found = PART.fullmatch(part.strip())
        assert found, f"not a form this test evaluates: {part!r}"
        if found[3]:
            fired |= found[3] not in samples
        else:
            fired |= found[1] in samples and samples[found[1]] > float(found[2])
    return fired


def test_beat_never_started_fires_the_beat_alert_and_not_the_pump_one(redis_client) -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    # Workers run the pump (nudged by each booking written), beat never came up: no beat
    # tick was ever published, so its heartbeat was never stamped.
    stamp(redis_client, pump_key(PREFIX), node="w1:1", seconds="0.001")
    samples = scrape(redis_client)
    assert samples["reminders_redis_up"] == 1
    assert "reminders_beat_heartbeat_age_seconds" not in samples
    assert not fires(alerts["RemindersPumpStalled"], samples)
    assert fires(alerts["RemindersBeatStalled"], samples)
    # And with beat's heartbeat three minutes old, as after a beat that died.
    redis_client.hset(f"{PREFIX}:health:beat", "at", str(redis_client.time()[0] - 180))
    assert fires(alerts["RemindersBeatStalled"], scrape(redis_client))


def labelled(client, name: str) -> dict[tuple[str, str], float]:
    """One counter's series, {(clinic, channel): value}, as a real scrape gives them."""
    registry = CollectorRegistry()
    registry.register(ScheduleCollector(client, PREFIX))
    text = generate_latest(registry).decode()
    return {(s.labels["clinic"], s.labels["channel"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def increase(before: dict, after: dict) -> dict:
    """Prometheus's increase() over two scrapes: only a series present in both has one (a
    series first seen at 1 shows no increase: Prometheus has no sample of it before)."""
    return {k: after[k] - before[k] for k in after if k in before}


def test_a_clinics_first_dead_letter_fires_dead_letters_growing(redis_client, catalog,
                                                                 booking_doc) -> None:
    """Counters kept in Redis appear in the scrape only once counted: the first dead letter of
    a clinic's channel made its series appear at 1, and `increase(...) > 0` never saw it."""
    from datetime import UTC, datetime

    from tests.ops.test_metrics import attempt_on, book
    from tests.test_retention import soon
    from worker.store import Store

    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    expr = next(r["expr"] for g in rules["groups"] for r in g["rules"]
                if r["alert"] == "RemindersDeadLettersGrowing")
    assert expr.startswith("sum by (clinic, channel) (increase(reminders_dead_lettered_total")
    store = Store(redis_client, PREFIX, retention_days=400)
    # Scheduled (the clinic is running): the example booking moved to 14 days from today, so
    # its day-before SMS is ahead whatever the date (5 Dec 2026 itself is in the past from
    # that day on, and from 3 Dec 20:00 the late pause SMS takes 4 Dec: the day-before by email).
    book(store, catalog, soon(booking_doc), datetime.now(UTC))
    before = labelled(redis_client, "reminders_dead_lettered_total")
    sms = "glow/A-1042/day-before:sms"
    assert store.finish_failed(sms, attempt_on(store, sms), "HTTP 400") == "ok"
    after = labelled(redis_client, "reminders_dead_lettered_total")
    assert after[("glow", "sms")] == 1
    assert increase(before, after).get(("glow", "sms"), 0) > 0, (before, after)


def test_the_workers_config_gauge_loads_config_in_a_child_and_says_when_it_does_not(
        tmp_path, monkeypatch) -> None:
    """The worker's metrics port (its main process) asks a child Python whether config/ as on
    disk loads: a real child, the environment's settings, as the worker's own."""
    import shutil
    import time

    from worker.metrics import ConfigCollector
    from worker.settings import Settings

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    monkeypatch.setenv("REMINDERS_CONFIG_DIR", str(config))
    monkeypatch.setenv("REMINDERS_TEMPLATES_DIR", str(ROOT / "templates"))
    settings = Settings(_env_file=None, config_dir=config, templates_dir=ROOT / "templates")
    # The worker's own check (importing worker.tasks needs a broker URL; nothing connects).
    monkeypatch.setenv("REMINDERS_REDIS_URL", os.environ.get("REMINDERS_REDIS_URL")
                       or "redis://127.0.0.1:1/0")
    from worker.tasks import _config_loads

    collector = ConfigCollector(settings, loads=_config_loads)

    def gauge() -> float:
        registry = CollectorRegistry()
        registry.register(collector)
        (sample,) = [s for f in text_string_to_metric_families(generate_latest(
            registry).decode()) for s in f.samples if s.name == "reminders_config_loads"]
        return sample.value

    assert gauge() == 1
    clinic = config / "clinics" / "glow.toml"
    good = clinic.read_text(encoding="utf-8")
    clinic.write_text(good + '\nname = "unclosed\n', encoding="utf-8")
    assert gauge() == 0
    time.sleep(0.01)
    clinic.write_text(good, encoding="utf-8")
    assert gauge() == 1


def test_a_redis_that_evicts_fires_an_alert_and_keys_it_evicted_another(redis_client) -> None:
    """A Redis that may evict (a managed Redis's default `volatile-lru` evicts the bookings'
    keys, which carry a TTL) was said only in a log line at the worker's start, by `reminders
    check --redis` and by health's details: no metric, so no alert, and keys actually evicted
    (reminders gone unsent) were seen by no one; nor was a Redis about to be full, which
    under `noeviction` refuses every booking and every record (review)."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert alerts["RemindersRedisMayEvict"] == "max(reminders_redis_setting_unsafe) > 0"
    assert alerts["RemindersRedisEvictedKeys"] == (
        "max(increase(reminders_redis_evicted_keys_total[30m])) > 0")
    assert alerts["RemindersRedisMemoryNearlyFull"] == (
        "max(reminders_redis_memory_used_ratio) > 0.9")

    def unsafe() -> dict[str, float]:
        registry = CollectorRegistry()
        registry.register(ScheduleCollector(redis_client, PREFIX))
        text = generate_latest(registry).decode()
        return {s.labels["setting"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "reminders_redis_setting_unsafe"}

    assert unsafe() == {"appendonly": 0, "appendfsync": 0, "maxmemory-policy": 0, "role": 0}
    before = scrape(redis_client)["reminders_redis_evicted_keys_total"]
    assert scrape(redis_client)["reminders_redis_memory_used_ratio"] == 0  # no maxmemory
    try:
        redis_client.config_set("maxmemory-policy", "allkeys-lru")
        assert unsafe()["maxmemory-policy"] == 1
        used = int(redis_client.info("memory")["used_memory"])
        redis_client.config_set("maxmemory", used + 512 * 1024)
        for n in range(64):  # 2 MB more than it takes: keys are evicted
            redis_client.set(f"{PREFIX}:filler:{n}", "x" * 32 * 1024)
        samples = scrape(redis_client)
        after = samples["reminders_redis_evicted_keys_total"]
        assert samples["reminders_redis_memory_used_ratio"] > 0.9, samples
    finally:
        redis_client.config_set("maxmemory", 0)
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_resetstat()
    assert after > before, (before, after)
    assert unsafe()["maxmemory-policy"] == 0
