"""API fixtures: the real app served by uvicorn on a real loopback port, a real Redis.

`api` serves the repository's config/ (clinics glow and demo) on the session's
redis-server, database emptied for each test; `serve(**settings)` starts another server
with other settings (a small rate limit, a small body limit, another Redis).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn

from tests.conftest import EXAMPLE_BOOKING, ROOT
from worker.api import create_app
from worker.keys import ApiKeys
from worker.settings import Settings


class ApiServer:
    """uvicorn running the app in a thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.app = create_app(settings, url=redis_url)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        # No pump nudge of this server's published into the next test's emptied database.
        self.app.state.services.nudge.close()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def issue_key(self, clinic: str) -> str:
        keys = ApiKeys(self.app.state.services.redis, self.settings.key_prefix)
        return keys.issue(clinic).key


def api_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"config_dir": ROOT / "config", "templates_dir": ROOT / "templates",
                              "api_rate_burst": 10_000, "api_rate_per_second": 10_000.0}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def serve(redis_server, redis_client) -> Iterator[Callable[..., ApiServer]]:
    """Start an API server with these settings (on the test Redis unless `redis_url`)."""
    started: list[ApiServer] = []

    def start(redis_url: str | None = None, **overrides: Any) -> ApiServer:
        server = ApiServer(api_settings(**overrides), redis_url or redis_server.url).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def api(serve) -> ApiServer:
    return serve()


@pytest.fixture
def glow(api: ApiServer) -> Iterator[httpx.Client]:
    """A client holding a key of clinic glow."""
    with api.client(api.issue_key("glow")) as client:
        yield client


@pytest.fixture
def demo(api: ApiServer) -> Iterator[httpx.Client]:
    """A client holding a key of clinic demo (the other clinic)."""
    with api.client(api.issue_key("demo")) as client:
        yield client


def awake_timezone(now: datetime | None = None) -> str:
    """A timezone where it is early afternoon now (14:00-14:59 there): inside the send
    window of every clinic in config/, so what a booking sends at once (its confirmation,
    a hold notice) is due now, not at the window's next opening. (Booked in Madrid after
    20:00 there, nothing is due until 09:00: the tests of what is due at once, and of the
    pump nudges it asks for, failed every evening from 19:00 UTC.)"""
    offset = 14 - (now or datetime.now(UTC)).hour  # -9 to +14 hours from UTC
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc/GMT-2 is UTC+2


def future_booking(booking_id: str = "A-1042", days: float = 20, **changes: Any) -> dict[str, Any]:
    """DESIGN.md's booking, starting `days` from now (so the test does not age), for a
    patient where it is afternoon now (`awake_timezone`: so the test does not depend on
    the time of day it runs at)."""
    doc = copy.deepcopy(EXAMPLE_BOOKING)
    doc["patient"]["timezone"] = awake_timezone()
    starts = (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)
    doc.update(booking_id=booking_id, starts_at=starts.isoformat(), **changes)
    return doc


def held_booking(booking_id: str = "H-1") -> dict[str, Any]:
    """A microneedling booking whose patient took isotretinoin a month ago: held."""
    doc = future_booking(booking_id)
    dose = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    doc["medications"] = {"tretinoin": False, "retinol": False, "isotretinoin_last_dose": dose}
    return doc


PUMP_LIST = "reminders:celery:reminders.pump"  # the broker's list of the pump queue


def nudges(redis_client: Any) -> int:
    """How many pump nudges (worker/nudge.py) wait in the pump queue (no worker takes them)."""
    return int(redis_client.llen(PUMP_LIST))


def nudges_settled(redis_client: Any, at_least: int = 1) -> int:
    """The number of nudges once they stopped coming: the API's nudge thread publishes
    after the answer, one per GAP_SECONDS at most; wait for `at_least`, then for a quiet
    spell longer than the gap."""
    from tests.e2e.conftest import wait_until
    from worker.nudge import GAP_SECONDS

    wait_until(lambda: nudges(redis_client) >= at_least, 10, interval=0.02)
    count = -1
    while count != nudges(redis_client):
        count = nudges(redis_client)
        time.sleep(GAP_SECONDS * 3)
    return count
