"""Review (config read again while running): a template renamed with the protocol step that
names it (the files and the step's `template` edited together; `reminders check` passes).
A reminder planned before keeps the template name it was planned with: at send time that
file was gone, 'template file not found', a permanent failure, dead-lettered, for every
reminder of the step planned before the rename. It is sent with the template its step names
in the configuration as read now. Real Redis, real Apprise, a real HTTP gateway."""

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


def test_a_reminder_planned_before_its_template_was_renamed_is_sent(
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
    for path in (templates / "en").glob("day-before.*.j2"):
        text = path.read_text(encoding="utf-8").replace("Come with clean skin",
                                                        "Please come with clean skin")
        (templates / "en" / path.name.replace("day-before", "visit-eve")).write_text(
            text, encoding="utf-8")
        path.unlink()
    protocol = config / "protocols" / "race.toml"
    protocol.write_text(protocol.read_text(encoding="utf-8").replace(
        'template = "day-before"', 'template = "visit-eve"'), encoding="utf-8")
    time.sleep(1.2)  # the edit held still: read at the next look
    claim = rig.claim_now(races.PREP)
    outcome = races.send_claimed(ctx, races.PREP, claim.version, claim.claim)
    assert ctx.catalog.protocols["race"].steps[1].template == "visit-eve"
    assert outcome == "sent", (outcome, store.record(races.PREP))
    (body,) = gate.bodies
    assert "Please come with clean skin" in body["message"], body
