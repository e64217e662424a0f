"""Review (config read again while running): Catalog.fresh reads config/ again once the changed
files "held still for one more look" (1c64755), but it looks only when a send asks. In a
quiet worker (no send for a while: a clinic's evening) the first send after an edit made
long before was the first look: it saw the change, kept the old configuration for that
send, while the templates are read again at once (worker/rendering.py). A protocol [advice]
value and the template line stating it, edited together (`reminders check` passes), then
rendered the new template with the old protocol and failed for good: dead-lettered, the
failure 54682d1 fixed. Files that have not changed for a look's interval have held still:
read at once. Real Redis, real Apprise, a real HTTP gateway."""

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


def test_the_first_send_after_a_quiet_edit_uses_the_edited_protocol(
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
    # Edited together, as `reminders check` wants them: the value and the line stating it.
    protocol = config / "protocols" / "race.toml"
    protocol.write_text(protocol.read_text(encoding="utf-8") + "makeup_free_hours = 12\n",
                        encoding="utf-8")
    sms = templates / "en" / "day-before.sms.txt.j2"
    sms.write_text(sms.read_text(encoding="utf-8").replace(
        "no makeup.", "no makeup for {{ advice.makeup_free_hours }} h."), encoding="utf-8")
    time.sleep(1.2)  # quiet: no send looks at config/ meanwhile
    claim = rig.claim_now(races.PREP)
    outcome = races.send_claimed(ctx, races.PREP, claim.version, claim.claim)
    assert outcome == "sent", (outcome, store.record(races.PREP))
    (body,) = gate.bodies
    assert "no makeup for 12 h." in body["message"], body
    assert ctx.catalog.protocols["race"].advice["makeup_free_hours"] == 12


def test_a_file_copied_with_its_old_times_is_not_read_until_it_held_still(
        tmp_path, monkeypatch) -> None:
    import os

    from worker import catalog as catalog_module

    config = races.write_config(tmp_path / "config", 9)
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", _env_file=None)
    first = Catalog.load(settings)
    time.sleep(1.1)
    monkeypatch.setattr(catalog_module, "CONFIG_RECHECK_SECONDS", 0.0)
    # A deploy copying config/ with its source's times (rsync -a): written now, dated old.
    clinic = config / "clinics" / "rc.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'name = "Race Clinic"', 'name = "Copied Clinic"'), encoding="utf-8")
    old = time.time() - 3600
    for path in (clinic, config / "clinics", config / "protocols"):
        os.utime(path, (old, old))
    assert first.fresh(settings) is first  # changed just now: not in the middle of a copy
    second = first.fresh(settings)  # held still for a look
    assert second.clinics["rc"].name == "Copied Clinic"
