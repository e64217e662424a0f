"""The send path's round trips and what its begin reads (worker/dispatch.py, worker/store.py
`begin_send`): an attempt is begin (one script: fence, opt-out, ledger, and the booking, its
document and the unsubscribe secret read in the same step) -> render -> the fence again
just before the hand-over (one script) -> send -> finish (one script).

Real Redis, a real SMTP server (aiosmtpd), a real HTTP SMS gateway, real Apprise. The races
are forced: the competing change lands while the attempt renders (after its begin read the
booking, before the hand-over), then the attempt goes on; the final state is asserted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.connection import AbstractConnection

from tests.conftest import ROOT
from tests.sinks import HttpSink, SmtpSink
from worker.catalog import Catalog
from worker.dispatch import Context, send_claimed
from worker.models import parse_booking
from worker.optout import contact_hash, read_token, unsubscribe_key
from worker.planner import plan
from worker.rendering import Renderer
from worker.secrets import SECRET_BYTES, secret_key
from worker.settings import Settings
from worker.store import Store

PREFIX = "fast"
PROTOCOL = """
name = "Fast path protocol"
[[steps]]
id = "stop"
offset = "-3h"
channels = ["email", "sms"]
template = "stop-retinoids"
only_if_any = ["tretinoin"]
late = "send"
[[steps]]
id = "prep"
offset = "-2h"
channels = ["email", "sms"]
template = "day-before"
late = "send"
[advice]
spf = 30
clean_skin_on_the_day = true
ask_cold_sore_or_infection = true
retinoids_sensitise = true
no_retinoid_on_the_day = true
retinoid_pause_min_days = 5
gentle_care = true
"""


class Trips:
    """Counts the Redis round trips made within (each write of commands to a socket)."""

    def __init__(self) -> None:
        self.count = 0
        self._real = AbstractConnection.send_packed_command

    def __enter__(self) -> Trips:
        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            self._real(conn, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AbstractConnection.send_packed_command = self._real  # type: ignore[method-assign]


class DuringRender(Renderer):
    """A renderer that runs `change` (once) as it starts rendering: after the attempt's begin
    read the booking, before its message is handed over."""

    change: Callable[[], None] | None = None

    def render(self, **kwargs: Any) -> Any:
        change, self.change = self.change, None
        if change is not None:
            change()
        return super().render(**kwargs)


class Rig:
    def __init__(self, folder: Path, redis_client: Any, smtp: SmtpSink, sms: HttpSink) -> None:
        (folder / "protocols").mkdir(parents=True)
        (folder / "clinics").mkdir()
        (folder / "protocols" / "fast.toml").write_text(PROTOCOL, encoding="utf-8")
        (folder / "clinics" / "fc.toml").write_text(f"""
name = "Fast Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[sms]  # several SMS minutes apart: not a test of the frequency cap
max_per_day = 10
max_per_week = 70
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp.port}?from=clinic@fc.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms.port}/sms?:to={{to}}"
""", encoding="utf-8")
        # No REMINDERS_UNSUBSCRIBE_SECRET: links are signed with the server secret in Redis.
        self.settings = Settings(config_dir=folder, templates_dir=ROOT / "templates",
                                 public_url="https://reminders.example", lease_seconds=30,
                                 send_timeout_seconds=3, _env_file=None)
        self.catalog = Catalog.load(self.settings)
        self.store = Store(redis_client, PREFIX)
        self.renderer = DuringRender(self.catalog.templates_dir)
        self.ctx = Context(settings=self.settings, store=self.store, catalog=self.catalog,
                           renderer=self.renderer)
        self.smtp, self.sms = smtp, sms

    def book(self, booking_id: str = "F-1", *, email: str = "Ana@Example.com",
             phone: str = "+34600111222", days: float = 2, tretinoin: bool = True,
             starts: datetime | None = None) -> None:
        starts = starts or (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)
        doc = {"clinic": "fc", "booking_id": booking_id, "treatment": "fast",
               "starts_at": starts.isoformat(),
               "patient": {"name": "Ana López", "email": email, "phone": phone,
                           "timezone": "UTC", "locale": "en", "channels": ["sms", "email"]},
               "medications": {"tretinoin": tretinoin}}
        booking = parse_booking(doc, self.catalog)
        now = datetime.now(UTC)
        self.store.upsert(booking, plan(booking, self.catalog.protocols["fast"],
                                        self.catalog.clinics["fc"], now), now)

    def send(self, ref: str) -> str:
        self.store.redis.zadd(self.store.due_key, {ref: 0})
        (claim,) = [c for c in self.store.claim_due(100, 30) if c.ref == ref]
        return send_claimed(self.ctx, ref, claim.version, claim.claim)

    def delivered(self) -> int:
        return len(self.smtp.snapshot()) + len(self.sms.snapshot())


@pytest.fixture
def rig(tmp_path, redis_client) -> Iterator[Rig]:
    smtp, sms = SmtpSink().start(), HttpSink().start()
    yield Rig(tmp_path / "config", redis_client, smtp, sms)
    smtp.stop()
    sms.stop()


def link_of(message: Any) -> str:
    return str(message.raw["List-Unsubscribe"])[1:-1].rsplit("/", 1)[1]


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("opt_outs", [False, True])
def test_an_attempt_takes_three_round_trips_on_each_channel(rig, opt_outs):
    """begin, the fence before the hand-over, finish: nothing else on the wire. With opt-outs
    at the clinic, the begin checks them in the same script (an ASCII address is normalised
    there, as Python would: no read of the document first)."""
    for n in range(3):
        rig.book(f"F-{n}")
    if opt_outs:
        rig.store.opt_out("fc", "email", "someone@else.example", "STOP at 10:00")
        rig.store.opt_out("fc", "sms", "+34699999999", "STOP at 10:00")
    assert rig.send("fc/F-0/prep:email") == "sent"  # warm: scripts loaded, texts read
    for n, channel in ((1, "email"), (2, "sms")):
        ref = f"fc/F-{n}/prep:{channel}"
        rig.store.redis.zadd(rig.store.due_key, {ref: 0})
        (claim,) = [c for c in rig.store.claim_due(100, 30) if c.ref == ref]
        with Trips() as trips:
            assert send_claimed(rig.ctx, ref, claim.version, claim.claim) == "sent"
        assert trips.count == 3, (channel, trips.count)
    assert rig.delivered() == 3


def test_an_ascii_address_opted_out_in_another_case_is_refused_by_one_begin(rig):
    """The begin script normalises an ASCII address itself ("Ana@Example.com" is opted out
    as "ana@example.com"): refused in one script run, never sent."""
    rig.book()
    refs = ["fc/F-1/prep:email", "fc/F-1/prep:sms"]
    rig.store.redis.zadd(rig.store.due_key, dict.fromkeys(refs, 0))
    claims = rig.store.claim_due(100, 30)  # claimed by the pump before the opt-outs
    assert sorted(c.ref for c in claims) == refs
    rig.store.opt_out("fc", "email", "ana@example.com", "unsubscribed at 10:00")
    rig.store.opt_out("fc", "sms", "+34600111222", "STOP at 10:00")
    runs: list[str] = []
    real = rig.store._begin

    def counted(**kwargs: Any) -> Any:
        runs.append(str(real(**kwargs)))
        return runs[-1]

    rig.store._begin = counted  # type: ignore[method-assign]
    for claim in claims:
        assert send_claimed(rig.ctx, claim.ref, claim.version, claim.claim) == \
            "dropped: opted out"
    assert runs == ["opted out", "opted out"]
    assert rig.store.record("fc/F-1/prep:email")["reason"] == "opted_out: unsubscribed at 10:00"
    assert rig.delivered() == 0


def test_the_begin_reads_the_booking_as_its_fence_left_it(rig):
    rig.book()
    ref = "fc/F-1/prep:email"
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    (claim,) = rig.store.claim_due(100, 30)
    begun = rig.store.begin_send(ref, claim.version, claim.claim, "tok", 30000,
                                 secret="unsubscribe")
    assert begun == "ok" and begun.read
    assert begun.fields == rig.store.redis.hgetall(rig.store.booking_key("fc", "F-1"))
    assert begun.doc == rig.store.redis.get(rig.store.doc_key("fc", "F-1"))
    assert begun.secret is None  # not made yet: the attempt makes it (worker/secrets.py)
    record, booking = rig.store.begun_record(ref, begun)
    assert (record, booking) == rig.store.record_and_booking(ref)
    assert record["attempts"] == "1" and record["status"] == "sending"
    # Within `reading`, the plan dates of that booking come from the begin's read: no round
    # trip; another booking's, and any outside it, are read from Redis.
    expected = rig.store.plan_dates("fc", "F-1")
    assert set(expected) == {"stop", "prep"}
    rig.book("F-2")
    with rig.store.reading(ref, begun):
        with Trips() as trips:
            assert rig.store.plan_dates("fc", "F-1") == expected
        assert trips.count == 0
        with Trips() as trips:
            rig.store.plan_dates("fc", "F-2")
        assert trips.count == 1
    with Trips() as trips:
        assert rig.store.plan_dates("fc", "F-1") == expected
    assert trips.count == 1


# --- the unsubscribe secret: read with the begin, never stale -------------------------------

def test_links_follow_the_stored_secret_even_when_it_changes(rig):
    """The begin reads the secret as stored (no round trip of its own, and nothing cached
    that could go stale): after the key is replaced (a Redis wiped, a new secret made by
    another process), the next email's link is signed with the new one, which the
    unsubscribe route (`unsubscribe_key`) checks with."""
    rig.book("F-1")
    rig.book("F-2", email="eva@example.com")
    assert rig.send("fc/F-1/prep:email") == "sent"
    first = unsubscribe_key(rig.settings, rig.store.redis, PREFIX)
    assert len(first) == SECRET_BYTES
    named = read_token(first, link_of(rig.smtp.snapshot()[0]))
    assert named is not None and named.contact_hash == contact_hash(first, "email",
                                                                     "ana@example.com")
    # The route finds the address behind the link (noted by the fence's script).
    assert rig.store.unsubscribe_address("fc", named.contact_hash) == (
        "email", "ana@example.com")
    rig.store.redis.delete(secret_key(PREFIX, "unsubscribe"))
    second = unsubscribe_key(rig.settings, rig.store.redis, PREFIX)  # made anew
    assert second != first
    assert rig.send("fc/F-2/prep:email") == "sent"
    link = link_of(rig.smtp.snapshot()[1])
    assert read_token(first, link) is None
    assert read_token(second, link) is not None


# --- changes landing between the begin and the hand-over: forced -----------------------------

def test_a_move_landing_after_the_begin_read_the_booking_sends_nothing(rig):
    rig.book()
    ref = "fc/F-1/prep:sms"
    rig.renderer.change = lambda: rig.book(days=9)  # the appointment moves a week later
    assert rig.send(ref) == "dropped: overtaken before sending"
    record = rig.store.record(ref)
    assert record["status"] == "scheduled" and record["version"] == "2", record
    due = rig.store.redis.zscore(rig.store.due_key, ref)
    assert due is not None and due > datetime.now(UTC).timestamp() + 6 * 86400
    assert rig.store.redis.zscore(rig.store.lease_key, ref) is None
    assert rig.store.redis.get(rig.store.ledger_key(ref)) is None
    assert [(e["outcome"], e["result"]) for e in rig.store.attempts(ref)] == [
        ("abandoned", "stale")]
    assert rig.delivered() == 0


def test_a_step_removed_after_the_begin_read_the_booking_sends_nothing(rig):
    rig.book()
    ref = "fc/F-1/stop:email"
    rig.renderer.change = lambda: rig.book(tretinoin=False)  # new medications
    assert rig.send(ref) == "dropped: overtaken before sending"
    record = rig.store.record(ref)
    assert record["status"] == "cancelled", record
    assert record["reason"] == "no longer in the plan after a change"
    for key in (rig.store.due_key, rig.store.lease_key, rig.store.dead_key):
        assert rig.store.redis.zscore(key, ref) is None
    assert rig.delivered() == 0


@pytest.mark.parametrize("channel", ["email", "sms"])
def test_an_opt_out_landing_after_the_begin_read_the_booking_sends_nothing(rig, channel):
    rig.book()
    ref = f"fc/F-1/prep:{channel}"
    contact = "ana@example.com" if channel == "email" else "+34600111222"
    rig.renderer.change = lambda: rig.store.opt_out("fc", channel, contact, "STOP at 10:00")
    assert rig.send(ref) == "dropped: overtaken before sending"
    assert rig.store.record(ref)["status"] == "scheduled"  # back: the begin's rule decides
    assert rig.store.redis.zscore(rig.store.due_key, ref) is not None
    assert rig.send(ref) == "dropped: opted out"
    record = rig.store.record(ref)
    assert record["status"] == "skipped" and record["reason"] == "opted_out: STOP at 10:00"
    for key in (rig.store.due_key, rig.store.lease_key, rig.store.dead_key):
        assert rig.store.redis.zscore(key, ref) is None
    assert rig.store.redis.get(rig.store.ledger_key(ref)) is None
    assert rig.delivered() == 0


def test_a_cancel_landing_after_the_begin_read_the_booking_sends_nothing(rig):
    rig.book()
    ref = "fc/F-1/prep:email"
    rig.renderer.change = lambda: rig.store.cancel("fc", "F-1", datetime.now(UTC))
    assert rig.send(ref) == "dropped: overtaken before sending"
    assert rig.store.record(ref)["status"] == "cancelled"
    assert rig.store.redis.zscore(rig.store.lease_key, ref) is None
    assert rig.delivered() == 0


@pytest.mark.parametrize(("channel", "old", "new", "change"), [
    ("sms", "+34600111222", "+34600999888", {"phone": "+34600999888"}),
    ("email", "old@example.com", "new@example.com", {"email": "new@example.com"}),
])
def test_a_contact_corrected_after_the_begin_goes_to_the_new_address_only(
        rig, channel, old, new, change):
    """The clinic corrects the patient's phone or email while an attempt renders: the
    reminder's own version is unchanged (same step, same time), only the booking's. The
    fence before the hand-over sees the booking's version: nothing goes to the old address,
    the reminder is back on the schedule at once, and the next attempt sends to the new one."""
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)  # kept
    rig.book(email=old if channel == "email" else "ana@example.com", starts=starts)
    ref = f"fc/F-1/prep:{channel}"
    before = rig.store.record(ref)["version"]
    rig.renderer.change = lambda: rig.book(**change, starts=starts)
    assert rig.send(ref) == "dropped: overtaken before sending"
    record = rig.store.record(ref)
    assert record["status"] == "scheduled" and record["version"] == before, record
    due = rig.store.redis.zscore(rig.store.due_key, ref)
    # Due now, not a lease later: on Redis's clock as this process estimates it
    # (worker/clock.py), which may be a fraction of a millisecond ahead of this host's.
    assert due is not None and due <= datetime.now(UTC).timestamp() + 1
    for key in (rig.store.lease_key, rig.store.dead_key):
        assert rig.store.redis.zscore(key, ref) is None
    assert rig.store.redis.get(rig.store.ledger_key(ref)) is None
    assert [(e["outcome"], e["result"]) for e in rig.store.attempts(ref)] == [
        ("abandoned", "ok")]
    assert rig.delivered() == 0
    assert rig.send(ref) == "sent"
    sink = rig.smtp if channel == "email" else rig.sms
    sent_to = [str(m.to) for m in sink.snapshot()]
    assert len(sent_to) == 1 and new in sent_to[0] and old not in sent_to[0], sent_to
    assert rig.store.record(ref)["status"] == "sent"


@pytest.mark.parametrize("nil", [None, False])
def test_a_script_nil_is_none_whichever_way_the_server_sends_it(nil):
    """Lua's false (a missing document, a secret not made yet) reaches a RESP3 client as None
    from Redis 7.0 and as False from servers that map it to RESP3's boolean."""
    from worker.store import _BeginScript

    fields = ["status", "scheduled", "prep:sms", "P|1"]
    begun = _BeginScript(lambda **_: ["ok", fields, nil, nil])(keys=[], args=[])
    assert begun == "ok" and begun.read and begun.fields == {"status": "scheduled",
                                                             "prep:sms": "P|1"}
    assert begun.doc is None and begun.secret is None
    changed = _BeginScript(lambda **_: ["contacts changed", [], nil])(keys=[], args=[])
    assert changed == "contacts changed" and not changed.read and changed.doc is None
    assert _BeginScript(lambda **_: ["opted out"])(keys=[], args=[]) == "opted out"


@pytest.mark.parametrize(("channel", "old", "new"), [
    ("sms", "+34600111222", "+34600999888"),
    ("email", "old@example.com", "new@example.com"),
])
def test_an_old_address_opted_out_as_the_clinic_corrects_it_leaves_the_new_one_served(
        rig, channel, old, new):
    """While an attempt renders, the clinic corrects the address and the old address's
    owner opts out (STOP from the wrong number). Nothing goes to the old address, and the
    reminder is not skipped for the old address's opt-out: the next attempt sends it to the
    new one (found by review)."""
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)  # kept
    rig.book(email=old if channel == "email" else "ana@example.com", starts=starts)
    ref = f"fc/F-1/prep:{channel}"

    def change() -> None:
        rig.book(**({"phone": new} if channel == "sms" else {"email": new}), starts=starts)
        rig.store.opt_out("fc", channel, old, "the old address's owner opted out")

    rig.renderer.change = change
    assert rig.send(ref) == "dropped: overtaken before sending"
    assert rig.delivered() == 0
    assert rig.store.record(ref)["status"] == "scheduled"
    assert rig.send(ref) == "sent"
    sink = rig.smtp if channel == "email" else rig.sms
    sent_to = [str(m.to) for m in sink.snapshot()]
    assert len(sent_to) == 1 and new in sent_to[0] and old not in sent_to[0], sent_to
    assert rig.store.record(ref)["status"] == "sent"


def test_redis_replies_are_parsed_in_c(redis_server):
    """redis-py reads the service's replies with hiredis (a dependency): its pure-Python
    parser costs the send path about a quarter of its instructions."""
    from redis._parsers import _HiredisParser

    from worker.store import connect

    client = connect(redis_server.url)
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(connection._parser, _HiredisParser), (
            "hiredis is not installed in this environment: `make .venv/.installed-dev`")
        assert client.ping()
    finally:
        client.connection_pool.release(connection)
        client.close()
