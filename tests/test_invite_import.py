"""The icalendar library is imported at a process's first invite, not with the send path.

A pool process that never sends an invite does without it (about 2.5 MB each,
benchmarks/rss_probe.py; tests/e2e/test_lean_worker.py checks the worker's). Its first
invites are made by sender threads at once: a thread that finds the library's import under
way in another thread waits for it to finish, and never builds from a half-imported
module. Forced here in a fresh Python process: the first thread is parked inside the import
(as it looks for `icalendar.cal`, after `icalendar` itself is in sys.modules, not yet
initialised), a second thread makes an invite meanwhile, then the first goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import importlib.abc, json, sys, threading
from datetime import UTC, datetime
from pathlib import Path

from worker.catalog import Catalog
from worker.invites import build_invite
from worker.models import Booking
from worker.rendering import Renderer
from worker.settings import Settings

root = Path(sys.argv[1])
catalog = Catalog.load(Settings(config_dir=root / "config", templates_dir=root / "templates",
                                _env_file=None))
Renderer(catalog.templates_dir)  # the send path, as a pool process warms it up
booking = Booking.model_validate(
    json.loads((root / "examples" / "booking.json").read_text(encoding="utf-8")),
    context={"catalog": catalog})
imported_before = "icalendar" in sys.modules
parked, go = threading.Event(), threading.Event()


class Park(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "icalendar.cal" and threading.current_thread().name == "first":
            parked.set()
            go.wait(20)
        return None


sys.meta_path.insert(0, Park())
results = {}


def make(name):
    try:
        invite = build_invite(
            booking=booking, clinic=catalog.clinics[booking.clinic],
            protocol=catalog.protocols[booking.treatment], summary="Microneedling",
            description="See you", sequence=0, method="REQUEST",
            now=datetime(2026, 11, 21, 12, 0, tzinfo=UTC))
        results[name] = invite.data.decode()
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {exc}"


first = threading.Thread(target=make, args=("first",), name="first")
first.start()
while not parked.is_set() and first.is_alive():
    parked.wait(0.01)
second = threading.Thread(target=make, args=("second",), name="second")
second.start()
second.join(1.0)
waited = second.is_alive()  # held by the import under way, not failing on half of it
go.set()
first.join(20)
second.join(20)
print(json.dumps({"imported_before": imported_before, "parked": parked.is_set(),
                  "waited": waited, **results}))
"""


def test_the_first_invites_import_icalendar_once_and_wait_for_it() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["imported_before"] is False  # not with the send path
    assert found["parked"] and found["waited"], found
    first, second = found["first"], found["second"]
    assert first.startswith("BEGIN:VCALENDAR\r\n"), first
    assert "BEGIN:VTIMEZONE" in first and "SEQUENCE:0" in first
    assert second == first  # the same invite, whole
