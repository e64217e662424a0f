"""A clinic file edited into one that does not load is kept out by the running processes
(worker/catalog.py), logged once at ERROR, and nothing else showed it: health passed, no
metric changed, the clinic's change silently never took effect, and the next worker
started (a deploy, a restart) refused to start. `/metrics` says whether config/ as it is
now on disk loads (`reminders_config_loads`), and an alert rule fires on it. Real uvicorn,
real Redis, a real scrape."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

NAME = "reminders_config_loads"


def loads(api) -> float | None:
    with api.client() as client:
        text = client.get("/metrics").text
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == NAME]
    return found[0] if found else None


def test_metrics_and_an_alert_say_when_config_does_not_load(tmp_path: Path, serve) -> None:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    api = serve(config_dir=config)
    assert loads(api) == 1
    clinic = config / "clinics" / "glow.toml"
    good = clinic.read_text(encoding="utf-8")
    clinic.write_text(good + '\nname = "unclosed\n', encoding="utf-8")
    assert loads(api) == 0
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"]
               if r["alert"] == "RemindersConfigNotLoading"]
    assert rule["expr"] == f"min({NAME}) == 0"
    time.sleep(0.01)
    clinic.write_text(good, encoding="utf-8")  # fixed: loads again
    assert loads(api) == 1
