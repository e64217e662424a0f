"""Where a reminder is stored: the durable schedule in Redis (not in the broker).

Keys, all under the configured prefix P:
  P:due                    ZSET  reminder ref -> due instant (epoch seconds)
  P:lease                  ZSET  reminder ref -> lease expiry (claimed by a pump, not yet done)
  P:dead                   ZSET  reminder ref -> when it was dead-lettered
  P:b:<clinic>/<booking>   HASH  the booking: doc (JSON), status, version, hold_reason, times
  P:k:<clinic>/<booking>   SET   the booking's reminder keys
  P:r:<ref>                HASH  one reminder: step, channel, due_at, status, attempts, ...
  P:a:<ref>                LIST  one JSON line per delivery attempt
  P:ledger:<ref>           STR   send ledger: a token while sending (expires), "sent" after
  P:bookings:<clinic>      SET   the clinic's booking ids

A reminder ref is "<clinic>/<booking_id>/<key>"; neither id may contain "/".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from .errors import NotFound
from .models import Booking, utc_iso
from .planner import Plan, PlannedReminder

PENDING = ("scheduled", "sending", "retrying")  # reminder states that may still send
TERMINAL = ("sent", "failed", "skipped", "cancelled")
ATTEMPT_LOG_MAX = 50

# Claim due reminders: one atomic step with Redis's own clock. Expired leases (a pump
# that died after claiming, a worker killed mid-send) are claimed again.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[1])
local lease_until = now + tonumber(ARGV[2])
local rprefix = ARGV[3]
local out = {}
local function claim(ref)
  local rkey = rprefix .. ref
  local st = redis.call('HGET', rkey, 'status')
  if st ~= 'scheduled' and st ~= 'retrying' and st ~= 'sending' then
    return
  end
  local claim_no = redis.call('HINCRBY', rkey, 'claim', 1)
  redis.call('HSET', rkey, 'status', 'sending')
  redis.call('ZADD', KEYS[2], lease_until, ref)
  table.insert(out, {ref, redis.call('HGET', rkey, 'version'), tostring(claim_no)})
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, ref in ipairs(expired) do
  redis.call('ZREM', KEYS[2], ref)
  claim(ref)
end
if #out < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit - #out)
  for _, ref in ipairs(due) do
    redis.call('ZREM', KEYS[1], ref)
    claim(ref)
  end
end
return out
"""

# Fence and take the send ledger in one step. KEYS: record, booking, ledger.
# ARGV: version, claim, token, ledger ttl ms. Returns "ok" or why the task is dropped.
_BEGIN_SEND = """
local r = redis.call('HMGET', KEYS[1], 'status', 'version', 'claim')
if r[1] == false then return 'gone' end
if r[2] ~= ARGV[1] then return 'version moved' end
if r[3] ~= ARGV[2] then return 'stale claim' end
if r[1] ~= 'sending' then return 'status ' .. r[1] end
local b = redis.call('HGET', KEYS[2], 'status')
if b ~= 'scheduled' then return 'booking ' .. tostring(b) end
local ledger = redis.call('GET', KEYS[3])
if ledger == 'sent' then return 'already sent' end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return 'in flight' end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'ok'
"""

# Finish an attempt. KEYS: record, ledger, due, lease, dead. ARGV: token, ref, outcome,
# field/value pairs... Only the holder of the ledger token may finish.
_FINISH = """
local ref, outcome = ARGV[2], ARGV[3]
local owner = redis.call('GET', KEYS[2]) == ARGV[1]
-- Not the ledger's holder (it expired mid-send): a failure is not ours to record, but a
-- message that went out is recorded all the same, so nothing sends it again.
if not owner and outcome ~= 'sent' then return 0 end
redis.call('ZREM', KEYS[4], ref)
if outcome == 'sent' then
  redis.call('SET', KEYS[2], 'sent')
  redis.call('ZREM', KEYS[3], ref)
else
  redis.call('DEL', KEYS[2])
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if outcome == 'retry' then
  redis.call('ZADD', KEYS[3], ARGV[4], ref)
elseif outcome == 'failed' then
  redis.call('ZADD', KEYS[5], ARGV[4], ref)
end
if owner then return 1 end
return 2
"""

# Hand a leased reminder back to the due set, only if it is still being sent under the given
# claim: once its attempt finished (sent, retrying, dead-lettered) or it was claimed again,
# there is nothing to hand back. KEYS: record, lease, due. ARGV: ref, due score, claim ('' = any).
_REQUEUE = """
local r = redis.call('HMGET', KEYS[1], 'status', 'claim')
if r[1] ~= 'sending' then return 0 end
if ARGV[3] ~= '' and r[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'scheduled')
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """A due reminder the pump has leased, to be handed to a send task."""

    ref: str
    version: str
    claim: str


def ref_of(clinic: str, booking_id: str, key: str) -> str:
    return f"{clinic}/{booking_id}/{key}"


def split_ref(ref: str) -> tuple[str, str, str]:
    clinic, booking_id, key = ref.split("/", 2)
    return clinic, booking_id, key


def _now_epoch(now: datetime) -> float:
    return now.timestamp()


def _iso(epoch: float | str | None) -> str | None:
    if epoch in (None, ""):
        return None
    return utc_iso(datetime.fromtimestamp(float(epoch), UTC))


class Store:
    """The schedule: bookings, their reminders, the due and lease sets, the ledger."""

    def __init__(self, client: redis.Redis, prefix: str = "reminders") -> None:
        self.redis = client
        self.prefix = prefix
        self.due_key = f"{prefix}:due"
        self.lease_key = f"{prefix}:lease"
        self.dead_key = f"{prefix}:dead"
        self._claim = client.register_script(_CLAIM)
        self._begin = client.register_script(_BEGIN_SEND)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)

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

    # --- bookings --------------------------------------------------------------------

    def upsert(
        self, booking: Booking, plan: Plan, now: datetime, *, release: bool = False
    ) -> dict[str, Any]:
        """Store `plan` for `booking`, reconciled with what is stored; return the timeline.

        Unchanged reminders are kept, moved ones rescheduled, obsolete ones cancelled, sent
        ones kept as history. The version goes up only when something changed, so
        submitting the same booking again is a no-op. `release` is the clinic's review of
        a held booking: the hold is waived for as long as the medications stay as reviewed.
        """
        clinic, booking_id = booking.key
        bkey = self.booking_key(clinic, booking_id)
        kkey = self.keys_key(clinic, booking_id)
        doc = booking.model_dump_json()
        medications = booking.medications.model_dump_json()
        planned = {r.key: r for r in plan.reminders}

        def reconcile(pipe: redis.client.Pipeline) -> None:
            stored_booking = pipe.hgetall(bkey)
            released_for = medications if release else stored_booking.get("released_for", "")
            status = plan.status
            if status == "held" and released_for == medications:
                status = "scheduled"  # the clinic reviewed exactly these medications
            keys = sorted(set(pipe.smembers(kkey)) | set(planned))
            refs = [ref_of(clinic, booking_id, k) for k in keys]
            pipe.watch(*[self.record_key(r) for r in refs])
            stored = {k: pipe.hgetall(self.record_key(r)) for k, r in zip(keys, refs, strict=True)}
            version = int(stored_booking.get("version", 0))
            writes: list[tuple[str, str, dict[str, str] | None, str]] = []
            for key, ref in zip(keys, refs, strict=True):
                change = self._reconcile_one(
                    stored[key],
                    planned.get(key),
                    status,
                    doc_changed=stored_booking.get("doc") != doc,
                    now=now,
                )
                if change is not None:
                    writes.append((key, ref, *change))
            hold_reason = plan.hold_reason if status == "held" else None
            booking_changed = (
                stored_booking.get("doc") != doc
                or stored_booking.get("status") != status
                or stored_booking.get("hold_reason", "") != (hold_reason or "")
                or stored_booking.get("released_for", "") != released_for
            )
            if not writes and not booking_changed:
                pipe.unwatch()
                return
            version += 1
            stamp = utc_iso(now) or ""
            pipe.multi()
            pipe.hset(
                bkey,
                mapping={
                    "doc": doc,
                    "status": status,
                    "version": str(version),
                    "hold_reason": hold_reason or "",
                    "released_for": released_for,
                    "updated_at": stamp,
                    "created_at": stored_booking.get("created_at") or stamp,
                },
            )
            pipe.sadd(f"{self.prefix}:bookings:{clinic}", booking_id)
            for key, ref, fields, schedule in writes:
                rkey = self.record_key(ref)
                assert fields is not None
                fields["version"] = str(version)
                pipe.hset(rkey, mapping=fields)
                pipe.sadd(kkey, key)
                pipe.zrem(self.lease_key, ref)
                if schedule == "due":
                    pipe.zadd(self.due_key, {ref: float(fields["due_epoch"])})
                    pipe.zrem(self.dead_key, ref)
                elif schedule == "remove":
                    pipe.zrem(self.due_key, ref)
            # A held booking keeps its plan but nothing of it is due until released.
            for key in keys:
                ref = ref_of(clinic, booking_id, key)
                record = stored[key]
                if status == "held":
                    pipe.zrem(self.due_key, ref)
                elif (
                    not any(w[1] == ref for w in writes)
                    and record.get("status") in ("scheduled", "retrying")
                    and stored_booking.get("status") == "held"
                ):
                    pipe.zadd(self.due_key, {ref: float(record["due_epoch"])})

        self.redis.transaction(reconcile, bkey, kkey)
        return self.timeline(clinic, booking_id)

    @staticmethod
    def _reconcile_one(
        stored: dict[str, str],
        new: PlannedReminder | None,
        booking_status: str,
        *,
        doc_changed: bool,
        now: datetime,
    ) -> tuple[dict[str, str], str] | None:
        """Return (fields to write, "due" or "remove") for one reminder, or None if unchanged."""
        old_status = stored.get("status")
        if old_status == "sent":
            return None  # history: never sent again, whatever the new plan says
        if old_status == "failed" and new is not None and not doc_changed:
            return None  # dead letter: the same booking again changes nothing; replay does
        if new is None:
            if old_status in PENDING or old_status == "failed":
                return {
                    "status": "cancelled",
                    "reason": "no longer in the plan after a change",
                }, "remove"
            return None
        if new.status == "skipped":
            if old_status == "skipped" and stored.get("reason") == new.reason:
                return None
            return _fields(new, "skipped", new.reason), "remove"
        planned_epoch = repr(_now_epoch(new.due_at))
        came_due = (
            float(stored.get("planned_epoch") or "inf") <= now.timestamp() and new.due_at <= now
        )
        if old_status in PENDING and (
            stored.get("planned_epoch") == planned_epoch
            or (new.at_booking and stored.get("at_booking") == "1")
            or came_due
        ):
            # Unchanged, or due now in both plans (a late step is planned for "now", which
            # moves with every submission): keep its time, attempts and any retry.
            return None
        fields = _fields(new, "scheduled", new.reason)
        if old_status in PENDING:
            fields["reason"] = f"rescheduled: {new.reason}"
        if old_status == "failed":  # the clinic corrected the booking: try afresh
            fields |= {"attempts": "0", "reason": f"booking changed, sending again: {new.reason}"}
        return fields, "due" if booking_status != "held" else "remove"

    def cancel(
        self, clinic: str, booking_id: str, now: datetime, reason: str = "cancelled by the clinic"
    ) -> dict[str, Any]:
        """Cancel a booking: nothing not yet sent will be sent; history stays."""
        bkey = self.booking_key(clinic, booking_id)
        kkey = self.keys_key(clinic, booking_id)

        def apply(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(bkey):
                raise NotFound(f"{clinic}/{booking_id}")
            keys = sorted(pipe.smembers(kkey))
            refs = [ref_of(clinic, booking_id, k) for k in keys]
            statuses = [pipe.hget(self.record_key(r), "status") for r in refs]
            version = int(pipe.hget(bkey, "version") or 0)
            if pipe.hget(bkey, "status") == "cancelled":
                return
            pipe.multi()
            pipe.hset(
                bkey,
                mapping={
                    "status": "cancelled",
                    "version": str(version + 1),
                    "updated_at": utc_iso(now) or "",
                },
            )
            for ref, st in zip(refs, statuses, strict=True):
                if st in PENDING or st == "failed":
                    pipe.hset(
                        self.record_key(ref),
                        mapping={
                            "status": "cancelled",
                            "reason": reason,
                            "version": str(version + 1),
                        },
                    )
                    pipe.zrem(self.due_key, ref)
                    pipe.zrem(self.lease_key, ref)
                    pipe.zrem(self.dead_key, ref)

        self.redis.transaction(apply, bkey, kkey)
        return self.timeline(clinic, booking_id)

    def booking_doc(self, clinic: str, booking_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self.booking_key(clinic, booking_id), "doc")
        if raw is None:
            raise NotFound(f"{clinic}/{booking_id}")
        return json.loads(raw)

    def timeline(self, clinic: str, booking_id: str) -> dict[str, Any]:
        """Return the booking's timeline in the DESIGN.md JSON shape."""
        booking = self.redis.hgetall(self.booking_key(clinic, booking_id))
        if not booking:
            raise NotFound(f"{clinic}/{booking_id}")
        keys = sorted(self.redis.smembers(self.keys_key(clinic, booking_id)))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.record_key(ref_of(clinic, booking_id, key)))
        records = pipe.execute()
        reminders = [
            {
                "id": key,
                "step": rec.get("step"),
                "channel": rec.get("channel"),
                "due_at": _iso(rec.get("due_epoch")),
                "status": rec.get("status"),
                "attempts": int(rec.get("attempts", 0)),
                "sent_at": rec.get("sent_at") or None,
                "reason": rec.get("reason") or None,
            }
            for key, rec in zip(keys, records, strict=True)
            if rec
        ]
        reminders.sort(key=lambda r: (r["due_at"] or "", r["id"]))
        status = booking["status"]
        if status == "held":
            for r in reminders:
                if r["status"] in PENDING:
                    r["reason"] = f"booking held: {booking.get('hold_reason')}"
        if status == "scheduled" and reminders and all(r["status"] in TERMINAL for r in reminders):
            doc = json.loads(booking["doc"])
            if datetime.fromisoformat(doc["starts_at"]) <= datetime.now(UTC):
                status = "completed"
        return {
            "clinic": clinic,
            "booking_id": booking_id,
            "status": status,
            "version": int(booking["version"]),
            "hold_reason": booking.get("hold_reason") or None,
            "reminders": reminders,
        }

    # --- pump ------------------------------------------------------------------------

    def claim_due(self, limit: int, lease_seconds: int) -> list[Claim]:
        """Atomically lease up to `limit` due reminders (Redis's clock decides 'due')."""
        rows = self._claim(
            keys=[self.due_key, self.lease_key], args=[limit, lease_seconds, f"{self.prefix}:r:"]
        )
        return [Claim(ref=r[0], version=r[1], claim=r[2]) for r in rows]

    def next_due_in(self) -> float | None:
        """Return seconds until the earliest due reminder (negative if overdue), or None."""
        first = self.redis.zrange(self.due_key, 0, 0, withscores=True)
        if not first:
            return None
        return first[0][1] - time.time()

    # --- sending ---------------------------------------------------------------------

    def begin_send(self, ref: str, version: str, claim: str, token: str, ledger_ms: int) -> str:
        """Fence the task and take the ledger; return "ok" or why to drop the task."""
        clinic, booking_id, _ = split_ref(ref)
        return self._begin(
            keys=[self.record_key(ref), self.booking_key(clinic, booking_id), self.ledger_key(ref)],
            args=[version, claim, token, ledger_ms],
        )

    def ledger_ttl(self, ref: str) -> float:
        """Return seconds until an in-flight attempt's ledger entry expires (0 if none)."""
        return max(0, self.redis.pttl(self.ledger_key(ref))) / 1000

    def record(self, ref: str) -> dict[str, str]:
        return self.redis.hgetall(self.record_key(ref))

    def _finish_call(
        self, ref: str, token: str, outcome: str, score: float, fields: dict[str, str]
    ) -> int:
        args: list[Any] = [token, ref, outcome, score]
        for k, v in fields.items():
            args += [k, v]
        done = self._finish(
            keys=[
                self.record_key(ref),
                self.ledger_key(ref),
                self.due_key,
                self.lease_key,
                self.dead_key,
            ],
            args=args,
        )
        return int(done)

    def finish_sent(self, ref: str, token: str, sent_at: datetime) -> bool:
        """Record a delivery; return False if the ledger had expired (recorded all the same)."""
        return 1 == self._finish_call(
            ref,
            token,
            "sent",
            0,
            {"status": "sent", "sent_at": utc_iso(sent_at) or "", "reason": "", "last_error": ""},
        )

    def finish_retry(self, ref: str, token: str, retry_at: datetime, reason: str) -> bool:
        return 1 == self._finish_call(
            ref,
            token,
            "retry",
            retry_at.timestamp(),
            {
                "status": "retrying",
                "due_epoch": repr(retry_at.timestamp()),
                "reason": f"retrying at {utc_iso(retry_at)}: {reason}",
                "last_error": reason,
            },
        )

    def finish_failed(self, ref: str, token: str, now: datetime, reason: str) -> bool:
        return 1 == self._finish_call(
            ref,
            token,
            "failed",
            now.timestamp(),
            {"status": "failed", "reason": reason, "last_error": reason},
        )

    def requeue(self, ref: str, at: datetime, reason: str, claim: str | None = None) -> bool:
        """Put a leased reminder back in the due set (another attempt holds the ledger).

        Only while it is still being sent (under `claim`, if given); return whether it was.
        An attempt that finished in the meantime keeps its outcome.
        """
        return bool(
            self._requeue(
                keys=[self.record_key(ref), self.lease_key, self.due_key],
                args=[ref, at.timestamp(), claim or ""],
            )
        )

    def plan_dates(self, clinic: str, booking_id: str) -> dict[str, datetime]:
        """Return each step's first due instant among reminders still to be (or already) sent."""
        keys = sorted(self.redis.smembers(self.keys_key(clinic, booking_id)))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            # The planned time, not the current one: a retry must not shift the dates shown.
            pipe.hmget(
                self.record_key(ref_of(clinic, booking_id, key)), "step", "planned_epoch", "status"
            )
        dates: dict[str, datetime] = {}
        for step, epoch, status in pipe.execute():
            if step and epoch and status not in ("skipped", "cancelled"):
                when = datetime.fromtimestamp(float(epoch), UTC)
                dates[step] = min(when, dates.get(step, when))
        return dates

    def log_attempt(self, ref: str, entry: dict[str, Any]) -> None:
        key = self.attempts_key(ref)
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
        pipe.ltrim(key, -ATTEMPT_LOG_MAX, -1)
        pipe.execute()

    def attempts(self, ref: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(self.attempts_key(ref), 0, -1)]

    # --- dead letters ----------------------------------------------------------------

    def dead_letters(self, clinic: str | None = None) -> list[dict[str, Any]]:
        """Return every dead-lettered reminder (optionally one clinic's), oldest first."""
        out = []
        for ref, score in self.redis.zrange(self.dead_key, 0, -1, withscores=True):
            c, booking_id, key = split_ref(ref)
            if clinic and c != clinic:
                continue
            rec = self.record(ref)
            out.append(
                {
                    "ref": ref,
                    "clinic": c,
                    "booking_id": booking_id,
                    "id": key,
                    "channel": rec.get("channel"),
                    "attempts": int(rec.get("attempts", 0)),
                    "failed_at": _iso(score),
                    "reason": rec.get("reason"),
                }
            )
        return out

    def replay(self, refs: Iterable[str], now: datetime) -> list[str]:
        """Put dead-lettered reminders back in the due set, now; return those replayed."""
        replayed = []
        for ref in refs:
            rkey = self.record_key(ref)

            def apply(pipe: redis.client.Pipeline, ref: str = ref, rkey: str = rkey) -> bool:
                if pipe.zscore(self.dead_key, ref) is None or pipe.hget(rkey, "status") != "failed":
                    return False
                pipe.multi()
                pipe.hset(
                    rkey,
                    mapping={
                        "status": "scheduled",
                        "attempts": "0",
                        "due_epoch": repr(now.timestamp()),
                        "reason": f"replayed at {utc_iso(now)}",
                    },
                )
                pipe.zrem(self.dead_key, ref)
                pipe.zadd(self.due_key, {ref: now.timestamp()})
                return True

            if self.redis.transaction(apply, self.dead_key, rkey, value_from_callable=True):
                replayed.append(ref)
        return replayed


def _fields(r: PlannedReminder, status: str, reason: str) -> dict[str, str]:
    epoch = repr(_now_epoch(r.due_at))
    return {
        "step": r.step,
        "channel": r.channel,
        "template": r.template,
        "occurrence": str(r.occurrence),
        "planned_epoch": epoch,
        "due_epoch": epoch,
        "status": status,
        "reason": reason,
        "at_booking": "1" if r.at_booking else "0",
    }


def connect(url: str) -> redis.Redis:
    """Return a Redis client that decodes replies to str."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
