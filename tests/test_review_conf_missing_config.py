"""Review (config read again while running): a protocol or clinic file missing when config/ is
read again (deleted, or missing for two looks while a deploy rewrites config/: a git
checkout, an rsync) made every due reminder of it a permanent failure ("clinic or protocol
no longer configured"), dead-lettered at once: a lost message. Now it is a transient failure
naming the missing file (retried with backoff, given up only after max_attempts), logged as
a WARNING naming the file and no patient data; once the file is back it is sent, with the
words of the configuration then. Real Redis, real Apprise, a real HTTP gateway."""

from __future__ import annotations

import logging

import pytest

from tests import test_send_races as races
from worker import catalog as catalog_module

gate = races.gate  # the send-path rig's fixtures
rig = races.rig


@pytest.mark.parametrize("missing", ["protocols/race.toml", "clinics/rc.toml"])
def test_a_missing_config_file_retries_its_reminders(rig, missing, monkeypatch,
                                                     caplog) -> None:
    rig.book(rig.booking())
    settings = rig.ctx.settings
    path = settings.config_dir / missing
    text = path.read_text(encoding="utf-8")
    monkeypatch.setattr(catalog_module, "CONFIG_RECHECK_SECONDS", 0.0)
    path.unlink()
    assert rig.ctx.catalog.fresh(settings) is rig.ctx.catalog  # one look: not read yet
    rig.ctx.catalog = rig.ctx.catalog.fresh(settings)  # still missing a look later: read
    assert "race" not in rig.ctx.catalog.protocols or "rc" not in rig.ctx.catalog.clinics
    claim = rig.claim_now(races.PREP)
    with caplog.at_level(logging.DEBUG):
        outcome = races.send_claimed(rig.ctx, races.PREP, claim.version, claim.claim)
    assert outcome == "retrying", outcome
    s = rig.state(races.PREP)
    assert s["dead"] is None and s["due"] is not None and s["lease"] is None, s
    assert s["record"]["status"] == "retrying" and str(path) in s["record"]["last_error"], s
    assert rig.gate.bodies == []  # nothing sent with another configuration
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(path) in w for w in warnings), warnings
    assert not any("+34600111222" in w or "Ana" in w for w in warnings), warnings
    # The file is back (the deploy finished): read again, and the retry is sent.
    path.write_text(text.replace('name = "Race Clinic"', 'name = "Back Clinic"'),
                    encoding="utf-8")
    assert rig.ctx.catalog.fresh(settings) is rig.ctx.catalog
    rig.ctx.catalog = rig.ctx.catalog.fresh(settings)
    assert "race" in rig.ctx.catalog.protocols and "rc" in rig.ctx.catalog.clinics
    claim = rig.claim_now(races.PREP)
    rig.gate.answer(200)
    assert races.send_claimed(rig.ctx, races.PREP, claim.version, claim.claim) == "sent"
    (body,) = rig.gate.bodies
    assert ("Back Clinic" in body["message"]) == missing.startswith("clinics"), body
    assert rig.state(races.PREP)["record"]["status"] == "sent"
