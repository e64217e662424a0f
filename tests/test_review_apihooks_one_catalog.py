"""Review (apihooks): one attempt reads one configuration.

`attempt` reads config/ again (`ctx.catalog.fresh`) and the senders' threads share `ctx`:
another thread's attempt may put a newer catalog in `ctx.catalog` while this one is between
its fence (begin_send, with the catalog's care-critical steps) and its render (the clinic's
name, channels and the protocol). The attempt read `ctx.catalog` at each step, so one
message was fenced with one configuration and rendered with another. Forced: the attempt is
parked right after its begin while the catalog is swapped. Real Redis, real Apprise, a real
HTTP gateway."""

from __future__ import annotations

import threading
from typing import Any

from tests import test_send_races as races
from worker.catalog import Catalog

gate = races.gate  # the send-path rig's fixtures
rig = races.rig


def test_an_attempt_renders_with_the_catalog_it_began_with(rig) -> None:
    rig.book(rig.booking())
    claim = rig.claim_now(races.PREP)
    parked, release = threading.Event(), threading.Event()
    real = rig.store.begin_send

    def held(*args: Any, **kwargs: Any) -> Any:
        verdict = real(*args, **kwargs)
        parked.set()
        assert release.wait(10)
        return verdict

    rig.store.begin_send = held  # type: ignore[method-assign]
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.update(outcome=races.send_claimed(
        rig.ctx, races.PREP, claim.version, claim.claim)))
    thread.start()
    try:
        assert parked.wait(10), "the attempt never began"
        clinic = rig.ctx.settings.config_dir / "clinics" / "rc.toml"
        clinic.write_text(clinic.read_text(encoding="utf-8").replace(
            'name = "Race Clinic"', 'name = "Renamed Clinic"'), encoding="utf-8")
        renamed = Catalog.load(rig.ctx.settings)
        assert renamed.clinics["rc"].name == "Renamed Clinic"
        rig.ctx.catalog = renamed  # what another sender's `fresh` does meanwhile
        release.set()
        assert rig.gate.arrived.wait(10), "the attempt never reached the gateway"
        rig.gate.answer(200)
        thread.join(20)
    finally:
        release.set()
        rig.gate.answer(200)
        del rig.store.begin_send
    assert result["outcome"] == "sent"
    (body,) = rig.gate.bodies
    assert "Race Clinic" in body["message"] and "Renamed" not in body["message"], body
    assert rig.ctx.catalog is renamed  # the newer one stays for the attempts after it
