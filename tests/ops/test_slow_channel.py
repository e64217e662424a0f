"""A slow email provider never holds SMS back, for real: a worker started as `reminders run`
and the compose file start it (`python -m worker.celery_main worker`), beat, a burst of
emails and SMS due at once, an SMTP server that takes 2 s to accept each message. The SMS
all go out at once; the emails at the pace of the SMTP server, each once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, wait_until
from tests.ops import test_sigterm
from tests.ops.test_sigterm import PREFIX, Gateway, booking
from tests.sinks import SmtpSink
from worker.service import celery_command
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.integration
# tests/ops/test_sigterm.py's processes and SMTP server, with a gateway that parks nothing.
service, smtp_sink = test_sigterm.service, test_sigterm.smtp_sink
SMTP_DELAY = 2.0
BURST = 8  # of each channel


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway(park=0)
    yield g
    g.close()


def test_slow_smtp_never_delays_sms(service: Service, gateway: Gateway, smtp_sink: SmtpSink,
                                    redis_client, tmp_path: Path) -> None:
    smtp_sink.delay = SMTP_DELAY
    argv = celery_command("worker", Settings(_env_file=None, log_level="INFO"))  # type: ignore[call-arg]
    worker = service._spawn([*argv, "-n", "slow@%h"], "worker")
    wait_until(lambda: b" ready." in worker.log_path.read_bytes()  # type: ignore[attr-defined]
               or worker.poll() is not None, 30)
    assert worker.poll() is None, worker.log_path.read_text()  # type: ignore[attr-defined]
    service.beat(worker=worker)
    # The emails first in line: booked (and due) before the SMS.
    emails = [booking(n, "oneemail") for n in range(1, BURST + 1)]
    texts = [booking(n, "onesms") for n in range(BURST + 1, 2 * BURST + 1)]
    service.book(*emails)
    booked_at = time.time()
    service.book(*texts)
    phones = {d["patient"]["phone"] for d in texts}
    wait_until(lambda: {to for _, to in gateway.snapshot()} == phones, 15)
    sms_done = max(at for at, _ in gateway.snapshot()) - booked_at
    sent_emails = len(smtp_sink.snapshot())
    # 8 emails at 2 s each on 2 x 2 threads take two rounds (4 s): the SMS, booked after
    # them, went out within the first round, not behind the email backlog.
    assert sent_emails <= BURST // 2, (sms_done, sent_emails)
    assert sms_done < 2 * SMTP_DELAY, (sms_done, sent_emails)
    addresses = {d["patient"]["email"] for d in emails}
    wait_until(lambda: {m.to for m in smtp_sink.snapshot()} == addresses, 20)
    time.sleep(0.5)
    assert Counter(m.to for m in smtp_sink.snapshot()) == Counter(addresses)
    assert Counter(to for _, to in gateway.snapshot()) == Counter(phones)
    store = Store(redis_client, PREFIX)
    for doc in emails + texts:
        (reminder,) = store.timeline("ops", doc["booking_id"])["reminders"]
        assert (reminder["status"], reminder["attempts"]) == ("sent", 1), reminder
    print(f"SMS all out {sms_done:.2f}s after booking; {sent_emails} of {BURST} emails by then")
