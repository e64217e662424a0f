"""Review (revconf): the API plans bookings with the protocols and clinics as they are now.

The API read config/ once, at start, while the worker (worker/catalog.py `Catalog.fresh`)
and `reminders book` read the files as edited: a step the clinic moved from 09:00 to 11:00
(or whose template it renamed) was still planned at the old time (or template) for every
booking made through the API until the API was restarted. Real uvicorn, real Redis."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from tests.api.conftest import future_booking
from tests.conftest import ROOT


def _spf_hour(timeline: dict) -> int:
    (spf,) = [r for r in timeline["reminders"] if r["id"] in ("spf:sms", "spf:email")]
    return datetime.fromisoformat(spf["due_at"]).astimezone(ZoneInfo("Europe/Madrid")).hour


def _in_madrid(doc: dict) -> dict:
    doc["patient"]["timezone"] = "Europe/Madrid"  # the SPF hour is read in Madrid's time
    return doc


def test_a_protocol_edited_while_the_api_runs_plans_new_bookings(tmp_path: Path,
                                                                 serve) -> None:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    api = serve(config_dir=config)
    with api.client(api.issue_key("glow")) as glow:
        first = glow.put("/v1/bookings/A-1", json=_in_madrid(future_booking("A-1")))
        assert first.status_code == 201, first.text
        assert _spf_hour(first.json()) == 9
        path = config / "protocols" / "microneedling.toml"
        text = path.read_text(encoding="utf-8")
        old = 'id = "spf"\nday = 1\ntime = "09:00"'
        assert old in text
        path.write_text(text.replace(old, old.replace("09:00", "11:00"), 1), encoding="utf-8")
        # The configuration is looked at again at most once a second, and read once it held
        # still for a look: within about two seconds.
        for _ in range(2):
            time.sleep(1.2)
            assert glow.get("/v1/bookings/A-1").status_code == 200
        second = glow.put("/v1/bookings/A-2", json=_in_madrid(future_booking("A-2")))
        assert second.status_code == 201, second.text
        assert _spf_hour(second.json()) == 11
