"""`reminders release` under a change landing between its check and its write (review).

The command reads the booking (held) and its document, then stores them again with the
clinic's release. Here it is parked at that store call while the clinic cancels the
booking or corrects it; then released. It must not undo the other change: it refuses
(exit 1) and the booking stays as the other change left it, in Redis.
"""

from __future__ import annotations

import copy
import os
import threading
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import ROOT
from tests.test_cli_store import future
from worker import cli
from worker.settings import get_settings
from worker.store import Store

MADRID = ZoneInfo("Europe/Madrid")
SOON = (datetime.now(UTC) + timedelta(days=90)).astimezone(MADRID).replace(
    hour=14, minute=30, second=0, microsecond=0)


def patient_today() -> date:
    return datetime.now(MADRID).date()


@pytest.fixture
def held(redis_server, redis_client, tmp_path, monkeypatch, booking_doc):
    for name in [k for k in os.environ if k.startswith("REMINDERS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REMINDERS_REDIS_URL", redis_server.url)
    monkeypatch.setenv("REMINDERS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REMINDERS_CONFIG_DIR", str(ROOT / "config"))
    monkeypatch.setenv("REMINDERS_TEMPLATES_DIR", str(ROOT / "templates"))
    get_settings.cache_clear()
    # A visit three months ahead, the last dose yesterday (the patient's day, in Madrid):
    # held, and a correction to today is still a date already past. (With the visit six
    # months ahead, yesterday by the machine's date was 182 days before the visit late in
    # the evening UTC, outside the washout: not held.)
    doc = future(booking_doc, SOON.isoformat())
    doc["medications"]["isotretinoin_last_dose"] = (patient_today() - timedelta(days=1)).isoformat()
    yield doc, cli.open_store(get_settings())
    get_settings.cache_clear()


def book(store: Store, doc) -> dict:
    from worker.batch import Document, check_document
    from worker.catalog import Catalog

    checked = check_document(Document(1, None, doc), Catalog.load(get_settings()), None,
                             datetime.now(UTC))
    assert checked.booking is not None and checked.plan is not None
    return store.upsert(checked.booking, checked.plan, datetime.now(UTC))


def stored(store: Store):
    r = store.redis
    return (r.hgetall(store.booking_key("glow", "A-1042")), r.get(store.doc_key("glow", "A-1042")),
            sorted(m for m in r.zrange(store.due_key, 0, -1) if m.startswith("glow/A-1042/")))


def parked_release(monkeypatch, change, capsys) -> tuple[int, dict]:
    parked, go = threading.Event(), threading.Event()
    real = Store.upsert_many

    def upsert_many(self, items, now, *, release=False, **kwargs):
        if release:
            parked.set()
            assert go.wait(10)
        return real(self, items, now, release=release, **kwargs)

    monkeypatch.setattr(Store, "upsert_many", upsert_many)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "code", cli.main(["release", "--clinic", "glow", "A-1042"])))
    thread.start()
    try:
        assert parked.wait(20)
        out["after_change"] = change()
    finally:
        go.set()
        thread.join(30)
    return out["code"], out


def test_a_cancel_landing_during_a_release_stands(held, monkeypatch, capsys):
    doc, store = held
    assert book(store, doc)["status"] == "held"

    def cancel():
        store.cancel("glow", "A-1042", datetime.now(UTC))
        return stored(store)

    code, out = parked_release(monkeypatch, cancel, capsys)
    assert code == cli.EXIT_REFUSED
    assert "changed while it was being released" in capsys.readouterr().err
    assert stored(store) == out["after_change"]  # nothing of the release was written
    assert store.timeline("glow", "A-1042")["status"] == "cancelled"
    assert out["after_change"][2] == []  # nothing will be sent


def test_a_correction_landing_during_a_release_is_not_overwritten(held, monkeypatch, capsys):
    doc, store = held
    assert book(store, doc)["version"] == 1
    recent = patient_today().isoformat()  # corrected: the last dose was today
    corrected = copy.deepcopy(doc)
    corrected["medications"]["isotretinoin_last_dose"] = recent

    def correct():
        assert book(store, corrected)["status"] == "held"
        return stored(store)

    code, out = parked_release(monkeypatch, correct, capsys)
    assert code == cli.EXIT_REFUSED
    assert stored(store) == out["after_change"]
    timeline = store.timeline("glow", "A-1042")
    assert timeline["status"] == "held" and timeline["version"] == 2
    assert store.booking_doc("glow", "A-1042")["medications"]["isotretinoin_last_dose"] == recent


def test_a_release_with_nothing_in_its_way_schedules_the_reminders(held, capsys):
    doc, store = held
    assert book(store, doc)["status"] == "held"
    assert cli.main(["release", "--clinic", "glow", "A-1042"]) == cli.EXIT_OK
    assert store.timeline("glow", "A-1042")["status"] == "scheduled"
