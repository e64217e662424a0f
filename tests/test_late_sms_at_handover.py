"""The SMS cap's day is checked again at the hand-over (found by review of 1b08cac): an SMS
begun at 23:59 under an all-day send window whose last fence (`still_owned`, a Redis round
trip the client retries through a Redis restart) ends after the patient's midnight would go
on the next day while counted on the day before; the next day holding another of the
patient's SMS, that day got two. Now it is capped on the day it goes, as a late SMS
(`_late_sms`): moved to the next slot the cap allows.

A real Redis stopped and restarted under the fence, a real HTTP SMS gateway, the real send
path; its clock (worker.dispatch.datetime) is moved past midnight while Redis is down."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

from tests.test_send_caps import TZ, Clock, Rig, _Fixed, step
from tests.test_send_caps import sinks as sinks  # noqa: F401  (a fixture)
from worker.catalog import Catalog
from worker.connections import WORKER, from_url
from worker.dispatch import Context
from worker.embedded import RedisServer
from worker.rendering import Renderer


def test_an_sms_whose_fence_waits_past_midnight_is_capped_on_the_day_it_goes(
        tmp_path, sinks, monkeypatch):  # noqa: F811
    monkeypatch.setattr("worker.dispatch.datetime", _Fixed)
    server = RedisServer(tmp_path / "redis").start()
    client = from_url(server.url, WORKER)
    restarted: list[threading.Thread] = []
    try:
        rig = Rig(tmp_path / "config", client, *sinks)
        folder = tmp_path / "config"
        (folder / "protocols" / "late.toml").write_text(
            step("night", 1, "23:59", '["sms"]', "week-check"), encoding="utf-8")
        clinic = folder / "clinics" / "cap.toml"
        clinic.write_text(clinic.read_text(encoding="utf-8").replace(
            'start = "09:00"\nend = "20:00"', 'start = "00:00"\nend = "24:00"'),
            encoding="utf-8")
        rig.catalog = Catalog.load(rig.settings)
        rig.ctx = Context(settings=rig.settings, store=rig.store, catalog=rig.catalog,
                          renderer=Renderer(rig.catalog.templates_dir))
        d = rig.day
        rig.book("A-1", "late", d - timedelta(days=1))  # its SMS: D 23:59
        rig.book("A-2", "morn", d)  # its SMS: D+1 10:00 (the one SMS of D+1)
        assert rig.due("A-1", "night:sms") == rig.local(d, 23, 59)
        assert rig.due("A-2", "morning:sms") == rig.local(d + timedelta(days=1), 10)

        real = rig.store.still_owned
        after_midnight = rig.local(d + timedelta(days=1), 0, 1)

        def across_a_restart(*args: Any, **kwargs: Any) -> bool:
            server.stop()  # Redis goes down just as the last fence is read ...
            Clock.at = after_midnight  # ... and the patient's midnight passes meanwhile
            restart = threading.Timer(2.0, server.start)
            restarted.append(restart)
            restart.start()
            return real(*args, **kwargs)

        rig.store.still_owned = across_a_restart  # type: ignore[method-assign]
        gone: list[date] = []  # the patient-local day of every SMS the gateway took

        def send(booking_id: str, key: str, at: datetime) -> str:
            before = len(rig.sms.snapshot())
            outcome = rig.send(booking_id, key, at)
            gone.extend([Clock.at.astimezone(TZ).date()] * (len(rig.sms.snapshot()) - before))
            return outcome

        outcome = send("A-1", "night:sms", rig.local(d, 23, 59) + timedelta(seconds=20))
        rig.store.still_owned = real  # type: ignore[method-assign]
        assert outcome == "deferred", (outcome, rig.reminder("A-1", "night:sms"))
        assert rig.sms.snapshot() == []  # nothing went on D+1 beside A-2's SMS
        moved = rig.due("A-1", "night:sms")
        assert moved.astimezone(TZ).date() == d + timedelta(days=2), moved
        # The rest, each at its stored time: one SMS a day.
        for booking_id, key in sorted((("A-2", "morning:sms"), ("A-1", "night:sms")),
                                      key=lambda bk: rig.due(*bk)):
            assert send(booking_id, key, rig.due(booking_id, key)) == "sent"
        assert Counter(gone) == {d + timedelta(days=1): 1, d + timedelta(days=2): 1}
    finally:
        for restart in restarted:
            restart.join(10)
        client.close()
        server.stop()
