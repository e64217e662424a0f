"""Config/ and templates/ edited while a worker sends (a deploy, `git pull`; `reminders check`
passes): each send reads them again (Catalog.fresh once the files held still, 1-2 s; the
templates within a second, worker/rendering.py) and never loses a message to the moment in
between. Found by review, each a lost (dead-lettered) message before its fix. Real Redis,
real Apprise, a real HTTP gateway; `editable` gives the send-path rig of
tests/test_send_races.py its own copies of config/ and templates/ to edit.
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests import test_send_races as races
from tests.conftest import ROOT
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

gate = races.gate  # the send-path rig's fixtures


def editable(tmp_path: Path, redis_client: Any, gate: Any
             ) -> tuple[Path, Path, Store, Context, races.Rig]:
    """The rig with one booking stored and the gateway answering 200, over config/ and
    templates/ copies in tmp_path: (config, templates, store, ctx, rig)."""
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
    return config, templates, store, ctx, rig


# Review (config read again while running): a protocol [advice] value and the template line
# stating it, edited together while the worker sends (a deploy, `git pull`; `reminders check`
# passes). The templates are read again within a second (worker/rendering.py); config/ once
# its files held still for a look (Catalog.fresh, 1-2 s). A send in between rendered the new
# template with the old protocol and failed for good: dead-lettered, a lost message (the
# failure 54682d1 fixed, left in a 1-2 s window). A render that fails while config/ has
# changed since the catalog was read is a transient failure: retried once the edit is read.
# Real Redis, real Apprise, a real HTTP gateway.
def test_a_send_between_a_template_and_its_protocol_being_read_is_retried(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
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


# Review (config read again while running): Catalog.fresh reads config/ again once the changed
# files "held still for one more look" (1c64755), but it looks only when a send asks. In a
# quiet worker (no send for a while: a clinic's evening) the first send after an edit made
# long before was the first look: it saw the change, kept the old configuration for that
# send, while the templates are read again at once (worker/rendering.py). A protocol [advice]
# value and the template line stating it, edited together (`reminders check` passes), then
# rendered the new template with the old protocol and failed for good: dead-lettered, the
# failure 54682d1 fixed. Files that have not changed for a look's interval have held still:
# read at once. Real Redis, real Apprise, a real HTTP gateway.
def test_the_first_send_after_a_quiet_edit_uses_the_edited_protocol(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
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


# Review (config read again while running): a deploy rewriting templates/ (a git checkout
# unlinks a file and writes it again; `rm -r` then copy) leaves a template file missing a
# moment. A send in that moment failed for good ('template file not found'): dead-lettered, a
# lost message. A render failing while the templates folder changed within the last
# CONFIG_STILL_SECONDS is retried. Real Redis, real Apprise, a real HTTP gateway.
def test_a_send_while_its_template_is_being_rewritten_is_retried(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
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


# Review (config read again while running): a template renamed with the protocol step that
# names it (the files and the step's `template` edited together; `reminders check` passes).
# A reminder planned before keeps the template name it was planned with: at send time that
# file was gone, 'template file not found', a permanent failure, dead-lettered, for every
# reminder of the step planned before the rename. It is sent with the template its step names
# in the configuration as read now. Real Redis, real Apprise, a real HTTP gateway.
def test_a_reminder_planned_before_its_template_was_renamed_is_sent(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
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


# Review (config while sending): the rename above (4300d7a) looks the renamed template up by
# the reminder's step id, which is the protocol's only for the plan's own reminders. A
# message sent again for a new date after a move (`again-<step>#<seq>`, worker/notices.py)
# keeps its step's template as planned and its own step id: after the template was renamed
# with its step, 'template file not found', a permanent failure, dead-lettered: the patient
# moved to a new date never got the day-before message for it. It is sent with the template
# its step (`base_step`) names now. Real Redis, real Apprise, a real HTTP gateway.
def test_a_message_again_for_a_new_date_planned_before_its_template_was_renamed_is_sent(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
    claim = rig.claim_now(races.PREP)  # the day-before SMS goes out for the first date
    assert races.send_claimed(ctx, races.PREP, claim.version, claim.claim) == "sent"
    moved = rig.booking(starts_in=timedelta(days=3))
    rig.book(moved)  # a move: the day-before message again for the new date
    again = "rc/R-1/again-prep#1:sms"
    record = store.record(again)
    assert record["status"] == "scheduled" and record["template"] == "day-before", record
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
    claim = rig.claim_now(again)
    outcome = races.send_claimed(ctx, again, claim.version, claim.claim)
    s = rig.state(again)
    assert outcome == "sent" and s["dead"] is None, (outcome, s)
    assert s["record"]["status"] == "sent", s
    first, second = gate.bodies
    assert "Please come with clean skin" in second["message"], second


# Review (config while sending): the same for a held booking's message, whose template is the
# protocol's `hold_template` (step id `hold-notice`, no protocol step's): renamed with the
# protocol's hold_template (edited together; `reminders check` passes), a hold message
# planned before failed for good, 'template file not found': dead-lettered, and the patient
# whose booking is held for review never heard that the clinic will call. Real Redis, real
# Apprise, a real HTTP gateway.
def test_a_hold_message_planned_before_its_template_was_renamed_is_sent(
        tmp_path, redis_client, gate) -> None:
    from datetime import UTC, datetime

    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
    protocol = config / "protocols" / "race.toml"
    text = protocol.read_text(encoding="utf-8")
    protocol.write_text("isotretinoin_washout_days = 182\n" + text, encoding="utf-8")
    rig.catalog = ctx.catalog = Catalog.load(ctx.settings)
    doc = rig.booking(booking_id="R-2")
    doc["medications"]["isotretinoin_last_dose"] = (
        datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    assert rig.book(doc)["status"] == "held"
    hold = "rc/R-2/hold-notice:sms"
    assert store.record(hold)["template"] == "hold-notice", store.record(hold)
    for path in (templates / "en").glob("hold-notice.*.j2"):
        words = path.read_text(encoding="utf-8").replace("We will call you",
                                                         "Our team will call you")
        (templates / "en" / path.name.replace("hold-notice", "call-first")).write_text(
            words, encoding="utf-8")
        path.unlink()
    protocol.write_text('isotretinoin_washout_days = 182\nhold_template = "call-first"\n'
                        + text, encoding="utf-8")
    time.sleep(1.2)  # the edit held still: read at the next look
    claim = rig.claim_now(hold)
    outcome = races.send_claimed(ctx, hold, claim.version, claim.claim)
    s = rig.state(hold)
    assert ctx.catalog.protocols["race"].hold_template == "call-first"
    assert outcome == "sent" and s["dead"] is None, (outcome, s)
    assert s["record"]["status"] == "sent", s
    (body,) = gate.bodies
    assert "Our team will call you" in body["message"], body


# Review (config while sending): templates/<locale>/_spelling.toml (how an en-US message
# respells the templates' British wording) was read once per process and never again: an
# edit (a respelling added or corrected; `reminders check` shows it at once) never reached
# a running worker's messages, while the templates beside it are read again within a second.
# The worker went on sending the old wording until restarted. It is read again with the
# templates. Real Redis, real Apprise, a real HTTP gateway.
def test_an_edited_spelling_table_is_used_by_the_next_message(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
    doc = rig.booking(booking_id="R-3")
    doc["patient"]["locale"] = "en-US"
    rig.book(doc)
    stop, prep = "rc/R-3/stop:sms", "rc/R-3/prep:sms"
    claim = rig.claim_now(stop)  # a first US message: the spelling table is read
    assert races.send_claimed(ctx, stop, claim.version, claim.claim) == "sent"
    spelling = templates / "en" / "_spelling.toml"
    spelling.write_text(spelling.read_text(encoding="utf-8")
                        + '"clean skin" = "freshly washed skin"\n', encoding="utf-8")
    time.sleep(1.2)  # the templates are looked at again
    claim = rig.claim_now(prep)
    assert races.send_claimed(ctx, prep, claim.version, claim.claim) == "sent"
    first, second = gate.bodies
    assert "Come with freshly washed skin" in second["message"], second


# Review (config while sending): the language a message is written in (the patient's if
# templates/ has a folder for it, else the clinic's, else English) was worked out once per
# patient and clinic locale for the process's life. A language folder added to templates/
# (`reminders check` renders it at once) never reached a running worker: its patients kept
# getting the clinic's language until a restart, while the templates themselves are read
# again within a second. Real Redis, real Apprise, a real HTTP gateway.
def test_a_language_folder_added_is_used_by_the_next_message(
        tmp_path, redis_client, gate) -> None:
    config, templates, store, ctx, rig = editable(tmp_path, redis_client, gate)
    doc = rig.booking(booking_id="R-4")
    doc["patient"]["locale"] = "pt"  # no templates in Portuguese: the clinic's English
    rig.book(doc)
    stop, prep = "rc/R-4/stop:sms", "rc/R-4/prep:sms"
    claim = rig.claim_now(stop)
    assert races.send_claimed(ctx, stop, claim.version, claim.claim) == "sent"
    assert "Hi Ana" in gate.bodies[0]["message"], gate.bodies
    shutil.copytree(templates / "en", templates / "pt")
    sms = templates / "pt" / "day-before.sms.txt.j2"
    sms.write_text(sms.read_text(encoding="utf-8").replace(
        "Come with clean skin", "Venha com a pele limpa"), encoding="utf-8")
    time.sleep(1.2)  # the templates are looked at again
    claim = rig.claim_now(prep)
    assert races.send_claimed(ctx, prep, claim.version, claim.claim) == "sent"
    first, second = gate.bodies
    assert "Venha com a pele limpa" in second["message"], second
