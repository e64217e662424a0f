"""A cancel racing the pause message ("stop tretinoin"), forced with a hook between the
cancel's read and its script: the pause SMS is claimed and sent in that gap. The cancel
must see the change (its check is the hash as read, notices or not) and add the
"you may resume" notice. Real Redis, real Apprise, a real HTTP gateway
(tests/test_send_races.py's rig)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests import test_send_races as races
from tests.conftest import ROOT
from tests.test_send_races import STOP, Rig, write_config
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

gate = races.gate  # the rig's gateway


@pytest.fixture
def rig(tmp_path, redis_client, gate) -> Rig:
    """tests/test_send_races.py's rig, its "stop" step the protocol's pause message."""
    config = write_config(tmp_path / "config", gate.port)
    protocol = config / "protocols" / "race.toml"
    text = protocol.read_text(encoding="utf-8")
    protocol.write_text(text.replace('template = "stop-retinoids"\n',
                                     'template = "stop-retinoids"\npause = true\n', 1),
                        encoding="utf-8")
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=8,
                        send_timeout_seconds=1, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    assert catalog.protocols["race"].pause_step() is not None
    store = Store(redis_client, races.PREFIX)
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


def _send_now(rig: Rig, ref: str) -> str:
    rig.gate.answer(200)  # the gateway answers at once
    claim = rig.claim_now(ref)
    return send_claimed(rig.ctx, ref, claim.version, claim.claim)


def test_the_pause_sms_sent_between_the_cancels_read_and_its_write_gets_a_notice(rig):
    rig.book(rig.booking())
    real = rig.store._cancel_notices
    reads: list[tuple[str, str]] = []

    def racing(clinic, booking_id, now):
        out = real(clinic, booking_id, now)
        reads.append((out[0], out[1]))
        if len(reads) == 1:  # the first read saw nothing sent: the SMS goes now
            assert out[1] == ""  # no notice planned by that read
            assert _send_now(rig, STOP) == "sent"
        return out

    rig.store._cancel_notices = racing  # type: ignore[method-assign]
    timeline = rig.store.cancel("rc", "R-1", datetime.now(UTC))
    assert len(reads) == 2, "the cancel did not read again after the send"
    assert reads[0][0] != ""  # a scheduled booking is always checked
    statuses = {(r["step"], r["channel"]): r["status"] for r in timeline["reminders"]}
    assert statuses[("stop", "sms")] == "sent"
    assert statuses[("prep", "sms")] == "cancelled"
    notices = [k for k in rig.store.redis.hkeys(rig.store.booking_key("rc", "R-1"))
               if k.startswith("cancelled#")]
    assert notices == ["cancelled#1:sms"], notices
    # The notice is due and goes: the patient is told they may resume.
    assert rig.store.redis.zscore(rig.store.due_key, "rc/R-1/cancelled#1:sms") is not None
    rig.gate.reset()
    assert _send_now(rig, "rc/R-1/cancelled#1:sms") == "sent"
    assert len(rig.gate.bodies) == 2


def test_a_cancel_with_nothing_changed_in_between_applies_at_once(rig):
    rig.book(rig.booking())
    calls = []
    real = rig.store._cancel_notices

    def counting(*args):
        calls.append(1)
        return real(*args)

    rig.store._cancel_notices = counting  # type: ignore[method-assign]
    timeline = rig.store.cancel("rc", "R-1", datetime.now(UTC))
    assert len(calls) == 1 and timeline["status"] == "cancelled"
    assert not [k for k in rig.store.redis.hkeys(rig.store.booking_key("rc", "R-1"))
                if k.startswith("cancelled#")]


def test_the_pause_sms_sent_inside_a_moves_reconcile_gets_the_move_notice(rig):
    """The same gap on the move path: the upsert's write checks the whole hash it read, so
    the pause SMS sent between its read and its write makes it reconcile again and add the
    "moved" notice and the pause message again for the new date."""
    from datetime import timedelta

    rig.book(rig.booking())
    calls: list[int] = []
    real = rig.store._reconcile

    def reconcile_with_the_pause_going_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            assert _send_now(rig, STOP) == "sent"
        return real(*args, **kwargs)

    rig.store._reconcile = reconcile_with_the_pause_going_out  # type: ignore[method-assign]
    rig.book(rig.booking(starts_in=timedelta(days=9)))
    assert len(calls) == 2, "the move did not read again after the send"
    keys = set(rig.store.redis.hkeys(rig.store.booking_key("rc", "R-1")))
    assert "rescheduled#1:sms" in keys and "repause#1:sms" in keys, sorted(keys)
    assert rig.store.record(STOP)["status"] == "sent"


@pytest.mark.parametrize("before", ["missing", "cancelled"])
def test_a_cancel_read_before_the_booking_was_made_live_still_tells_what_went_out(rig, before):
    """A cancel of a booking that does not exist yet (or is cancelled) reads it so; before
    its script runs, the clinic creates (or books again) the booking and its pause SMS goes
    out. The cancel then applies to that live booking: it must read it again and add the
    "you may resume" notice, as for a booking it read scheduled (review: its script applied
    unfenced, and the patient told to stop tretinoin never heard the visit was off)."""
    if before == "cancelled":
        rig.book(rig.booking())
        rig.store.cancel("rc", "R-1", datetime.now(UTC))
        assert rig.store.redis.zrange(rig.store.due_key, 0, -1) == []
    real = rig.store._cancel_notices
    reads: list[str] = []

    def racing(clinic, booking_id, now):
        out = real(clinic, booking_id, now)
        reads.append(out[1])
        if len(reads) == 1:  # read missing (or cancelled): now it is booked and the SMS goes
            assert out[1] == ""
            assert rig.book(rig.booking())["status"] == "scheduled"
            assert _send_now(rig, STOP) == "sent"
        return out

    rig.store._cancel_notices = racing  # type: ignore[method-assign]
    timeline = rig.store.cancel("rc", "R-1", datetime.now(UTC))
    assert len(reads) == 2, "the cancel did not read again after the booking was made"
    assert timeline["status"] == "cancelled"
    statuses = {r["id"]: r["status"] for r in timeline["reminders"]}
    assert statuses["stop:sms"] == "sent"
    assert statuses["prep:sms"] == "cancelled"
    seq = 2 if before == "cancelled" else 1
    notice = f"cancelled#{seq}:sms"
    assert statuses.get(notice) == "scheduled", statuses
    due = [m for m in rig.store.redis.zrange(rig.store.due_key, 0, -1)]
    assert due == [f"rc/R-1/{notice}"], due  # the notice alone: nothing else of it goes
    version = int(rig.store.redis.hget(rig.store.booking_key("rc", "R-1"), "version"))
    assert timeline["version"] == version
    sent = len(rig.gate.bodies)
    rig.gate.reset()
    assert _send_now(rig, f"rc/R-1/{notice}") == "sent"
    assert len(rig.gate.bodies) == sent + 1
    assert "resume" in str(rig.gate.bodies[-1]), rig.gate.bodies[-1]
