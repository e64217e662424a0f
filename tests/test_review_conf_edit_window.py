"""Review (config read again while running): a protocol [advice] value and the template line
stating it, edited together while the worker sends (a deploy, `git pull`; `reminders check`
passes). The templates are read again within a second (worker/rendering.py); config/ once
its files held still for a look (Catalog.fresh, 1-2 s). A send in between rendered the new
template with the old protocol and failed for good: dead-lettered, a lost message (the
failure 54682d1 fixed, left in a 1-2 s window). A render that fails while config/ has
changed since the catalog was read is a transient failure: retried once the edit is read.
Real Redis, real Apprise, a real HTTP gateway."""

from __future__ import annotations

import shutil
import time

from tests import test_send_races as races
from tests.conftest import ROOT
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

gate = races.gate  # the send-path rig's fixtures


def test_a_send_between_a_template_and_its_protocol_being_read_is_retried(
        tmp_path, redis_client, gate) -> None:
    config = races.write_config(tmp_path / "config", gate.port)
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    settings = Settings(config_dir=config, templates_dir=templates, lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, races.PREFIX)
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    rig = races.Rig(store, ctx, catalog, gate)
    rig.book(rig.booking())
    gate.answer(200)
    time.sleep(1.1)  # a busy worker: the templates and config/ are due for a look
    protocol = config / "protocols" / "race.toml"
    protocol.write_text(protocol.read_text(encoding="utf-8") + "makeup_free_hours = 12\n",
                        encoding="utf-8")
    sms = templates / "en" / "day-before.sms.txt.j2"
    sms.write_text(sms.read_text(encoding="utf-8").replace(
        "no makeup.", "no makeup for {{ advice.makeup_free_hours }} h."), encoding="utf-8")
    claim = rig.claim_now(races.PREP)
    outcome = races.send_claimed(ctx, races.PREP, claim.version, claim.claim)
    s = rig.state(races.PREP)
    assert outcome == "retrying" and s["dead"] is None and s["due"] is not None, (outcome, s)
    assert gate.bodies == []
    time.sleep(1.1)  # the edit held still for a look: read
    claim = rig.claim_now(races.PREP)
    assert races.send_claimed(ctx, races.PREP, claim.version, claim.claim) == "sent"
    (body,) = gate.bodies
    assert "no makeup for 12 h." in body["message"], body
