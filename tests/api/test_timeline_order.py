"""The timeline's order: by the instant each reminder is due, not by its time as text.

A start with a fraction of a second (`.5`) gives its steps due times such as
`09:45:24.500000Z`; moved to a whole second, the steps still planned are due at
`09:45:24Z` while the ones the change cancelled keep their old due. As text,
`"09:45:24.500000Z" < "09:45:24Z"` ('.' before 'Z'): the later one was listed first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.api.conftest import future_booking
from tests.conftest import ROOT


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_a_due_with_a_fraction_of_a_second_sorts_after_the_whole_second(
        api, demo, redis_server, tmp_path):
    start = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
    doc = future_booking("F-1", clinic="demo", treatment="demo")
    doc["starts_at"] = (start + timedelta(milliseconds=500)).isoformat()
    doc["medications"] = {"tretinoin": True, "retinol": False, "isotretinoin_last_dose": None}
    assert demo.put("/v1/bookings/F-1", json=doc).status_code == 201
    # No retinoids any more (stop-retinoids cancelled, due start - 60s + 0.5s), and the visit
    # 30 s earlier on a whole second (day-before due start - 60s, the same second).
    doc["medications"]["tretinoin"] = False
    doc["starts_at"] = (start - timedelta(seconds=30)).isoformat()
    assert demo.put("/v1/bookings/F-1", json=doc).status_code == 200

    timeline = demo.get("/v1/bookings/F-1").json()
    due = {r["id"]: r["due_at"] for r in timeline["reminders"]}
    before = (start - timedelta(seconds=60)).isoformat().replace("+00:00", "Z")
    assert due["day-before:sms"] == before
    assert due["stop-retinoids:sms"] == before.replace("Z", ".500000Z")
    order = [r["id"] for r in timeline["reminders"]]
    assert order.index("day-before:sms") < order.index("stop-retinoids:email") \
        < order.index("stop-retinoids:sms")
    instants = [_instant(r["due_at"]) for r in timeline["reminders"]]
    assert instants == sorted(instants), order

    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))
    reminders = Path(sys.executable).parent / "reminders"
    shown = subprocess.run([str(reminders), "show", "--clinic", "demo", "--json", "F-1"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert [r["id"] for r in json.loads(shown.stdout)["reminders"]] == order
    table = subprocess.run([str(reminders), "show", "--clinic", "demo", "F-1"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    rows = [word for line in table.stdout.splitlines() for word in line.split()
            if word in order]
    assert rows == order
