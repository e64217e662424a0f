"""A patient's timezone must be an IANA zone name, not any file ZoneInfo can load (review).

`parse_timezone` accepted "localtime" (the API host's own zone: the patient's reminders
would follow the server's clock), "posixrules", "right/Europe/Madrid" (a leap-second clock)
and "Factory" (a placeholder, "-00"). They are refused with an error naming
`patient.timezone`, and nothing is stored: through the real API over HTTP, and through
`reminders book` as a real process on a real Redis. IANA names, links included ("UTC",
"US/Eastern"), are still taken; the list is read once, not per booking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pytest

from tests.api.conftest import future_booking
from tests.conftest import ROOT
from worker import models
from worker.models import parse_timezone

NOT_ZONES = ["localtime", "posixrules", "Factory", "right/Europe/Madrid",
             "posix/Europe/Madrid"]


def loads(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", NOT_ZONES)
def test_a_file_of_the_tz_database_that_is_no_zone_name_is_refused(name):
    with pytest.raises(ValueError, match="not an IANA timezone name"):
        parse_timezone(name)


def test_those_files_do_load_so_the_check_is_not_zoneinfos():
    # The reason for the fix: ZoneInfo itself loads them (tzdata ships Factory; the
    # system's folder has the rest). Where the system has no such file, there is less to
    # refuse, so at least the tzdata package's ones must load.
    assert loads("Factory")
    assert [n for n in NOT_ZONES if loads(n)], "no such file here: nothing tested"


@pytest.mark.parametrize("name", ["Europe/Madrid", "America/Argentina/Buenos_Aires", "UTC",
                                  "US/Eastern", "Etc/GMT+5", "Asia/Kolkata"])
def test_iana_names_are_taken(name):
    assert parse_timezone(name) == name


def test_the_list_is_read_once_not_per_booking(monkeypatch):
    models.iana_timezones.cache_clear()
    calls = []
    real = zoneinfo.available_timezones

    def counted() -> set[str]:
        calls.append(1)
        return real()

    monkeypatch.setattr(zoneinfo, "available_timezones", counted)
    for _ in range(1000):
        parse_timezone("Europe/Madrid")
        with pytest.raises(ValueError):
            parse_timezone("Mars/Base")
    assert len(calls) == 1
    models.iana_timezones.cache_clear()


@pytest.mark.parametrize("name", ["localtime", "Factory", "right/Europe/Madrid"])
def test_the_api_refuses_it_naming_the_field_and_stores_nothing(glow, api, name):
    doc = future_booking("TZ-1")
    doc["patient"] = dict(doc["patient"], timezone=name)
    store = api.app.state.services.store
    assert glow.get("/v1/bookings/TZ-1").status_code == 404  # the API's own keys written

    def stored() -> set[str]:  # all but the rate limiter's counters
        return {k for k in store.redis.keys("*") if ":ratelimit:" not in k}

    before = stored()
    refused = glow.put("/v1/bookings/TZ-1", json=doc)
    assert refused.status_code == 422, refused.text
    (field,) = refused.json()["error"]["fields"]
    assert field["field"] == "patient.timezone"
    assert name in field["message"] and "not an IANA timezone name" in field["message"]
    assert glow.get("/v1/bookings/TZ-1").status_code == 404
    assert stored() == before


def test_reminders_book_refuses_it_naming_the_field_and_stores_nothing(
        redis_server, redis_client, tmp_path, booking_doc):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))
    before = set(redis_client.keys("*"))
    docs = []
    for n, name in enumerate(["localtime", "posixrules", "Factory"]):
        doc = json.loads(json.dumps(booking_doc))
        doc["booking_id"], doc["patient"]["timezone"] = f"TZ-{n}", name
        docs.append(json.dumps(doc))
    done = subprocess.run([str(Path(sys.executable).parent / "reminders"), "book", "-"],
                          input="\n".join(docs) + "\n", env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    for n, name in enumerate(["localtime", "posixrules", "Factory"]):
        assert f"line {n + 1} (TZ-{n}) refused:\n  patient.timezone: {name!r} is not an " \
               f"IANA timezone name" in done.stderr, done.stderr
    # Nothing stored: no key but what any command writes first (the store's layout mark).
    assert set(redis_client.keys("*")) - before <= {"reminders:layout"}


def test_a_zone_installed_after_the_list_was_read_is_taken(tmp_path):
    # A worker reads the list once; a zone file that appears later (a tzdata update, a
    # PYTHONTZPATH folder filled after start) must still be readable in a stored booking,
    # or its reminders would be dead-lettered as "no longer valid".
    models.iana_timezones.cache_clear()
    assert "Test/Later" not in models.iana_timezones()
    (tmp_path / "Test").mkdir()
    (tmp_path / "Test" / "Later").write_bytes(_tzif_of("Europe/Madrid"))
    zoneinfo.reset_tzpath([str(tmp_path), *zoneinfo.TZPATH])
    try:
        zoneinfo.ZoneInfo.clear_cache()
        assert "Test/Later" not in models.iana_timezones()  # the list read before it
        assert parse_timezone("Test/Later") == "Test/Later"
        (tmp_path / "zone.tab").write_text("# not a zone\n", encoding="utf-8")
        with pytest.raises(ValueError, match="unknown IANA timezone"):
            parse_timezone("zone.tab")
        with pytest.raises(ValueError, match="unknown IANA timezone"):
            parse_timezone("Test/Missing")
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()
        models.iana_timezones.cache_clear()


def _tzif_of(name: str) -> bytes:
    """The TZif bytes of `name` from the tzdata package (a real zone file)."""
    import importlib.resources

    package, _, leaf = f"tzdata.zoneinfo.{name.replace('/', '.')}".rpartition(".")
    return importlib.resources.files(package).joinpath(leaf).read_bytes()
