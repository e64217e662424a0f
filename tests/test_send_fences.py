"""The send path's fences against a second claim and against changes the begin did not see,
forced (a review of the three-round-trip attempt: begin, the fence before the hand-over,
finish). An attempt is parked mid-flight (at the SMS gateway after its hand-over, or just
before its fence), its lease runs out and the pump claims the reminder again, or the
clinic changes the booking; then the attempt is released and the final Redis state is
asserted: sent at most once, never lost, due when it should be.

Real Redis, real Apprise, a real HTTP gateway on 127.0.0.1 (tests/test_send_races.py's rig).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests import test_send_races as races
from tests.test_send_races import PREP, Rig, assert_no_claim
from worker.dispatch import send_claimed
from worker.store import Store

gate = races.gate  # the rig's fixtures
rig = races.rig
_RELEASES: list[threading.Event] = []


@pytest.fixture(autouse=True)
def _release_parked() -> Any:
    """A test that fails while an attempt is parked still lets it go (before its watchdog
    would end the test process)."""
    yield
    while _RELEASES:
        _RELEASES.pop().set()


@pytest.fixture
def hold_rig(tmp_path, redis_client, gate) -> Rig:
    """The race rig, its protocol with the isotretinoin gate (a washout of 182 days)."""
    config = races.write_config(tmp_path / "config", gate.port)
    (config / "protocols" / "race.toml").write_text(
        races.PROTOCOL.replace('name = "Race protocol"',
                               'name = "Race protocol"\nisotretinoin_washout_days = 182'),
        encoding="utf-8")
    settings = races.Settings(config_dir=config, templates_dir=races.ROOT / "templates",
                              lease_seconds=8, send_timeout_seconds=1, max_attempts=5,
                              backoff_base_seconds=1, backoff_cap_seconds=2, _env_file=None)
    catalog = races.Catalog.load(settings)
    store = Store(redis_client, races.PREFIX)
    ctx = races.Context(settings=settings, store=store, catalog=catalog,
                        renderer=races.Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


def expire_lease_and_claim_again(rig: Rig, ref: str) -> Any:
    """The attempt's lease runs out; the pump's next run claims the reminder again."""
    rig.store.redis.zadd(rig.store.lease_key, {ref: 0})
    claims = [c for c in rig.store.claim_due(100, rig.ctx.settings.lease_seconds) if c.ref == ref]
    assert len(claims) == 1, claims
    return claims[0]


def parked_before_the_fence(rig: Rig, ref: str) -> tuple[threading.Thread, dict[str, str],
                                                          Callable[[], None]]:
    """Claim and begin `ref` in a thread, held just before its fence (`still_owned`)."""
    claim = rig.claim_now(ref)
    parked, release = threading.Event(), threading.Event()
    _RELEASES.append(release)
    real = Store.still_owned

    def held(self: Store, *args: Any, **kwargs: Any) -> bool:
        parked.set()
        assert release.wait(20)
        return real(self, *args, **kwargs)

    rig.store.still_owned = held.__get__(rig.store)  # type: ignore[method-assign]
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "outcome", send_claimed(rig.ctx, ref, claim.version, claim.claim)))
    thread.start()
    assert parked.wait(10), "the attempt never reached its fence"

    def go() -> None:
        release.set()
        thread.join(20)
        del rig.store.still_owned  # the next attempts use the real fence

    return thread, result, go


# --- a second claim while the first attempt is handing over -------------------------------------

@pytest.mark.parametrize("answer", ["sent", "transient", "unknown"])
def test_a_claim_again_after_the_lease_ran_out_never_sends_twice(rig, answer):
    """The first attempt is at the gateway (past its fence) when its lease runs out and the
    pump claims the reminder again. The second claim's begin finds the first attempt's
    ledger: it sends nothing and puts the reminder back for just after that ledger expires.
    The first attempt's finish then records its outcome; nothing goes out twice, and an
    undelivered reminder is still on the schedule."""
    rig.book(rig.booking())
    thread, result = rig.park(PREP)
    second = expire_lease_and_claim_again(rig, PREP)
    assert send_claimed(rig.ctx, PREP, second.version, second.claim) == "requeued"
    ledger_ends = time.time() + rig.store.ledger_ttl(PREP)
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled" and s["lease"] is None, s
    assert s["due"] >= ledger_ends  # not before the first attempt's ledger expires
    rig.gate.answer(races.ANSWERS[answer])
    thread.join(20)
    assert result["outcome"] == races.RETURNED[answer]
    assert len(rig.gate.bodies) == 1
    s = rig.state(PREP)
    assert s["lease"] is None and s["dead"] is None, s
    if answer == "sent":
        assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
        assert s["due"] is None
        assert s["log"][-1]["result"] == "stale: recorded as sent"
        assert_no_claim(rig)
        return
    # Not delivered (or not known to be): still scheduled, due once the ledger is gone.
    assert s["record"]["status"] == "scheduled" and s["due"] >= ledger_ends, s
    assert s["log"][-1]["result"] == "stale"
    assert (s["ledger"] is not None) == (answer == "unknown"), s
    rig.store.redis.delete(rig.store.ledger_key(PREP))  # as if it expired
    rig.gate.reset()
    rig.gate.answer(200)
    third = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, third.version, third.claim) == "sent"
    assert len(rig.gate.bodies) == 2
    assert rig.state(PREP)["record"]["status"] == "sent"


def test_a_claim_again_that_begins_while_the_first_attempt_renders(rig):
    """The lease runs out while the first attempt renders; the second claim begins (and finds
    the first one's ledger). The first attempt's fence then finds another claim: nothing is
    sent, its ledger is freed, and the reminder stays on the schedule."""
    rig.book(rig.booking())
    _, result, go = parked_before_the_fence(rig, PREP)
    second = expire_lease_and_claim_again(rig, PREP)
    assert send_claimed(rig.ctx, PREP, second.version, second.claim) == "requeued"
    go()
    assert result["outcome"] == "dropped: overtaken before sending"
    assert rig.gate.bodies == []
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled" and s["due"] is not None, s
    assert (s["lease"], s["dead"], s["ledger"]) == (None, None, None), s
    rig.gate.answer(200)
    third = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, third.version, third.claim) == "sent"
    assert len(rig.gate.bodies) == 1


def test_a_claim_again_that_begins_after_the_first_attempt_gave_up(rig):
    """The lease runs out while the first attempt renders and the pump claims it again; the
    first attempt's fence finds the new claim and gives the ledger up; the second claim's
    begin then sends it, once."""
    rig.book(rig.booking())
    _, result, go = parked_before_the_fence(rig, PREP)
    second = expire_lease_and_claim_again(rig, PREP)
    go()
    assert result["outcome"] == "dropped: overtaken before sending"
    assert rig.store.redis.get(rig.store.ledger_key(PREP)) is None
    rig.gate.answer(200)
    assert send_claimed(rig.ctx, PREP, second.version, second.claim) == "sent"
    assert len(rig.gate.bodies) == 1
    s = rig.state(PREP)
    assert s["record"]["status"] == "sent" and s["ledger"] == "sent", s
    assert (s["due"], s["lease"]) == (None, None)
    assert [x["result"] for x in s["log"]] == ["stale", "ok"]


# --- a hold landing between the begin and the fence ---------------------------------------------

def test_new_medications_that_hold_the_booking_before_the_fence_send_nothing_until_released(
        hold_rig):
    """Isotretinoin is added while the attempt renders: the booking is held. The fence sends
    nothing; the reminder waits for the clinic's review (never sent while held), and goes
    once after the release."""
    rig = hold_rig
    doc = rig.booking()
    rig.book(doc)
    _, result, go = parked_before_the_fence(rig, PREP)
    # The same visit (a booking made again now could start a second later: the plan moved).
    held = copy.deepcopy(doc)
    held["medications"] = {"tretinoin": True, "isotretinoin_last_dose": (
        datetime.now(UTC) - timedelta(days=30)).date().isoformat()}
    assert rig.book(held)["status"] == "held"
    go()
    assert result["outcome"] == "dropped: overtaken before sending"
    assert rig.gate.bodies == []
    # Whatever the pump claims while the booking is held, nothing goes out.
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled" and s["due"] is not None, s  # put back
    claims = {c.ref: c for c in rig.store.claim_due(100, 8)}
    assert PREP in claims, claims  # (beside the hold's own notice to the patient)
    claim = claims[PREP]
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "dropped: booking held"
    assert rig.gate.bodies == []
    s = rig.state(PREP)
    assert s["record"]["status"] == "scheduled", s
    assert (s["due"], s["lease"], s["ledger"]) == (None, None, None), s
    # The clinic reviews and releases: the reminder is due again and goes once.
    booking = races.parse_booking(held, rig.catalog)
    now = datetime.now(UTC)
    planned = races.plan(booking, rig.catalog.protocols["race"], rig.catalog.clinics["rc"], now)
    rig.store.upsert(booking, planned, now, release=True)
    assert rig.state(PREP)["due"] is not None
    rig.gate.reset()
    rig.gate.answer(200)
    before = len(rig.gate.bodies)
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "sent"
    assert len(rig.gate.bodies) == before + 1


# --- a send-time rule applied to a booking the begin read before the clinic changed it ----------

def test_a_move_landing_before_an_expired_skip_does_not_lose_the_reminder(rig):
    """The reminder was late (a backlog) and its appointment has just begun: the attempt
    finds it expired and skips it. Meanwhile the clinic moves the appointment an hour on
    (the patient is running late). The reminder is due now in both plans, so its own version
    stays; only its expiry moves. The skip for the old appointment must not stand: the
    reminder goes back on the schedule and is sent for the new one."""
    rig.book(rig.booking(starts_in=timedelta(seconds=2)))
    assert rig.store.record(PREP)["status"] == "scheduled"  # late: due now, expires at start
    time.sleep(max(0.0, float(rig.store.record(PREP)["expires_epoch"]) - time.time()) + 0.2)
    real = rig.store.finish

    def finish(ref: str, attempt: Any, outcome: str, **kwargs: Any) -> str:
        if outcome == "skip":  # the begin read the old appointment; the move lands now
            rig.book(rig.booking(starts_in=timedelta(hours=1)))
        return real(ref, attempt, outcome, **kwargs)

    rig.store.finish = finish  # type: ignore[method-assign]
    claim = rig.claim_now(PREP)
    send_claimed(rig.ctx, PREP, claim.version, claim.claim)
    del rig.store.finish
    s = rig.state(PREP)
    assert s["record"]["version"] == claim.version  # its own version stayed
    assert float(s["record"]["expires_epoch"]) > time.time() + 3000  # the new appointment's
    assert s["record"]["status"] == "scheduled", (s["record"], s["log"])
    assert s["due"] is not None and s["due"] <= time.time(), s
    assert (s["lease"], s["ledger"]) == (None, None), s
    assert [(x["outcome"], x["result"]) for x in s["log"]] == [
        ("abandoned", "put back: the booking changed since the begin")]
    assert s["record"]["attempts"] == "0"
    metrics = rig.store.redis.hgetall(f"{rig.store.prefix}:metrics")
    assert not any(k.startswith("skipped|") for k in metrics), metrics
    rig.gate.answer(200)
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "sent"
    assert len(rig.gate.bodies) == 1


def _zone(offset: int) -> str:
    """The IANA zone of a whole-hour UTC offset (POSIX signs: Etc/GMT-5 is UTC+5)."""
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


def test_a_timezone_corrected_before_a_defer_does_not_leave_the_old_zones_opening(
        tmp_path, redis_client, gate):
    """The attempt finds the present moment outside the patient's send window (06:00-22:00
    their time) and defers to its next opening. Meanwhile the clinic corrects the patient's
    timezone: in the right one the window is open now. The reminder's own time is the same
    in both zones (its version stays); the deferral worked out in the wrong zone must not
    stand: the reminder goes back at once, and the next attempt sends it."""
    now = datetime.now(UTC)
    hour = now.hour + now.minute / 60
    found = None
    for old in range(-12, 15):
        for new in range(-12, 15):
            if not (5.5 <= (hour + old) % 24 < 22.5) and 7 <= (hour + new) % 24 < 21:
                # A visit hour whose reminder (2 h before) is well inside both windows.
                for at in range(24):
                    if all(7 <= (at - 2 + o) % 24 < 21 for o in (old, new)):
                        found = old, new, at
                        break
            if found:
                break
        if found:
            break
    assert found is not None
    old, new, at = found
    config = races.write_config(tmp_path / "config", gate.port, window=("06:00", "22:00"))
    settings = races.Settings(config_dir=config, templates_dir=races.ROOT / "templates",
                              lease_seconds=8, send_timeout_seconds=1, _env_file=None)
    catalog = races.Catalog.load(settings)
    store = Store(redis_client, races.PREFIX)
    rig = Rig(store, races.Context(settings, store, catalog, races.Renderer(
        catalog.templates_dir)), catalog, gate)
    starts = (now + timedelta(days=3)).replace(hour=at, minute=0, second=0, microsecond=0)

    def doc(zone: str) -> dict[str, Any]:
        d = rig.booking()
        d["starts_at"] = starts.isoformat()
        d["patient"]["timezone"] = zone
        return d

    rig.book(doc(_zone(old)))
    version = rig.store.record(PREP)["version"]
    real = rig.store.finish

    def finish(ref: str, attempt: Any, outcome: str, **kwargs: Any) -> str:
        if outcome == "defer":  # worked out in the old zone; the correction lands now
            rig.book(doc(_zone(new)))
        return real(ref, attempt, outcome, **kwargs)

    rig.store.finish = finish  # type: ignore[method-assign]
    claim = rig.claim_now(PREP)  # a retry or a backlog, due now
    send_claimed(rig.ctx, PREP, claim.version, claim.claim)
    del rig.store.finish
    s = rig.state(PREP)
    assert s["record"]["version"] == version, s["record"]  # its own time is the same
    assert s["record"]["status"] == "scheduled", s
    assert s["due"] is not None and s["due"] <= time.time(), (s["due"], time.time())
    assert (s["lease"], s["ledger"]) == (None, None), s
    gate.answer(200)
    claim = rig.claim_now(PREP)
    assert send_claimed(rig.ctx, PREP, claim.version, claim.claim) == "sent"
    assert len(gate.bodies) == 1
