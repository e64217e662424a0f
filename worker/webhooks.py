"""Telling the clinic: signed webhooks and the held-booking alert, delivered at least once.

An event (`reminder.sent`, `reminder.failed`, `reminder.skipped`, `booking.held`,
`booking.completed`, `booking.late_pause`, `patient.replied`) is written by the same atomic
step that changes the state it reports (the store's Lua scripts call `emit_event`; the
upsert queues the emit script inside its MULTI; a patient's reply is recorded with its
events in one MULTI), so an event is never lost and never made up. Events wait in their
own schedule:

  P:ev:seq        STR   event id counter, never behind Redis's clock in milliseconds (so
                        an id is not given again after Redis rolls back: `emit_event`)
  P:ev:last       STR   the due set's score of the last event written or replayed
                        (`event_due`: each a microsecond after the one before at least)
  P:ev:<id>       HASH  clinic, kind (webhook | alert), type, body (JSON), attempts, claim,
                        last_error
  P:ev:due        ZSET  event id -> when to try it (a claimed event: when its lease ends; a
                        new or replayed one: when it was put there, so those due together
                        go oldest first)
  P:ev:dead       ZSET  event id -> when it was given up (kept `retention`, then expires)
  P:ev:consent:<clinic>  HASH  "<channel>:<contact id>" -> "1": the clinic was told this
                        contact opted out of that channel; "0": opted out (the opt-out
                        script writes it), not told yet (`tell_consent`; no number or
                        address in it: the contact index's keyed id). An SMS opt-out with
                        no field predates the record: the clinic was told of it then
  P:ev:out        ZSET  event id -> its lease's end: claimed, not finished (the pump's count)
  P:ev:senders    ZSET  "<host>:<pid>:<token>|<threads>" -> until when: the event senders registered
  P:ev:held:<node> SET  "<claim>@<id>": the claims handed to one process's event senders
                        (`<node>` as in P:ev:senders), not finished; expires a day after
                        the last one
  P:ev:holders    SET   the processes with such a set: once one's registration lapses (it
                        was SIGKILLed, its container removed), the claim takes what it held
                        off P:ev:out (`_CLAIM`), so it keeps no capacity from the live ones
  P:ev:rest:<clinic>     HASH  the clinic's webhook endpoint rests: until (Redis's clock),
                        probe_for, probe, why (an event id and reason: no URL or secret),
                        url (the digest of the URL that rests); expires
                        REST_SLACK_SECONDS after its end
  P:ev:resting:<clinic>  SET   the events put back to wait for that rest's end (same expiry)

The pump claims due events (one Lua step, Redis's clock), no more than the registered event
senders take at once, and publishes one task each on their own queue; the task hands the
claim to its process's event senders (worker/event_senders.py: threads of their own; one
done with a delivery claims the next due events itself, the same way), so a
slow or dead clinic endpoint never holds a pool process nor delays a patient's reminder.
A delivery POSTs the event to the clinic's webhook URL (or emails the held-booking alert
to the clinic's address through its email channel), then deletes it; on failure it is tried
again with backoff (counted on Redis's clock, as its claims), and after `max_attempts` it is
given up and kept in `P:ev:dead` (`reminders events dead` lists them, `reminders events
replay` sends them again). A worker killed mid-delivery leaves the event claimed until its
lease ends, then it is claimed again: a receiver may see an event twice, with the same `id`
(deduplicate on it), never zero times.

An endpoint that did not answer rests, so that one clinic's dead endpoint cannot hold every
event sender while other clinics' events wait behind its burst (as Stripe and Svix isolate
endpoints). The endpoint is a clinic's webhook URL (P:ev:rest:<clinic>). When an attempt
gets no answer (`NoAnswer`: the connection refused or reset, or a connect or read timeout;
not an HTTP status, even 500, which holds no thread, nor a TLS or URL error) the endpoint
rests until that event's retry (and, given up, as long as a retry would have waited), on
Redis's clock, REST_MAX_SECONDS (a minute) at most: that event keeps its own backoff, and
the next event due after the rest tries the endpoint, so an endpoint back after an outage
of hours is found within a minute, not the backoff's cap (an hour) later. While it rests
its events are not tried: the claim puts each back due at the rest's end without claiming
it for a sender (no capacity taken), and a sender thread that takes one claimed before the
rest began (`Events.take`) does the same, fenced by its claim; neither counts an attempt
(`webhook_max_attempts` counts real ones), and the event's last_error says it waited for
its endpoint to rest after which event got no answer. Once the rest is over, the first
event claimed tries the endpoint (the probe); the others wait for its answer, `probe_for`
seconds at most (its two network waits and a margin: a probe whose worker died is replaced
then; one handed back, not begun, at once). So a dead endpoint holds about one thread per
rest, not all of them. Any answer (a 2xx or any HTTP status) ends the rest at once and
makes the events that waited for it due now; so does a probe that meets anything but
silence (a TLS or URL error, or the event dropped: the clinic's webhook removed from
config/), and replaying one of the clinic's given-up events. The held-booking alert is
another endpoint (the clinic's email channel) and never rests: alerts come one per held
booking, not in bursts, the clinic needs each promptly, its email channel is shared with
the clinic's patient messages (often one relay for several clinics) and Apprise's failures
do not tell "no answer" apart from an outcome unknown; a webhook's rest never holds an
alert back. Events written during a rest wait for its end (a minute at most), as the
retries before them do. The rest is the URL's that got no answer (its digest in the mark): a
URL edited in config/ ends it at the pump's next run (`pump_events` is told the clinics'
URLs), so the new URL is tried at once.

Signature (Stripe-style): header `Reminders-Signature: t=<unix seconds>,v1=<hex>` where
hex = HMAC-SHA256(secret, "<t>.<raw body>"); while the clinic's `previous_secret` is set
(a secret being rotated), a second `v1=<hex>` with it follows the first, so a receiver on
either secret verifies the event. A receiver checks it with `verify_signature`
and refuses a timestamp more than `SIGNATURE_TOLERANCE_SECONDS` from its clock, so a
captured request cannot be replayed later. Bodies carry ids, steps, channels, times and
reasons only: never a message body or a patient's contact details.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo

from .errors import ConfigError, DeliveryError

# The clinic config imports EVENT_TYPES from here: every command loads it, so the heavier
# libraries (redis, requests, babel) are imported where they are used.
if TYPE_CHECKING:
    import redis

    from .clinics import Clinic
    from .rendering import RenderedMessage, Renderer
    from .settings import Settings
    from .store import Store

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "reminder.sent",
    "reminder.failed",
    "reminder.skipped",
    "booking.held",
    "booking.completed",
    "patient.replied",
    # A booking too late for the protocol's minimum retinoid pause (worker/planner.py
    # `late_pause`): the patient is asked to call; the clinic should expect the call.
    "booking.late_pause",
)
SIGNATURE_HEADER = "Reminders-Signature"
SIGNATURE_TOLERANCE_SECONDS = 300
USER_AGENT = "aftercare-reminders-webhooks/1"
# What a delivery returns for an event not tried because its endpoint rests.
RESTED = ("resting: its webhook endpoint did not answer an earlier event; due again at the "
          "rest's end")
PROBE_MARGIN = 2.0  # seconds past an attempt's two network waits the others wait for it

# Write one event. Shared by the store's scripts (spliced into their source) and by
# `Events.emit_script` (Python callers, e.g. inside the upsert's MULTI). `fields` is a Lua
# table; times in it are epoch seconds (turned into ISO 8601 when the event is sent).
LUA_EMIT = """
-- An event's place in the due set: now, on Redis's clock, not 0: events due together are
-- claimed oldest first (equal scores sort their ids as text, "10" before "9"). One put in
-- the same microsecond as the one before (one script writes several) comes a microsecond
-- after it; never further (a clock stepped back: a last one more than a second ahead is
-- ignored).
local function event_due(prefix, now)
  local last = tonumber(redis.call('GET', prefix .. ':ev:last'))
  local due = now
  if last and last >= now and last < now + 1 then due = last + 0.000001 end
  due = string.format('%.6f', due)
  redis.call('SET', prefix .. ':ev:last', due)
  return due
end

local function emit_event(prefix, clinic, kind, etype, fields)
  local t = redis.call('TIME')
  local created = tonumber(t[1]) + tonumber(t[2]) / 1000000
  -- The id: the counter, never behind Redis's clock in milliseconds. A counter gone back
  -- (Redis restored from a backup, a lagging replica promoted) would give new events the
  -- ids of events the clinic already took, and its deduplication would drop them.
  local n = redis.call('INCR', prefix .. ':ev:seq')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if n < floor then
    n = floor
    redis.call('SET', prefix .. ':ev:seq', string.format('%.0f', n))
  end
  local id = string.format('%.0f', n)
  fields['created_at'] = created
  redis.call('HSET', prefix .. ':ev:' .. id, 'clinic', clinic, 'kind', kind, 'type', etype,
    'body', cjson.encode(fields), 'attempts', '0')
  redis.call('ZADD', prefix .. ':ev:due', event_due(prefix, created), id)
  return id
end
"""

_EMIT = (
    LUA_EMIT
    + """
return emit_event(ARGV[1], ARGV[2], ARGV[3], ARGV[4], cjson.decode(ARGV[5]))
"""
)

# A clinic's webhook endpoint that did not answer rests (see the module docstring):
#   P:ev:rest:<clinic>     HASH until (Redis's clock), probe_for (seconds one attempt may
#                          take), probe ("<id>:<claim>" let through to try it), why, url
#                          (`url_id` of the URL that rests)
#   P:ev:resting:<clinic>  SET  the ids put back to wait for the rest's end
# `endpoint_rest` returns 'go' (no rest, or this claim is its probe), 'probe' (the rest is
# over: this claim tries the endpoint, the others wait for its answer until `probe_for`
# from now) or the rest's end (a number): this event waits for it. `rest_event` puts an
# event back to the schedule due then: its claim ended, no attempt counted, its
# last_error saying why. Both expire REST_SLACK seconds after the rest's end.
REST_SLACK_SECONDS = 60
# A rest lasts the failed event's retry, at most this long: the next event due then tries the
# endpoint, so a recovered endpoint is found within a minute, whatever the backoff's cap.
REST_MAX_SECONDS = 60.0
LUA_REST = (
    f"local REST_SLACK = {REST_SLACK_SECONDS}\n"
    + """
local function endpoint_rest(prefix, clinic, token, now)
  local rkey = prefix .. ':ev:rest:' .. clinic
  local mark = redis.call('HMGET', rkey, 'until', 'probe_for', 'probe')
  if not mark[1] or mark[3] == token then return 'go' end
  local rest_end = tonumber(mark[1])
  if rest_end > now then return rest_end end
  local probe_end = now + (tonumber(mark[2]) or 30)
  redis.call('HSET', rkey, 'until', string.format('%.6f', probe_end), 'probe', token)
  redis.call('EXPIREAT', rkey, math.ceil(probe_end + REST_SLACK))
  return 'probe'
end

local function rest_event(prefix, due_key, out_key, id, clinic, rest_end, now)
  local rkey = prefix .. ':ev:rest:' .. clinic
  local wkey = prefix .. ':ev:resting:' .. clinic
  redis.call('ZADD', due_key, string.format('%.6f', rest_end), id)
  redis.call('ZREM', out_key, id)
  redis.call('HSET', prefix .. ':ev:' .. id, 'last_error',
    'not tried, no attempt counted: waited for its webhook endpoint to rest after ' ..
    (redis.call('HGET', rkey, 'why') or 'an event it did not answer'))
  redis.call('SADD', wkey, id)
  if redis.call('TTL', wkey) < rest_end - now + REST_SLACK then
    redis.call('EXPIREAT', wkey, math.ceil(rest_end + REST_SLACK))
  end
end

-- The endpoint answered (or was fixed): its rest ends, and the events put back to wait for
-- it are due now (those claimed meanwhile, or due already, are left as they are).
local function end_rest(prefix, clinic, due_key, out_key, now)
  local wkey = prefix .. ':ev:resting:' .. clinic
  redis.call('DEL', prefix .. ':ev:rest:' .. clinic)
  for _, waited in ipairs(redis.call('SMEMBERS', wkey)) do
    local due = tonumber(redis.call('ZSCORE', due_key, waited))
    local leased = tonumber(redis.call('ZSCORE', out_key, waited))
    if due and due > now and not (leased and leased > now) then
      redis.call('ZADD', due_key, now, waited)
    end
  end
  redis.call('DEL', wkey)
end
""")

# Claim due events: their score becomes the lease's end, so one whose worker died is due
# again then. Each claim is counted in P:ev:out (id -> its lease's end) until it finishes,
# is handed back or its lease ends, or the event senders it was handed to are gone (their
# registration lapsed: KEYS[4], P:ev:holders and P:ev:held:<node>). With a capacity
# (ARGV[4] > 0) no more are claimed than the event senders registered in P:ev:senders
# ("<node>|<threads>" -> until when) take at once (ARGV[4] itself while none is
# registered). A webhook event whose endpoint rests is not claimed: it is put back due at
# the rest's end (`rest_event`), taking no capacity, and the claim looks further (up to
# CLAIM_SCAN events a call). Returns {id, claim} pairs.
CLAIM_SCAN = 1000
HELD_KEEP_SECONDS = 86400  # a process's held set expires this long after its last claim
_CLAIM = (
    LUA_REST
    + f"local CLAIM_SCAN = {CLAIM_SCAN}\n"
    + """
local due_key, out_key, senders_key, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local holders_key = KEYS[4]
local limit, lease, default = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local holder, held_keep = ARGV[5] or '', tonumber(ARGV[6] or 0)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', out_key, '-inf', now)
-- Event senders gone (their registration lapsed): what they held stops counting (each
-- still that claim's); it stays due at its lease's end, as ever (it may be at the endpoint).
for _, node in ipairs(redis.call('SMEMBERS', holders_key)) do
  local live = redis.call('ZSCORE', senders_key, node)
  if not live or tonumber(live) <= now then
    local held = prefix .. ':ev:held:' .. node
    for _, m in ipairs(redis.call('SMEMBERS', held)) do
      local at = string.find(m, '@', 1, true)
      if at then
        local id = string.sub(m, at + 1)
        if redis.call('HGET', prefix .. ':ev:' .. id, 'claim') == string.sub(m, 1, at - 1) then
          redis.call('ZREM', out_key, id)
        end
      end
    end
    redis.call('DEL', held)
    redis.call('SREM', holders_key, node)
  end
end
if default > 0 then
  redis.call('ZREMRANGEBYSCORE', senders_key, '-inf', now)
  local capacity = 0
  for _, m in ipairs(redis.call('ZRANGE', senders_key, 0, -1)) do
    capacity = capacity + (tonumber(string.match(m, '|(%d+)$')) or 0)
  end
  if capacity == 0 then capacity = default end
  limit = math.min(limit, capacity - redis.call('ZCARD', out_key))
  if limit <= 0 then return {} end
end
local out = {}
local scanned = 0
while #out < limit and scanned < CLAIM_SCAN do
  local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0,
    math.min(limit - #out + 100, CLAIM_SCAN - scanned))
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #out >= limit then break end
    scanned = scanned + 1
    local ekey = prefix .. ':ev:' .. id
    local ev = redis.call('HMGET', ekey, 'kind', 'clinic', 'claim')
    if ev[1] then
      local claim = (tonumber(ev[3]) or 0) + 1
      local go = 'go'
      if ev[1] == 'webhook' then go = endpoint_rest(prefix, ev[2], id .. ':' .. claim, now) end
      if type(go) == 'number' then
        -- Claimed and put back at once: an attempt still holding an older claim (its lease
        -- over) is fenced out, as by any claim.
        redis.call('HINCRBY', ekey, 'claim', 1)
        rest_event(prefix, due_key, out_key, id, ev[2], go, now)
      else
        redis.call('ZADD', due_key, now + lease, id)
        redis.call('ZADD', out_key, now + lease, id)
        local claim = tostring(redis.call('HINCRBY', ekey, 'claim', 1))
        table.insert(out, {id, claim})
        if holder ~= '' then
          redis.call('SADD', prefix .. ':ev:held:' .. holder, claim .. '@' .. id)
        end
      end
    else
      redis.call('ZREM', due_key, id)
    end
  end
end
if holder ~= '' and #out > 0 then
  redis.call('EXPIRE', prefix .. ':ev:held:' .. holder, held_keep)
  redis.call('SADD', holders_key, holder)
end
return out
"""
)

# A claimed event taken by a sender thread, before it is sent: 'go' (or 'probe'), or, if
# its webhook endpoint rests, put back due at the rest's end ('rested': claimed before the
# rest began). Only the attempt that still holds the claim ('stale' otherwise).
_TAKE = (
    LUA_REST
    + """
local due_key, out_key, ekey = KEYS[1], KEYS[2], KEYS[3]
local prefix, id, claim = ARGV[1], ARGV[2], ARGV[3]
local ev = redis.call('HMGET', ekey, 'claim', 'clinic')
if ev[1] ~= claim then return 'stale' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local go = endpoint_rest(prefix, ev[2], id .. ':' .. claim, now)
if type(go) == 'number' then
  rest_event(prefix, due_key, out_key, id, ev[2], go, now)
  return 'rested'
end
return go
"""
)

# Hand a claimed event back, not begun (its senders are stopping, or its lease is nearly
# over): due now, its attempts unchanged. Only the attempt that still holds the claim.
# Its webhook endpoint's probe, handed back, tried nothing: the next claim probes at once.
_RELEASE = """
local due_key, out_key, ekey, id, claim, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1],
  ARGV[2], ARGV[3]
if redis.call('HGET', ekey, 'claim') ~= claim then return 'stale' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', due_key, now, id)
redis.call('ZREM', out_key, id)
local rkey = prefix .. ':ev:rest:' .. (redis.call('HGET', ekey, 'clinic') or '')
if redis.call('HGET', rkey, 'probe') == id .. ':' .. claim then
  redis.call('HSET', rkey, 'until', string.format('%.6f', now))
  redis.call('HDEL', rkey, 'probe')
end
return 'released'
"""

# Finish one delivery attempt. done: the event is deleted (whoever holds the claim: it was
# delivered). retry / dead: only the attempt that still holds the claim reschedules it.
# A retry is due ARGV[4] seconds after now on Redis's clock, the one the claim compares
# with: a delivering host's clock off Redis's neither shortens the backoff nor stretches it.
# ARGV[8], the clinic's webhook endpoint as this attempt found it (whichever claim it held:
# it is about the endpoint, not the event): 'rest', no answer: it rests ARGV[10] seconds
# from now (the event's retry, at most REST_MAX_SECONDS), an attempt then taking up to
# ARGV[9] seconds, the URL that rests being ARGV[11] (`url_id`: a digest, not the URL);
# 'answered' (any HTTP status): its rest ends and the events that waited for it are due
# now (those not claimed meanwhile); '' neither: the rest ends too if this attempt was its
# probe (a probe that met no silence leaves nothing to rest for).
_FINISH = LUA_REST + """
local due_key, dead_key, ekey, out_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, claim, outcome, delay, err, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  ARGV[5], tonumber(ARGV[6])
local prefix, endpoint, probe_for, rest_for = ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])
local url_id = ARGV[11]
local clinic = redis.call('HGET', ekey, 'clinic')
local wkey = prefix .. ':ev:resting:' .. (clinic or '')
if clinic then
  local rkey = prefix .. ':ev:rest:' .. clinic
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  if endpoint == 'rest' then
    redis.call('HSET', rkey, 'until', string.format('%.6f', now + rest_for),
      'probe_for', probe_for, 'why', 'ev:' .. id .. ' got no answer (' .. err .. ')',
      'url', url_id)
    redis.call('HDEL', rkey, 'probe')
    redis.call('EXPIREAT', rkey, math.ceil(now + rest_for + REST_SLACK))
  elseif endpoint == 'answered'
      or redis.call('HGET', rkey, 'probe') == id .. ':' .. claim then
    -- Answered; or this attempt was the rest's probe and found no silence (dropped: the
    -- clinic no longer takes it; a TLS or URL error; config/ being read): nothing left
    -- to rest for, the others go now rather than one per `probe_for`.
    end_rest(prefix, clinic, due_key, out_key, now)
  end
end
if outcome == 'done' then
  redis.call('SREM', wkey, id)
  redis.call('DEL', ekey)
  redis.call('ZREM', due_key, id)
  redis.call('ZREM', out_key, id)
  return 'done'
end
if redis.call('HGET', ekey, 'claim') ~= claim then return 'stale' end
redis.call('SREM', wkey, id)
redis.call('ZREM', out_key, id)
redis.call('HINCRBY', ekey, 'attempts', 1)
redis.call('HSET', ekey, 'last_error', err)
if outcome == 'dead' then
  local t = redis.call('TIME')
  redis.call('ZREM', due_key, id)
  redis.call('ZADD', dead_key, tonumber(t[1]), id)
  redis.call('EXPIRE', ekey, keep)
  -- Those given up longer ago than `keep` have expired: their entries go too.
  redis.call('ZREMRANGEBYSCORE', dead_key, '-inf', '(' .. (tonumber(t[1]) - keep))
  return 'dead'
end
local t = redis.call('TIME')
redis.call('ZADD', due_key, tonumber(t[1]) + tonumber(t[2]) / 1000000 + delay, id)
return 'retry'
"""


# Send a given-up event again (`reminders events replay`): due now with its attempts
# counted afresh, kept until delivered. 0 if it is not given up (any more), or expired.
# Replayed once the endpoint is fixed: the clinic's webhook rest, if any, ends too.
_REPLAY = LUA_EMIT + LUA_REST + """
local dead_key, due_key, ekey, out_key, id, prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  ARGV[1], ARGV[2]
if not redis.call('ZSCORE', dead_key, id) then return 0 end
redis.call('ZREM', dead_key, id)
if redis.call('EXISTS', ekey) == 0 then return 0 end
redis.call('PERSIST', ekey)
redis.call('HSET', ekey, 'attempts', '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', due_key, event_due(prefix, now), id)
if redis.call('HGET', ekey, 'kind') == 'webhook' then
  end_rest(prefix, redis.call('HGET', ekey, 'clinic'), due_key, out_key, now)
end
return 1
"""

# The clinics' webhook URLs as config/ reads now (ARGV[2], JSON: clinic -> `url_id`): a
# clinic's rest of another URL (edited in config/ since) ends, the events that waited due
# now, for the new URL has given no reason to wait. Returns the clinics whose rest ended.
_MOVED = LUA_REST + """
local due_key, out_key, prefix = KEYS[1], KEYS[2], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ended = {}
for clinic, url_id in pairs(cjson.decode(ARGV[2])) do
  local rested = redis.call('HGET', prefix .. ':ev:rest:' .. clinic, 'url')
  if rested and rested ~= url_id then
    end_rest(prefix, clinic, due_key, out_key, now)
    table.insert(ended, clinic)
  end
end
return ended
"""


def url_id(url: str) -> str:
    """A webhook URL as a rest's mark names it: a digest (a URL may carry a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def webhook_urls(clinics: Mapping[str, Clinic]) -> dict[str, str]:
    """Return each clinic's webhook URL (those with a webhook), for `pump_events`."""
    return {clinic_id: c.webhook.url for clinic_id, c in clinics.items() if c.webhook}


EVENT_REF = "ev:"  # an event as `reminders events` names it: "ev:<id>" (no booking id has ":")


@dataclass(frozen=True)
class Event:
    """One event as stored, ready to be delivered."""

    id: str
    clinic: str
    kind: str  # "webhook" | "alert"
    type: str
    fields: dict[str, Any]
    attempts: int

    def payload(self) -> dict[str, Any]:
        """The JSON the clinic receives: times as ISO 8601 UTC."""
        data = {"id": self.id, "type": self.type, "clinic": self.clinic}
        for key, value in sorted(self.fields.items()):
            if key.endswith("_at") and isinstance(value, int | float):
                value = iso(value)
            data[key] = value
        return data


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Events:
    """The clinic events waiting to be delivered (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, *, retention_days: float = 90) -> None:
        self.redis = client
        self.prefix = prefix
        self.keep_seconds = int(retention_days * 86400)
        self.due_key = f"{prefix}:ev:due"
        self.dead_key = f"{prefix}:ev:dead"
        self.out_key = f"{prefix}:ev:out"  # claimed, not finished: id -> its lease's end
        self.senders_key = f"{prefix}:ev:senders"  # "<node>|<threads>" -> until when
        self.holders_key = f"{prefix}:ev:holders"  # nodes with a held set
        self.emit_script = client.register_script(_EMIT)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._replay = client.register_script(_REPLAY)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)
        self._moved = client.register_script(_MOVED)

    def event_key(self, event_id: str) -> str:
        return f"{self.prefix}:ev:{event_id}"

    def held_key(self, node: str) -> str:
        """The claims ("<claim>@<id>") handed to one process's event senders, not finished."""
        return f"{self.prefix}:ev:held:{node}"

    def rest_key(self, clinic: str) -> str:
        """The mark of `clinic`'s webhook endpoint resting (see the module docstring)."""
        return f"{self.prefix}:ev:rest:{clinic}"

    def emit(
        self,
        clinic: str,
        kind: str,
        etype: str,
        fields: Mapping[str, Any],
        *,
        pipe: redis.client.Pipeline | None = None,
    ) -> str | None:
        """Write one event (inside `pipe`'s MULTI if given); return its id (None in a pipe)."""
        args = [self.prefix, clinic, kind, etype, json.dumps(dict(fields), separators=(",", ":"))]
        if pipe is not None:
            self.emit_script(args=args, client=pipe)
            return None
        return str(self.emit_script(args=args))

    def claim(self, limit: int, lease_seconds: float, capacity: int = 0, *,
              holder: str = "") -> list[tuple[str, str]]:
        """Lease up to `limit` due events; return (event id, claim) pairs.

        `capacity` > 0: no more than the registered event senders take at once, counting
        the claims not finished yet (`capacity` itself while no sender is registered).
        `holder`: the event senders (`<node>` of P:ev:senders) claiming for themselves:
        the claims are noted as held by them in the same step (P:ev:held:<node>), so a
        process killed the moment after keeps no capacity once its registration lapses."""
        rows = self._claim(keys=[self.due_key, self.out_key, self.senders_key, self.holders_key],
                           args=[self.prefix, limit, lease_seconds, capacity, holder,
                                 HELD_KEEP_SECONDS])
        return [(str(r[0]), str(r[1])) for r in rows]

    def release(self, event_id: str, claim: str) -> str:
        """Hand a claimed event back, not begun: due now ("released"), if `claim` still
        holds it ("stale" otherwise)."""
        return str(self._release(keys=[self.due_key, self.out_key, self.event_key(event_id)],
                                 args=[event_id, claim, self.prefix]))

    def lease_left(self, event_id: str, claim: str) -> float | None:
        """Return the seconds left of `claim`'s lease (Redis's clock), None if it no longer
        holds the event (delivered, or claimed again)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.event_key(event_id), "claim")
        pipe.zscore(self.due_key, event_id)
        pipe.time()
        held, until, (seconds, micros) = pipe.execute()
        if held != claim or until is None:
            return None
        return float(until) - (float(seconds) + float(micros) / 1_000_000)

    def load(self, event_id: str, claim: str) -> Event | None:
        """Return the event if `claim` still holds it, else None (done, or claimed again)."""
        raw = cast(dict[str, str], self.redis.hgetall(self.event_key(event_id)))
        if not raw or raw.get("claim") != claim:
            return None
        return Event(
            id=event_id,
            clinic=raw["clinic"],
            kind=raw["kind"],
            type=raw["type"],
            fields=json.loads(raw["body"]),
            attempts=int(raw.get("attempts", 0)),
        )

    def take(self, event_id: str, claim: str) -> str:
        """A sender thread takes a claimed webhook event: "go" (or "probe": its endpoint's
        rest is over and this attempt tries it), "rested" (its endpoint rests: put back due
        at the rest's end, not tried, no attempt counted) or "stale" (`claim` no longer
        holds it)."""
        return str(self._take(keys=[self.due_key, self.out_key, self.event_key(event_id)],
                              args=[self.prefix, event_id, claim]))

    def done(self, event_id: str, claim: str, *, endpoint: str = "") -> str:
        """Delete the delivered event; `endpoint` "answered": its webhook endpoint's rest
        ends (`_fin`)."""
        return self._fin(event_id, claim, "done", endpoint=endpoint)

    def retry(self, event_id: str, claim: str, delay: float, error: str, *,
              endpoint: str = "", rest: float = 0.0, probe_for: float = 0.0,
              url: str = "") -> str:
        """Try the event again `delay` seconds from now on Redis's clock (its claims');
        `endpoint` "rest": its webhook endpoint (`url`) rests `rest` seconds."""
        return self._fin(event_id, claim, "retry", delay, error, endpoint=endpoint,
                         rest=rest, probe_for=probe_for, url=url)

    def give_up(self, event_id: str, claim: str, error: str, *, endpoint: str = "",
                rest: float = 0.0, probe_for: float = 0.0, url: str = "") -> str:
        """Give the event up; `endpoint` "rest": its webhook endpoint (`url`) rests `rest`
        seconds."""
        return self._fin(event_id, claim, "dead", 0.0, error, endpoint=endpoint, rest=rest,
                         probe_for=probe_for, url=url)

    def _fin(self, event_id: str, claim: str, outcome: str, delay: float = 0.0,
             err: str = "", *, endpoint: str = "", rest: float = 0.0,
             probe_for: float = 0.0, url: str = "") -> str:
        """`endpoint`: what the attempt found of the clinic's webhook endpoint: "rest" (no
        answer: it, `url`, rests `rest` seconds, an attempt then taking up to `probe_for`),
        "answered" (any HTTP status: its rest ends, the events that waited are due now),
        or "" (neither, or not a webhook)."""
        return str(
            self._finish(
                keys=[self.due_key, self.dead_key, self.event_key(event_id), self.out_key],
                args=[event_id, claim, outcome, delay, err, self.keep_seconds, self.prefix,
                      endpoint, probe_for, rest, url_id(url) if url else ""],
            )
        )

    def end_moved_rests(self, urls: Mapping[str, str]) -> list[str]:
        """End the rests of webhook URLs no longer the clinic's (`urls`: clinic -> its
        webhook URL as config/ reads now); return the clinics whose rest ended."""
        if not urls:
            return []
        ids = {clinic_id: url_id(url) for clinic_id, url in urls.items()}
        return [str(c) for c in self._moved(keys=[self.due_key, self.out_key],
                                            args=[self.prefix, json.dumps(ids)])]

    def pending(self, clinic: str | None = None) -> list[Event]:
        """Return the events waiting (or being delivered), oldest first (for tests and ops)."""
        out = []
        for event_id in cast(list[str], self.redis.zrange(self.due_key, 0, -1)):
            raw = cast(dict[str, str], self.redis.hgetall(self.event_key(event_id)))
            if raw and (clinic is None or raw["clinic"] == clinic):
                out.append(
                    Event(event_id, raw["clinic"], raw["kind"], raw["type"],
                          json.loads(raw["body"]), int(raw.get("attempts", 0)))
                )
        return out

    def dead(self) -> list[str]:
        return cast(list[str], self.redis.zrange(self.dead_key, 0, -1))

    def dead_events(self, clinic: str | None = None) -> list[dict[str, Any]]:
        """Return the given-up events (optionally one clinic's), oldest first: ids, type,
        booking id, attempts and the last reason; never a body or contact (events have
        none). Entries whose event has expired (`retention` after it was given up) are
        dropped from P:ev:dead on the way."""
        rows = cast(list[tuple[str, float]],
                    self.redis.zrange(self.dead_key, 0, -1, withscores=True))
        pipe = self.redis.pipeline(transaction=False)
        for event_id, _ in rows:
            pipe.hgetall(self.event_key(event_id))
        out: list[dict[str, Any]] = []
        gone: list[str] = []
        for (event_id, score), raw in zip(rows, pipe.execute(), strict=True):
            if not raw:  # expired (an id is never used again: nothing can bring it back)
                gone.append(event_id)
                continue
            if clinic is not None and raw["clinic"] != clinic:
                continue
            fields = json.loads(raw["body"])
            out.append({
                "id": event_id, "ref": EVENT_REF + event_id, "clinic": raw["clinic"],
                "type": raw["type"], "kind": raw["kind"],
                "booking_id": fields.get("booking_id"),
                "attempts": int(raw.get("attempts", 0)),
                "reason": raw.get("last_error") or None, "given_up_at": iso(score),
            })
        if gone:
            self.redis.zrem(self.dead_key, *gone)
        out.sort(key=lambda d: (d["given_up_at"], int(d["id"])))
        return out

    def replay(self, event_ids: list[str]) -> list[str]:
        """Put given-up events back to be delivered now, in the order they were written;
        return the ids replayed."""
        ordered = sorted(event_ids, key=lambda i: (len(i), i))  # "9" before "10"
        return [event_id for event_id in ordered if int(self._replay(
            keys=[self.dead_key, self.due_key, self.event_key(event_id), self.out_key],
            args=[event_id, self.prefix]))]


# The reply kind a change of consent is told as, per channel: (opted out, opted in again).
CONSENT_REPLIES = {"sms": ("stop", "start"), "email": ("unsubscribe", "resubscribe")}


def consent_told(store: Store, clinic: str, channel: str, contact: str) -> bool:
    """Return whether the clinic was last told that `contact` opted out of `channel`
    (P:ev:consent, as `tell_consent` writes it)."""
    from .optout import normal_contact

    kind = "email" if channel == "email" else "phone"
    field = f"{channel}:{store.contact_id(kind, normal_contact(channel, contact))}"
    return bool(store.redis.hexists(f"{store.prefix}:ev:consent:{clinic}", field))


def tell_consent(store: Store, clinic: str, channel: str, contact: str, when: datetime, *,
                 hooks: str) -> str | None:
    """Tell the clinic of `contact`'s consent to `channel` as it stands now, if it was not
    told yet: `patient.replied` (reply "stop" / "start", "unsubscribe"; `channel`) on each of
    the contact's bookings at the clinic. Return the reply told, or None (nothing changed
    since the clinic was last told).

    Called after each opt-out and opt-in (STOP, START, the email unsubscribe), and again
    when the patient repeats one: what was told is kept per contact (P:ev:consent), written
    in the same MULTI as the events, watched with the opt-out itself. So a change is told
    once whoever asks (two STOPs at once), and a change whose telling was lost (Redis failed
    after the opt-out's write, the process died) is told when the patient or the provider
    sends it again, where the opt-out script's own answer says "nothing changed". A STOP
    then a START before either is told tells nothing: the clinic's record is still right.

    An upgraded deployment: an SMS opt-out with no record was made before the record
    existed (every opt-out since marks it "0" in its own script, worker/store.py _OPT_OUT),
    and the code of its day told the clinic and confirmed it: counted told, so a STOP again
    gets no second event or confirmation, and its START (whose opt-in writes "1" for it) is
    told. No marker in time: nothing to set at start-up, any process may serve any request,
    and a STOP served by an older process still running meanwhile (which tells it itself)
    is counted told too. An email unsubscribe was never told before the record: one with no
    record is told (once) when the link is clicked again.
    """
    import redis

    from .optout import normal_contact

    contact = normal_contact(channel, contact)
    out_key = store.optout_key(clinic)
    out_field = f"{channel}:{contact}"
    told_key = store.consent_key(clinic)
    told_field = store.consent_field(channel, contact)
    events = Events(store.redis, store.prefix)
    with store.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(out_key, told_key)  # type: ignore[no-untyped-call]  # redis-py stubs
                out = bool(pipe.hexists(out_key, out_field))
                record = cast(str | None, pipe.hget(told_key, told_field))
                told = record == "1" or (record is None and out and channel == "sms")
                if out == told:
                    if record == "0":  # out and in again, never told: nothing to tell
                        pipe.multi()
                        pipe.hdel(told_key, told_field)
                        pipe.execute()
                    else:
                        pipe.reset()
                    return None
                reply = CONSENT_REPLIES[channel][0 if out else 1]
                ids = store.contact_bookings(clinic, channel, contact)
                summaries = [s for s in store.booking_summaries(clinic, ids) if s]
                pipe.multi()
                if out:
                    pipe.hset(told_key, told_field, "1")
                else:
                    pipe.hdel(told_key, told_field)
                if "patient.replied" in hooks.split():
                    for summary in summaries:
                        events.emit(clinic, "webhook", "patient.replied",
                                    {"booking_id": summary["booking_id"],
                                     "version": summary["version"], "reply": reply,
                                     "channel": channel, "received_at": when.timestamp()},
                                    pipe=pipe)
                pipe.execute()
                return reply
            except redis.WatchError:
                continue


def hooks_of(clinic: Clinic | None) -> str:
    """Return what `clinic` is told of, space-separated: its webhook's event types, and
    "alert" when held bookings are emailed to it (it has an address)."""
    if clinic is None:
        return ""
    wanted = [t for t in EVENT_TYPES if clinic.wants(t)]
    if clinic.email:
        wanted.append("alert")
    return " ".join(wanted)


def hooks_for(clinics: Mapping[str, Clinic]) -> Callable[[str], str]:
    """Return `hooks_of` over a clinic config, for `Store(hooks=...)`."""
    table = {clinic_id: hooks_of(c) for clinic_id, c in clinics.items()}
    return lambda clinic_id: table.get(clinic_id, "")


# --- signing -----------------------------------------------------------------------


def sign(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """Return the signature header value for `body` sent at `timestamp`: one `v1=` per
    secret (several while one is rotated: `verify_signature` accepts any of them)."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    macs = [hmac.new(s.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
            for s in secrets]
    return f"t={timestamp}," + ",".join(f"v1={mac}" for mac in macs)


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """Return whether `header` signs `body` with `secret` within `tolerance` of `now`."""
    if not header:
        return False
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        parts.setdefault(name, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split(",v1=", 1)[1]
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))


def post_webhook(url: str, secret: str | Sequence[str], event: Event, *,
                 timeout: float) -> None:
    """POST one signed event; raise DeliveryError unless the clinic answers 2xx.

    `secret`: one, or several (a secret being rotated: the new one, then the previous one),
    each giving the signature header a `v1=` of its own (`sign`)."""
    import requests

    from .delivery import urllib3_lines_kept_out

    body = json.dumps(event.payload(), separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Reminders-Event": event.type,
        "Reminders-Event-Id": event.id,
        # The host's clock, not Redis's: the receiver compares it with its own clock
        # (`verify_signature`), and both should be NTP-synced; Redis's is for our claims.
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
    }
    session = requests.Session()
    adapter = _DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # The whole attempt ends after its two network waits (a connect and a read): an answer
    # whose status line and headers trickle in, each byte inside the read timeout, had no
    # end but the watchdog's kill of the worker process (worker/event_senders.py).
    deadline = threading.Timer(2 * timeout, adapter.cut)
    deadline.daemon = True
    deadline.start()
    try:
        # The status decides; the body is never read (stream=True, closed unread): an
        # answer whose body trickles on, each byte inside the read timeout, held the
        # delivery until the task's time limit, the event left claimed and sent again.
        # urllib3's lines carry the URL (its token): kept out of every handler.
        with urllib3_lines_kept_out():
            response = session.post(url, data=body, headers=headers, timeout=timeout,
                                    allow_redirects=False, stream=True)
            response.close()
    except (requests.Timeout, requests.ConnectionError) as exc:
        if adapter.was_cut:
            raise NoAnswer(f"webhook gave no full answer in {2 * timeout:g} s") from None
        if isinstance(exc, requests.exceptions.SSLError):  # an answer, not HTTP: no rest
            raise DeliveryError(f"webhook unreachable ({type(exc).__name__})") from None
        # Refused, reset, or no answer in time: its endpoint rests (`deliver_event`).
        raise NoAnswer(f"webhook unreachable ({type(exc).__name__})") from None
    except requests.RequestException as exc:
        if adapter.was_cut:
            raise NoAnswer(f"webhook gave no full answer in {2 * timeout:g} s") from None
        raise DeliveryError(f"webhook unreachable ({type(exc).__name__})") from None
    except ValueError as exc:
        if adapter.was_cut:  # http.client's parse of a cut answer
            raise NoAnswer(f"webhook gave no full answer in {2 * timeout:g} s") from None
        # urllib3's LocationParseError (a host label empty or too long: "hooks..x.example")
        # is a ValueError, not a RequestException: counted, retried and given up as any
        # failure, never left to escape (the event stayed claimed and was never given up).
        raise DeliveryError(f"webhook URL cannot be used ({type(exc).__name__})") from None
    finally:
        deadline.cancel()
        session.close()
    if not 200 <= response.status_code < 300:
        raise Answered(f"webhook answered HTTP {response.status_code}")


def _DeadlineAdapter() -> Any:  # noqa: N802  (a class made on use: requests is imported late)
    """A requests adapter whose connections `cut()` shuts (the attempt's deadline)."""
    import socket

    from requests.adapters import HTTPAdapter
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Adapter(HTTPAdapter):
        def __init__(self) -> None:
            self.connections: list[Any] = []
            self.was_cut = False
            self._cut_lock = threading.Lock()
            super().__init__(max_retries=0)

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            adapter = self

            class Pool(HTTPConnectionPool):
                def _new_conn(self) -> Any:
                    conn = super()._new_conn()
                    adapter._made(conn)
                    return conn

            class TLSPool(HTTPSConnectionPool):
                def _new_conn(self) -> Any:
                    conn = super()._new_conn()
                    adapter._made(conn)
                    return conn

            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

        def _made(self, conn: Any) -> None:
            with self._cut_lock:
                self.connections.append(conn)

        def cut(self) -> None:
            with self._cut_lock:
                self.was_cut = True
                for conn in self.connections:
                    sock = getattr(conn, "sock", None)
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)

    return Adapter()


class NoAnswer(DeliveryError):
    """The webhook endpoint gave no answer: the connection refused or reset, or a timeout."""


class Answered(DeliveryError):
    """The webhook endpoint answered, with an HTTP status other than 2xx."""


# --- delivering one claimed event ----------------------------------------------------


def deliver_event(
    events: Events,
    event_id: str,
    claim: str,
    *,
    clinics: Mapping[str, Clinic],
    renderer: Renderer,
    settings: Settings,
    env: Mapping[str, str] | None = None,
    unsettled: Callable[[], bool] | None = None,
    timeout: float | None = None,
) -> str:
    """Deliver one claimed event; return what happened (for the task's log line).

    `timeout`: the most one network wait of this attempt may take, below the settings'
    (the event senders keep a delivery inside its lease: worker/event_senders.py).

    `unsettled()`: config/ changed since `clinics` was read (not read yet: worker/catalog.py).
    An event the clinic does not take as `clinics` say is then retried, not dropped: the
    process that wrote it (the API) may have read the edit that made the clinic take it."""
    from .dispatch import compute_backoff  # dispatch imports the clinic config, which imports us

    event = events.load(event_id, claim)
    if event is None:
        return "gone (delivered, or claimed again after the lease)"
    clinic = clinics.get(event.clinic)
    endpoint = ""  # what this attempt finds of the clinic's webhook endpoint (`Events._fin`)
    wait = _within(settings.webhook_timeout_seconds, timeout)
    probe_for = 2 * wait + PROBE_MARGIN  # a connect and a read, each at most `wait`
    try:
        if clinic is None:
            # Its file missing as config/ is read now: deleted by mistake, or being rewritten
            # by a deploy. Retried, not dropped (given up after webhook_max_attempts).
            path = settings.clinics_dir / f"{event.clinic}.toml"
            log.warning("clinic event %s (%s): %s is not in config/ as read now; retried",
                        event_id, event.type, path)
            raise DeliveryError(f"clinic {event.clinic!r} not configured: {path} is missing")
        if event.kind == "alert":
            if not clinic.email:
                _unsettled(unsettled)
                events.done(event_id, claim)
                return "dropped: the clinic has no email address"
            send_alert(clinic, event, renderer, settings, env, timeout=timeout)
        else:
            if clinic.webhook is None or not clinic.wants(event.type):
                _unsettled(unsettled)
                events.done(event_id, claim)
                return "dropped: the clinic's webhook does not take this event"
            secrets = clinic.webhook.secret_values(clinic.id, env)
            taken = events.take(event_id, claim)
            if taken == "stale":
                return "gone (delivered, or claimed again after the lease)"
            if taken == "rested":
                log.info("clinic event %s (%s): clinic %s's webhook endpoint rests after an "
                         "event it did not answer; not tried, due again when the rest ends",
                         event_id, event.type, event.clinic)
                return RESTED
            post_webhook(clinic.webhook.url, secrets, event, timeout=wait)
            endpoint = "answered"
    except (DeliveryError, ConfigError) as exc:
        reason = exc.reason if isinstance(exc, DeliveryError) else exc.problem
        endpoint = "rest" if isinstance(exc, NoAnswer) else (
            "answered" if isinstance(exc, Answered) else "")
        attempts = event.attempts + 1
        # Its retry; with no answer, its endpoint rests until then (and on giving up, as
        # long as a retry would have waited), at most REST_MAX_SECONDS, the events taken
        # meanwhile not tried.
        delay = compute_backoff(attempts, base=settings.backoff_base_seconds,
                                cap=settings.backoff_cap_seconds)
        rest = min(delay, REST_MAX_SECONDS)
        url = clinic.webhook.url if clinic is not None and clinic.webhook else ""
        if attempts >= settings.webhook_max_attempts:
            events.give_up(event_id, claim, reason, endpoint=endpoint, rest=rest,
                           probe_for=probe_for, url=url)
            log.warning("clinic event %s (%s) given up after %d attempts: %s",
                        event_id, event.type, attempts, reason)
            return f"given up: {reason}"
        # Due on Redis's clock, not this host's.
        events.retry(event_id, claim, delay, reason, endpoint=endpoint, rest=rest,
                     probe_for=probe_for, url=url)
        log.info("clinic event %s (%s) retried in %.0f s: %s", event_id, event.type, delay, reason)
        return f"retrying: {reason}"
    events.done(event_id, claim, endpoint=endpoint)
    log.info("clinic event %s (%s) delivered to clinic %s", event_id, event.type, event.clinic)
    return "delivered"


def _within(configured: float, limit: float | None) -> float:
    return configured if limit is None else min(configured, limit)


def _unsettled(unsettled: Callable[[], bool] | None) -> None:
    """Raise a (transient) DeliveryError if config/ is being read again (`deliver_event`)."""
    if unsettled is not None and unsettled():
        raise DeliveryError("config/ changed and is not read yet: what the clinic takes "
                            "is decided once it is")


def render_alert(clinic: Clinic, event: Event, renderer: Renderer) -> RenderedMessage:
    """Render the clinic's alert for `event` (templates/<locale>/clinic/<name>.email.*.j2)."""
    from babel.dates import format_date, format_time
    from jinja2 import TemplateError

    from .planner import reason_facts

    name = event.type.split(".", 1)[1]
    fields = event.fields
    tz = ZoneInfo(clinic.timezone)
    # In the clinic's locale if it has templates, else English, as its patients' messages.
    folder = renderer.fallback(clinic.locale, clinic)
    locale = renderer.locale(folder)
    starts = datetime.fromtimestamp(float(fields.get("starts_at", 0)), UTC).astimezone(tz)
    # The reason's values, for a template that says it in its own language (`kind` "" for a
    # reason it does not know: the template quotes `reason` as it is).
    facts = reason_facts(str(fields.get("reason", ""))) or {"kind": ""}
    if "last_dose" in facts:
        try:
            facts["last_dose"] = format_date(date.fromisoformat(facts["last_dose"]), "long",
                                             locale=locale)
        except ValueError:
            facts = {"kind": ""}
    context = {
        "clinic_name": clinic.name,
        "booking_id": fields.get("booking_id", ""),
        "treatment_id": fields.get("treatment", ""),
        "reason": fields.get("reason", ""),
        "facts": facts,
        "appointment_date": format_date(starts.date(), "full", locale=locale),
        "appointment_time": format_time(starts, "short", tzinfo=tz, locale=locale),
    }
    base = f"{folder}/clinic/{name}.email"
    try:
        subject = renderer.env.get_template(f"{base}.subject.j2").render(context)
        text = renderer.env.get_template(f"{base}.txt.j2").render(context)
    except TemplateError as exc:
        # A ConfigError: counted, retried and given up as any failed delivery, not an
        # exception that leaves the event claimed and claims it again at every lease's end.
        raise ConfigError(renderer.templates_dir / base,
                          f"cannot render the clinic's alert ({type(exc).__name__})") from None
    from .rendering import RenderedMessage

    return RenderedMessage(channel="email", subject=" ".join(subject.split()),
                           text=text.strip() + "\n", html=None)


def send_alert(
    clinic: Clinic,
    event: Event,
    renderer: Renderer,
    settings: Settings,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float | None = None,
) -> str:
    """Email the alert to the clinic's own address through its email channel (or outbox)."""
    from .delivery import Envelope, deliver

    assert clinic.email is not None
    booking_id = str(event.fields.get("booking_id", ""))
    envelope = Envelope(ref=f"{clinic.id}/{booking_id}/clinic-{event.type}", clinic=clinic.id,
                        channel="email", to=clinic.email)
    return deliver(
        clinic.delivery_url("email", clinic.email, env),
        envelope,
        render_alert(clinic, event, renderer),
        outbox=settings.outbox,
        timeout=_within(settings.send_timeout_seconds, timeout),
        now=datetime.now(UTC),
    )


def pump_events(events: Events, publish: Callable[[str, str], None], *, batch: int,
                lease_seconds: float, capacity: int = 0,
                endpoints: Mapping[str, str] | None = None) -> int:
    """Claim due clinic events and publish one delivery task each; return how many.

    `capacity` > 0: only what the workers' event senders can take at once (`Events.claim`):
    the others stay due, not claimed to wait behind a dead endpoint until their lease ends.
    `endpoints`: each clinic's webhook URL as config/ reads now (`webhook_urls`): a rest of
    a URL edited since ends first, so the new URL is tried at once."""
    for clinic_id in events.end_moved_rests(endpoints or {}):
        log.info("pump: clinic %s's webhook URL changed in config/: its rest ends", clinic_id)
    published = 0
    for event_id, claim in events.claim(batch, lease_seconds, capacity):
        publish(event_id, claim)  # a refused publish leaves it claimed: due again after the lease
        published += 1
    if published:
        log.info("pump: published %d clinic event(s)", published)
    return published
