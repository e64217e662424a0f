"""A patient's timezone naming a folder of the zone database ("Europe", "America/Argentina",
"Etc") is refused naming `patient.timezone`, and nothing is stored (review).

30afccf takes a name missing from the list read at start if ZoneInfo loads it. For a name
that is a folder, ZoneInfo does not say "not found": it looks in the system's folders
(isfile: no) and then opens the tzdata package's resource of that name, a folder, and
raises IsADirectoryError, an OSError, which the validator did not catch: the PUT answered
a 500 ("internal error"), a batch holding one such booking answered 500 for all of them
(none stored), and `reminders book` ended in a traceback. Real HTTP (uvicorn), real Redis.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import future_booking
from worker.models import parse_timezone

FOLDERS = ["Europe", "America/Argentina", "Etc"]


@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_of_the_zone_database_is_no_timezone(name):
    with pytest.raises(ValueError, match="unknown IANA timezone"):
        parse_timezone(name)


@pytest.mark.parametrize("name", FOLDERS)
def test_the_api_refuses_it_naming_the_field_and_stores_nothing(name, glow, redis_client):
    doc = future_booking("TZ-1")
    doc["patient"]["timezone"] = name
    answer = glow.put("/v1/bookings/TZ-1", json=doc)
    assert answer.status_code == 422, answer.text
    fields = [f["field"] for f in answer.json()["error"]["fields"]]
    assert fields == ["patient.timezone"], fields
    assert glow.get("/v1/bookings/TZ-1").status_code == 404
    assert list(redis_client.scan_iter("*:b:*")) == []


def test_a_batch_with_one_such_booking_stores_the_others(glow, redis_client):
    bad = future_booking("TZ-2")
    bad["patient"]["timezone"] = "Europe"
    answer = glow.post("/v1/bookings:batch",
                       json={"bookings": [future_booking("TZ-1"), bad]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["stored"], body["refused"]) == (1, 1), body
    refused = body["results"][1]
    assert refused["status"] == 422
    assert [f["field"] for f in refused["error"]["fields"]] == ["patient.timezone"]
    assert glow.get("/v1/bookings/TZ-1").status_code == 200
    assert glow.get("/v1/bookings/TZ-2").status_code == 404
