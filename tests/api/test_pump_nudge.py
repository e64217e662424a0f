"""The API nudges the pump after a write storing something due soon, as `reminders book`
does (worker/nudge.py): real HTTP to the app on uvicorn, real Redis, no worker here, so the
nudges published stay in the pump queue's Redis list, where they are counted. Delivery by a
real worker: tests/e2e/test_api_nudge.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

from tests.api.conftest import (
    PUMP_LIST,
    ApiServer,
    future_booking,
    held_booking,
    nudges,
    nudges_settled,
)
from tests.e2e.conftest import wait_until
from tests.sinks import DeadEndpoint
from worker.embedded import free_port
from worker.nudge import GAP_SECONDS, PumpNudge


def test_a_put_nudges_the_pump_and_the_nudge_is_the_pump_task(glow, redis_client):
    created = glow.put("/v1/bookings/N-1", json=future_booking("N-1"))
    assert created.status_code == 201, created.text
    assert nudges_settled(redis_client) == 1
    message = json.loads(redis_client.lindex(PUMP_LIST, 0))
    assert message["headers"]["task"] == "reminders.pump"
    assert message["headers"]["expires"] is not None
    assert message["properties"]["delivery_info"]["routing_key"] == "reminders.pump"


def test_reads_and_an_unchanged_put_do_not_nudge(glow, redis_client):
    doc = future_booking("N-2")
    assert glow.put("/v1/bookings/N-2", json=doc).status_code == 201
    assert nudges_settled(redis_client) == 1
    again = glow.put("/v1/bookings/N-2", json=doc)
    assert again.status_code == 200 and again.json()["version"] == 1
    for _ in range(5):
        assert glow.get("/v1/bookings/N-2").status_code == 200
    assert glow.get("/v1/bookings").status_code == 200
    time.sleep(GAP_SECONDS * 5)
    assert nudges(redis_client) == 1


def test_a_batch_of_fifty_publishes_one_nudge(glow, redis_client):
    batch = {"bookings": [future_booking(f"B-{i}") for i in range(50)]}
    answered = glow.post("/v1/bookings:batch", json=batch)
    assert answered.status_code == 200, answered.text
    assert answered.json()["stored"] == 50
    assert nudges_settled(redis_client) == 1


def test_a_burst_of_puts_is_coalesced(api: ApiServer, redis_client):
    key = api.issue_key("glow")
    began = time.monotonic()

    def put_some(first: int) -> None:
        with api.client(key) as client:
            for i in range(first, 50, 5):
                answer = client.put(f"/v1/bookings/P-{i}", json=future_booking(f"P-{i}"))
                assert answer.status_code == 201, answer.text

    threads = [threading.Thread(target=put_some, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - began
    count = nudges_settled(redis_client)
    # One per gap at most, plus the first and the trailing one; never one per PUT.
    assert count <= took / GAP_SECONDS + 2, (count, took)
    assert count < 50
    print(f"50 PUTs in {took:.2f}s published {count} nudges")


def test_a_release_nudges_the_pump(glow, redis_client):
    assert glow.put("/v1/bookings/H-1", json=held_booking("H-1")).status_code == 201
    before = nudges_settled(redis_client)  # the hold notice is due at once: one for the PUT
    released = glow.post("/v1/bookings/H-1/release")
    assert released.status_code == 200, released.text
    assert nudges_settled(redis_client, before + 1) == before + 1


def test_with_the_broker_refusing_connections_a_put_is_stored_answered_and_warned_once(
        api: ApiServer, redis_client, caplog):
    svc = api.app.state.services
    dead = PumpNudge(svc.settings, f"redis://127.0.0.1:{free_port()}/0")
    api.app.state.services = replace(svc, nudge=dead)
    caplog.set_level(logging.WARNING)
    doc = future_booking("D-1")
    with api.client(api.issue_key("glow")) as client:
        for n in range(3):
            doc["patient"]["name"] = f"Ana {'Bé' * (n + 1)}"  # a change each time
            answer = client.put("/v1/bookings/D-1", json=doc)
            assert answer.status_code == (201 if n == 0 else 200), answer.text
            time.sleep(GAP_SECONDS * 2)
        wait_until(lambda: [r for r in caplog.records if r.name == "worker.nudge"], 15)
        time.sleep(3.0)  # room for a second warning
        assert client.get("/v1/bookings/D-1").json()["version"] == 3
    dead.close()
    warned = [r for r in caplog.records if r.name == "worker.nudge"
              and r.levelno >= logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    text = warned[0].getMessage()
    assert "could not nudge the pump" in text
    patient = doc["patient"]
    for private in ("Ana", patient["phone"], patient["email"]):
        assert private not in text
    assert nudges(redis_client) == 0 and dead.published == 0


def test_with_the_broker_hung_a_put_is_answered_without_waiting_for_it(
        api: ApiServer, redis_client):
    hung = DeadEndpoint().start()  # accepts the connection, never answers
    svc = api.app.state.services
    nudge = PumpNudge(svc.settings, f"redis://127.0.0.1:{hung.port}/0")
    api.app.state.services = replace(svc, nudge=nudge)
    try:
        with api.client(api.issue_key("glow")) as client:
            for n in range(3):
                began = time.monotonic()
                answer = client.put(f"/v1/bookings/G-{n}", json=future_booking(f"G-{n}"))
                took = time.monotonic() - began
                assert answer.status_code == 201, answer.text
                # The publish hangs (the broker never answers): the PUT does not wait for
                # it. A margin generous for a loaded machine, far below a hung publish.
                assert took < 10, took
            wait_until(lambda: hung.connections() >= 1, 10)  # the nudge thread is at it
            assert [client.get(f"/v1/bookings/G-{n}").status_code for n in range(3)] == [200] * 3
        assert nudge.published == 0
    finally:
        hung.stop()
        nudge.close(timeout=1)



def test_with_no_worker_taking_the_pump_queue_nudges_do_not_pile_up(glow, redis_client):
    """Workers down (stopped, crash-looping, refusing a config that does not load) while the
    API takes bookings: each write due soon published one more nudge into the pump queue,
    ~1 KB each kept under noeviction, and a worker coming back first discarded every expired
    one. As beat adds no tick to TICKS_WAITING_MAX waiting ones, no nudge is added either."""
    from worker.nudge import TICKS_WAITING_MAX

    for i in range(TICKS_WAITING_MAX + 3):
        answer = glow.put(f"/v1/bookings/Q-{i}", json=future_booking(f"Q-{i}"))
        assert answer.status_code == 201, answer.text
        time.sleep(GAP_SECONDS * 1.5)  # each write's nudge its own, not coalesced
    assert nudges_settled(redis_client) == TICKS_WAITING_MAX
