"""The start of a burst on a fresh store, for real: a real worker (2 pool processes, 2 sender
threads per channel each), real Redis, the SMS gateway on 127.0.0.1, no beat tick for a
minute.

Before any attempt of a channel was measured, the pump hands its senders two claims a
thread (a window more while another channel has room: worker/pump.py). Once the first
attempts are measured, the window follows their latency. The pump must then hand out the
rest at once, not wait until the senders run dry (their nudge) or for beat's next tick: in
a burst the senders drained the first window in a few tenths of a second and sat idle until
the nudge's run (`python -m benchmarks.burst_probe`: the SMS channel sent nothing for
0.1-0.2 s of the burst's first half second).

Here the gateway answers the first few SMS at once (measured: a few milliseconds each) and
holds the next ones, so the senders never run dry and no nudge comes: only the pump's own
runs can hand out the rest while the gateway holds them. Then everything goes once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Service, wait_until
from tests.ops import test_sigterm
from tests.ops.test_sigterm import PREFIX, Gateway, booking
from worker.pump import Keys
from worker.store import Store

pytestmark = pytest.mark.integration
service, smtp_sink = test_sigterm.service, test_sigterm.smtp_sink
BURST = 40  # SMS due at once: far more than the first window (two claims a thread)
ANSWERED = 1  # the first SMS, answered at once: the senders' first measured attempt


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway(park=BURST, answer_first=ANSWERED)
    yield g
    g.close()


def test_a_burst_is_handed_out_once_the_first_attempts_are_measured(
        service: Service, gateway: Gateway, redis_client) -> None:
    service.configure(REMINDERS_PUMP_INTERVAL_SECONDS="60")  # no tick during the test
    worker = service.worker()
    store = Store(redis_client, PREFIX)
    keys = Keys(PREFIX)
    # Both pool processes' senders registered (a worker up for a while, not one starting).
    wait_until(lambda: redis_client.zcard(keys.senders("sms")) == 2, 20)
    assert not redis_client.hget(keys.stats("sms"), "latency"), "a fresh store: not measured"
    docs = [booking(n, "onesms") for n in range(1, BURST + 1)]
    service.book(*docs)  # due at once; the booking's nudge runs the pump
    # The first window: the gateway answers the first few, then holds every SMS it gets.
    wait_until(lambda: gateway.parked.acquire(timeout=0.01), 20)
    measured = time.time()
    # Measured (the senders report every 0.1 s): the window now follows the latency, which
    # has room for the whole burst; the senders are busy, and no tick comes for a minute.
    try:
        wait_until(lambda: redis_client.zcard(store.due_key) == 0, 5)
    except AssertionError:
        raise AssertionError(
            f"{redis_client.zcard(store.due_key)} of {BURST} still due "
            f"{time.time() - measured:.1f}s after the first SMS were answered; latency "
            f"{redis_client.hget(keys.stats('sms'), 'latency')!r}",
            worker.log_path.read_text()[-3000:]) from None  # type: ignore[attr-defined]
    handed_out = time.time() - measured
    assert redis_client.hget(keys.stats("sms"), "latency"), "handed out before measured"
    gateway.release()
    phones = {d["patient"]["phone"] for d in docs}
    wait_until(lambda: {to for _, to in gateway.snapshot()} == phones, 30)

    def outcomes() -> list[tuple[str, int]]:
        return [(reminder["status"], reminder["attempts"]) for doc in docs
                for reminder in store.timeline("ops", doc["booking_id"])["reminders"]]

    wait_until(lambda: all(status == "sent" for status, _ in outcomes()), 30)
    time.sleep(0.5)  # room for a stray second copy
    assert Counter(to for _, to in gateway.snapshot()) == Counter(phones)
    assert set(outcomes()) == {("sent", 1)}
    assert redis_client.zcard(store.due_key) == 0 and redis_client.zcard(store.lease_key) == 0
    print(f"the rest of the burst handed out {handed_out:.2f}s after the first SMS were held")
