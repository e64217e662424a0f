"""Fixtures shared by every test: the repository's own config, templates and example."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from worker.catalog import Catalog
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_BOOKING = json.loads((ROOT / "examples" / "booking.json").read_text(encoding="utf-8"))

# A suite started in the background from a script (`make test &`: SIGINT ignored) hands
# the ignored Ctrl-C to every process it starts, and the tests of Ctrl-C would find the
# `reminders` commands deaf to it. Python's own default, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def repo_settings() -> Settings:
    """Settings pointing at the repository's config/ and templates/."""
    return Settings(config_dir=ROOT / "config", templates_dir=ROOT / "templates",
                    _env_file=None)


@pytest.fixture(scope="session")
def catalog(repo_settings: Settings) -> Catalog:
    return Catalog.load(repo_settings)


@pytest.fixture
def booking_doc() -> dict[str, Any]:
    """A fresh copy of DESIGN.md's example booking (examples/booking.json)."""
    return copy.deepcopy(EXAMPLE_BOOKING)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server on a free loopback port for the whole session."""
    from worker.embedded import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client on a clean database: every test starts with an empty Redis."""
    from worker.store import connect

    client = connect(redis_server.url)
    client.flushdb()
    yield client
    client.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slowest modules first and spread evenly (tests/schedule.py)."""
    from tests.schedule import load_durations, order, workers_from_env

    items[:] = order(items, workers_from_env(), load_durations())
