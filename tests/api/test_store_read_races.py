"""A write's answer, and a read's, describe one state of the booking (review).

1. DELETE ran its cancel script, then read the timeline in a round trip of its own: a
   conditional PUT opening the booking again in between made the DELETE answer 200 with
   `"status": "scheduled"` and the PUT's version, so a clinic's software checking the
   answer would DELETE again and cancel the other writer's re-opening. The answer is now
   read by the cancel script itself ('cancelled' and 'already' alike).
2. GET read the booking's hash and its document in two round trips: a move landing between
   them paired the old reminders and version with the new start, and the computed
   `completed` came out of that mix. Both are now read in one step.

Each race is forced: the DELETE is parked right after its script returned, the GET right
after its first read of the booking (a hook on redis-py's reply parsing), the competing
PUT is applied, then they are released. Real redis-server, real HTTP to the real app.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from tests.api.conftest import future_booking
from tests.raw import set_reminder_fields
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Store, ref_of


class Parked:
    """Wraps a store's cancel script: the first call returns only once released."""

    def __init__(self, store: Store) -> None:
        self.real = store._cancel
        self.written = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        store._cancel = self  # type: ignore[assignment]

    def __call__(self, **kwargs: Any) -> Any:
        reply = self.real(**kwargs)
        self.calls += 1
        if self.calls == 1:
            self.written.set()
            assert self.go.wait(15), "never released"
        return reply


@pytest.mark.parametrize("outcome", ["cancelled", "already"])
def test_a_delete_answers_the_cancel_it_made_not_a_put_landing_after_it(api, glow, outcome):
    store = api.app.state.services.store
    doc = future_booking("R-1")
    assert glow.put("/v1/bookings/R-1", json=doc).status_code == 201  # version 1
    if outcome == "already":
        assert glow.delete("/v1/bookings/R-1").json()["version"] == 2
        if_match = '"2"'  # cancelled already at version 2: the DELETE changes nothing
    else:
        if_match = '"1"'  # the DELETE makes version 2
    parked = Parked(store)
    answer: list[httpx.Response] = []
    deleting = threading.Thread(target=lambda: answer.append(
        glow.delete("/v1/bookings/R-1", headers={"If-Match": if_match})))
    deleting.start()
    try:
        assert parked.written.wait(15), "the DELETE never ran its script"
        # Another writer, having read the cancelled booking (version 2), opens it again.
        reopened = glow.put("/v1/bookings/R-1", json=doc, headers={"If-Match": '"2"'})
    finally:
        parked.go.set()
        deleting.join(15)
    assert reopened.status_code == 200, reopened.text
    assert reopened.json()["status"] == "scheduled" and reopened.json()["version"] == 3
    (deleted,) = answer
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    # The DELETE's own result: cancelled at version 2, the ETag naming that version.
    assert body["status"] == "cancelled" and body["version"] == 2, body
    assert deleted.headers["etag"] == '"2"'
    assert body["reminders"] and all(
        r["status"] in ("cancelled", "skipped") for r in body["reminders"]
        if not r["id"].startswith("cancelled#")), body["reminders"]
    # What is stored: the PUT's re-opening, untouched.
    now = glow.get("/v1/bookings/R-1")
    assert now.json()["status"] == "scheduled" and now.headers["etag"] == '"3"'
    assert parked.calls == 1


def test_a_cancel_by_the_store_answers_its_own_step(redis_client, catalog):
    """`Store.cancel` (the CLI's `reminders cancel`) answers the same way."""
    store = Store(redis_client)
    booking = parse_booking(future_booking("R-2"), catalog)
    now = datetime.now(UTC)
    planned = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], now)
    store.upsert(booking, planned, now)
    parked = Parked(store)
    answer: list[dict[str, Any]] = []
    cancelling = threading.Thread(target=lambda: answer.append(
        store.cancel("glow", "R-2", now)))
    cancelling.start()
    try:
        assert parked.written.wait(15)
        store.upsert(booking, planned, now)  # booked again: version 3, scheduled
    finally:
        parked.go.set()
        cancelling.join(15)
    assert [(t["status"], t["version"]) for t in answer] == [("cancelled", 2)]
    again = store.timeline("glow", "R-2")
    assert (again["status"], again["version"]) == ("scheduled", 3)


def test_a_timeline_read_while_a_move_lands_is_one_state(redis_client, catalog, monkeypatch):
    """A booking whose visit was yesterday and whose reminders all went is `completed`;
    the clinic moves it to next month (new reminders, a new version). A timeline read
    parked right after its first read of the booking, the move applied, then released:
    it shows the booking as it was (completed, the old version), not the old version's
    reminders with the new start (`scheduled` at a version that never was)."""
    store = Store(redis_client)
    then = datetime.now(UTC) - timedelta(days=30)
    past = parse_booking(future_booking("R-3", days=-1), catalog)
    store.upsert(past, plan(past, catalog.protocols["microneedling"], catalog.clinics["glow"],
                            then), then)
    for reminder in store.timeline("glow", "R-3")["reminders"]:
        set_reminder_fields(store, ref_of("glow", "R-3", reminder["id"]), status="sent")
    before = store.timeline("glow", "R-3")
    assert before["status"] == "completed"

    parked, go = threading.Event(), threading.Event()
    local = threading.local()
    real = redis.Redis.parse_response

    def parse_response(self: Any, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = real(self, connection, command_name, **options)
        if getattr(local, "armed", False) and str(command_name).upper() in (
                "HGETALL", "EVALSHA", "EVAL"):
            local.armed = False
            parked.set()
            assert go.wait(15), "never released"
        return reply

    monkeypatch.setattr(redis.Redis, "parse_response", parse_response)
    answer: list[dict[str, Any]] = []

    def read() -> None:
        local.armed = True
        answer.append(store.timeline("glow", "R-3"))

    reading = threading.Thread(target=read)
    reading.start()
    try:
        assert parked.wait(15), "the read never reached Redis"
        now = datetime.now(UTC)
        moved = parse_booking(future_booking("R-3", days=30), catalog)
        store.upsert(moved, plan(moved, catalog.protocols["microneedling"],
                                 catalog.clinics["glow"], now), now)
    finally:
        go.set()
        reading.join(15)
    assert answer == [before]
    after = store.timeline("glow", "R-3")
    assert after["version"] == before["version"] + 1 and after["status"] == "scheduled"
