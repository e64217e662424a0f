"""A warm shutdown, for real: the provider accepts a send the worker had already cut (its
shutdown grace ran out, the attempt was recorded as of unknown outcome) while the pool
process is still alive (it waits for the cut attempts a little before it ends).

That delivery happened: it must be recorded as sent, not left "retrying once its ledger
expires", which sends the patient the same message a second time (tests/ops/
test_sigterm.py shows a cut send going out again on the next worker after its ledger).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, wait_until
from tests.ops import test_sigterm
from tests.ops.test_sigterm import PREFIX, booking, sigterm, wait_exit
from tests.sinks import SmtpSink
from worker.dispatch import CUT_REASON
from worker.store import Store

pytestmark = pytest.mark.integration
# tests/ops/test_sigterm.py's processes and gateway, with the SMTP server below.
service, gateway = test_sigterm.service, test_sigterm.gateway


@dataclass
class GatedSmtp(SmtpSink):
    """An SMTP server that answers DATA only once `gate` is set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate = threading.Event()
        self.waiting = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.waiting += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtp_sink() -> Iterator[GatedSmtp]:
    sink = GatedSmtp().start()
    yield sink
    sink.gate.set()
    sink.stop()


def test_a_cut_send_the_provider_accepts_before_the_process_ends_is_recorded_as_sent(
        service: Service, smtp_sink: GatedSmtp, redis_client, tmp_path: Path) -> None:
    service.configure(REMINDERS_LEASE_SECONDS="12", REMINDERS_SEND_TIMEOUT_SECONDS="5",
                      REMINDERS_SHUTDOWN_GRACE_SECONDS="1")
    a, _ = service.start("a", concurrency=1)
    service.book(booking(1, "oneemail"))
    wait_until(lambda: smtp_sink.waiting >= 1, 15)  # DATA sent, waiting for our answer
    sigterm(a)
    # The grace runs out: the worker cuts the attempt (recorded as of unknown outcome)...
    wait_until(lambda: "the worker stopped before the provider answered"
               in a.log_path.read_text(errors="replace"), 15)
    smtp_sink.gate.set()  # ... and the provider accepts it then: the message was delivered.
    assert wait_exit(a, 15) == 0, a.log_path.read_text()
    assert [m.to for m in smtp_sink.snapshot()] == ["s1@example.com"]

    store = Store(redis_client, PREFIX)
    ref = "ops/S-1/confirm:email"
    outcomes = [line["outcome"] for line in store.attempts(ref)]
    assert outcomes == ["unknown", "sent"], (outcomes, a.log_path.read_text()[-3000:])
    assert CUT_REASON in store.attempts(ref)[0]["error"]
    (reminder,) = store.timeline("ops", "S-1")["reminders"]
    assert reminder["status"] == "sent", reminder
    # Not due again: no second copy once the ledger would have expired.
    assert redis_client.zscore(store.due_key, ref) is None
    assert redis_client.get(store.ledger_key(ref)) == "sent"
