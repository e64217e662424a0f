"""Layout 1 of the schedule store, for tests of `reminders migrate` (worker/migrate.py).

Vendored from worker/store.py as it was before commit 85d0ea5 (layout 2), trimmed to the
writers (upsert, claim, begin, finish, requeue, cancel, replay, purge) and `timeline`, so
the tests write layout-1 data exactly as that version did. Do not change its behaviour.


Keys, all under the configured prefix P:
  P:due                    ZSET  reminder ref -> due instant (epoch seconds)
  P:lease                  ZSET  reminder ref -> lease expiry (claimed by a pump, not yet done)
  P:dead                   ZSET  reminder ref -> when it was dead-lettered
  P:b:<clinic>/<booking>   HASH  the booking: doc (JSON), status, version, hold_reason,
                                 window (send window, minutes), keep_until, times
  P:k:<clinic>/<booking>   SET   the booking's reminder keys
  P:r:<ref>                HASH  one reminder: step, channel, due_epoch, expires_epoch, status,
                                 version, claim, tok (attempt token), attempts, sent_at, ...
  P:a:<ref>                LIST  one JSON line per delivery attempt (stale ones too)
  P:ledger:<ref>           STR   send ledger: a token while sending (expires), "sent" after
  P:bookings:<clinic>      ZSET  the clinic's booking ids -> when their keys expire

A reminder ref is "<clinic>/<booking_id>/<key>"; neither id may contain "/".

Every change of a reminder's state is one atomic step: a Lua script (claim, begin,
finish, requeue, cancel, replay, purge) or a MULTI under WATCH of every key read
(upsert). Every finish is fenced by the reminder's version and claim and the attempt's
token: an attempt the clinic's change overtook only adds to the attempt log, except that
a delivery that did happen is always recorded. Retention: a booking's keys expire
`retention` after its last reminder; a booking with a dead letter is kept until the dead
letter is replayed or purged.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from tests.layout1_reconcile import reconcile
from worker.errors import NotFound
from worker.models import Booking, utc_iso
from worker.planner import Plan
from worker.status import PENDING, TERMINAL, Status, lua_prelude

ATTEMPT_LOG_MAX = 50
IN_FLIGHT_MARGIN = 1.0  # seconds past an in-flight attempt's ledger expiry before trying again

# Shared by every script: the status names, and the retention rule for one booking.
_PRELUDE = (
    lua_prelude()
    + """
local function is_pending(st)
  return st == ST_SCHEDULED or st == ST_SENDING or st == ST_RETRYING
end
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- Expire every key of one booking at `at` (epoch seconds), or keep them all while one of
-- its reminders is a dead letter. A ledger entry still held by an attempt keeps its TTL.
local function keep_booking(prefix, clinic, booking_id, at)
  local base = clinic .. '/' .. booking_id
  local bkey, kkey = prefix .. ':b:' .. base, prefix .. ':k:' .. base
  local refs = {}
  local dead = false
  for _, k in ipairs(redis.call('SMEMBERS', kkey)) do
    local ref = base .. '/' .. k
    table.insert(refs, ref)
    if redis.call('ZSCORE', prefix .. ':dead', ref) then dead = true end
  end
  local stored = tonumber(redis.call('HGET', bkey, 'keep_until') or '0')
  if stored > at then at = stored end
  at = math.ceil(at)
  redis.call('HSET', bkey, 'keep_until', tostring(at))
  local function apply(key)
    if dead then redis.call('PERSIST', key) else redis.call('EXPIREAT', key, at) end
  end
  apply(bkey)
  apply(kkey)
  for _, ref in ipairs(refs) do
    apply(prefix .. ':r:' .. ref)
    apply(prefix .. ':a:' .. ref)
    local lkey = prefix .. ':ledger:' .. ref
    if redis.call('GET', lkey) == 'sent' then apply(lkey) end
  end
  redis.call('ZADD', prefix .. ':bookings:' .. clinic, dead and '+inf' or at, booking_id)
end
-- After one reminder's finish. The common case: the booking's expiry already reaches `at`
-- and no dead letter keeps it, so only this reminder's keys (its attempt log may be new)
-- need it. Otherwise the whole booking is done again.
local function keep_reminder(prefix, clinic, booking_id, ref, at)
  local bkey = prefix .. ':b:' .. clinic .. '/' .. booking_id
  local stored = tonumber(redis.call('HGET', bkey, 'keep_until') or '0')
  if stored < at or redis.call('TTL', bkey) < 0 or redis.call('ZSCORE', prefix .. ':dead', ref)
  then
    keep_booking(prefix, clinic, booking_id, at)
    return
  end
  redis.call('EXPIREAT', prefix .. ':r:' .. ref, stored)
  redis.call('EXPIREAT', prefix .. ':a:' .. ref, stored)
  local lkey = prefix .. ':ledger:' .. ref
  if redis.call('GET', lkey) == 'sent' then redis.call('EXPIREAT', lkey, stored) end
end
"""
)

# Claim due reminders: one atomic step with Redis's own clock. Expired leases (a pump
# that died after claiming, a worker killed mid-send) are claimed again.
_CLAIM = """
local due_key, lease_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local limit, lease_seconds, rprefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
-- Run twice with the same run key (a client retry after a lost reply): the same answer,
-- so no claim is left leased with no task.
local done = redis.call('GET', run_key)
if done then return cjson.decode(done) end
local now = redis_now()
local lease_until = now + lease_seconds
local out = {}
local function claim(ref)
  local rkey = rprefix .. ref
  if not is_pending(redis.call('HGET', rkey, 'status')) then return end
  local claim_no = redis.call('HINCRBY', rkey, 'claim', 1)
  redis.call('HSET', rkey, 'status', ST_SENDING)
  redis.call('ZADD', lease_key, lease_until, ref)
  table.insert(out, {ref, redis.call('HGET', rkey, 'version'), tostring(claim_no)})
end
local expired = redis.call('ZRANGEBYSCORE', lease_key, '-inf', now, 'LIMIT', 0, limit)
for _, ref in ipairs(expired) do
  redis.call('ZREM', lease_key, ref)
  claim(ref)
end
if #out < limit then
  local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, limit - #out)
  for _, ref in ipairs(due) do
    redis.call('ZREM', due_key, ref)
    claim(ref)
  end
end
redis.call('SET', run_key, cjson.encode(out), 'EX', 60)
return out
"""

# Fence the task and take the send ledger in one step; idempotent for the same token.
# Returns "ok" or why the task is dropped. A dropped task whose claim still owns the
# reminder settles it: nothing is left `sending` without an owner.
_BEGIN_SEND = """
local rkey, bkey, lkey, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local version, claim, token, ledger_ms, ref = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local r = redis.call('HMGET', rkey, 'status', 'version', 'claim', 'tok')
local status = r[1]
if status == false then return 'gone' end
local ledger = redis.call('GET', lkey)
if r[4] == token and ledger == token and status == ST_SENDING then return 'ok' end
if r[2] ~= version then return 'version moved' end
if r[3] ~= claim then return 'stale claim' end
if status ~= ST_SENDING then return 'status ' .. status end
local booking = redis.call('HGET', bkey, 'status')
if booking ~= ST_SCHEDULED then
  redis.call('ZREM', lease_key, ref)
  if booking == ST_HELD then
    -- Back to waiting, outside the due set: the clinic's release schedules it again.
    redis.call('HSET', rkey, 'status', ST_SCHEDULED)
  else
    booking = booking or 'gone'
    redis.call('HSET', rkey, 'status', ST_CANCELLED, 'reason', 'booking ' .. booking)
  end
  return 'booking ' .. tostring(booking)
end
if ledger == 'sent' then
  redis.call('ZREM', lease_key, ref)
  redis.call('HSET', rkey, 'status', ST_SENT)
  return 'already sent'
end
if ledger then return 'in flight' end
redis.call('SET', lkey, token, 'PX', ledger_ms)
redis.call('HSET', rkey, 'tok', token)
redis.call('HINCRBY', rkey, 'attempts', 1)
return 'ok'
"""

# Finish an attempt: sent, retry, unknown, failed, defer (outside the send window) or skip
# (expired). Fenced: only the attempt that still owns the reminder (status sending, same
# version, claim and token) changes its state. A stale attempt adds to the attempt log;
# if it delivered, the delivery is recorded: as the reminder's outcome when the plan did
# not change it (or no longer wanted it: it went out all the same), else as `sent_at` /
# `sent_version` beside the new plan. Repeating a finish with the same token is a no-op.
_FINISH = """
local rkey, lkey, due_key, lease_key, dead_key, akey =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, ref, version, claim, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local score, retention, entry, log_max = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9]
local prefix, clinic, booking_id, margin = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
-- What the attempt sent: when, and which planned time and template its words were for.
local sent_at, sent_planned, sent_template = ARGV[14], ARGV[15], ARGV[16]
local now = redis_now()
local r = redis.call('HMGET', rkey, 'status', 'version', 'claim', 'tok', 'fin', 'planned_epoch',
  'template')
local status = r[1]
local owner = redis.call('GET', lkey) == token
if status == false then
  if owner then redis.call('DEL', lkey) end
  return 'gone'
end
if r[5] == token then return 'repeated' end
local same_version = r[2] == version
-- The plan changed, but what it wants now is what went out (a cancel undone, a move undone).
local same_words = r[6] == sent_planned and r[7] == sent_template
local current = status == ST_SENDING and same_version and r[3] == claim and r[4] == token
local function set_fields()
  for i = 17, #ARGV, 2 do redis.call('HSET', rkey, ARGV[i], ARGV[i + 1]) end
end
local result
if outcome == 'sent' and status == ST_SENT then
  result = 'already recorded as sent'
elseif outcome == 'sent' and (same_version or same_words or not is_pending(status)) then
  set_fields()
  redis.call('HSET', rkey, 'status', ST_SENT, 'sent_version', version)
  if not same_version then
    redis.call('HSET', rkey, 'reason',
      'sent by an attempt for version ' .. version .. ' while the booking was being changed')
  end
  redis.call('SET', lkey, 'sent')
  redis.call('ZREM', due_key, ref)
  redis.call('ZREM', lease_key, ref)
  redis.call('ZREM', dead_key, ref)
  result = current and 'ok' or 'stale: recorded as sent'
elseif outcome == 'sent' then
  -- The clinic moved it meanwhile: the delivery is history, the new plan decides what next.
  redis.call('HSET', rkey, 'sent_at', sent_at, 'sent_version', version)
  if owner then redis.call('DEL', lkey) end
  result = 'stale: delivery recorded beside the new plan'
elseif current then
  redis.call('ZREM', lease_key, ref)
  set_fields()
  if outcome == 'retry' or outcome == 'defer' or outcome == 'abandon' then
    if owner then redis.call('DEL', lkey) end
    redis.call('HSET', rkey, 'status', outcome == 'retry' and ST_RETRYING or ST_SCHEDULED,
      'due_epoch', tostring(score))
    redis.call('ZADD', due_key, score, ref)
    if outcome ~= 'retry' then redis.call('HINCRBY', rkey, 'attempts', -1) end
  elseif outcome == 'unknown' then
    -- It may have reached the provider: the ledger stays until it expires; retry after.
    local ttl = redis.call('PTTL', lkey)
    local at = now + math.max(ttl, 0) / 1000 + margin
    if score > at then at = score end
    redis.call('HSET', rkey, 'status', ST_RETRYING, 'due_epoch', tostring(at))
    redis.call('ZADD', due_key, at, ref)
  elseif outcome == 'failed' then
    if owner then redis.call('DEL', lkey) end
    redis.call('HSET', rkey, 'status', ST_FAILED)
    redis.call('ZADD', dead_key, now, ref)
  elseif outcome == 'skip' then
    if owner then redis.call('DEL', lkey) end
    redis.call('HSET', rkey, 'status', ST_SKIPPED)
    redis.call('HINCRBY', rkey, 'attempts', -1)
  end
  result = 'ok'
else
  -- Overtaken by the clinic's change or by another claim: only the log changes. An unknown
  -- outcome keeps the ledger until it expires, whoever owns the reminder now.
  if owner and outcome ~= 'unknown' then redis.call('DEL', lkey) end
  result = 'stale'
end
redis.call('HSET', rkey, 'fin', token)
local line = cjson.decode(entry)
line['result'] = result
redis.call('RPUSH', akey, cjson.encode(line))
redis.call('LTRIM', akey, -tonumber(log_max), -1)
keep_reminder(prefix, clinic, booking_id, ref, now + retention)
return result
"""

# Hand a leased reminder back to the due set, only if it is still being sent under the given
# claim: once its attempt finished (sent, retrying, dead-lettered) or it was claimed again,
# there is nothing to hand back. Returns 1 if handed back.
_REQUEUE = """
local rkey, lease_key, due_key = KEYS[1], KEYS[2], KEYS[3]
local ref, score, claim, reason = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local r = redis.call('HMGET', rkey, 'status', 'claim')
if r[1] ~= ST_SENDING then return 0 end
if claim ~= '' and r[2] ~= claim then return 0 end
redis.call('ZREM', lease_key, ref)
redis.call('HSET', rkey, 'status', ST_SCHEDULED, 'due_epoch', tostring(score), 'reason', reason)
redis.call('ZADD', due_key, score, ref)
return 1
"""

# Cancel a booking in one step: every reminder that may still be sent (or is a dead letter)
# is cancelled; an attempt in flight becomes stale (its delivery, if any, is still recorded).
_CANCEL = """
local bkey, kkey, due_key, lease_key, dead_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local reason, stamp, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prefix, clinic, booking_id = ARGV[4], ARGV[5], ARGV[6]
local b = redis.call('HMGET', bkey, 'status', 'version')
if b[1] == false then return 'missing' end
if b[1] == ST_CANCELLED then return 'already' end
local version = tostring(tonumber(b[2] or '0') + 1)
redis.call('HSET', bkey, 'status', ST_CANCELLED, 'version', version, 'updated_at', stamp)
for _, k in ipairs(redis.call('SMEMBERS', kkey)) do
  local ref = clinic .. '/' .. booking_id .. '/' .. k
  local rkey = prefix .. ':r:' .. ref
  local st = redis.call('HGET', rkey, 'status')
  if is_pending(st) or st == ST_FAILED then
    redis.call('HSET', rkey, 'status', ST_CANCELLED, 'reason', reason, 'version', version)
    redis.call('ZREM', due_key, ref)
    redis.call('ZREM', lease_key, ref)
    redis.call('ZREM', dead_key, ref)
  end
end
keep_booking(prefix, clinic, booking_id, redis_now() + retention)
return 'cancelled'
"""

# Replay a dead letter now (1), or purge it from the dead letters, keeping it `failed` (2).
_REVIVE = """
local rkey, dead_key, due_key = KEYS[1], KEYS[2], KEYS[3]
local ref, mode, stamp, retention = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local prefix, clinic, booking_id = ARGV[5], ARGV[6], ARGV[7]
if not redis.call('ZSCORE', dead_key, ref) or redis.call('HGET', rkey, 'status') ~= ST_FAILED then
  return 0
end
local now = redis_now()
redis.call('ZREM', dead_key, ref)
if mode == 'replay' then
  redis.call('HSET', rkey, 'status', ST_SCHEDULED, 'attempts', '0', 'due_epoch', tostring(now),
    'reason', 'replayed at ' .. stamp)
  redis.call('ZADD', due_key, now, ref)
else
  redis.call('HSET', rkey, 'reason', 'purged from the dead letters at ' .. stamp .. ': '
    .. (redis.call('HGET', rkey, 'reason') or ''))
end
keep_booking(prefix, clinic, booking_id, now + retention)
return 1
"""

# Apply the retention rule to one booking (after an upsert).
_KEEP = """
local prefix, clinic, booking_id, keep_until = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
keep_booking(prefix, clinic, booking_id, keep_until)
return 1
"""


# How each finish reads in the attempt log.
_LOGGED_AS = {
    "sent": "sent",
    "retry": "retrying",
    "unknown": "unknown",
    "failed": "failed",
    "defer": "deferred",
    "skip": "skipped",
    "abandon": "abandoned",
}


@dataclass(frozen=True)
class Claim:
    """A due reminder the pump has leased, to be handed to a send task."""

    ref: str
    version: str
    claim: str


# `connect` makes the client with decode_responses=True, so every reply is str; redis-py
# still types replies as `bytes | str`. These narrow the types where a reply is read.
def _str_hash(reply: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return cast(dict[str, str], reply)


def _str_set(reply: set[bytes | str]) -> set[str]:
    return cast(set[str], reply)


def ref_of(clinic: str, booking_id: str, key: str) -> str:
    return f"{clinic}/{booking_id}/{key}"


def split_ref(ref: str) -> tuple[str, str, str]:
    clinic, booking_id, key = ref.split("/", 2)
    return clinic, booking_id, key


def _iso(epoch: float | str | None) -> str | None:
    if epoch in (None, ""):
        return None
    return utc_iso(datetime.fromtimestamp(float(epoch), UTC))  # type: ignore[arg-type]


class Store:
    """The schedule: bookings, their reminders, the due and lease sets, the ledger."""

    def __init__(
        self, client: redis.Redis, prefix: str = "reminders", *, retention_days: float = 90
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.retention_seconds = int(retention_days * 86400)
        self.due_key = f"{prefix}:due"
        self.lease_key = f"{prefix}:lease"
        self.dead_key = f"{prefix}:dead"
        script = client.register_script
        self._claim = script(_PRELUDE + _CLAIM)
        self._begin = script(_PRELUDE + _BEGIN_SEND)
        self._finish = script(_PRELUDE + _FINISH)
        self._requeue = script(_PRELUDE + _REQUEUE)
        self._cancel = script(_PRELUDE + _CANCEL)
        self._revive = script(_PRELUDE + _REVIVE)
        self._keep = script(_PRELUDE + _KEEP)

    # --- keys ----------------------------------------------------------------------

    def booking_key(self, clinic: str, booking_id: str) -> str:
        return f"{self.prefix}:b:{clinic}/{booking_id}"

    def keys_key(self, clinic: str, booking_id: str) -> str:
        return f"{self.prefix}:k:{clinic}/{booking_id}"

    def record_key(self, ref: str) -> str:
        return f"{self.prefix}:r:{ref}"

    def attempts_key(self, ref: str) -> str:
        return f"{self.prefix}:a:{ref}"

    def ledger_key(self, ref: str) -> str:
        return f"{self.prefix}:ledger:{ref}"

    def bookings_key(self, clinic: str) -> str:
        return f"{self.prefix}:bookings:{clinic}"

    # --- bookings --------------------------------------------------------------------

    def upsert(
        self, booking: Booking, plan: Plan, now: datetime, *, release: bool = False
    ) -> dict[str, Any]:
        """Store `plan` for `booking`, reconciled with what is stored; return the timeline.

        See worker/reconcile.py for the rule. The version goes up only when something
        changed, so submitting the same booking again is a no-op. Every key read is
        watched: a concurrent claim, finish or cancel is either before or after this.
        """
        clinic, booking_id = booking.key
        bkey = self.booking_key(clinic, booking_id)
        kkey = self.keys_key(clinic, booking_id)
        doc = booking.model_dump_json()
        medications = booking.medications.model_dump_json()
        planned_keys = {r.key for r in plan.reminders}
        window = f"{plan.window.start}-{plan.window.end}" if plan.window else ""

        def apply(pipe: redis.client.Pipeline) -> None:
            stored_booking = _str_hash(pipe.hgetall(bkey))
            keys = sorted(_str_set(pipe.smembers(kkey)) | planned_keys)
            refs = {k: ref_of(clinic, booking_id, k) for k in keys}
            if refs:
                watched = [self.record_key(r) for r in refs.values()]
                pipe.watch(*watched)  # type: ignore[no-untyped-call]  # unannotated in redis-py
            stored = {k: _str_hash(pipe.hgetall(self.record_key(r))) for k, r in refs.items()}
            result = self._reconcile(stored_booking, stored, plan, doc, medications, release, now)
            window_changed = stored_booking.get("window", "") != window
            if not result.changed and not result.changes and not window_changed:
                pipe.unwatch()
                return
            bumped = result.changed
            version = int(stored_booking.get("version", 0)) + (1 if bumped else 0)
            stamp = utc_iso(now) or ""
            pipe.multi()
            pipe.hset(
                bkey,
                mapping={
                    "doc": doc,
                    "status": result.status,
                    "version": str(version),
                    "hold_reason": result.hold_reason,
                    "released_for": result.released_for,
                    "window": window,
                    "updated_at": stamp if bumped else stored_booking.get("updated_at", stamp),
                    "created_at": stored_booking.get("created_at") or stamp,
                },
            )
            for change in result.changes:
                ref = refs[change.key]
                rkey = self.record_key(ref)
                if change.fields is not None:
                    fields = dict(change.fields)
                    if change.bump:
                        fields["version"] = str(version)
                        pipe.zrem(self.lease_key, ref)
                    pipe.hset(rkey, mapping=fields)
                    pipe.sadd(kkey, change.key)
                if change.schedule == "due":
                    pipe.zadd(self.due_key, {ref: change.due_epoch or 0.0})
                    pipe.zrem(self.dead_key, ref)
                elif change.schedule == "remove":
                    pipe.zrem(self.due_key, ref)
                    pipe.zrem(self.lease_key, ref)
                    pipe.zrem(self.dead_key, ref)
                elif change.schedule == "hold":
                    pipe.zrem(self.due_key, ref)
                    if change.fields is not None:  # rewritten: no longer a dead letter
                        pipe.zrem(self.dead_key, ref)

        self.redis.transaction(apply, bkey, kkey)
        last = max(
            [r.due_at.timestamp() for r in plan.reminders] + [booking.starts_at.timestamp()]
        )
        self._keep(args=[self.prefix, clinic, booking_id, last + self.retention_seconds])
        return self.timeline(clinic, booking_id)

    @staticmethod
    def _reconcile(
        stored_booking: dict[str, str],
        stored: dict[str, dict[str, str]],
        plan: Plan,
        doc: str,
        medications: str,
        release: bool,
        now: datetime,
    ) -> Any:
        """The pure rule (a seam the race tests use to land a change between read and write)."""
        return reconcile(
            stored_booking, stored, plan, doc=doc, medications=medications, release=release,
            now=now,
        )

    def cancel(
        self, clinic: str, booking_id: str, now: datetime, reason: str = "cancelled by the clinic"
    ) -> dict[str, Any]:
        """Cancel a booking: nothing not yet sent will be sent; history stays."""
        outcome = self._cancel(
            keys=[
                self.booking_key(clinic, booking_id),
                self.keys_key(clinic, booking_id),
                self.due_key,
                self.lease_key,
                self.dead_key,
            ],
            args=[reason, utc_iso(now) or "", self.retention_seconds, self.prefix, clinic,
                  booking_id],
        )
        if outcome == "missing":
            raise NotFound(f"{clinic}/{booking_id}")
        return self.timeline(clinic, booking_id)

    def booking_doc(self, clinic: str, booking_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self.booking_key(clinic, booking_id), "doc")
        if raw is None:
            raise NotFound(f"{clinic}/{booking_id}")
        return json.loads(raw)  # type: ignore[no-any-return]

    def timeline(self, clinic: str, booking_id: str) -> dict[str, Any]:
        """Return the booking's timeline in the DESIGN.md JSON shape."""
        booking = _str_hash(self.redis.hgetall(self.booking_key(clinic, booking_id)))
        if not booking:
            raise NotFound(f"{clinic}/{booking_id}")
        keys = sorted(_str_set(self.redis.smembers(self.keys_key(clinic, booking_id))))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.record_key(ref_of(clinic, booking_id, key)))
        records = pipe.execute()
        reminders = [
            _timeline_entry(key, rec) for key, rec in zip(keys, records, strict=True) if rec
        ]
        reminders.sort(key=lambda r: (r["due_at"] or "", r["id"]))
        status = booking["status"]
        if status == Status.HELD:
            for r in reminders:
                if r["status"] in PENDING:
                    r["reason"] = f"booking held: {booking.get('hold_reason')}"
        if (
            status == Status.SCHEDULED
            and reminders
            and all(r["status"] in TERMINAL for r in reminders)
        ):
            doc = json.loads(booking["doc"])
            if datetime.fromisoformat(doc["starts_at"]) <= datetime.now(UTC):
                status = Status.COMPLETED
        return {
            "clinic": clinic,
            "booking_id": booking_id,
            "status": str(status),
            "version": int(booking["version"]),
            "hold_reason": booking.get("hold_reason") or None,
            "reminders": reminders,
        }

    # --- pump ------------------------------------------------------------------------

    def claim_due(self, limit: int, lease_seconds: int) -> list[Claim]:
        """Atomically lease up to `limit` due reminders (Redis's clock decides 'due')."""
        run_key = f"{self.prefix}:claimrun:{uuid.uuid4().hex}"
        rows = self._claim(
            keys=[self.due_key, self.lease_key, run_key],
            args=[limit, lease_seconds, f"{self.prefix}:r:"],
        )
        return [Claim(ref=r[0], version=r[1], claim=r[2]) for r in rows]

    def begin_send(self, ref: str, version: str, claim: str, token: str, ledger_ms: int) -> str:
        """Fence the task and take the ledger; return "ok" or why to drop the task."""
        clinic, booking_id, _ = split_ref(ref)
        return str(
            self._begin(
                keys=[
                    self.record_key(ref),
                    self.booking_key(clinic, booking_id),
                    self.ledger_key(ref),
                    self.lease_key,
                ],
                args=[version, claim, token, ledger_ms, ref],
            )
        )

    def record(self, ref: str) -> dict[str, str]:
        return _str_hash(self.redis.hgetall(self.record_key(ref)))

    def finish(
        self,
        ref: str,
        attempt: Attempt,
        outcome: str,
        *,
        at: datetime | None = None,
        fields: dict[str, str] | None = None,
        entry: dict[str, Any] | None = None,
        sent_at: str = "",
    ) -> str:
        """Record the outcome of `attempt` (fenced; see _FINISH); return what was done.

        outcome: sent | retry | unknown | failed | defer | skip | abandon (the attempt found
        itself overtaken before sending). `at`: when to try again (retry, defer; unknown:
        not before the ledger expires). `entry`: the attempt log line.
        """
        clinic, booking_id, _ = split_ref(ref)
        line = {
            "version": attempt.version,
            "claim": attempt.claim,
            "outcome": _LOGGED_AS[outcome],
            **(entry or {}),
        }
        args: list[Any] = [
            attempt.token,
            ref,
            attempt.version,
            attempt.claim,
            outcome,
            (at or datetime.now(UTC)).timestamp(),
            self.retention_seconds,
            json.dumps(line, separators=(",", ":")),
            ATTEMPT_LOG_MAX,
            self.prefix,
            clinic,
            booking_id,
            IN_FLIGHT_MARGIN,
            sent_at,
            attempt.planned,
            attempt.template,
        ]
        for k, v in (fields or {}).items():
            args += [k, v]
        return str(
            self._finish(
                keys=[
                    self.record_key(ref),
                    self.ledger_key(ref),
                    self.due_key,
                    self.lease_key,
                    self.dead_key,
                    self.attempts_key(ref),
                ],
                args=args,
            )
        )

    def finish_sent(
        self, ref: str, attempt: Attempt, sent_at: datetime, entry: dict[str, Any] | None = None
    ) -> str:
        """Record a delivery (always: a stale attempt's delivery is history too)."""
        stamp = utc_iso(sent_at) or ""
        return self.finish(
            ref,
            attempt,
            "sent",
            fields={"sent_at": stamp, "reason": "", "last_error": ""},
            entry=entry,
            sent_at=stamp,
        )

    def finish_retry(
        self,
        ref: str,
        attempt: Attempt,
        retry_at: datetime,
        reason: str,
        entry: dict[str, Any] | None = None,
    ) -> str:
        return self.finish(
            ref,
            attempt,
            "retry",
            at=retry_at,
            fields={"reason": f"retrying at {utc_iso(retry_at)}: {reason}", "last_error": reason},
            entry=entry,
        )

    def finish_unknown(
        self, ref: str, attempt: Attempt, reason: str, entry: dict[str, Any] | None = None
    ) -> str:
        return self.finish(
            ref,
            attempt,
            "unknown",
            fields={
                "reason": f"outcome unknown ({reason}): not retried before this attempt's "
                "ledger expires, so a late delivery is not doubled",
                "last_error": reason,
            },
            entry=entry,
        )

    def finish_failed(
        self, ref: str, attempt: Attempt, reason: str, entry: dict[str, Any] | None = None
    ) -> str:
        return self.finish(
            ref, attempt, "failed", fields={"reason": reason, "last_error": reason}, entry=entry
        )

    def finish_defer(
        self,
        ref: str,
        attempt: Attempt,
        at: datetime,
        reason: str,
        entry: dict[str, Any] | None = None,
    ) -> str:
        return self.finish(ref, attempt, "defer", at=at, fields={"reason": reason}, entry=entry)

    def finish_skip(
        self, ref: str, attempt: Attempt, reason: str, entry: dict[str, Any] | None = None
    ) -> str:
        return self.finish(ref, attempt, "skip", fields={"reason": reason}, entry=entry)

    def requeue(self, ref: str, at: datetime, reason: str, claim: str | None = None) -> bool:
        """Put a leased reminder back in the due set (another attempt holds the ledger).

        Only while it is still being sent (under `claim`, if given); return whether it was.
        An attempt that finished in the meantime keeps its outcome.
        """
        return bool(
            self._requeue(
                keys=[self.record_key(ref), self.lease_key, self.due_key],
                args=[ref, at.timestamp(), claim or "", reason],
            )
        )

    def attempts(self, ref: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(self.attempts_key(ref), 0, -1)]

    # --- dead letters ----------------------------------------------------------------

    def _revive_all(self, refs: Iterable[str], now: datetime, mode: str) -> list[str]:
        done = []
        for ref in refs:
            clinic, booking_id, _ = split_ref(ref)
            if self._revive(
                keys=[self.record_key(ref), self.dead_key, self.due_key],
                args=[ref, mode, utc_iso(now) or "", self.retention_seconds, self.prefix, clinic,
                      booking_id],
            ):
                done.append(ref)
        return done

    def replay(self, refs: Iterable[str], now: datetime) -> list[str]:
        """Put dead-lettered reminders back in the due set, now; return those replayed.

        The send-time rules still apply: one past its expiry is skipped, one outside the
        patient's send window waits for the next opening.
        """
        return self._revive_all(refs, now, "replay")

    def purge(self, refs: Iterable[str], now: datetime) -> list[str]:
        """Remove dead letters without sending them (they stay `failed` in the timeline)."""
        return self._revive_all(refs, now, "purge")

    # --- housekeeping ----------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """One attempt at a claimed reminder: the fence it must pass to change anything."""

    version: str
    claim: str
    token: str
    # What it sends (read after begin): the planned time and template its words are for.
    planned: str = ""
    template: str = ""


def _timeline_entry(key: str, rec: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": key,
        "step": rec.get("step"),
        "channel": rec.get("channel"),
        "due_at": _iso(rec.get("due_epoch")),
        "status": rec.get("status"),
        "attempts": int(rec.get("attempts", 0)),
        "sent_at": rec.get("sent_at") or None,
        "reason": rec.get("reason") or None,
    }
    if rec.get("expires_epoch"):
        entry["expires_at"] = _iso(rec["expires_epoch"])
    if rec.get("sent_version"):
        entry["sent_version"] = int(rec["sent_version"])
        if entry["status"] in PENDING:
            # Delivered for an earlier version; the new plan sends it again.
            note = f"already sent at {entry['sent_at']} for version {entry['sent_version']}"
            entry["reason"] = f"{entry['reason']}; {note}" if entry["reason"] else note
    return entry
