"""The clinic corrects the patient's phone (a real PUT over HTTP) while an SMS of the
booking is in flight, forced: the attempt is parked after its begin and before its last
check, or at the SMS gateway past it. Before the hand-over nothing goes to the old number
once the PUT has answered, and the next attempt goes to the new one; an attempt already at
the gateway went to the old number (the accepted window), and its retry goes to the new one.
Real Redis, a real API (uvicorn), real Apprise to a real HTTP gateway on 127.0.0.1."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests import test_send_races as races
from tests.api.conftest import serve  # noqa: F401 (the API fixture)
from tests.conftest import ROOT
from tests.test_send_races import PREP, Rig
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

gate = races.gate  # the rig's fixtures
OLD, NEW = "+34600111222", "+34600999888"


@pytest.fixture
def both(tmp_path, redis_client, gate, serve):  # noqa: F811
    config = races.write_config(tmp_path / "config", gate.port)
    server = serve(config_dir=config)
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, server.settings.key_prefix)  # the API's store
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    rig = Rig(store, ctx, catalog, gate)
    with server.client(server.issue_key("rc")) as client:
        yield rig, client


def put_new_phone(client: Any, doc: dict[str, Any]) -> None:
    doc = doc | {"patient": doc["patient"] | {"phone": NEW}}
    answer = client.put("/v1/bookings/R-1", json=doc)
    assert answer.status_code in (200, 201), answer.text


def sent_to(rig: Rig) -> list[str]:
    return [str(body.get("to") or "") for body in rig.gate.bodies]


def test_a_phone_corrected_before_the_last_check_goes_to_the_new_number_only(both):
    rig, client = both
    doc = rig.booking()
    rig.book(doc)
    c = rig.claim_now(PREP)
    parked, release = threading.Event(), threading.Event()
    real = rig.store.still_owned

    def held(*args: Any, **kwargs: Any) -> bool:
        parked.set()
        assert release.wait(20)
        return real(*args, **kwargs)

    rig.store.still_owned = held  # type: ignore[method-assign]
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", send_claimed(rig.ctx, PREP, c.version, c.claim)))
    thread.start()
    assert parked.wait(10)
    put_new_phone(client, doc)  # answered 200: the old number must get nothing now
    release.set()
    thread.join(20)
    del rig.store.still_owned
    assert out["r"] == "dropped: overtaken before sending"
    assert rig.gate.bodies == []
    rig.gate.answer(200)
    c = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, c.version, c.claim) == "sent"
    assert len(rig.gate.bodies) == 1 and NEW in str(rig.gate.bodies[0]), rig.gate.bodies
    assert OLD not in str(rig.gate.bodies)


def test_at_the_gateway_it_went_to_the_old_number_and_its_retry_goes_to_the_new(both):
    rig, client = both
    doc = rig.booking()
    rig.book(doc)
    thread, result = rig.park(PREP)  # handed over to the gateway: past its last check
    put_new_phone(client, doc)
    rig.gate.answer(503)  # the gateway refuses it for now: retried
    thread.join(20)
    assert result["outcome"] == "retrying", result
    assert OLD in str(rig.gate.bodies[0])
    record = rig.store.record(PREP)
    assert record["status"] == "retrying", record
    rig.gate.reset()
    rig.gate.answer(200)
    c = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, c.version, c.claim) == "sent"
    assert len(rig.gate.bodies) == 2 and NEW in str(rig.gate.bodies[1]), rig.gate.bodies
