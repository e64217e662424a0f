"""Review (config read again while running): a deploy rewriting templates/ (a git checkout
unlinks a file and writes it again; `rm -r` then copy) leaves a template file missing a
moment. A send in that moment failed for good ('template file not found'): dead-lettered, a
lost message. A render failing while the templates folder changed within the last
CONFIG_STILL_SECONDS is retried. Real Redis, real Apprise, a real HTTP gateway."""

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


def test_a_send_while_its_template_is_being_rewritten_is_retried(
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
    time.sleep(1.2)  # config/ and templates/ quiet since
    sms = templates / "en" / "day-before.sms.txt.j2"
    text = sms.read_text(encoding="utf-8")
    sms.unlink()  # the checkout's moment between unlinking and writing it again
    claim = rig.claim_now(races.PREP)
    outcome = races.send_claimed(ctx, races.PREP, claim.version, claim.claim)
    s = rig.state(races.PREP)
    assert outcome == "retrying" and s["dead"] is None and s["due"] is not None, (outcome, s)
    sms.write_text(text.replace("Come with clean skin", "Do come with clean skin"),
                   encoding="utf-8")
    time.sleep(1.1)  # the templates are looked at again
    claim = rig.claim_now(races.PREP)
    assert races.send_claimed(ctx, races.PREP, claim.version, claim.claim) == "sent"
    (body,) = gate.bodies
    assert "Do come with clean skin" in body["message"], body
