"""One provider's share of a channel's senders (worker/dispatch.py `Lanes`), forced: a
clinic's gateway holds a send, and a burst behind it is handed to the same senders.

Real Redis, real Apprise, the holding HTTP gateway of tests/test_send_batches.py; final
states are read back from Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_send_batches import Gateway, Rig, phone, prep, wait_for
from worker.catalog import Catalog
from worker.dispatch import PROVIDER_BUSY, SLOW_SEND_SECONDS
from worker.models import parse_booking
from worker.planner import plan


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway()
    yield g
    g.close()


def other_clinic(rig: Rig, tmp_path: Path) -> str:
    """Add clinic `rd`, whose SMS go through a provider of its own (another URL on the same
    gateway), and book patient 9 there; return that booking's prep SMS."""
    clinics = tmp_path / "config" / "clinics"
    text = (clinics / "rc.toml").read_text(encoding="utf-8")
    (clinics / "rd.toml").write_text(
        text.replace("Race Clinic", "Other Clinic").replace("/sms?", "/other-sms?"),
        encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    booking = parse_booking(rig.doc(9) | {"clinic": "rd"}, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert_many([(booking, plan(booking, rig.catalog.protocols["race"],
                                          rig.catalog.clinics["rd"], now))], now)
    return "rd/R-9/prep:sms"


def test_a_provider_with_a_send_hanging_holds_no_more_than_its_share(
        tmp_path, redis_client, gateway) -> None:
    """Clinic rc's gateway has held one SMS for over SLOW_SEND_SECONDS (hung: no send of it
    has ended yet, so none measured it slow). Its next SMS took the other of the two
    threads too, and clinic rd's SMS behind it waited for rc's send timeout. rc is held to
    its share (one thread) once one of its sends has run that long: its next SMS goes back
    to the schedule, not begun, and rd's goes at once."""
    # rc's send times out after 5 s: longer than SLOW_SEND_SECONDS and the second after it.
    rig = Rig(tmp_path, redis_client, gateway, send_threads=2, send_timeout_seconds=5,
              lease_seconds=12)
    try:
        theirs = other_clinic(rig, tmp_path)
        rig.book(rig.doc(1), rig.doc(2))
        gateway.hold = {phone(1), phone(2)}
        rig.hand(rig.claim(prep(1)))
        gateway.wait_held()
        time.sleep(SLOW_SEND_SECONDS + 0.2)
        handed = time.monotonic()
        rig.hand(rig.claim(prep(2), theirs))
        wait_for(lambda: gateway.to(phone(9)), timeout=10)
        assert time.monotonic() - handed < 1.0, "rd's SMS waited for rc's send"
        wait_for(lambda: rig.state(theirs)["record"]["status"] == "sent", timeout=5)
        held = rig.state(prep(2))
        assert held["lease"] is None and held["due"] is not None, held
        assert held["record"]["status"] == "scheduled", held
        assert held["record"]["reason"] == PROVIDER_BUSY.format(channel="sms"), held
        assert held["log"] == [] and held["ledger"] is None, held
        assert gateway.to(phone(2)) == []  # never begun
    finally:
        gateway.release()
        rig.drain()
    ours = rig.state(prep(1))
    assert ours["record"]["status"] == "sent" and ours["ledger"] == "sent", ours
    assert [b["to"] for b in gateway.bodies] == [phone(1), phone(9)]
