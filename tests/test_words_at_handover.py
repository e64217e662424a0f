"""The words of a message are those of the moment it goes (found by review of 1b08cac and
00b239e). An attempt renders its message ("see you tomorrow", "you may resume as before")
from the instant it began, then reads its last fence (`still_owned`), a Redis round trip
the client retries through a Redis restart (about half a minute). The send-time rules and
the SMS cap's day are checked again after that wait, but the message was sent as written
before it: a day-before SMS begun at 23:59 and handed over after the patient's midnight
told the patient, on the day of the visit, "see you tomorrow"; a cancel notice written just
before the visit began and sent after it said "you may resume tretinoin as before".

Now an attempt whose words were written for another patient-local day, or for before a
visit that has begun since, is handed back (at once, fenced as any finish) and written again
by the next attempt.

A real Redis stopped and restarted under the fence, a real HTTP SMS gateway, the real send
path; for the midnight case its clock (worker.dispatch.datetime) is moved meanwhile, for the
visit start the real clock passes it while Redis is down."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import ROOT
from tests.test_send_caps import Clock, Rig, _Fixed, step
from tests.test_send_caps import sinks as sinks  # noqa: F401  (a fixture)
from worker.catalog import Catalog
from worker.connections import WORKER, from_url
from worker.dispatch import Context, send_claimed
from worker.embedded import RedisServer
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store


def test_a_day_before_sms_handed_over_after_midnight_does_not_say_tomorrow(
        tmp_path, sinks, monkeypatch):  # noqa: F811
    monkeypatch.setattr("worker.dispatch.datetime", _Fixed)
    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    restarted: list[threading.Timer] = []
    try:
        rig = Rig(tmp_path / "config", client, *sinks)
        folder = tmp_path / "config"
        (folder / "protocols" / "late.toml").write_text(
            step("night", -1, "23:59", '["sms"]', "day-before"), encoding="utf-8")
        clinic = folder / "clinics" / "cap.toml"
        clinic.write_text(clinic.read_text(encoding="utf-8").replace(
            'start = "09:00"\nend = "20:00"', 'start = "00:00"\nend = "24:00"'),
            encoding="utf-8")
        rig.catalog = Catalog.load(rig.settings)
        rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                          renderer=Renderer(rig.catalog.templates_dir))
        d = rig.day
        rig.book("A-1", "late", d)  # the visit: D 14:00; its SMS: D-1 23:59
        assert rig.due("A-1", "night:sms") == rig.local(d - timedelta(days=1), 23, 59)

        real = rig.store.still_owned
        after_midnight = rig.local(d, 0, 1)

        def across_a_restart(*args: Any, **kwargs: Any) -> bool:
            server.stop()  # Redis goes down just as the last fence is read ...
            Clock.at = after_midnight  # ... and the patient's midnight passes meanwhile
            restart = threading.Timer(2.0, server.start)
            restarted.append(restart)
            restart.start()
            return real(*args, **kwargs)

        rig.store.still_owned = across_a_restart  # type: ignore[method-assign]
        rig.send("A-1", "night:sms", rig.local(d - timedelta(days=1), 23, 59)
                 + timedelta(seconds=20))
        rig.store.still_owned = real  # type: ignore[method-assign]
        # Whatever went on the visit's day says so; the reminder is not lost.
        for body in rig.sms.snapshot():
            assert "tomorrow" not in str(body), body
        if not rig.sms.snapshot():
            assert rig.reminder("A-1", "night:sms")["status"] == "scheduled"
            assert rig.send("A-1", "night:sms", after_midnight + timedelta(seconds=2)) \
                == "sent"
        (body,) = rig.sms.snapshot()
        assert "see you today at" in str(body), body
    finally:
        for restart in restarted:
            restart.join(10)
        client.close()
        server.stop()


def test_a_cancel_notice_written_before_the_visit_and_sent_after_it_asks_to_call_first(
        tmp_path):
    """The demo protocol (steps seconds apart) on a clinic open all day: the pause SMS goes,
    the clinic cancels just before the visit; the notice's fence waits out a Redis restart
    while the visit begins. What the gateway gets asks the patient to call first."""
    from tests.test_send_races import Gate

    gate = Gate()
    gate.answer(200)
    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    restarted: list[threading.Timer] = []
    try:
        config = tmp_path / "config"
        shutil.copytree(ROOT / "config" / "protocols", config / "protocols")
        (config / "clinics").mkdir()
        (config / "clinics" / "sk.toml").write_text(f"""
name = "Skin Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 10
max_per_week = 70
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "json://127.0.0.1:{gate.port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate.port}/email?:to={{to}}"
""", encoding="utf-8")
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            lease_seconds=30, send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(client, "revwords")
        ctx = Context(settings=settings, store=store, catalog=catalog,
                      renderer=Renderer(catalog.templates_dir))
        start = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
        booking = parse_booking({
            "clinic": "sk", "booking_id": "D-1", "treatment": "demo",
            "starts_at": start.isoformat(),
            "patient": {"name": "Ana Ruiz", "phone": "+34600111222",
                        "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": True}}, catalog)
        now = datetime.now(UTC)
        store.upsert(booking, plan(booking, catalog.protocols["demo"],
                                   catalog.clinics["sk"], now), now)

        def send(key: str) -> str:
            ref = f"sk/D-1/{key}"
            store.redis.zadd(store.due_key, {ref: 0})
            claims = store.claim_due(100, settings.lease_seconds)
            for c in claims:
                if c.ref != ref:
                    assert store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                         "not in this test", c.claim)
            (claim,) = [c for c in claims if c.ref == ref]
            return send_claimed(ctx, ref, claim.version, claim.claim)

        assert send("stop-retinoids:sms") == "sent"
        store.cancel("sk", "D-1", datetime.now(UTC))  # before the visit
        assert datetime.now(UTC) < start - timedelta(seconds=1)
        (notice,) = [r["id"] for r in store.timeline("sk", "D-1")["reminders"]
                     if r["id"].startswith("cancelled#")]
        real = store.still_owned

        def across_a_restart(*args: Any, **kwargs: Any) -> bool:
            server.stop()  # Redis goes down as the last fence is read; back after the start
            wait = (start - datetime.now(UTC)).total_seconds() + 1.0
            restart = threading.Timer(wait, server.start)
            restarted.append(restart)
            restart.start()
            return real(*args, **kwargs)

        store.still_owned = across_a_restart  # type: ignore[method-assign]
        first = send(notice)
        store.still_owned = real  # type: ignore[method-assign]
        assert datetime.now(UTC) > start
        texts = [b["message"] for b in gate.bodies if "cancelled" in b["message"]]
        for text in texts:
            assert "as before" not in text, text
        if not texts:
            assert first == "handed back", first
            assert send(notice) == "sent"
        (text,) = [b["message"] for b in gate.bodies if "cancelled" in b["message"]]
        assert "Before you resume tretinoin/retinol, call +34910000000" in text, text
    finally:
        for restart in restarted:
            restart.join(15)
        client.close()
        server.stop()
        gate.close()


def test_a_notice_handed_back_to_be_written_again_is_due_on_redis_clock(
        tmp_path, monkeypatch):
    """The hand-back of words written for before the visit is 'at once': due at the
    attempt's 'later', this host's clock, while the pump claims by Redis's. A host 30 s
    ahead (the skew e7fde86 keeps sending through) put the notice 30 s into the pump's
    future. The notice's last fence parked until the visit began on the host's clock, then
    released; real Redis, a real HTTP gateway."""
    from tests.test_clock_handbacks import _Ahead
    from tests.test_clock_skew import SKEW
    from tests.test_send_races import Gate
    from worker import dispatch
    from worker.clock import RedisClock, redis_time

    gate = Gate()
    gate.answer(200)
    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    try:
        config = tmp_path / "config"
        shutil.copytree(ROOT / "config" / "protocols", config / "protocols")
        (config / "clinics").mkdir()
        (config / "clinics" / "sk.toml").write_text(f"""
name = "Skin Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
locale = "en"
[sms]
max_per_day = 10
max_per_week = 70
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "json://127.0.0.1:{gate.port}/sms?:to={{to}}"
email = "json://127.0.0.1:{gate.port}/email?:to={{to}}"
""", encoding="utf-8")
        settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                            lease_seconds=30, send_timeout_seconds=2, _env_file=None)
        catalog = Catalog.load(settings)
        store = Store(client, "revwords")
        ctx = Context(settings=settings, store=store, catalog=catalog,
                      renderer=Renderer(catalog.templates_dir))
        clock = RedisClock(dispatch.CLOCK.local)
        clock.refresh(client)
        monkeypatch.setattr(dispatch, "CLOCK", clock)
        monkeypatch.setattr(dispatch, "datetime", _Ahead)  # the sending host is 30 s ahead
        # The visit 3 s ahead on the sending host's clock.
        start = (datetime.now(UTC) + timedelta(seconds=SKEW + 3)).replace(microsecond=0)
        booking = parse_booking({
            "clinic": "sk", "booking_id": "D-1", "treatment": "demo",
            "starts_at": start.isoformat(),
            "patient": {"name": "Ana Ruiz", "phone": "+34600111222",
                        "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]},
            "medications": {"tretinoin": True}}, catalog)
        now = datetime.now(UTC)
        store.upsert(booking, plan(booking, catalog.protocols["demo"],
                                   catalog.clinics["sk"], now), now)

        def send(key: str) -> str:
            ref = f"sk/D-1/{key}"
            store.redis.zadd(store.due_key, {ref: 0})
            claims = store.claim_due(100, settings.lease_seconds)
            for c in claims:
                if c.ref != ref:
                    assert store.requeue(c.ref, datetime.now(UTC) + timedelta(days=30),
                                         "not in this test", c.claim)
            (claim,) = [c for c in claims if c.ref == ref]
            return send_claimed(ctx, ref, claim.version, claim.claim)

        assert send("stop-retinoids:sms") == "sent"
        store.cancel("sk", "D-1", datetime.now(UTC))
        (notice,) = [r["id"] for r in store.timeline("sk", "D-1")["reminders"]
                     if r["id"].startswith("cancelled#")]
        real = store.still_owned

        def parked(*args: Any, **kwargs: Any) -> bool:
            wait = (start - _Ahead.now(UTC)).total_seconds() + 0.5
            time.sleep(max(0.0, wait))  # the visit begins (on the host's clock) meanwhile
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "still_owned", parked)
        assert send(notice) == "handed back"
        ref = f"sk/D-1/{notice}"
        due = store.redis.zscore(store.due_key, ref)
        assert store.record(ref)["status"] == "scheduled" and due is not None
        # Due now on Redis's clock (the pump takes it at its next run), not SKEW later.
        assert due <= redis_time(client) + 1.0, due - redis_time(client)
    finally:
        client.close()
        server.stop()
        gate.close()
