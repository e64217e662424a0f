"""A slow email provider never holds SMS back, for real: a worker started as `reminders run`
and the compose file start it (`python -m worker.celery_main worker`), beat, a burst of
emails and SMS due at once, an SMTP server that takes 2 s to accept each message. The SMS
all go out at once; the emails at the pace of the SMTP server, each once.

And a channel with a backlog never paces the other (either way round): a provider slow
enough that its senders have several rounds of claims waiting, so that each of its batch
tasks holds its pool process (worker/dispatch.py `hand_over`) and its batches alone could
keep both pool processes busy; the other channel's batches must still reach a pool process
at once, not one between two of the busy channel's holds (the two channels then drained in
lockstep, the fast one no sooner than the slow one).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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




# Seconds a send to the busy channel's provider takes (an SMTP send has more round trips:
# it takes about 0.15 s more): its senders finish about 5-8 a second, and its batches
# of one, each holding a pool process up to 0.5 s, could keep both busy all the time.
BUSY_DELAY = {"email": 0.4, "sms": 0.8}
BUSY_BURST = 120  # of the busy channel: 15-25 s of work for its 2 x 2 senders
OTHER_BURST = 60  # of the other channel, due OTHER_LAG after the busy channel's
OTHER_LAG = 4.0  # seconds: the busy channel is under way, its latency known
BACKLOG = 6.0  # seconds of work handed out ahead (the pump's window): many rounds waiting
BATCH = 1  # claims a send task carries
# A step 1 s after the "appointment" (as benchmarks/side_by_side.py's): due when we say.
AT_DUE = 'offset = "1s"'


def due_booking(n: int, treatment: str, due: float) -> dict[str, Any]:
    doc = booking(n, treatment)
    starts = datetime.fromtimestamp(due - 1, UTC)
    return doc | {"starts_at": starts.isoformat(timespec="milliseconds")}


@pytest.mark.parametrize("busy", ["email", "sms"])
def test_busy_channel_never_paces_the_other(service: Service, gateway: Gateway,
                                            smtp_sink: SmtpSink, redis_client,
                                            busy: str) -> None:
    """The busy channel's 120 are handed out many rounds ahead (the pump's window: 6 s of
    its work), so that each of its batch tasks waits for room and its batches alone could
    keep both pool processes busy. The other channel's 60, due 4 s later, must go out at
    their own pace: while they do (from the first to the last), the busy channel sends
    fewer than half as many (4-25 here). Through pool processes held between the busy
    channel's batches they came out one batch between two of the busy channel's holds, at
    its pace: 45 emails, and 56 SMS, went out meanwhile."""
    other = "sms" if busy == "email" else "email"
    if busy == "email":
        smtp_sink.delay = BUSY_DELAY[busy]
    else:
        gateway.delay = BUSY_DELAY[busy]
    protocols = Path(service.env["REMINDERS_CONFIG_DIR"]) / "protocols"
    for channel in ("email", "sms"):
        text = (protocols / f"one{channel}.toml").read_text(encoding="utf-8")
        (protocols / f"due{channel}.toml").write_text(
            text.replace('at = "booking"', AT_DUE), encoding="utf-8")
    service.configure(REMINDERS_SEND_BATCH_SIZE=str(BATCH),
                      REMINDERS_SEND_BACKLOG_SECONDS=str(BACKLOG))
    worker = service.up()

    def sent(channel: str) -> list[tuple[float, str]]:
        if channel == "email":
            return [(m.at, m.to) for m in smtp_sink.snapshot()]
        return gateway.snapshot()

    def address(doc: dict[str, Any], channel: str) -> str:
        return str(doc["patient"]["email" if channel == "email" else "phone"])

    due = time.time() + 8.0  # after the booking (a process of its own) is done
    busy_docs = [due_booking(n, f"due{busy}", due) for n in range(1, BUSY_BURST + 1)]
    other_docs = [due_booking(n, f"due{other}", due + OTHER_LAG)
                  for n in range(BUSY_BURST + 1, BUSY_BURST + OTHER_BURST + 1)]
    service.book(*busy_docs, *other_docs)
    assert time.time() < due, "booking took longer than the lead: give it more"
    wanted = {address(d, other) for d in other_docs}
    wait_until(lambda: {to for _, to in sent(other)} >= wanted, 60)
    times = sorted(at for at, _ in sent(other))
    first, last = times[0], times[-1]
    busy_meanwhile = sum(1 for at, _ in sent(busy) if first <= at <= last)
    busy_left = BUSY_BURST - sum(1 for at, _ in sent(busy) if at <= last)
    assert busy_left > 0, "the busy channel was done first: make it busier"
    assert busy_meanwhile < OTHER_BURST // 2, (
        f"{busy_meanwhile} {busy} out while the {OTHER_BURST} {other} were",
        worker.log_path.read_text()[-3000:])  # type: ignore[attr-defined]
    store = Store(redis_client, PREFIX)

    def outcomes() -> list[tuple[str, int]]:
        return [(reminder["status"], reminder["attempts"]) for doc in busy_docs + other_docs
                for reminder in store.timeline("ops", doc["booking_id"])["reminders"]]

    # Every one recorded as sent (the gateway counts an SMS when it arrives, before its
    # delay), then nothing more.
    wait_until(lambda: all(status == "sent" for status, _ in outcomes()), 90)
    time.sleep(0.5)
    assert set(outcomes()) == {("sent", 1)}
    assert Counter(to for _, to in sent(other)) == Counter(wanted)
    busy_wanted = {address(d, busy) for d in busy_docs}
    assert Counter(to for _, to in sent(busy)) == Counter(busy_wanted)
    print(f"busy {busy}: {busy_meanwhile} out while the {OTHER_BURST} {other} were "
          f"({last - first:.2f}s), {busy_left} left then")
