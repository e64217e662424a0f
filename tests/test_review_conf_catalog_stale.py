"""Review (config read again while running): the senders' threads share `ctx.catalog`, and
each attempt put back what its own `fresh` returned. An attempt that read `ctx.catalog`
just before another thread read config/ again got the old catalog back from its `fresh`
(looked at less than a second ago) and put it back over the new one: the attempts after it
went out with the configuration the edit had replaced (for up to a second, then read again
from scratch). Forced: one attempt is parked after reading `ctx.catalog`, another reads
config/ again and sends, the first is released, then a third attempt sends. Real Redis,
real Apprise, a real HTTP gateway."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests import test_send_races as races
from worker.catalog import Catalog

gate = races.gate  # the send-path rig's fixtures
rig = races.rig


def test_an_older_catalog_is_not_put_back_over_a_newer_one(rig, monkeypatch) -> None:
    rig.book(rig.booking())
    rig.book(rig.booking(booking_id="R-2"))
    rig.gate.answer(200)  # every request answered at once
    settings = rig.ctx.settings
    clinic = settings.config_dir / "clinics" / "rc.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'name = "Race Clinic"', 'name = "Renamed Clinic"'), encoding="utf-8")
    old = rig.ctx.catalog
    assert old.fresh(settings) is old  # the edit seen once: read at the next look
    time.sleep(1.1)  # the next look is due (CONFIG_RECHECK_SECONDS)
    parked, release = threading.Event(), threading.Event()
    real = Catalog.fresh

    def fresh(self: Catalog, settings: Any) -> Catalog:
        if threading.current_thread().name == "slow" and not parked.is_set():
            parked.set()  # it read ctx.catalog (the old one) and is about to look
            assert release.wait(10)
        return real(self, settings)

    monkeypatch.setattr(Catalog, "fresh", fresh)
    slow_claim = rig.claim_now(races.PREP)
    outcome: dict[str, str] = {}
    slow = threading.Thread(name="slow", target=lambda: outcome.update(slow=races.send_claimed(
        rig.ctx, races.PREP, slow_claim.version, slow_claim.claim)))
    slow.start()
    try:
        assert parked.wait(10)
        claim = rig.claim_now(races.STOP)
        assert races.send_claimed(rig.ctx, races.STOP, claim.version, claim.claim) == "sent"
        new = rig.ctx.catalog
        assert new is not old and new.clinics["rc"].name == "Renamed Clinic"
    finally:
        release.set()
        slow.join(20)
    assert outcome["slow"] == "sent"
    claim = rig.claim_now("rc/R-2/prep:sms")
    assert races.send_claimed(rig.ctx, "rc/R-2/prep:sms", claim.version, claim.claim) == "sent"
    last = rig.gate.bodies[-1]["message"]
    assert "Renamed Clinic" in last, last  # after the edit was read and used: the new words
    assert rig.ctx.catalog is new, "the older catalog was put back"

