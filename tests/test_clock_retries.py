"""A reminder's retry is due on Redis's clock (found by review, as the clinic events' were:
tests/test_clock_events.py): the pump claims reminders by Redis's TIME, but a transient
failure's retry was dated `datetime.now(UTC) + backoff` on the sending host. A host 30 s
behind Redis made every backoff under 30 s into "due now" (a failing SMS gateway or SMTP
server hammered at each pump run, the attempts burnt in seconds and the reminder
dead-lettered early); a host ahead made each retry wait the skew more. An unknown outcome's
retry (not before its ledger expires: a Redis TTL) was held to the host's "now" too, so a
host ahead waited the skew past the ledger. Now both are counted from this process's
reading of Redis's clock (`dispatch.CLOCK`), as the hand-backs already were
(tests/test_clock_handbacks.py). The send window stays the host's (NTP required): the
retry's instant on Redis's clock is what is handed to it (`next_opening`).

Real Redis, the real senders (`Lanes`, which read Redis's clock as they open), a real HTTP
gateway answering 503 (or not at all); the skewed clock is the one edge patched: the send
path's and its store's `time` and `datetime`."""

from __future__ import annotations

import time as real_time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.test_clock_skew import SKEW, Skewed
from tests.test_send_batches import (  # noqa: F401  (gateway: fixture)
    LEASE,
    Rig,
    gateway,
    phone,
    prep,
    settled,
    wait_for,
)
from worker import dispatch, store
from worker.catalog import Catalog
from worker.clock import RedisClock, redis_time
from worker.store import IN_FLIGHT_MARGIN

# The first retry's backoff with base 10 s, cap 20 s: 5-10 s (dispatch.compute_backoff),
# well under SKEW: a host SKEW behind would find it due at once.
BASE, CAP = 10.0, 20.0
BACKOFF = (BASE / 2, BASE)


def _skewed_datetime(seconds: float) -> type[datetime]:
    class _Skewed(datetime):
        """The datetime class, its clock `seconds` off."""

        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=seconds)

    return _Skewed


def _host_off(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The sending host's clock `seconds` off Redis's (the send path's and its store's), in
    a process that has not read Redis's clock yet (its senders read it as they open)."""
    monkeypatch.setattr(dispatch, "CLOCK", RedisClock(dispatch.CLOCK.local))
    for module in (dispatch, store):
        monkeypatch.setattr(module, "time", Skewed(seconds))
        monkeypatch.setattr(module, "datetime", _skewed_datetime(seconds))


def _shown(rig: Rig) -> dict:
    (entry,) = [r for r in rig.store.timeline("rc", "R-1")["reminders"]
                if r["id"] == "prep:sms"]
    return entry


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _send_once(rig: Rig, redis_client) -> tuple[float, float]:
    """Claim R-1's prep SMS as the pump would and hand it to the senders; wait for its
    outcome. Return Redis's clock before the claim and after the outcome."""
    before = redis_time(redis_client)
    rig.hand(rig.claim(prep(1)), before)
    wait_for(lambda: settled(rig, prep(1)))
    return before, redis_time(redis_client)


@pytest.mark.parametrize("skew", [-SKEW, SKEW], ids=["host behind", "host ahead"])
def test_a_transient_failure_is_retried_after_its_backoff_on_redis_clock(
        skew, tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    _host_off(monkeypatch, skew)
    rig = Rig(tmp_path, redis_client, gateway, backoff_base_seconds=BASE,
              backoff_cap_seconds=CAP)
    rig.book(rig.doc(1))
    gateway.hold = {phone(1)}
    gateway.release(503)  # the gateway answers 503 at once: a transient failure
    try:
        before, after = _send_once(rig, redis_client)
    finally:
        rig.drain()
    s = rig.state(prep(1))
    assert s["record"]["status"] == "retrying" and s["record"]["attempts"] == "1", s
    assert len(gateway.to(phone(1))) == 1
    due = s["due"]
    assert due is not None, s
    # Its backoff counted on Redis's clock, the pump's: not the skew early, nor late.
    assert before + BACKOFF[0] - 0.5 <= due <= after + BACKOFF[1] + 0.5, (due - before, skew)
    # The timeline says the same instant: its due and its reason's "retrying at".
    shown = _shown(rig)
    assert shown["status"] == "retrying" and abs(_epoch(shown["due_at"]) - due) < 0.01, shown
    said = shown["reason"].removeprefix("retrying at ").split(": ", 1)[0]
    assert abs(_epoch(said) - due) < 1, shown
    assert "." not in said, shown  # to the second, as a clinic reads it
    # Not claimed again before its backoff (a host behind made it due at once).
    assert prep(1) not in [c.ref for c in rig.store.claim_due(100, LEASE)]


@pytest.mark.parametrize("skew", [-SKEW, SKEW], ids=["host behind", "host ahead"])
def test_an_unknown_outcome_is_retried_once_its_ledger_expires_on_redis_clock(
        skew, tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    """The gateway never answers: the send times out after the hand-over (it may have been
    delivered), so the retry waits for the attempt's ledger to expire (a Redis TTL, LEASE
    from its begin) and a margin, no more: a host ahead held it to its own "now", the skew
    past that."""
    _host_off(monkeypatch, skew)
    rig = Rig(tmp_path, redis_client, gateway)
    rig.book(rig.doc(1))
    gateway.hold = {phone(1)}  # held past the send timeout (3 s)
    try:
        before, after = _send_once(rig, redis_client)
    finally:
        gateway.release(200)
        rig.drain()
    s = rig.state(prep(1))
    assert s["record"]["status"] == "retrying" and s["log"][-1]["outcome"] == "unknown", s
    due = s["due"]
    assert due is not None, s
    # The ledger was taken between `before` and `after`, for LEASE seconds.
    assert before + LEASE + IN_FLIGHT_MARGIN - 0.5 <= due <= after + LEASE + IN_FLIGHT_MARGIN \
        + 0.5, (due - after, skew)
    shown = _shown(rig)
    assert abs(_epoch(shown["due_at"]) - due) < 0.01, shown


def test_a_retry_waits_for_the_send_window_from_its_time_on_redis_clock(
        tmp_path, redis_client, gateway, monkeypatch):  # noqa: F811
    """The send window is the host's (NTP required), but the instant handed to it is the
    retry's on Redis's clock. A host 120 s ahead sends inside a window that opened S, a
    minute or so after Redis's now: the retry, due 5-10 s after Redis's now, is before S,
    so it waits for S; dated on the host's clock it fell inside the window, 120 s late."""
    skew = 120.0
    now = redis_time(redis_client)
    start = datetime.fromtimestamp(now + BACKOFF[1] + 1, UTC)
    start = start.replace(second=0, microsecond=0) + timedelta(minutes=1)  # S
    while (start.date() != datetime.fromtimestamp(now + skew + 5, UTC).date()):
        # The host's now would be past midnight, outside a window opening before it.
        real_time.sleep(1)  # at most a few minutes, once a day
        now = redis_time(redis_client)
        start = datetime.fromtimestamp(now + BACKOFF[1] + 1, UTC)
        start = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    _host_off(monkeypatch, skew)
    rig = Rig(tmp_path, redis_client, gateway, backoff_base_seconds=BASE,
              backoff_cap_seconds=CAP)
    clinic = Path(tmp_path / "config" / "clinics" / "rc.toml")
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'start = "00:00"', f'start = "{start:%H:%M}"'), encoding="utf-8")
    rig.catalog = rig.ctx.catalog = Catalog.load(rig.settings)
    assert rig.catalog.clinics["rc"].send_window.describe().startswith(f"{start:%H:%M}")
    rig.book(rig.doc(1))
    gateway.hold = {phone(1)}
    gateway.release(503)
    try:
        before, _ = _send_once(rig, redis_client)
    finally:
        rig.drain()
    assert before + BACKOFF[1] < start.timestamp() < before + skew  # as set up
    s = rig.state(prep(1))
    assert s["record"]["status"] == "retrying" and len(gateway.to(phone(1))) == 1, s
    assert s["due"] == start.timestamp(), (s["due"] - before, start)
