"""Review (config read again while running): the API and the worker read config/ again each
on its own (Catalog.fresh: 1-2 s after an edit, once it held still for a look). A webhook
added to a clinic file: the API read it first and wrote an event for it (a STOP's skipped
reminders, a completion); the worker, not yet, took it as an event the clinic does not take
and dropped it, deleted: an event lost in the second the two disagreed. An event the
delivering process would drop while config/ has changed since its catalog was read is
retried instead. Forced: the worker's catalog has looked at the edit but not read it; the
event is delivered by the worker's event task. Real Redis, a real webhook receiver."""

from __future__ import annotations

import time

from tests import test_send_races as races
from tests.conftest import ROOT
from tests.sinks import WebhookReceiver
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer
from worker.settings import Settings, get_settings
from worker.store import Store
from worker.webhooks import Events

SECRET = "whsec-review-0123456789abcdefghijklmnop"


def test_an_event_the_worker_has_not_read_the_webhook_for_yet_is_not_dropped(
        tmp_path, redis_server, redis_client, monkeypatch) -> None:
    # worker.tasks reads the process's settings as it is imported (its tasks' limits).
    monkeypatch.setenv("REMINDERS_REDIS_URL", redis_server.url)
    get_settings.cache_clear()
    from worker import tasks

    receiver = WebhookReceiver(SECRET).start()
    try:
        config = races.write_config(tmp_path / "config", 9)
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            backoff_base_seconds=0.2, backoff_cap_seconds=0.4,
                            _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(redis_client, settings.key_prefix)
        ctx = Context(settings=settings, store=store, catalog=catalog,
                      renderer=Renderer(catalog.templates_dir))
        monkeypatch.setattr(tasks, "_context", ctx)  # this process's send context
        monkeypatch.setenv("RC_WEBHOOK_SECRET", SECRET)
        time.sleep(1.1)
        clinic = config / "clinics" / "rc.toml"
        clinic.write_text(clinic.read_text(encoding="utf-8") + f'[webhook]\nurl = '
                          f'"{receiver.url}"\nsecret = "${{RC_WEBHOOK_SECRET}}"\n',
                          encoding="utf-8")
        assert ctx.catalog.fresh(settings) is catalog  # the worker looked: not read yet
        # The API has read it: its store wrote the event the new webhook takes.
        events = Events(redis_client, settings.key_prefix)
        event_id = events.emit("rc", "webhook", "reminder.skipped", {"booking_id": "R-1"})
        ((claimed, claim),) = events.claim(10, 30)
        assert claimed == event_id
        first = tasks.deliver_clinic_event(event_id, claim)
        assert first.startswith("retrying"), first
        assert [e.id for e in events.pending()] == [event_id]
        time.sleep(1.1)  # the worker reads the edit at its next look
        redis_client.zadd(events.due_key, {event_id: 0})
        ((_, claim),) = events.claim(10, 30)
        assert tasks.deliver_clinic_event(event_id, claim) == "delivered"
        (hook,) = receiver.snapshot()
        assert hook.valid and hook.json()["type"] == "reminder.skipped"
    finally:
        receiver.stop()
        get_settings.cache_clear()
