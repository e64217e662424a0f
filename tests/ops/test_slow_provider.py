"""One clinic's slow SMS provider never holds another clinic's SMS back, for real: two
clinics on the same channel, each with its own gateway (real HTTP servers on 127.0.0.1), a
real worker (one pool process, four SMS senders) and beat, a burst of both clinics'
SMS due at the same instant.

Clinic `acme`'s gateway answers each SMS after SLOW seconds (a provider in trouble: the
same holds for one that hangs until the send timeout, or whose TLS handshake stalls),
clinic `bloom`'s at once. Acme's reminders come first in the due set (same instant, and
"acme/..." sorts before "bloom/..."). Within a channel all clinics share the sender
threads: acme's SMS took every one of them, so bloom's waited for acme's whole burst to be
claimed, at acme's pace (here 15 s or more; at the defaults, 16 threads and 200 SMS
answered in 5 s or hanging for the 15 s send timeout, minutes). Bloom's must go out
within a few of acme's sends of falling due, and once acme's gateway recovers, every
SMS of both clinics goes exactly once.

A third clinic, `cracked`, names a secret its environment lacks (a broken configuration):
its SMS fail on their own, with the reason, and hold back nobody.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import Service, wait_until
from tests.ops.test_sigterm import ONE_SMS, Gateway
from worker.pump import Keys
from worker.store import Store

pytestmark = pytest.mark.integration
PREFIX = "reminders"  # the default key prefix: the processes run with it
SLOW = 2.5  # seconds acme's gateway takes to answer one SMS
ACME, BLOOM = 24, 6  # SMS of each clinic, all due at one instant
# A step 1 s after the "appointment": due when the test says.
DUE_SMS = ONE_SMS.replace('at = "booking"', 'offset = "1s"')
CLINIC = """
name = "{name}"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
sms = "{sms}"
email = "json://127.0.0.1:9/email?:to={{to}}"
"""


@pytest.fixture
def slow() -> Iterator[Gateway]:
    g = Gateway(park=0, delay=SLOW)
    yield g
    g.close()


@pytest.fixture
def fast() -> Iterator[Gateway]:
    g = Gateway(park=0)
    yield g
    g.close()


@pytest.fixture
def service(tmp_path: Path, redis_server, redis_client, slow: Gateway,
            fast: Gateway) -> Iterator[Service]:
    config = tmp_path / "config"
    (config / "protocols").mkdir(parents=True)
    (config / "clinics").mkdir()
    (config / "protocols" / "duesms.toml").write_text(DUE_SMS, encoding="utf-8")
    urls = {"acme": f"json://127.0.0.1:{slow.port}/sms?:to={{to}}",
            "bloom": f"json://127.0.0.1:{fast.port}/sms?:to={{to}}",
            "cracked": f"json://${{CRACKED_UNSET_TOKEN}}@127.0.0.1:{fast.port}/sms?:to={{to}}"}
    for clinic, url in urls.items():
        (config / "clinics" / f"{clinic}.toml").write_text(
            CLINIC.format(name=f"{clinic.title()} Skin Clinic", sms=url), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.pop("CRACKED_UNSET_TOKEN", None)
    env.update({
        "REMINDERS_REDIS_URL": redis_server.url,
        "REMINDERS_CONFIG_DIR": str(config),
        "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMINDERS_DATA_DIR": str(tmp_path / "data"),
        "REMINDERS_SEND_THREADS": "4",
        "REMINDERS_SEND_TIMEOUT_SECONDS": "4",
        "REMINDERS_LEASE_SECONDS": "10",
    })
    svc = Service(env, tmp_path)
    yield svc
    svc.stop()


def due_booking(clinic: str, n: int, due: float) -> dict[str, Any]:
    starts = datetime.fromtimestamp(due - 1, UTC)
    return {"clinic": clinic, "booking_id": f"S-{n}", "treatment": "duesms",
            "starts_at": starts.isoformat(timespec="milliseconds"),
            "patient": {"name": "Ana López", "phone": f"+346001{n:05d}",
                        "timezone": "Europe/Madrid", "locale": "en", "channels": ["sms"]}}


def test_a_slow_provider_never_holds_another_clinics_sms_back(
        service: Service, slow: Gateway, fast: Gateway, redis_client) -> None:
    worker, _ = service.start(concurrency=1)
    due = time.time() + 6.0  # after the booking (a process of its own) is done
    acme = [due_booking("acme", n, due) for n in range(1, ACME + 1)]
    bloom = [due_booking("bloom", n, due) for n in range(ACME + 1, ACME + BLOOM + 1)]
    cracked = [due_booking("cracked", ACME + BLOOM + 1, due)]
    service.book(*acme, *bloom, *cracked)
    assert time.time() < due, "booking took longer than the lead: give it more"
    bloom_phones = {d["patient"]["phone"] for d in bloom}
    wait_until(lambda: {to for _, to in fast.snapshot()} >= bloom_phones, 30)
    bloom_late = max(at for at, to in fast.snapshot() if to in bloom_phones) - due
    acme_by_then = len(slow.snapshot())
    assert bloom_late < 4 * SLOW, (f"bloom's SMS out {bloom_late:.1f}s after due, behind "
                              f"{acme_by_then} of acme's",
                              worker.log_path.read_text()[-3000:])  # type: ignore[attr-defined]
    # Acme's provider recovers: the rest of its burst goes at once.
    slow.delay = 0.0
    store = Store(redis_client, PREFIX)

    def outcome(doc: dict[str, Any]) -> tuple[str, int]:
        (reminder,) = store.timeline(doc["clinic"], doc["booking_id"])["reminders"]
        return reminder["status"], reminder["attempts"]

    wait_until(lambda: all(outcome(d) == ("sent", 1) for d in acme + bloom), 30)
    wait_until(lambda: outcome(cracked[0])[0] == "failed", 10)
    time.sleep(0.5)  # room for a stray second copy to arrive
    assert Counter(to for _, to in slow.snapshot()) == Counter(
        d["patient"]["phone"] for d in acme)
    assert Counter(to for _, to in fast.snapshot()) == Counter(bloom_phones)
    (failed,) = store.timeline("cracked", cracked[0]["booking_id"])["reminders"]
    assert "CRACKED_UNSET_TOKEN" in failed["reason"], failed
    client = store.redis
    wait_until(lambda: client.zcard(Keys(PREFIX).outstanding("sms")) == 0, 5)
    assert (client.zcard(store.due_key), client.zcard(store.lease_key)) == (0, 0)
    assert {client.get(store.ledger_key(f"{d['clinic']}/{d['booking_id']}/confirm:sms"))
            for d in acme + bloom} == {"sent"}
    print(f"bloom's {BLOOM} SMS all out {bloom_late:.2f}s after due, {acme_by_then} of "
          f"acme's {ACME} by then")
