"""Review: a permanent failure worked out from the booking as the begin read it (the mail
server refuses the old address) is fenced by that booking version, as a send-time skip or
defer is: the clinic's correction landing while the attempt is at the provider puts the
reminder back, and the next attempt goes to the corrected address. Real Redis, a real
SMTP server (aiosmtpd) that refuses the old address, the real send path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.sinks import HttpSink, SmtpSink
from tests.test_unsubscribe_send import Rig
from worker.models import parse_booking
from worker.planner import plan

OLD, NEW = "ana@exmaple.com", "ana@example.com"  # a typo the clinic corrects


class _RefusesOld(SmtpSink):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address == OLD:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def rig(tmp_path, redis_client) -> Iterator[Rig]:
    smtp, sms = _RefusesOld().start(), HttpSink().start()
    try:
        yield Rig(tmp_path / "config", redis_client, smtp, sms)
    finally:
        smtp.stop()
        sms.stop()


def _book(rig: Rig, email: str, starts: datetime) -> None:
    doc = {"clinic": "uc", "booking_id": "U-1", "treatment": "unsub",
           "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "email": email, "phone": "+34600111222",
                       "timezone": "UTC", "locale": "en", "channels": ["sms", "email"]}}
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["unsub"],
                                   rig.catalog.clinics["uc"], now), now)


def test_an_address_corrected_while_the_old_one_is_refused_is_not_dead_lettered(
        rig, monkeypatch):
    import worker.dispatch as dispatch

    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    _book(rig, OLD, starts)
    ref = "uc/U-1/plain:email"
    real_deliver = dispatch.deliver
    at_provider, release = threading.Event(), threading.Event()

    def parked(url: Any, envelope: Any, *args: Any, **kwargs: Any) -> str:  # the hand-over
        if envelope.to == OLD:
            at_provider.set()
            assert release.wait(20)
        return real_deliver(url, envelope, *args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", parked)
    claim = rig.claim("plain:email")
    outcome: list[str] = []
    sender = threading.Thread(target=lambda: outcome.append(rig.send("plain:email", claim)))
    sender.start()
    try:
        assert at_provider.wait(10)
        _book(rig, NEW, starts)  # the clinic corrects the address: the plan is unchanged
    finally:
        release.set()
        sender.join(20)
    assert outcome, "the attempt did not finish"
    record = rig.store.record(ref)
    # Not a dead letter of the old address: back in the schedule, due now.
    assert rig.store.redis.zscore(rig.store.dead_key, ref) is None, record
    assert record["status"] == "scheduled", record
    assert rig.store.redis.zscore(rig.store.due_key, ref) is not None
    assert rig.send("plain:email") == "sent"
    (mail,) = rig.smtp.snapshot()
    assert mail.to == NEW
    assert rig.store.record(ref)["status"] == "sent"
