"""Where a reminder is stored: the durable schedule in Redis (not in the broker).

Layout 2. Keys, all under the configured prefix P:
  P:layout                 STR   "2": the layout of everything below (see "Layouts")
  P:due                    ZSET  reminder ref -> due instant (epoch seconds)
  P:lease                  ZSET  reminder ref -> lease expiry (claimed by a pump, not yet done)
  P:dead                   ZSET  reminder ref -> when it was dead-lettered
  P:b:<clinic>/<booking>   HASH  the booking and every one of its reminders (below)
  P:d:<clinic>/<booking>   STR   the booking document (JSON, validated)
  P:a:<ref>                LIST  one JSON line per finished attempt (from the first one on)
  P:ledger:<ref>           STR   send ledger: a token while sending (expires), "sent" after
  P:bookings:<clinic>      ZSET  the clinic's booking ids -> when their keys expire
  P:c:<clinic>/<contact>   ZSET  the contact index: the clinic's booking ids of one patient
                                 contact -> when their keys expire (see "Contact index")
  P:t                      HASH  text id -> text: the planner's words, each stored once
  P:optout:<clinic>        HASH  "<channel>:<address>" -> why: the patients' opt-outs (STOP,
                                 unsubscribe), read by the send's fenced begin; kept until
                                 the patient opts in again (worker/optout.py)
  P:unsub:<clinic>/<link>  STR   "<channel>:<address>" behind one unsubscribe link id
                                 (written by each email's send to that address; expires
                                 `retention` after the last one, each address on its own,
                                 but not before the keys of a booking that sent it; a
                                 cancel brings it down to the cancelled booking's expiry
                                 unless another live booking sent it)
  P:unsub-by:<clinic>/<link> ZSET the bookings whose emails carried that link, each scored
                                 by its keep_until when noted (an email's send drops a few
                                 past it whose keys are gone, scores again those still
                                 kept), read by a cancel; expires with the link
  P:secret:<name>          STR   a server secret shared by every process (worker/secrets.py)
  P:once:help:<clinic>:<contact> STR the one help answer to an unknown text in 24 h
  P:inbound:<clinic>/<sid> STR   an inbound text acted on (its provider's MessageSid): sent
                                 again (a replay), it is not acted on again; kept
                                 `retention` (worker/api/inbound.py)
  P:insid:<clinic>/<contact> ZSET MessageSid -> when: the number's STOP, START, confirm
                                 and reschedule texts acted on, as P:inbound but with no
                                 expiry (as the opt-outs they change), the last 100 of a number

A reminder ref is "<clinic>/<booking_id>/<key>" (neither id may contain "/"); a reminder
key is "<step>[#<occurrence>]:<channel>". The ZSETs hold these public refs.

The booking hash. Booking fields are plain words: status, version, window (the send window
it was planned under, minutes "start-end"), created_at, updated_at, keep_until, and only
when set hold_reason, released_for (a digest of the medications the clinic reviewed),
smsv (a count of its SMS whose time moved at send time: the SMS cap's guards read it) and
unsub (the ids of the unsubscribe links its emails carried, space-separated: its cancel
lets the address behind each go on time).
Every field with a ":" is a reminder's, in a fixed-order "|"-separated form (trailing empty
slots left out; the last slot is free text and may itself hold "|"):

  <key>    status|version|planned|due|expires|note|template|flags|reason
  <key>+   claim|attempts|tok|sent_at|sent_version|last_error        (once it was claimed)

  status   one letter: S scheduled, P sending, R retrying, D sent, F failed, K skipped,
           C cancelled (STATUS_CODE)
  planned, due, expires, sent_at   epoch seconds ("1797354000", or with a fraction);
           due is left empty while it equals planned
  note     the expiry's words (`expires_note`), as a text id
  template a text id; left empty when it is the step's id. Step and channel come from the key
  flags    "b": due when the booking arrives; "s": an email that went (or goes) by SMS
           (the patient unsubscribed from email: counted by the SMS cap; set when written
           for an unsubscribed patient, by the unsubscribe, or by its begin: `by_sms_keys`,
           _OPT_OUT, _BEGIN_SEND; cleared while still to go once it no longer goes by SMS:
           by its begin, an email opt-in, a write of a booking whose address is not
           unsubscribed or that no longer allows SMS, `_by_email_again`, or one that gives
           its step's own SMS back, which carries the step, `carried_keys`); "r": replayed
           from the dead letters, or retried after an unknown outcome, and not counted
           since by a cap decision (a dead SMS is not counted, a retry's time had no cap
           decision: its attempt caps it even on its own day, worker/dispatch.py
           `_late_sms`; the restamp clears it); "#<n>": the occurrence, when the key's
           "#<n>" (or its absence, 1) does not say it
  reason   "@<id>": a text id; anything else is the text itself ("\\" escapes a leading
           "@" or "\\")
  tok      the token of the attempt that took the ledger (fences finish)
  attempts "<n>" or "<n>+<earlier>": the n attempts of the reminder's budget of max_attempts
           (afresh after a move or a replay) and the earlier ones made before that; the
           timeline shows their sum (`attempts_made`)

Why this layout (measured: 100,000 bookings of 10 reminders, worker/store.py layout 1 took
1,131 B of Redis memory per pending reminder, this one ~300 B, ~340 B with the contact index
of distinct patients; see benchmarks/store_layout.py):
- One hash per booking instead of a hash per reminder plus a set of keys: no key, expiry or
  dict entry per reminder, and no separate SET. A booking's state is one key, so the
  upsert's optimistic check covers everything it read, and retention expires two keys.
- Redis keeps a small hash as a listpack (a few bytes per field) only while every value is
  at most 64 bytes (hash-max-listpack-value); one longer value turns it into a hashtable
  (~70 B more per field). So the document lives in its own key, a reminder's state is a
  short positional string, an attempt's token and counters sit in a second field that
  only attempted reminders have, and the planner's words (reasons, expiry notes, template
  names: a few dozen distinct strings per protocol, repeated in every booking) are stored once in
  P:t and referenced by a content-derived id. Words written at send time (errors, retry
  times) stay inline: a booking whose reminder failed may use the larger encoding.
- Derivable values are not stored: step and channel (the key), due while it equals planned,
  the template when it is the step's name, zeros and empty values.
- The due, lease and dead sets keep one entry per reminder with its public ref: a shorter
  member would save 8 B per reminder and cost a translation on every claim.
- The attempt log and the ledger exist only once a reminder was attempted; the token of the
  last finished attempt is in the log's last line (a repeated finish is recognised there).

Every change of a reminder's state is one atomic step: a Lua script (claim, begin, finish,
requeue, cancel, replay, purge, and the upsert's apply). The upsert reconciles in Python
(worker/reconcile.py) and applies the result with a script that first checks that the
booking's hash is exactly what was read (absent, for a new one, or the same fields and
values); otherwise it reads and reconciles again. Every finish is fenced by the reminder's
version and claim and the attempt's token: an attempt the clinic's change overtook only adds
to the attempt log, except that a delivery that did happen is always recorded. Retention:
a booking's keys expire `retention` after its last reminder; a booking with a dead letter
is kept until the dead letter is replayed or purged.

Contact index. <contact> is `contact_id(kind, value, secret)`: a truncated HMAC-SHA256 of
"phone:<E.164>" or "email:<address lowercased>" keyed with the server secret "contact"
(P:secret:contact, worker/secrets.py), so no phone number or address appears in a key name
or can be recovered from one by trying numbers (it hides them from a key listing, not
from someone who can read the documents or the secret). The booking hash's `contacts` field
lists the ids of its document's contacts; every step that writes a booking's expiry (the
upsert's apply, cancel, finish, replay and purge, through `keep_booking`) writes the same
score into each of its contacts' sets, and the apply takes the booking out of the sets of
contacts its new document no longer has, in the same script: the index is never stale. A
member whose score has passed is a booking whose keys expired (readers skip it; the next
write to the set removes it); the set expires with its last booking. A booking stored
before the index existed is indexed by its next upsert.
Ids were once unkeyed SHA-256: a booking stored then is moved to its keyed ids' sets by its
next upsert (its `contacts` field changes, so the apply unindexes the old ids); until then
`bookings_for_contact` also reads the unkeyed ids' sets, which expire with their bookings.

Layouts: P:layout names the layout. A store refuses (StoreLayoutError) data of another
layout, and data of layout 1 (which had no P:layout key but P:k:* and P:r:* keys), rather
than misread it; `reminders migrate` (worker/migrate.py) converts layout 1 to this one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import orjson
import redis

from .clinics import SendWindow, SmsSettings
from .clock import redis_time
from .errors import BookingRejected, ConfigError, NotFound
from .models import Booking, utc_iso
from .notices import NoticeReminder, base_step, is_notice, plan_notices, sent, went_out
from .optout import normal_contact
from .planner import (
    _LATE,
    BEYOND_CAP,
    Plan,
    PlannedReminder,
    PlanRecord,
    ReminderRecord,
    cap_plan,
    cap_words,
    critical_email,
    decoded_from,
    is_hold_notice,
    reminder_from_record,
    scheduled_sms,
    sms_fits,
)
from .protocols import AGAIN_PREFIX, NOTICE_STEPS, REPAUSE_STEP, parse_notice_steps
from .reconcile import AFTER_A_CHANGE, OPTED_OUT, reconcile, written_epoch
from .status import PENDING, TERMINAL, Status, lua_prelude
from .webhooks import LUA_EMIT

LAYOUT = "2"
ATTEMPT_LOG_MAX = 50
IN_FLIGHT_MARGIN = 1.0  # seconds past an in-flight attempt's ledger expiry before trying again
# The reason of a reminder a claim put back in the schedule because an earlier attempt of it
# is still at work (its ledger held): a change reads that attempt as being sent.
IN_FLIGHT_REQUEUED = "another attempt is in flight"
# `Store.recap` plans a booking whose visit has begun as re-submitted this long before it.
_JUST_BEFORE = timedelta(microseconds=1)
_NORMS_TRIES = 20  # reads of the patients' addresses before a script gives up (see contact_of)
APPLY_CHUNK = 200  # bookings per apply script: a few milliseconds of Redis at a time
READ_CHUNK = 200  # bookings per read script (`Store._read`): the same

# A reminder's status as stored (one letter) and back.
STATUS_CODE: dict[str, str] = {
    Status.SCHEDULED: "S",
    Status.SENDING: "P",
    Status.RETRYING: "R",
    Status.SENT: "D",
    Status.FAILED: "F",
    Status.SKIPPED: "K",
    Status.CANCELLED: "C",
}
STATUS_OF: dict[str, str] = {code: str(status) for status, code in STATUS_CODE.items()}
# The slots of a reminder's two fields, in order.
REMINDER_SLOTS = ("status", "version", "planned", "due", "expires", "note", "template", "flags",
                  "reason")
ATTEMPT_SLOTS = ("claim", "attempts", "tok", "sent_at", "sent_version", "last_error")


# The timeline's words for an email step that went (or goes) by SMS (flag "s").
BY_SMS = "by SMS: the patient unsubscribed from email; a care-critical step"

# A patient's replies by SMS, kept on the booking and shown on its timeline (epoch seconds).
REPLY_FIELDS = ("confirmed_at", "call_requested_at")


class StoreLayoutError(ConfigError):
    """The Redis data under the prefix is of another store layout than this code's."""


def _lua_codes() -> str:
    code = ", ".join(f"{status}='{c}'" for status, c in STATUS_CODE.items())
    back = ", ".join(f"{c}='{status}'" for status, c in STATUS_CODE.items())
    notices = ", ".join(f"['{step}']=true" for step in sorted(NOTICE_STEPS))
    return (f"local CODE = {{{code}}}\nlocal STATUS_OF = {{{back}}}\nlocal LAYOUT = '{LAYOUT}'\n"
            f"local NOTICE_STEP = {{{notices}}}\n"
            f"local AGAIN_PREFIX = '{AGAIN_PREFIX}'\nlocal REPAUSE_STEP = '{REPAUSE_STEP}'\n")


# Shared by every script: status names, the reminder codec and the retention rule.
_PRELUDE = (
    lua_prelude()
    + _lua_codes()
    + """
local function is_pending(st)
  return st == ST_SCHEDULED or st == ST_SENDING or st == ST_RETRYING
end
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- An attempt still at work on `ref` (<clinic>/<booking id>/<key>): its send ledger holds
-- a token its attempt log has no finish of (Store._in_flight_keys reads the same).
local function at_work(prefix, ref)
  local ledger = redis.call('GET', prefix .. ':ledger:' .. ref)
  if not ledger or ledger == 'sent' then return false end
  local last = redis.call('LINDEX', prefix .. ':a:' .. ref, -1)
  return not last or cjson.decode(last)['tok'] ~= ledger
end
-- Slots of a reminder's field (<key>) and of its attempt field (<key>+).
local R_ST, R_VER, R_PLAN, R_DUE, R_EXP, R_NOTE, R_TPL, R_FLAGS, R_WHY = 1, 2, 3, 4, 5, 6, 7, 8, 9
local A_CLAIM, A_TRIES, A_TOK, A_SENT, A_SENTV, A_ERR = 1, 2, 3, 4, 5, 6
local function split(s, n)
  local out, pos = {}, 1
  for i = 1, n - 1 do
    local j = string.find(s, '|', pos, true)
    if not j then break end
    out[i] = string.sub(s, pos, j - 1)
    pos = j + 1
  end
  out[#out + 1] = string.sub(s, pos)
  for i = #out + 1, n do out[i] = '' end
  return out
end
local function join(t, n)
  local last = n
  while last > 1 and t[last] == '' do last = last - 1 end
  return table.concat(t, '|', 1, last)
end
local function is_reminder(f)
  return string.find(f, ':', 1, true) ~= nil and string.sub(f, -1) ~= '+'
end
-- Read one reminder: its slots (status as a name) and its attempt slots; nil if none.
local function load(bkey, key)
  local v = redis.call('HMGET', bkey, key, key .. '+')
  if not v[1] then return nil end
  local r = split(v[1], 9)
  r[R_ST] = STATUS_OF[r[R_ST]]
  local a = split(v[2] or '', 6)
  a.had = v[2] ~= false
  return r, a
end
local function save(bkey, key, r, a)
  local st = r[R_ST]
  r[R_ST] = CODE[st]
  local main = join(r, 9)
  r[R_ST] = st
  local att = join(a, 6)
  if att ~= '' then
    redis.call('HSET', bkey, key, main, key .. '+', att)
  else
    redis.call('HSET', bkey, key, main)
    if a.had then redis.call('HDEL', bkey, key .. '+') end
  end
end
local function add(n, by) return tostring((tonumber(n) or 0) + by) end
-- A reminder's attempts (A_TRIES, "<n>" or "<n>+<earlier>"): the <n> of its budget of
-- max_attempts, afresh after a move or a replay, and the <earlier> ones made before that.
local function tries(a)
  local n, earlier = string.match(a[A_TRIES], '^([^+]*)%+?(.*)$')
  return tonumber(n) or 0, tonumber(earlier) or 0
end
local function set_tries(a, n, earlier)
  a[A_TRIES] = earlier > 0 and (tostring(n) .. '+' .. tostring(earlier))
    or (n ~= 0 and tostring(n) or '')
end
local function add_try(a, by)
  local n, earlier = tries(a)
  set_tries(a, n + by, earlier)
end
-- Every attempt made at a reminder: the count the clinic is shown.
local function all_tries(a)
  local n, earlier = tries(a)
  return n + earlier
end
-- Text written here is inline: escape a leading '@' (a text id) or '\\'.
local function inline(t)
  local c = string.sub(t, 1, 1)
  if c == '@' or c == '\\\\' then return '\\\\' .. t end
  return t
end
local function text_of(prefix, slot)
  local c = string.sub(slot, 1, 1)
  if c == '@' then return redis.call('HGET', prefix .. ':t', string.sub(slot, 2)) or '' end
  if c == '\\\\' then return string.sub(slot, 2) end
  return slot
end
local function step_of(key) return string.match(key, '^[^#:]*') end
-- Outcome counters for Prometheus (worker/metrics.py): one hash, "<what>|<clinic>|<channel>".
local function count_metric(prefix, what, clinic, key, n)
  local channel = string.match(key, ':([^:]*)$') or ''
  redis.call('HINCRBY', prefix .. ':metrics', what .. '|' .. clinic .. '|' .. channel, n or 1)
end
local function channel_of(key) return string.match(key, ':([^:]*)$') end
-- The patient's address for a channel, as opt-outs are kept (worker/optout.py
-- `normal_contact`). Lua never normalises an address itself (its string.lower knows ASCII
-- only): `norms` is {channel: {address as in the document: normalised}}, made in Python
-- from the documents it read (`_contact_norms`). Returns the normalised address (nil if
-- none), the document, its patient, and `missing`: the document has an address `norms`
-- does not know (it changed since Python read it: read again).
local function normal_of(norms, channel, value)
  local t = norms[channel]
  if type(t) ~= 'table' then return nil end
  return t[value]
end
local function contact_of(doc, channel, norms)
  if not doc then return nil end
  local ok, b = pcall(cjson.decode, doc)
  if not ok or type(b) ~= 'table' or type(b['patient']) ~= 'table' then return nil end
  local p = b['patient']
  local value = p[channel == 'email' and 'email' or 'phone']
  if type(value) ~= 'string' then return nil, b, p end
  local normal = normal_of(norms, channel, value)
  return normal, b, p, normal == nil
end
-- Whether the patient allows `channel` (consented, an address, and not opted out); an
-- address `norms` does not know counts as not allowed (the caller checks `missing` first).
local function allows(optkey, doc_table, patient, channel, norms)
  local value = patient[channel == 'email' and 'email' or 'phone']
  if type(value) ~= 'string' then return false end
  value = normal_of(norms, channel, value)
  if not value then return false end
  local listed = false
  for _, c in ipairs(patient['channels'] or {}) do
    if c == channel then listed = true end
  end
  return listed and redis.call('HEXISTS', optkey, channel .. ':' .. value) == 0
end
-- Whether a document has an address (of any channel) that `norms` does not know.
local function norms_stale(doc_table, norms)
  if type(doc_table) ~= 'table' or type(doc_table['patient']) ~= 'table' then return false end
  local p = doc_table['patient']
  for channel, field in pairs({email = 'email', sms = 'phone'}) do
    if type(p[field]) == 'string' and normal_of(norms, channel, p[field]) == nil then
      return true
    end
  end
  return false
end
-- Whether `critical` (space-separated "<treatment>/<step>") names this reminder's step.
-- A message again for a new date is its step's (worker/notices.py `base_step`): a step again
-- (again-<step>) the step, the pause message again (repause) the booking's pause step (its
-- "ns": "<pause step>|<invite steps>", a text id under `prefix`:t), as Python reads them
-- (`_resumable`, worker/dispatch.py `_capped`).
local function is_critical(critical, doc_table, key, bkey, prefix)
  local step = step_of(key)
  -- A change notice too: unsent, the patient comes on the wrong day (worker/notices.py).
  if NOTICE_STEP[step] then return true end
  if critical == '' or type(doc_table['treatment']) ~= 'string' then return false end
  if string.sub(step, 1, #AGAIN_PREFIX) == AGAIN_PREFIX then
    step = string.sub(step, #AGAIN_PREFIX + 1)
  elseif step == REPAUSE_STEP then
    local ns = redis.call('HGET', bkey, 'ns')
    local text = ns and ns ~= '' and redis.call('HGET', prefix .. ':t', ns) or ''
    step = string.match(text, '^[^|]*')
    if step == '' then return false end
  end
  local what = doc_table['treatment'] .. '/' .. step
  return string.find(' ' .. critical .. ' ', ' ' .. what .. ' ', 1, true) ~= nil
end
-- Clinic events (worker/webhooks.py): `hooks` is the space-separated list of what the
-- clinic takes ("reminder.sent ... alert").
local function wants(hooks, what)
  return string.find(' ' .. hooks .. ' ', ' ' .. what .. ' ', 1, true) ~= nil
end

local function parse_ref(ref)
  local i = string.find(ref, '/', 1, true)
  if not i then return nil end
  local j = string.find(ref, '/', i + 1, true)
  if not j then return nil end
  return string.sub(ref, 1, i - 1), string.sub(ref, i + 1, j - 1), string.sub(ref, j + 1)
end
-- Expire every key of one booking at `at` (epoch seconds), or keep them all while one of
-- its reminders is a dead letter. A ledger entry still held by an attempt keeps its TTL.
-- Only a reminder that was claimed (it has a <key>+ field) can have a log or a ledger.
-- The contact index (see the module docstring): `ids` is a booking's `contacts` field.
local function contact_keys(prefix, clinic, ids)
  local out = {}
  for id in string.gmatch(ids or '', '%S+') do
    table.insert(out, prefix .. ':c:' .. clinic .. '/' .. id)
  end
  return out
end
-- A contact set lives as long as its longest-kept booking; members already past are dropped.
local function index_expiry(ckey)
  redis.call('ZREMRANGEBYSCORE', ckey, '-inf', '(' .. tostring(redis_now()))
  local top = redis.call('ZRANGE', ckey, -1, -1, 'WITHSCORES')
  if #top == 0 then return end
  if top[2] == 'inf' then redis.call('PERSIST', ckey)
  else redis.call('EXPIREAT', ckey, math.ceil(tonumber(top[2]))) end
end
local function index_booking(prefix, clinic, booking_id, ids, score)
  local now, keep = nil, tonumber(score)
  for _, ckey in ipairs(contact_keys(prefix, clinic, ids)) do
    redis.call('ZADD', ckey, score, booking_id)
    -- A contact seen for the first time (its set holds this booking alone, kept until a
    -- finite time to come): what index_expiry would do, without reading the set back.
    now = now or redis_now()
    if keep and keep < math.huge and keep >= now and redis.call('ZCARD', ckey) == 1 then
      redis.call('EXPIREAT', ckey, math.ceil(keep))
    else
      index_expiry(ckey)
    end
  end
end
-- The clinic's booking list (P:bookings:<clinic>: GET /v1/bookings, `stats`): the booking
-- at its keys' expiry, and up to 8 members whose keys have expired dropped, so that the
-- list holds about the live bookings only (each write adds at most one; `stats` only reads).
local function list_booking(prefix, clinic, booking_id, score)
  local key = prefix .. ':bookings:' .. clinic
  local gone = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. redis_now(), 'LIMIT', 0, 8)
  if #gone > 0 then redis.call('ZREM', key, unpack(gone)) end
  redis.call('ZADD', key, score, booking_id)
end
local function unindex_booking(prefix, clinic, booking_id, ids)
  for _, ckey in ipairs(contact_keys(prefix, clinic, ids)) do
    redis.call('ZREM', ckey, booking_id)
    index_expiry(ckey)
  end
end
-- `exact`: `at` replaces the stored expiry even when earlier (a cancel: the booking's last
-- reminder is now, not its old visit); else the expiry is only ever lengthened.
local function keep_booking(prefix, clinic, booking_id, at, exact)
  local base = clinic .. '/' .. booking_id
  local bkey, dkey = prefix .. ':b:' .. base, prefix .. ':d:' .. base
  local flat = redis.call('HGETALL', bkey)
  local dead, tried, stored, contacts, links = false, {}, 0, '', ''
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if f == 'keep_until' then
      stored = tonumber(v) or 0
    elseif f == 'contacts' then
      contacts = v
    elseif f == 'unsub' then
      links = v
    elseif string.sub(f, -1) == '+' then
      table.insert(tried, base .. '/' .. string.sub(f, 1, -2))
    elseif string.sub(v, 1, 1) == 'F' and is_reminder(f) then
      if redis.call('ZSCORE', prefix .. ':dead', base .. '/' .. f) then dead = true end
    end
  end
  if stored > at and not exact then at = stored end
  at = math.ceil(at)
  redis.call('HSET', bkey, 'keep_until', tostring(at))
  local function apply(key)
    if dead then redis.call('PERSIST', key) else redis.call('EXPIREAT', key, at) end
  end
  apply(bkey)
  apply(dkey)
  for _, ref in ipairs(tried) do
    apply(prefix .. ':a:' .. ref)
    local lkey = prefix .. ':ledger:' .. ref
    if redis.call('GET', lkey) == 'sent' then apply(lkey) end
  end
  list_booking(prefix, clinic, booking_id, dead and '+inf' or at)
  index_booking(prefix, clinic, booking_id, contacts, dead and '+inf' or at)
  -- The unsubscribe links its emails carried (`unsub`) live at least as long as it now is
  -- (a visit moved later: its earlier email's link must work until its next one): only
  -- lengthened here; a cancel shortens them itself (_CANCEL).
  for link in string.gmatch(links, '%S+') do
    local ukey = prefix .. ':unsub:' .. clinic .. '/' .. link
    local left = redis.call('PTTL', ukey)
    if left > 0 and redis_now() + left / 1000 < at then
      redis.call('EXPIREAT', ukey, at)
      redis.call('EXPIREAT', prefix .. ':unsub-by:' .. clinic .. '/' .. link, at)
    end
  end
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
  redis.call('EXPIREAT', prefix .. ':a:' .. ref, stored)
  local lkey = prefix .. ':ledger:' .. ref
  if redis.call('GET', lkey) == 'sent' then redis.call('EXPIREAT', lkey, stored) end
end
"""
    + LUA_EMIT
    + """
-- A held booking keeps `held_from` (the date told before the hold) once a message went out
-- or may have (one being sent as the hold was written; one the change rescheduled or took
-- out of the plan while its attempt is still at work, `at_work`: at its provider, it may
-- yet deliver). An attempt that ends without delivering (`skip`: its own key, that
-- attempt's) may leave nothing of the booking gone out: then no date was told, and its
-- hold message names the start as it is when it goes. `base`: "<clinic>/<booking id>/".
local function drop_untold_hold(bkey, skip, prefix, base)
  local got = redis.call('HMGET', bkey, 'status', 'held_from')
  if got[1] ~= ST_HELD or not got[2] or got[2] == '' then return end
  local flat = redis.call('HGETALL', bkey)
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if is_reminder(f) then
      local st = STATUS_OF[string.sub(v, 1, 1)]
      if st == ST_SENT or (st == ST_SENDING and f ~= skip) then return end
      if f ~= skip and at_work(prefix, base .. f) then return end
    elseif string.sub(f, -1) == '+' and is_reminder(string.sub(f, 1, -2))
        and split(v, 6)[A_SENT] ~= '' then
      return
    end
  end
  redis.call('HDEL', bkey, 'held_from')
end
-- Once a scheduled booking has no reminder left to send (none scheduled, sending or
-- retrying), tell the clinic booking.completed, once (`completed_told`; a step that gives
-- it reminders to send again clears that, so it is told again once those are done). Every
-- step that ends a reminder calls it: the finish, the begin's opt-out skip, STOP's skips,
-- a change's write. A reminder a change took out of the plan while its attempt is still at
-- work (`at_work`: at its provider, it may yet deliver) still counts as going: that
-- attempt's finish tells it (so the clinic never hears reminder.sent after the booking's
-- end). `own`: the key whose attempt is ending in this step (the finish, before its log
-- line is written; the begin of a lost worker's task again; `_LEFT`, which looked).
local function tell_completed(prefix, clinic, booking_id, bkey, hooks, own)
  if not wants(hooks, 'booking.completed') then return end
  local flat = redis.call('HGETALL', bkey)
  local open, status_b, told = false, nil, false
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if f == 'status' then status_b = v
    elseif f == 'completed_told' then told = true
    elseif is_reminder(f) and is_pending(STATUS_OF[string.sub(v, 1, 1)]) then open = true end
  end
  if not open and not told and status_b == ST_SCHEDULED then
    local base = clinic .. '/' .. booking_id .. '/'
    for i = 1, #flat, 2 do
      local f = flat[i]
      if f ~= own and is_reminder(f) and STATUS_OF[string.sub(flat[i + 1], 1, 1)] ~= ST_SENT
          and at_work(prefix, base .. f) then
        return
      end
    end
    redis.call('HSET', bkey, 'completed_told', '1')
    local b = redis.call('HMGET', bkey, 'version', 'late_pause')
    emit_event(prefix, clinic, 'webhook', 'booking.completed',
      {booking_id = booking_id, version = tonumber(b[1]), late_pause = b[2] == '1'})
  end
end
"""
)

# Claim due reminders: one atomic step with Redis's own clock. Expired leases (a pump
# that died after claiming, a worker killed mid-send) are claimed again.
_CLAIM = """
local due_key, lease_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local limit, lease_seconds, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
-- Run twice with the same run key (a client retry after a lost reply): the same answer,
-- so no claim is left leased with no task.
local done = redis.call('GET', run_key)
if done then return cjson.decode(done) end
local now = redis_now()
local lease_until = now + lease_seconds
local out = {}
local function claim(ref, leased)
  local clinic, booking_id, key = parse_ref(ref)
  if not key then return end
  local bkey = prefix .. ':b:' .. clinic .. '/' .. booking_id
  local r, a = load(bkey, key)
  if r and leased and not is_pending(r[R_ST]) then
    -- A change took it out of the plan while it was being sent (its lease kept): its
    -- attempt may have been lost at the provider. Left in the lease set, answered with no
    -- version or claim: `Store.claim_due` settles it (`_LEFT`).
    redis.call('ZADD', lease_key, now, ref)
    table.insert(out, {ref, '', ''})
    return
  end
  if not r or not is_pending(r[R_ST]) then return end
  -- A lease a change kept (above) whose reminder something else scheduled again (the SMS
  -- cap's email copy of a step, START's): the due set brings it at its own time.
  if leased and r[R_ST] ~= ST_SENDING and redis.call('ZSCORE', due_key, ref) then return end
  a[A_CLAIM] = add(a[A_CLAIM], 1)
  r[R_ST] = ST_SENDING
  save(bkey, key, r, a)
  redis.call('ZADD', lease_key, lease_until, ref)
  table.insert(out, {ref, r[R_VER], a[A_CLAIM]})
end
local expired = redis.call('ZRANGEBYSCORE', lease_key, '-inf', now, 'LIMIT', 0, limit)
for _, ref in ipairs(expired) do
  redis.call('ZREM', lease_key, ref)
  claim(ref, true)
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

# Settle an expired lease the claim left (KEYS: booking, ledger, lease set, attempt log;
# ARGV: ref, key, the clinic's events, prefix, margin): a reminder a change took out of the
# plan while an attempt was sending it. While that attempt may still be at work (its ledger
# holds its token, its log has no finish of it) the lease is looked at again once the
# ledger expires (the watchdog ends a sender's process before that); then the attempt's
# end, never written (its worker was lost), may be the booking's: told complete, once.
_LEFT = """
local bkey, lkey, lease_key, akey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ref, key, hooks, prefix, margin = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local now = redis_now()
local score = redis.call('ZSCORE', lease_key, ref)
if not score or tonumber(score) > now then return 'not due' end
local r = load(bkey, key)
if r and is_pending(r[R_ST]) then return 'pending' end  -- the next claim takes it
local ledger = redis.call('GET', lkey)
if r and ledger and ledger ~= 'sent' then
  local last = redis.call('LINDEX', akey, -1)
  if not last or cjson.decode(last)['tok'] ~= ledger then
    local ttl = math.max(redis.call('PTTL', lkey), 0)
    redis.call('ZADD', lease_key, now + ttl / 1000 + margin, ref)
    return 'in flight'
  end
end
redis.call('ZREM', lease_key, ref)
if r then
  local clinic, booking_id = parse_ref(ref)
  tell_completed(prefix, clinic, booking_id, bkey, hooks, key)
end
return 'settled'
"""

# Fence the task and take the send ledger in one step; idempotent for the same token.
# Returns {verdict, ...}: "ok" or why the task is dropped (`Store.begin_send`). A dropped
# task whose claim still owns the reminder settles it: nothing is left `sending` without
# an owner. With "ok" ("ok sms") come what the attempt reads next, read in this same step:
# the booking's hash, its document and (KEYS[6], for an email) the stored unsubscribe
# secret; with "contacts changed" the document (to make `norms` from).
_BEGIN_SEND = """
local bkey, lkey, lease_key, dkey, optkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local secret_key = KEYS[6]
local key, version, claim, token, ledger_ms, ref = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6]
local critical, hooks, prefix = ARGV[7] or '', ARGV[8] or '', ARGV[9] or ''
local norms = cjson.decode(ARGV[10] or '{}')
-- An address of printable ASCII only is normalised here exactly as Python does
-- (worker/optout.py `normal_contact`: an email lower-cased, a phone as is; neither has
-- anything to strip): only another address needs Python's `norms` ('contacts changed').
local function add_ascii_norms(doc)
  if not doc then return end
  local ok, b = pcall(cjson.decode, doc)
  if not ok or type(b) ~= 'table' or type(b['patient']) ~= 'table' then return end
  for channel, field in pairs({email = 'email', sms = 'phone'}) do
    local v = b['patient'][field]
    if type(v) == 'string' and v ~= '' and not string.find(v, '[^!-~]') then
      if type(norms[channel]) ~= 'table' then norms[channel] = {} end
      if norms[channel][v] == nil then
        norms[channel][v] = channel == 'email' and string.lower(v) or v
      end
    end
  end
end
if redis.call('EXISTS', optkey) == 1 then add_ascii_norms(redis.call('GET', dkey)) end
local function begin()
local r, a = load(bkey, key)
if not r then return 'gone' end
local status = r[R_ST]
local ledger = redis.call('GET', lkey)
-- Whether this email's step (same occurrence) has its own SMS in this booking that goes or
-- went: then an unsubscribed patient's email is not sent by SMS too (one SMS, not two).
local function own_sms_goes()
  local own = redis.call('HGET', bkey, string.sub(key, 1, -7) .. ':sms')
  if not own then return false end
  local st = STATUS_OF[split(own, 9)[R_ST]]
  return st ~= ST_SKIPPED and st ~= ST_CANCELLED
end
if a[A_TOK] == token and ledger == token and status == ST_SENDING then
  -- The same attempt again (a client retry): the same answer, the SMS fallback included.
  local channel = channel_of(key)
  if channel == 'email' and redis.call('EXISTS', optkey) == 1 then
    local contact, doc_table, patient, missing = contact_of(redis.call('GET', dkey), channel,
      norms)
    if missing or norms_stale(doc_table, norms) then return 'contacts changed' end
    if contact and redis.call('HEXISTS', optkey, 'email:' .. contact) == 1
        and is_critical(critical, doc_table, key, bkey, prefix)
        and allows(optkey, doc_table, patient, 'sms', norms)
        and not own_sms_goes()
    then
      return 'ok sms'
    end
  end
  return 'ok'
end
if r[R_VER] ~= version then
  if not is_pending(status) then
    -- A change took it out of the plan while an attempt was at work (`Store._in_flight`),
    -- and that attempt never finished (its worker died; this is its task again): its
    -- end may be the booking's.
    local clinic, booking_id = parse_ref(ref)
    tell_completed(prefix, clinic, booking_id, bkey, hooks, key)
  end
  -- Claimed as the hold was written, not begun: nothing sent by this claim.
  drop_untold_hold(bkey, nil, prefix, string.sub(ref, 1, #ref - #key))
  return 'version moved'
end
if a[A_CLAIM] ~= claim then return 'stale claim' end
if status ~= ST_SENDING then return 'status ' .. status end
local booking = redis.call('HGET', bkey, 'status')
-- A cancelled booking sends nothing more, except the notice that tells of the cancel; a
-- held one only its hold notice (worker/planner.py `hold_notice`).
if booking ~= ST_SCHEDULED
  and not (booking == ST_CANCELLED and string.match(key, '^cancelled#') and r[R_VER] ==
           redis.call('HGET', bkey, 'version'))
  and not (booking == ST_HELD and string.match(key, '^hold%-notice:')) then
  redis.call('ZREM', lease_key, ref)
  if booking == ST_HELD then
    -- Back to waiting, outside the due set: the clinic's release schedules it again.
    r[R_ST] = ST_SCHEDULED
  else
    booking = booking or 'gone'
    r[R_ST] = ST_CANCELLED
    r[R_WHY] = inline('booking ' .. booking)
  end
  save(bkey, key, r, a)
  if booking == ST_HELD then
    drop_untold_hold(bkey, nil, prefix, string.sub(ref, 1, #ref - #key))
  end
  return 'booking ' .. tostring(booking)
end
if ledger == 'sent' then
  redis.call('ZREM', lease_key, ref)
  r[R_ST] = ST_SENT
  save(bkey, key, r, a)
  return 'already sent'
end
if ledger then
  -- Held by an attempt of this same claim (its token starts with the claim, `attempt_token`):
  -- a second copy of the claim's task, its batch delivered again (kombu gives an unacked
  -- message back to its queue after a Redis restart). The reminder is that attempt's: left to
  -- it, not handed back from under it (its fence would then send nothing, a lease late).
  if string.sub(ledger, 1, #claim + 1) == claim .. '.' then return 'claim in flight' end
  return 'in flight'
end
-- The patient's opt-out, checked in this same step (worker/optout.py): an opted-out
-- address is never sent to. An email of a care-critical step goes by SMS instead when
-- the patient allows SMS ('ok sms'), unless the step's own SMS carries it (skipped).
local verdict = 'ok'
if redis.call('EXISTS', optkey) == 1 then
  local channel = channel_of(key)
  local contact, doc_table, patient, missing = contact_of(redis.call('GET', dkey), channel,
    norms)
  if missing or norms_stale(doc_table, norms) then return 'contacts changed' end
  local why = contact and redis.call('HGET', optkey, channel .. ':' .. contact)
  if why then
    local carried = false
    if channel == 'email' and is_critical(critical, doc_table, key, bkey, prefix)
        and allows(optkey, doc_table, patient, 'sms', norms) then
      carried = own_sms_goes()
      if not carried then verdict = 'ok sms' end
    end
    if verdict ~= 'ok sms' then
      why = carried and 'unsubscribed: the SMS of this step carries it' or ('opted_out: ' .. why)
      redis.call('ZREM', lease_key, ref)
      r[R_ST] = ST_SKIPPED
      r[R_WHY] = inline(why)
      save(bkey, key, r, a)
      local clinic, booking_id = parse_ref(ref)
      count_metric(prefix, 'skipped', clinic, key)
      if wants(hooks, 'reminder.skipped') then
        emit_event(prefix, clinic, 'webhook', 'reminder.skipped',
          {booking_id = booking_id, reminder = key, step = step_of(key), channel = channel,
           version = tonumber(r[R_VER]), due_at = tonumber(r[R_DUE] ~= '' and r[R_DUE]
           or r[R_PLAN]), attempts = all_tries(a),
           reason = why})
      end
      -- The last one to go, maybe (a STOP left it to this attempt): told complete.
      tell_completed(prefix, clinic, booking_id, bkey, hooks, key)
      return carried and 'carried by its own sms' or 'opted out'
    end
  end
end
redis.call('SET', lkey, token, 'PX', ledger_ms)
a[A_TOK] = token
add_try(a, 1)
local flagged = string.find(string.match(r[R_FLAGS], '^[^#]*'), 's', 1, true)
local flipped = false
if verdict == 'ok sms' and not flagged then
  -- An email going by SMS: the SMS frequency cap counts it (flag "s", `_sms_times`).
  r[R_FLAGS] = 's' .. r[R_FLAGS]
  flipped = true
elseif verdict == 'ok' and flagged then
  -- An email that an earlier attempt took by SMS (not sent then: a retry, a defer) goes by
  -- email now (the patient subscribed again): no longer an SMS for the cap.
  local hash = string.find(r[R_FLAGS], '#', 1, true) or (#r[R_FLAGS] + 1)
  r[R_FLAGS] = string.gsub(string.sub(r[R_FLAGS], 1, hash - 1), 's', '')
    .. string.sub(r[R_FLAGS], hash)
  flipped = true
end
save(bkey, key, r, a)
if flipped then
  -- What the SMS cap counts changed: the upserts of the patient's other bookings that read
  -- it before must see it (`_caps_read`'s guard reads `smsv` beside the version).
  redis.call('HINCRBY', bkey, 'smsv', 1)
end
return verdict
end
local verdict = begin()
if verdict == 'ok' or verdict == 'ok sms' then
  local secret = false
  if secret_key and verdict == 'ok' then secret = redis.call('GET', secret_key) end
  return {verdict, redis.call('HGETALL', bkey), redis.call('GET', dkey), secret}
elseif verdict == 'contacts changed' then
  return {verdict, {}, redis.call('GET', dkey)}
end
return {verdict}
"""

# The SMS cap's guard at send time (`Store.send_caps_read`), shared by the finish and the
# restamp: whether the patient's SMS at the clinic are still what the decision read.
_CAPS_GUARD = """
-- When a stored booking's SMS go or went, as stored, leaving out the reminder `skip`: the
-- same as `_sms_slots` in Python (sent: when; to go: unless the booking is held, but for
-- the store's own, which a release puts back as they are, and the hold notice, which goes
-- while it is held; an email with the flag "s" counts as an SMS).
local function store_own(f)
  local step = step_of(f)
  return step == 'rescheduled' or step == 'cancelled' or step == 'repause'
    or string.sub(step, 1, 6) == 'again-' or string.match(f, '^[^:]*') == 'hold-notice'
end
local function sms_slots(obkey, skip)
  local flat = redis.call('HGETALL', obkey)
  local h = {}
  for j = 1, #flat, 2 do h[flat[j]] = flat[j + 1] end
  local held = h['status'] == ST_HELD
  local out = {}
  for f, v in pairs(h) do
    if is_reminder(f) and f ~= skip then
      local s = split(v, 9)
      local sms = string.sub(f, -4) == ':sms'
      if not sms and string.sub(f, -6) == ':email' then
        sms = string.find(string.match(s[R_FLAGS], '^[^#]*'), 's', 1, true) ~= nil
      end
      if sms then
        local st, when = STATUS_OF[s[R_ST]], nil
        if st == ST_SENT then
          local sa = split(h[f .. '+'] or '', 6)
          when = sa[A_SENT] ~= '' and sa[A_SENT] or (s[R_DUE] ~= '' and s[R_DUE] or s[R_PLAN])
        elseif is_pending(st) and (not held or store_own(f)) then
          when = s[R_DUE] ~= '' and s[R_DUE] or s[R_PLAN]
        end
        if when and when ~= '' then table.insert(out, when) end
      end
    end
  end
  return out
end
-- {contact key, min score, limit, the members read, the bookings read, "<id>|<when>" of
-- every SMS read}: the members and every SMS of those bookings (but `key` of `booking_id`)
-- must be unchanged.
local function caps_unchanged(g, prefix, clinic, booking_id, key)
  local got = redis.call('ZRANGEBYSCORE', g[1], g[2], '+inf', 'LIMIT', 0, tonumber(g[3]))
  local want = g[4]
  if #got ~= #want then return false end
  for j = 1, #got do
    if got[j] ~= want[j] then return false end
  end
  local expected = {}
  for _, item in ipairs(g[6]) do expected[item] = (expected[item] or 0) + 1 end
  for _, id in ipairs(g[5]) do
    local skip = id == booking_id and key or ''
    for _, when in ipairs(sms_slots(prefix .. ':b:' .. clinic .. '/' .. id, skip)) do
      local n = expected[id .. '|' .. when]
      if not n or n == 0 then return false end
      expected[id .. '|' .. when] = n - 1
    end
  end
  for _, n in pairs(expected) do
    if n ~= 0 then return false end
  end
  return true
end
"""

# Finish an attempt: sent, retry, unknown, failed, defer (outside the send window) or skip
# (expired). Fenced: only the attempt that still owns the reminder (status sending, same
# version, claim and token) changes its state. A stale attempt adds to the attempt log;
# if it delivered, the delivery is recorded: as the reminder's outcome when the plan did
# not change it (or no longer wanted it: it went out all the same), else as `sent_at` /
# `sent_version` beside the new plan. Repeating a finish with the same token is a no-op
# (the log's last line carries the token of the last finish), except a delivery after
# the same attempt's unknown outcome (a send cut by a shutdown that went out after all).
# A skip or defer (a send-time rule worked out from the booking as the begin read it) may
# carry that booking version (field `booking`): if the booking changed since, the rule may
# no longer hold (a moved appointment's expiry, a corrected timezone's send window), so an
# owning attempt puts the reminder back at once instead (as `abandon`), for the next
# begin to work it out afresh. So may a failure (a dead letter): the address the server
# refused, or the data that would not render, may be what the clinic just corrected.
_FINISH = """
local bkey, lkey, due_key, lease_key, dead_key, akey =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, ref, version, claim, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local score, retention, entry, log_max = ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local prefix, clinic, booking_id, margin = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
-- What the attempt sent: when, and which planned time and template its words were for.
local sent_at, sent_planned, sent_template, key = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local hooks = ARGV[18]  -- the events the clinic takes (worker/webhooks.py)
local now = redis_now()
-- No time given: now on Redis's clock, the one the pump claims by (an unknown outcome's
-- "not before", a hand-back's "due now"), never the finishing host's.
if score == '' then score = tostring(now) end
local r, a = load(bkey, key)
local owner = redis.call('GET', lkey) == token
if not r then
  if owner then redis.call('DEL', lkey) end
  return 'gone'
end
local last = redis.call('LINDEX', akey, -1)
if last then
  local done = cjson.decode(last)
  -- The one finish after this attempt's own: the delivery of a send the worker's shutdown
  -- cut (recorded as unknown) and its provider then accepted (worker/dispatch.py `_send`).
  if done['tok'] == token and not (outcome == 'sent' and done['outcome'] == 'unknown') then
    return 'repeated'
  end
end
local status = r[R_ST]
local same_version = r[R_VER] == version
-- The plan changed, but what it wants now is what went out (a cancel undone, a move undone).
local template = step_of(key)
if r[R_TPL] ~= '' then template = redis.call('HGET', prefix .. ':t', r[R_TPL]) end
local same_words = sent_planned ~= '' and tonumber(r[R_PLAN]) == tonumber(sent_planned)
  and template == sent_template
local current = status == ST_SENDING and same_version and a[A_CLAIM] == claim
  and a[A_TOK] == token
-- Being sent when a change moved it, a reminder a move does not send again: its delivery
-- counts as its send (the booking's `gone`, "<key>@<version> ...", Store._in_flight_gone).
local gone = outcome == 'sent' and not same_version and string.find(
  ' ' .. (redis.call('HGET', bkey, 'gone') or '') .. ' ', ' ' .. key .. '@' .. version .. ' ',
  1, true) ~= nil
local overtaken = false  -- a skip, defer or failure for a booking changed since the begin
-- The SMS cap at send time (`Store.send_caps_read`, worker/dispatch.py `_capped`): `guard`,
-- what the decision read of the patient's SMS at the clinic; `by_email`, the instant of the
-- email that carries this SMS's step instead (with its reason; `email_goes`: the SMS's
-- reason should the step's email copy go after all); `tried`: a retry turned into a skip
-- (the attempt was made: it stays counted).
-- `maybe_sent`: a failure (out of attempts) whose last attempt's outcome is unknown: it may
-- have reached the provider, so its ledger stays until it expires, as an unknown outcome's
-- does: a replay of the dead letter waits for it ("in flight"), never sent beside it.
local guard, by_email, email_reason, email_goes, tried = nil, nil, '', '', false
local maybe_sent = false
for i = 19, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'booking' and (outcome == 'skip' or outcome == 'defer' or outcome == 'failed')
      and redis.call('HGET', bkey, 'version') ~= value then
    overtaken = true
    outcome = 'abandon'
    score = tostring(now)
  elseif name == 'caps' then guard = cjson.decode(value)
  elseif name == 'by_email' then by_email = value
  elseif name == 'email_reason' then email_reason = value
  elseif name == 'email_goes' then email_goes = value
  elseif name == 'tried' then tried = true
  elseif name == 'maybe_sent' then maybe_sent = true
  end
end
if current and not overtaken and guard
    and not caps_unchanged(guard, prefix, clinic, booking_id, key) then
  return 'caps changed'  -- nothing written: the caller reads and decides again
end
local function set_fields()
  if overtaken then return end  -- the rule's reason is not the reminder's any more
  for i = 19, #ARGV, 2 do
    local name, value = ARGV[i], ARGV[i + 1]
    if name == 'reason' then r[R_WHY] = inline(value)
    elseif name == 'last_error' then a[A_ERR] = value
    elseif name == 'sent_at' then a[A_SENT] = value
    elseif name == 'booking' or name == 'caps' or name == 'by_email' or name == 'tried'
        or name == 'email_reason' or name == 'email_goes' or name == 'maybe_sent' then
      -- read above
    else error('finish: unknown field ' .. name) end
  end
end
local result
if outcome == 'sent' and status == ST_SENT then
  result = 'already recorded as sent'
elseif outcome == 'sent' and (same_version or same_words or gone or not is_pending(status))
    then
  -- What the SMS cap did to it (planner.py `cap_sms`: by email instead of SMS, moved to a
  -- day with room, sent although the patient's limit is reached) stays: the timeline says
  -- so once it went too (README, SMS caps). The planned reason is kept as stored (a text
  -- id: the booking's hash keeps its small encoding).
  local was = '; ' .. text_of(prefix, r[R_WHY])
  local capped = same_version and (string.find(was, '; by email: ', 1, true)
    or string.find(was, '; sent although ', 1, true)
    or string.match(was, '; moved to %d+%-%d+%-%d+: ')) and r[R_WHY]
  set_fields()
  if capped then r[R_WHY] = capped end
  r[R_ST] = ST_SENT
  a[A_SENTV] = version
  if not same_version then
    r[R_WHY] = inline(
      'sent by an attempt for version ' .. version .. ' while the booking was being changed')
  end
  -- The lease's ZREM first: Redis out of memory (noeviction) refuses only a script's first
  -- write, and only one that may grow memory; a delivery must be recorded even then (else it
  -- is sent again once its ledger expires), as a retry's or an unknown outcome's is.
  redis.call('ZREM', lease_key, ref)
  redis.call('ZREM', due_key, ref)
  redis.call('ZREM', dead_key, ref)
  redis.call('SET', lkey, 'sent')
  result = current and 'ok' or 'stale: recorded as sent'
elseif outcome == 'sent' then
  -- The clinic moved it meanwhile: the delivery is history, the new plan decides what next.
  a[A_SENT] = sent_at
  a[A_SENTV] = version
  if owner then redis.call('DEL', lkey) end
  result = 'stale: delivery recorded beside the new plan'
elseif current then
  redis.call('ZREM', lease_key, ref)
  set_fields()
  -- An SMS (or an email going by SMS) whose time moves, or that no longer counts (failed,
  -- skipped: neither sent nor to go): the upserts of the patient's other bookings that
  -- counted it at its old time must see the change (`_caps_read`'s guard reads `smsv`
  -- beside the version; the version itself fences sends).
  if (channel_of(key) == 'sms'
      or string.find(string.match(r[R_FLAGS], '^[^#]*'), 's', 1, true)) then
    redis.call('HINCRBY', bkey, 'smsv', 1)
  end
  if outcome == 'retry' or outcome == 'defer' or outcome == 'abandon' then
    if owner then redis.call('DEL', lkey) end
    r[R_ST] = outcome == 'retry' and ST_RETRYING or ST_SCHEDULED
    r[R_DUE] = score
    redis.call('ZADD', due_key, score, ref)
    if outcome ~= 'retry' then add_try(a, -1) end
  elseif outcome == 'unknown' then
    -- It may have reached the provider: the ledger stays until it expires; retry after.
    local ttl = redis.call('PTTL', lkey)
    local at = now + math.max(ttl, 0) / 1000 + margin
    if tonumber(score) > at then at = tonumber(score) end
    r[R_ST] = ST_RETRYING
    -- Its due is the retry's time, so the caps of the patient's other bookings count it on
    -- the day it goes (kept at its old day, a booking made meanwhile took that day beside a
    -- care-critical retry). That day had no cap decision (the retry may fall past the
    -- patient's midnight): flag "r", its attempt caps it even on its own day (`_late_sms`;
    -- the restamp clears it).
    r[R_DUE] = tostring(at)
    if not string.find(string.match(r[R_FLAGS], '^[^#]*'), 'r', 1, true) then
      r[R_FLAGS] = 'r' .. r[R_FLAGS]
    end
    redis.call('ZADD', due_key, at, ref)
  elseif outcome == 'failed' then
    if owner and not maybe_sent then redis.call('DEL', lkey) end
    r[R_ST] = ST_FAILED
    redis.call('ZADD', dead_key, now, ref)
  elseif outcome == 'skip' then
    if owner then redis.call('DEL', lkey) end
    r[R_ST] = ST_SKIPPED
    if not tried then add_try(a, -1) end
    if by_email then
      -- The SMS cap: this step goes by email instead, unless its email copy goes anyway.
      local ekey = string.sub(key, 1, -4) .. 'email'
      local e, ea = load(bkey, ekey)
      if e and (is_pending(e[R_ST]) or e[R_ST] == ST_SENT) then
        r[R_WHY] = inline(email_goes)
      else
        local copy = {}
        for j = 1, 9 do copy[j] = r[j] end
        copy[R_ST] = ST_SCHEDULED
        copy[R_DUE] = by_email
        copy[R_WHY] = inline(email_reason)
        if not ea then
          ea = split('', 6)
          ea.had = false
        end
        save(bkey, ekey, copy, ea)
        local eref = clinic .. '/' .. booking_id .. '/' .. ekey
        redis.call('ZREM', dead_key, eref)
        redis.call('ZADD', due_key, by_email, eref)
      end
    end
  end
  result = overtaken and 'put back: the booking changed since the begin' or 'ok'
else
  -- Overtaken by the clinic's change or by another claim: only the log changes. An unknown
  -- outcome keeps the ledger until it expires, whoever owns the reminder now.
  if owner and outcome ~= 'unknown' and not maybe_sent then redis.call('DEL', lkey) end
  -- Out of the plan (a change kept its lease for this attempt's end: `_LEFT`): ended here.
  if not is_pending(status) then redis.call('ZREM', lease_key, ref) end
  result = 'stale'
end
save(bkey, key, r, a)
-- Ended without delivering (an unknown outcome may have delivered): maybe nothing told.
if outcome ~= 'sent' and outcome ~= 'unknown' then
  -- (stale: another attempt may own it)
  drop_untold_hold(bkey, current and key or nil, prefix, clinic .. '/' .. booking_id .. '/')
end
-- Count the outcome for the metrics, in this same step (exact, whoever sent it).
if outcome == 'sent' and result ~= 'already recorded as sent' then
  count_metric(prefix, 'sent', clinic, key)
elseif current and (outcome == 'retry' or outcome == 'unknown') then
  count_metric(prefix, 'failed_attempt', clinic, key)
  count_metric(prefix, 'retried', clinic, key)
elseif current and outcome == 'failed' then
  count_metric(prefix, 'failed_attempt', clinic, key)
  count_metric(prefix, 'dead_lettered', clinic, key)
elseif current and outcome == 'skip' then
  count_metric(prefix, 'skipped', clinic, key)
elseif current and outcome == 'defer' then
  count_metric(prefix, 'deferred', clinic, key)
end
-- Tell the clinic, in this same step: a delivery (current or not), a failure, a skip; and
-- once every reminder of the booking is done, that the booking is.
local event
if outcome == 'sent' and result ~= 'already recorded as sent' then
  event = 'reminder.sent'
elseif current and outcome == 'failed' then
  event = 'reminder.failed'
elseif current and outcome == 'skip' then
  event = 'reminder.skipped'
end
if event and wants(hooks, event) then
  local fields = {booking_id = booking_id, reminder = key, step = step_of(key),
    channel = string.match(key, ':([^:]*)$'), version = tonumber(r[R_VER]),
    due_at = tonumber(r[R_DUE] ~= '' and r[R_DUE] or r[R_PLAN]),
    attempts = all_tries(a)}
  -- An email step this attempt took by SMS (the patient unsubscribed from email; a
  -- care-critical step): its key says email, the patient got (or was refused) a text.
  local via = cjson.decode(entry)['via']
  if type(via) == 'string' and string.sub(via, 1, 4) == 'sms:' then fields['via'] = 'sms' end
  if event == 'reminder.sent' then
    fields['sent_at'] = tonumber(sent_at)
    fields['version'] = tonumber(version)
  else
    fields['reason'] = text_of(prefix, r[R_WHY])
  end
  emit_event(prefix, clinic, 'webhook', event, fields)
end
-- Overtaken (a change took the reminder out of the plan while this attempt was at work,
-- and told nothing then: `Store._in_flight`): this attempt's end may be the booking's.
if event or result == 'stale' then tell_completed(prefix, clinic, booking_id, bkey, hooks, key) end
local line = cjson.decode(entry)
if overtaken then line['outcome'] = 'abandoned' end
line['result'] = result
line['tok'] = token
redis.call('RPUSH', akey, cjson.encode(line))
redis.call('LTRIM', akey, -tonumber(log_max), -1)
keep_reminder(prefix, clinic, booking_id, ref, now + retention)
return result
"""

# The SMS cap at send time (worker/dispatch.py `_late_sms`): an SMS about to go on a later
# patient-local day than the one it is counted on is counted on its new day (its due becomes
# `at`) before it goes, only while the attempt owns it and the patient's SMS the decision
# read are unchanged (`caps`, as the finish checks; '' unchecked): then any other decision
# about the patient's SMS sees it there. Returns 'ok', 'caps changed' or 'stale'.
_RESTAMP = """
local bkey = KEYS[1]
local key, version, claim, token, at, caps, prefix, clinic, booking_id =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local r, a = load(bkey, key)
if not r or r[R_ST] ~= ST_SENDING or r[R_VER] ~= version or a[A_CLAIM] ~= claim
    or a[A_TOK] ~= token then
  return 'stale'
end
if caps ~= '' and not caps_unchanged(cjson.decode(caps), prefix, clinic, booking_id, key) then
  return 'caps changed'
end
r[R_DUE] = at
-- Counted on its day by a cap decision now: no longer a replay's (flag "r").
local hash = string.find(r[R_FLAGS], '#', 1, true) or (#r[R_FLAGS] + 1)
r[R_FLAGS] = string.gsub(string.sub(r[R_FLAGS], 1, hash - 1), 'r', '')
  .. string.sub(r[R_FLAGS], hash)
save(bkey, key, r, a)
redis.call('HINCRBY', bkey, 'smsv', 1)
return 'ok'
"""

# Read what `Store.still_owned` checks just before the hand-over, in one step: the
# reminder's two fields, the booking's status and version, and (ARGV[2] not empty) the
# address's opt-out; and, for an email that goes, note (KEYS[3]) the address behind its
# unsubscribe link. Returns {fields, opt-out or false, 1 if the link was noted else 0}.
_STILL_OWNED = """
local bkey, optkey, unsub_key, by_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, optfield, unsub_value, unsub_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = redis.call('HMGET', bkey, key, key .. '+', 'status', 'version')
local why = false
if optfield ~= '' then why = redis.call('HGET', optkey, optfield) end
-- The link lives `retention` after this email, and at least as long as the booking it comes
-- from (its keys expire at `keep_until`, `retention` after its last reminder): a booking
-- months ahead emails again long after, and a click on this link meanwhile must work. Never
-- shortened: the link is the address's, and an earlier email of another booking to it, kept
-- longer (a visit months ahead, this one's now), carries the same link.
-- Only for an email that goes: the attempt still owns the reminder, and the booking and
-- address are as its words were made from (`Store.still_owned`'s own rule, ARGV[6..11]).
-- One overtaken here sends nothing (its address corrected, its booking cancelled since the
-- begin): the address it would have gone to is not kept behind a link, nor noted.
local function slots(v, n)
  local got, i = {}, 1
  v = v or ''
  for k = 1, n do
    local j = string.find(v, '|', i, true)
    if j then got[k] = string.sub(v, i, j - 1); i = j + 1
    else got[k] = string.sub(v, i); i = #v + 2 end
  end
  return got
end
local goes = false
if unsub_key and not why and out[1] then
  local r, a, booking = slots(out[1], 2), slots(out[2], 3), out[3]
  if booking == 'cancelled' and ARGV[10] == '1' and r[2] == out[4] then booking = 'scheduled' end
  if booking == 'held' and ARGV[11] == '1' then booking = 'scheduled' end
  goes = (ARGV[9] == '' or out[4] == ARGV[9]) and r[1] == 'P' and r[2] == ARGV[6]
    and a[1] == ARGV[7] and a[3] == ARGV[8] and booking == 'scheduled'
end
if goes then
  local t = redis.call('TIME')
  local now = tonumber(t[1])
  local at = now + 1 + tonumber(unsub_ttl)
  local keep = tonumber(redis.call('HGET', bkey, 'keep_until') or '')
  if keep and keep > at then at = math.ceil(keep) end
  local left = redis.call('PTTL', unsub_key)
  if left > 0 then
    -- (Its EXAT is whole seconds: rounded, not ceiled, so as not to creep up a second.)
    local set = math.floor(now + tonumber(t[2]) / 1000000 + left / 1000 + 0.5)
    if set > at then at = set end
  end
  redis.call('SET', unsub_key, unsub_value, 'EXAT', at)
  -- The booking notes the links its emails carried (`unsub`), and the link the bookings
  -- that emailed it (P:unsub-by), so that a cancel lets each go `retention` after it unless
  -- another live booking's email carries it (_CANCEL).
  if out[3] then
    local link = string.match(unsub_key, '/([^/]+)$')
    local noted = redis.call('HGET', bkey, 'unsub') or ''
    if link and not string.find(' ' .. noted .. ' ', ' ' .. link .. ' ', 1, true) then
      redis.call('HSET', bkey, 'unsub', noted == '' and link or (noted .. ' ' .. link))
    end
    -- Each booking noted is scored by when to look at it again: its keep_until (its keys
    -- expire then, unless it was moved later since). A send looks at a few of those past
    -- it: one gone is dropped, one still kept (moved later, a dead letter keeping its keys)
    -- is scored again. So the note lists the bookings still kept, not every visit ever
    -- emailed to the address, and a cancel reads no more than those.
    redis.call('ZADD', by_key, math.ceil(keep or at), ARGV[5])
    local stem = string.sub(bkey, 1, #bkey - #ARGV[5])
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', by_key, '-inf', now, 'LIMIT', 0, 10)) do
      if redis.call('EXISTS', stem .. id) == 0 then
        redis.call('ZREM', by_key, id)
      else
        local okeep = tonumber(redis.call('HGET', stem .. id, 'keep_until') or '') or 0
        redis.call('ZADD', by_key, math.max(math.ceil(okeep), now + tonumber(unsub_ttl)), id)
      end
    end
    redis.call('EXPIREAT', by_key, at)
  end
end
return {out, why, goes and 1 or 0}
"""

# Hand a leased reminder back to the due set, only if it is still being sent under the given
# claim: once its attempt finished (sent, retrying, dead-lettered) or it was claimed again,
# there is nothing to hand back; nor while an attempt of that same claim holds the ledger
# (KEYS[4]; its token starts with the claim, `attempt_token`): another copy of the claim's
# task is at work and owns it. Returns 1 if handed back.
_REQUEUE = """
local bkey, lease_key, due_key, lkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ref, key, score, claim, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local r, a = load(bkey, key)
if not r or r[R_ST] ~= ST_SENDING then return 0 end
if claim ~= '' and a[A_CLAIM] ~= claim then return 0 end
if claim ~= '' and lkey then
  local ledger = redis.call('GET', lkey)
  if ledger and string.sub(ledger, 1, #claim + 1) == claim .. '.' then return 0 end
end
redis.call('ZREM', lease_key, ref)
r[R_ST] = ST_SCHEDULED
-- Its due stays: a hand-back changes when it is tried again (the due set), not the time it
-- is counted on by the SMS cap, nor the day the send path finds it late after (`_late_sms`).
r[R_WHY] = inline(reason)
save(bkey, key, r, a)
redis.call('ZADD', due_key, score, ref)
return 1
"""

# Cancel a booking in one step: every reminder that may still be sent (or is a dead letter)
# is cancelled; an attempt in flight becomes stale (its delivery, if any, is still recorded).
# ARGV[7], when given, is the booking's hash as read (a flat JSON list): if it changed since,
# nothing is done ('changed'; read again). ARGV[8]: the change notices to add after the
# cancel (worker/notices.py), a flat JSON list of field, value, due score (and booking
# fields with no score: ''). ARGV[9]: the texts the notices refer to ({id: text}); an id
# already taken by other words is reported ('collision:<id>') and nothing is done.
# One booking as it stands, read in one step (`Store._read`, and the cancel's answer read in
# the step that wrote it): {its hash (flat), its document or false, {key, due score, ...} of
# its scheduled and retrying reminders that are in the due set (only if `with_scores`: the
# timeline's `next_try_at`)}. A missing booking: {{}, false, {}}.
_READ_BOOKING = """
local function read_booking(bkey, dkey, due_key, base, with_scores)
  local flat = redis.call('HGETALL', bkey)
  if #flat == 0 then return {flat, false, {}} end
  local scores = {}
  if with_scores then
    for i = 1, #flat, 2 do
      local key = flat[i]
      if is_reminder(key) then
        local st = STATUS_OF[split(flat[i + 1], 9)[R_ST]]
        if st == ST_SCHEDULED or st == ST_RETRYING then
          local score = redis.call('ZSCORE', due_key, base .. '/' .. key)
          if score then
            scores[#scores + 1] = key
            scores[#scores + 1] = score
          end
        end
      end
    end
  end
  return {flat, redis.call('GET', dkey), scores}
end
"""

# Bookings read each in one step (`read_booking`): KEYS the due set, then each booking's
# hash and document; ARGV '1' to read the due scores (else ''), then each booking's
# "<clinic>/<booking id>". Returns one {hash, document, scores} per booking.
_READ = """
local out = {}
for n = 2, #ARGV do
  out[n - 1] = read_booking(KEYS[2 * n - 2], KEYS[2 * n - 1], KEYS[1], ARGV[n], ARGV[1] == '1')
end
return out
"""

# A booking cancelled. KEYS[5], its document: the answer ('cancelled' or 'already') comes
# with the booking as this step leaves it ({outcome, hash, document, due scores}: see
# `read_booking`), so the timeline answered is the one this cancel made, never a write
# landing after it (a PUT re-opening it).
_CANCEL = """
local bkey, due_key, lease_key, dead_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function answer(outcome)
  local t = read_booking(bkey, KEYS[5], due_key, ARGV[5] .. '/' .. ARGV[6], true)
  return {outcome, t[1], t[2], t[3]}
end
local reason, stamp, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prefix, clinic, booking_id = ARGV[4], ARGV[5], ARGV[6]
local check, adds, texts = ARGV[7] or '', ARGV[8] or '', ARGV[9] or ''
local b = redis.call('HMGET', bkey, 'status', 'version')
if b[1] == false then return 'missing' end
if b[1] == ST_CANCELLED then return answer('already') end
if texts ~= '' then
  for id, text in pairs(cjson.decode(texts)) do
    local cur = redis.call('HGET', prefix .. ':t', id)
    if cur and cur ~= text then return 'collision:' .. id end
  end
end
if check ~= '' then
  local expected = cjson.decode(check)
  local flat = redis.call('HGETALL', bkey)
  if #flat ~= #expected then return 'changed' end
  local want = {}
  for j = 1, #expected, 2 do want[expected[j]] = expected[j + 1] end
  for j = 1, #flat, 2 do
    if want[flat[j]] ~= flat[j + 1] then return 'changed' end
  end
end
local version = tostring(tonumber(b[2] or '0') + 1)
redis.call('HSET', bkey, 'status', ST_CANCELLED, 'version', version, 'updated_at', stamp)
local flat = redis.call('HGETALL', bkey)
-- Being sent as it is cancelled: noted in the booking's `gone` ("<key>@<version>" of the
-- attempt), so that, booked again elsewhere before that attempt ends, its delivery still
-- counts as its send when a re-open would not send it again (Store._in_flight_gone). So
-- is one put back in the schedule while its attempt is still at work (claimed again past
-- its lease, the new claim found the ledger held): its version is that attempt's, unless
-- a move since rescheduled it (the booking's `flying` has that one, read first).
local gone = redis.call('HGET', bkey, 'gone') or ''
local noted = gone
for i = 1, #flat, 2 do
  local key = flat[i]
  if is_reminder(key) then
    local r = split(flat[i + 1], 9)
    local st = STATUS_OF[r[R_ST]]
    if (st == ST_SENDING or (is_pending(st)
        and at_work(prefix, clinic .. '/' .. booking_id .. '/' .. key))) and not string.find(
        ' ' .. gone .. ' ', ' ' .. key .. '@' .. r[R_VER] .. ' ', 1, true) then
      noted = noted .. (noted == '' and '' or ' ') .. key .. '@' .. r[R_VER]
    end
    if is_pending(st) or st == ST_FAILED then
      local ref = clinic .. '/' .. booking_id .. '/' .. key
      r[R_ST] = CODE[ST_CANCELLED]
      if st == ST_FAILED then
        -- A dead letter leaves with the booking (never replayed for a visit that is off);
        -- why it failed first stays on the timeline, before the cancel.
        r[R_WHY] = inline(reason .. '; it had failed before: ' .. text_of(prefix, r[R_WHY]))
      else
        r[R_WHY] = inline(reason)
      end
      r[R_VER] = version
      redis.call('HSET', bkey, key, join(r, 9))
      redis.call('ZREM', due_key, ref)
      redis.call('ZREM', lease_key, ref)
      redis.call('ZREM', dead_key, ref)
    end
  end
end
if noted ~= gone then redis.call('HSET', bkey, 'gone', noted) end
if texts ~= '' then
  for id, text in pairs(cjson.decode(texts)) do redis.call('HSET', prefix .. ':t', id, text) end
end
-- Kept `retention` after its last reminder: the cancel, or a notice of it still to go (not
-- after the visit it no longer has: the patient's details go on time).
local keep = redis_now() + retention
if adds ~= '' then
  local a = cjson.decode(adds)
  for j = 1, #a, 3 do
    redis.call('HSET', bkey, a[j], a[j + 1])
    if a[j + 2] ~= '' then
      redis.call('ZADD', due_key, a[j + 2], clinic .. '/' .. booking_id .. '/' .. a[j])
      keep = math.max(keep, tonumber(a[j + 2]) + retention)
    end
  end
end
keep_booking(prefix, clinic, booking_id, keep, true)
-- The unsubscribe links its emails carried (`unsub`, noted by _STILL_OWNED): the address
-- behind each is kept no longer than this booking now is, unless another live booking
-- emailed the same link (P:unsub-by; its email carries it as long as that booking is kept,
-- its address corrected since or not; one of its contacts' bookings emailed before links
-- were noted counts when it has begun any email). Only shortened: the link's own expiry,
-- `retention` after its last email, may already be sooner.
local links = redis.call('HGET', bkey, 'unsub')
if links then
  local now = redis_now()
  local own = tonumber(redis.call('HGET', bkey, 'keep_until'))
  local near = {}
  for _, ckey in ipairs(contact_keys(prefix, clinic, redis.call('HGET', bkey, 'contacts'))) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', ckey, '(' .. tostring(now), '+inf')) do
      if id ~= booking_id then near[id] = true end
    end
  end
  local function carries(okey, noted, link)
    if noted then return string.find(' ' .. noted .. ' ', ' ' .. link .. ' ', 1, true) ~= nil end
    local flat = redis.call('HKEYS', okey)
    for i = 1, #flat do
      if string.sub(flat[i], -7) == ':email+' then return true end
    end
    return false
  end
  for link in string.gmatch(links, '%S+') do
    local ukey = prefix .. ':unsub:' .. clinic .. '/' .. link
    local by_key = prefix .. ':unsub-by:' .. clinic .. '/' .. link
    local left = redis.call('PTTL', ukey)
    if left > 0 and own then
      local at, others = own, {}
      for id in pairs(near) do others[id] = true end
      for _, id in ipairs(redis.call('ZRANGE', by_key, 0, -1)) do
        if id ~= booking_id then others[id] = true end
      end
      for id in pairs(others) do
        local okey = prefix .. ':b:' .. clinic .. '/' .. id
        local o = redis.call('HMGET', okey, 'unsub', 'keep_until')
        local okeep = tonumber(o[2] or '')
        if not okeep then
          redis.call('ZREM', by_key, id)  -- its keys are gone
        elseif okeep > at and carries(okey, o[1], link) then
          at = okeep
        end
      end
      at = math.ceil(at)
      if at < now + left / 1000 then
        redis.call('EXPIREAT', ukey, at)
        redis.call('EXPIREAT', by_key, at)
      end
    end
  end
end
return answer('cancelled')
"""

# A patient's opt-out of one channel at one clinic (worker/optout.py), in one step: the
# address is recorded as opted out (the send-time check in _BEGIN_SEND reads it), and
# every reminder of that channel still to be sent in the given bookings of that address is
# skipped with the reason. One being sent (`sending`) is left to its attempt, whose own
# fence decides: before the hand-over, the send-time checks read the opt-out (_BEGIN_SEND
# skips it with the reason, or sends a care-critical email step by SMS; `still_owned` sends
# nothing and puts it back for the next begin to decide); past it, the delivery is
# recorded as sent. So exactly one of sent and skipped is counted and told for it. An
# email of a care-critical step is left to go by SMS when the patient allows SMS. Returns
# {1 if the address was not opted out before (0 if it was), number skipped, booking ids
# touched...}.
# KEYS[4], ARGV[9] (modes 'out', 'optin'): the clinic's consent record (worker/webhooks.py
# `tell_consent`) and this contact's field in it. An opt-out made here marks it "0" (opted
# out, the clinic not told yet) unless it holds "1" (told opted out: a START not told yet),
# so an opt-out with no field was made before the record existed, by code that told the
# clinic of a STOP then (`tell_consent` counts it told). The opt-in of such an SMS opt-out
# writes "1" in the same step, so its START is told as a change.
# Mode 'optin' removes the opt-out (returns {1 if it was opted out, 0}); then mode 'in'
# puts back into the schedule the reminders Python chose (`Store.opt_in`), unless the
# address was opted out again since (a STOP after the START: {0, 0}, nothing put back):
# ARGV[9] the bookings' hashes as read ({booking id, flat fields}), ARGV[10] the reminders
# to resume ({booking id, key, due score[, its own reason]}; score '-': it stays skipped,
# its own reason saying why; '@': it stays skipped and its step goes by email {.., reason,
# email key, email's reason, due score}), `why` their reason. Only if every hash read is unchanged
# (else {-1}: read again); an SMS resumed bumps its booking's `smsv` (the SMS cap's guards
# of other writes read it). Returns {0, number resumed}.
_OPT_OUT = """
local optkey, due_key, lease_key, told_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, clinic, channel, contact, why, mode, hooks, critical =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local field = channel .. ':' .. contact
if mode == 'optin' then
  local was = redis.call('HDEL', optkey, field)
  if was == 1 and channel == 'sms' and redis.call('HEXISTS', told_key, ARGV[9]) == 0 then
    redis.call('HSET', told_key, ARGV[9], '1')  -- an opt-out from before the record: told
  end
  return {was, 0}
end
if mode == 'in' then
  -- Opted out again since this opt-in (a STOP after the START): the STOP holds, nothing
  -- goes back.
  if redis.call('HEXISTS', optkey, field) == 1 then return {0, 0} end
  local read, resume = cjson.decode(ARGV[9] or '[]'), cjson.decode(ARGV[10] or '[]')
  -- The contact's bookings as read ({contact sets, min score, ids}): one stored since (a
  -- new booking of the patient, a phone corrected onto this one) was not counted by the
  -- SMS cap: read again.
  local index = cjson.decode(ARGV[11] or '[[],"",[]]')
  local known = {}
  for _, id in ipairs(index[3]) do known[id] = true end
  for _, ckey in ipairs(index[1]) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', ckey, index[2], '+inf')) do
      if not known[id] then return {-1} end
    end
  end
  for _, b in ipairs(read) do
    local flat = redis.call('HGETALL', prefix .. ':b:' .. clinic .. '/' .. b[1])
    local expected = b[2]
    if #flat ~= #expected then return {-1} end
    local want = {}
    for j = 1, #expected, 2 do want[expected[j]] = expected[j + 1] end
    for j = 1, #flat, 2 do
      if want[flat[j]] ~= flat[j + 1] then return {-1} end
    end
  end
  local resumed, bumped = 0, {}
  for _, item in ipairs(resume) do
    local booking_id, key, score = item[1], item[2], item[3]
    local bkey = prefix .. ':b:' .. clinic .. '/' .. booking_id
    local r, a = load(bkey, key)
    if r and r[R_ST] == ST_SKIPPED and score == '-' then
      r[R_WHY] = inline(item[4])  -- it stays skipped: why (the SMS cap had no room)
      save(bkey, key, r, a)
    elseif r and r[R_ST] == ST_SKIPPED and score == '@' then
      -- No room for this care-critical SMS: it stays skipped and its step goes by email
      -- (item[5] at item[7]), as the finish's SMS cap does, unless that email goes anyway.
      local ekey = item[5]
      local e, ea = load(bkey, ekey)
      if e and (is_pending(e[R_ST]) or e[R_ST] == ST_SENT) then
        r[R_WHY] = inline(item[4] .. '; its email goes')
        save(bkey, key, r, a)
      else
        r[R_WHY] = inline(item[4] .. '; by email instead (care-critical)')
        save(bkey, key, r, a)
        local copy = {}
        for j = 1, 9 do copy[j] = r[j] end
        copy[R_ST] = ST_SCHEDULED
        copy[R_DUE] = item[7]
        copy[R_WHY] = inline(item[6])
        if not ea then
          ea = split('', 6)
          ea.had = false
        end
        save(bkey, ekey, copy, ea)
        local eref = clinic .. '/' .. booking_id .. '/' .. ekey
        redis.call('ZADD', due_key, item[7], eref)
        count_metric(prefix, 'scheduled', clinic, ekey)
        resumed = resumed + 1
        redis.call('HDEL', bkey, 'completed_told')  -- more to send: told complete again
      end
    elseif r and r[R_ST] == ST_SKIPPED then
      r[R_ST] = ST_SCHEDULED
      r[R_WHY] = inline(item[4] or why)
      save(bkey, key, r, a)
      if score ~= '' then  -- '' : a held booking's, put into the schedule by its release
        redis.call('ZADD', due_key, score, clinic .. '/' .. booking_id .. '/' .. key)
      end
      count_metric(prefix, 'scheduled', clinic, key)
      resumed = resumed + 1
      -- Told complete before the STOP's skips ended it: more to send now, so the finish
      -- tells booking.completed again once these are done.
      redis.call('HDEL', bkey, 'completed_told')
      if channel_of(key) == 'sms' and not bumped[booking_id] then
        bumped[booking_id] = true
        redis.call('HINCRBY', bkey, 'smsv', 1)
      end
    end
  end
  -- Email opted in again: an email still to go that an attempt took by SMS (flag "s")
  -- goes by email now (as its begin says), so the SMS cap no longer counts it.
  for _, item in ipairs(cjson.decode(ARGV[12] or '[]')) do
    local bkey = prefix .. ':b:' .. clinic .. '/' .. item[1]
    local r, a = load(bkey, item[2])
    if r and (r[R_ST] == ST_SCHEDULED or r[R_ST] == ST_RETRYING) then
      local hash = string.find(r[R_FLAGS], '#', 1, true) or (#r[R_FLAGS] + 1)
      r[R_FLAGS] = string.gsub(string.sub(r[R_FLAGS], 1, hash - 1), 's', '')
        .. string.sub(r[R_FLAGS], hash)
      save(bkey, item[2], r, a)
      if not bumped[item[1]] then
        bumped[item[1]] = true
        redis.call('HINCRBY', bkey, 'smsv', 1)
      end
    end
  end
  return {0, resumed}
end
-- ARGV[10]: the addresses of these bookings' documents, normalised in Python (contact_of).
local norms = cjson.decode(ARGV[10])
local seen = {}
for n = 11, #ARGV do
  local found, doc_table, patient, missing = contact_of(
    redis.call('GET', prefix .. ':d:' .. clinic .. '/' .. ARGV[n]), channel, norms)
  if missing or norms_stale(doc_table, norms) then return {-1} end  -- read again
  seen[n] = {found, doc_table, patient}
end
local first = redis.call('HSET', optkey, field, why)
if first == 1 then redis.call('HSETNX', told_key, ARGV[9], '0') end  -- to be told
-- An attempt still at work on `ref` (its ledger holds the token, its log has no finish of
-- it): one a change took off `sending` (a move rescheduled it) is left to it as one being
-- sent is, so it is counted and told once, sent or skipped (`Store._in_flight`;
-- `at_work` of the prelude).
local skipped, touched = 0, {}
for n = 11, #ARGV do
  local booking_id = ARGV[n]
  local base = clinic .. '/' .. booking_id
  local bkey = prefix .. ':b:' .. base
  local found, doc_table, patient = seen[n][1], seen[n][2], seen[n][3]
  if found == contact then
    local flat = redis.call('HGETALL', bkey)
    local any = false
    for i = 1, #flat, 2 do
      local key = flat[i]
      if is_reminder(key) and channel_of(key) == channel then
        local r, a = load(bkey, key)
        local fallback = channel == 'email' and is_critical(critical, doc_table, key, bkey, prefix)
          and allows(optkey, doc_table, patient, 'sms', norms)
        if is_pending(r[R_ST]) and r[R_ST] ~= ST_SENDING and not fallback
            and not at_work(prefix, base .. '/' .. key) then
          local ref = base .. '/' .. key
          r[R_ST] = ST_SKIPPED
          r[R_WHY] = inline('opted_out: ' .. why)
          save(bkey, key, r, a)
          redis.call('ZREM', due_key, ref)
          redis.call('ZREM', lease_key, ref)
          count_metric(prefix, 'skipped', clinic, key)
          skipped = skipped + 1
          any = true
          if wants(hooks, 'reminder.skipped') then
            emit_event(prefix, clinic, 'webhook', 'reminder.skipped',
              {booking_id = booking_id, reminder = key, step = step_of(key),
               channel = channel, version = tonumber(r[R_VER]),
               due_at = tonumber(r[R_DUE] ~= '' and r[R_DUE] or r[R_PLAN]),
               attempts = all_tries(a), reason = 'opted_out: ' .. why})
          end
        end
      end
    end
    if any then
      table.insert(touched, booking_id)
      tell_completed(prefix, clinic, booking_id, bkey, hooks)  -- maybe nothing left to go
    end
    -- Its emails left to go by SMS (care-critical, the step's own SMS not carrying it: as
    -- the begin decides, 'ok sms') are SMS to the cap from now on (flag "s", counted by
    -- `_sms_slots`), and the writes that read this booking's SMS before must see it: `smsv`
    -- bumped, as the begin's flip does (`by_sms_keys` is the same rule at a write).
    if channel == 'email' then
      local flagged = false
      for i = 1, #flat, 2 do
        local key = flat[i]
        if is_reminder(key) and channel_of(key) == 'email' then
          local r, a = load(bkey, key)
          if (r[R_ST] == ST_SCHEDULED or r[R_ST] == ST_RETRYING)
              and not string.find(string.match(r[R_FLAGS], '^[^#]*'), 's', 1, true)
              and is_critical(critical, doc_table, key, bkey, prefix) then
            local own = redis.call('HGET', bkey, string.sub(key, 1, -7) .. ':sms')
            local st = own and STATUS_OF[split(own, 9)[R_ST]]
            if not own or st == ST_SKIPPED or st == ST_CANCELLED then
              r[R_FLAGS] = 's' .. r[R_FLAGS]
              save(bkey, key, r, a)
              flagged = true
            end
          end
        end
      end
      if flagged then redis.call('HINCRBY', bkey, 'smsv', 1) end
    end
  end
end
local out = {first, skipped}
for _, b in ipairs(touched) do table.insert(out, b) end
return out
"""

# Replay a dead letter now, or purge it from the dead letters, keeping it `failed`.
_REVIVE = """
local bkey, dead_key, due_key = KEYS[1], KEYS[2], KEYS[3]
local ref, key, mode, stamp, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local prefix, clinic, booking_id = ARGV[6], ARGV[7], ARGV[8]
if not redis.call('ZSCORE', dead_key, ref) then return 0 end
local r, a = load(bkey, key)
if not r or r[R_ST] ~= ST_FAILED then return 0 end
local now = redis_now()
redis.call('ZREM', dead_key, ref)
if mode == 'replay' then
  r[R_ST] = ST_SCHEDULED
  -- A fresh budget of attempts; those made stay counted (`all_tries`).
  set_tries(a, 0, all_tries(a))
  -- Its due stays (only the due set says "now"): an SMS replayed after its patient-local
  -- day is found late by its attempt and capped on the day it goes (dispatch `_late_sms`).
  -- Flag "r": a dead SMS was not counted (another booking may have taken its day since):
  -- its attempt caps it on the day it goes even when that is its own.
  if not string.find(string.match(r[R_FLAGS], '^[^#]*'), 'r', 1, true) then
    r[R_FLAGS] = 'r' .. r[R_FLAGS]
  end
  r[R_WHY] = inline('replayed at ' .. stamp)
  redis.call('ZADD', due_key, now, ref)
  -- Told complete with this one failed: to send again, so told again once it is done.
  redis.call('HDEL', bkey, 'completed_told')
  count_metric(prefix, 'replayed', clinic, key)
else
  local was = text_of(prefix, r[R_WHY])
  r[R_WHY] = inline('purged from the dead letters at ' .. stamp .. ': ' .. was)
end
save(bkey, key, r, a)
keep_booking(prefix, clinic, booking_id, now + retention)
return 1
"""

# The SMS cap's first read (`Store._caps_read`), for a chunk of bookings: ARGV: the lowest
# score (exclusive, as ZRANGEBYSCORE takes it), the limit, the number n of contact index
# keys, those n keys, then (opt-out key, field) pairs. Returns each key's first members
# from that score on, then 1 or 0 per pair: the field exists. What a pipeline of
# ZRANGEBYSCOREs and HEXISTSs answered, without a reply parsed in Python per command.
# The SEQUENCE of a calendar invite about to go (Store.invite_sequence; worker/invites.py):
# the booking's field `ics` is "<sequence> <content key>" of the last invite made for it.
# The same event again: that sequence (never below the change sequence `base`); another
# event: one above it (or `base`, if higher). Nothing written for a booking no longer stored.
_INVITE_SEQUENCE = """
local bkey, base, content = KEYS[1], tonumber(ARGV[1]), ARGV[2]
if redis.call('EXISTS', bkey) == 0 then return base end
local last = redis.call('HGET', bkey, 'ics')
local seq = base
if last then
  local was, was_content = string.match(last, '^(%d+) (.*)$')
  was = tonumber(was)
  if was then
    if was_content ~= content then was = was + 1 end
    if was > seq then seq = was end
  end
end
local now = seq .. ' ' .. content
if now ~= last then redis.call('HSET', bkey, 'ics', now) end
return seq
"""

_CAPS_FIRST = """
local since, limit, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for j = 1, n do
  out[j] = redis.call('ZRANGEBYSCORE', ARGV[3 + j], since, '+inf', 'LIMIT', 0, limit)
end
for j = 4 + n, #ARGV, 2 do
  out[#out + 1] = redis.call('HEXISTS', ARGV[j], ARGV[j + 1])
end
return out
"""

# The upsert's write, for a chunk of bookings. ARGV: the prefix, the batch's earlier
# bookings still to be written (JSON, see `stale` below), then the texts the chunk refers to
# (a text id already taken by other words is reported, and nothing is written). Then per booking
# (`apply_args`): a JSON array (its check: '' = it must not exist yet; '-' followed by the
# hash's fields as they were read = nothing to write, only retention, while it is still as
# read; else the hash's fields as they were read; its retention, the hash
# fields to set and to delete, its due entries as ZADD takes them (score, ref), ...), then
# its document ('' = unchanged) as a plain argument, not inside the JSON (no escaping, no
# decoding). The metrics it counts come precomputed (counted only for a booking whose
# write applies).
# Returns {'ok', the positions of bookings whose check failed (changed since read)...}.
_APPLY = """
local due_key, lease_key, dead_key, layout_key, texts_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local found = redis.call('GET', layout_key)
if not found then
  redis.call('SET', layout_key, LAYOUT)
elseif found ~= LAYOUT then
  return {'layout', found}
end
local i = 3
local ntexts = tonumber(ARGV[i])
i = i + 1
for _ = 1, ntexts do
  local id, text = ARGV[i], ARGV[i + 1]
  i = i + 2
  local cur = redis.call('HGET', texts_key, id)
  if not cur then
    redis.call('HSET', texts_key, id, text)
  elseif cur ~= text then
    return {'collision', id}
  end
end
-- Whether a hash (HGETALL reply) holds exactly the expected fields (a flat list). No
-- sorting: Lua compares strings by the server's locale, Python by code point.
local function same(flat, expected, from)
  from = from or 1
  if #flat ~= #expected - from + 1 then return false end
  local want = {}
  for j = from, #expected, 2 do want[expected[j]] = expected[j + 1] end
  for j = 1, #flat, 2 do
    if want[flat[j]] ~= flat[j + 1] then return false end
  end
  return true
end
local function refs(keys, base)
  local out = {}
  for j, k in ipairs(keys) do out[j] = base .. '/' .. k end
  return out
end
local out = {'ok'}
local tally = {}  -- metrics: "<what>|<clinic>|<channel>" -> count, one HINCRBY each at the end
-- Bookings ("<clinic>/<booking id>") to be written after this one, in a later round: those
-- of the batch's earlier chunks whose check failed (ARGV[2]), and those of this script whose
-- check fails. A booking whose SMS cap read one of them waits for it too (as one by one).
local stale = {}
for _, k in ipairs(cjson.decode(ARGV[2])) do stale[k] = true end
local position = 0
while i <= #ARGV do
  position = position + 1
  -- clinic, booking id, check, keep until, fields to set, fields to delete, due entries
  -- (score, ref, ...), clinic events ({kind, type, fields}) that come with the write,
  -- contact ids the booking no longer has (the contact index), the SMS cap's guard (or
  -- false), metrics {name, count, ...}, its contact ids, keys out of due, of lease, of
  -- dead letters; then the document.
  local b = cjson.decode(ARGV[i])
  local clinic, booking_id, check, keep_s = b[1], b[2], b[3], b[4]
  local hset, hdel, due = b[5], b[6], b[7]
  local emits, unindex, guard, counts, contacts = b[8], b[9], b[10], b[11], b[12]
  local rm_due, rm_lease, rm_dead = b[13], b[14], b[15]
  local keep = tonumber(keep_s)
  local doc = ARGV[i + 1]
  i = i + 2
  local base = clinic .. '/' .. booking_id
  local bkey, dkey = prefix .. ':b:' .. base, prefix .. ':d:' .. base
  local ok
  -- Unchanged as planned: nothing to write, but only while the booking is still as read
  -- (a cancel or a move landing since is reconciled again, not answered as read).
  local noop = check ~= '' and check[1] == '-'
  if check == '' then
    ok = redis.call('EXISTS', bkey) == 0
  elseif noop then
    ok = same(redis.call('HGETALL', bkey), check, 2)
  else
    ok = same(redis.call('HGETALL', bkey), check)
  end
  -- The SMS cap's read of the patient's other bookings (see `_caps_read`): {contact id, min
  -- score, limit, the members read, {booking id, version, ...}}; they must be unchanged.
  if ok and guard then
    local ckey = prefix .. ':c:' .. clinic .. '/' .. guard[1]
    local got = redis.call('ZRANGEBYSCORE', ckey, guard[2], '+inf', 'LIMIT', 0, guard[3])
    local want = guard[4]
    if #got ~= #want then ok = false end
    for j = 1, #got do
      if ok and got[j] ~= want[j] then ok = false end
    end
    local versions = guard[5]
    for j = 1, #versions, 2 do
      if ok and stale[clinic .. '/' .. versions[j]] then ok = false end
      if ok then
        local v = redis.call('HMGET', prefix .. ':b:' .. clinic .. '/' .. versions[j], 'version',
          'smsv')
        if (v[1] or '') .. '/' .. (v[2] or '') ~= versions[j + 1] then ok = false end
      end
    end
  end
  if not ok then
    table.insert(out, position)
    stale[base] = true
  else
    if not noop then
      if doc ~= '' then
        if check == '' then redis.call('SET', dkey, doc, 'EXAT', keep_s)
        else redis.call('SET', dkey, doc) end
      end
      if #hset > 0 then redis.call('HSET', bkey, unpack(hset)) end
      if #hdel > 0 then redis.call('HDEL', bkey, unpack(hdel)) end
      if #due > 0 then redis.call('ZADD', due_key, unpack(due)) end
      if #rm_due > 0 then redis.call('ZREM', due_key, unpack(refs(rm_due, base))) end
      if #rm_lease > 0 then redis.call('ZREM', lease_key, unpack(refs(rm_lease, base))) end
      if #rm_dead > 0 then redis.call('ZREM', dead_key, unpack(refs(rm_dead, base))) end
      for _, e in ipairs(emits) do
        if e[1] == 'completed' then
          -- booking.completed, unless an attempt on one of these keys is still at work (its
          -- finish tells it): read here, with the write (Store._prepare_reconciled).
          local busy = false
          for _, k in ipairs(e[3]) do
            if at_work(prefix, base .. '/' .. k) then busy = true end
          end
          if not busy then tell_completed(prefix, clinic, booking_id, bkey, e[2]) end
        else
          emit_event(prefix, clinic, e[1], e[2], e[3])
        end
      end
      if unindex ~= '' then unindex_booking(prefix, clinic, booking_id, unindex) end
      -- Metrics (worker/metrics.py): reminders put into the schedule (new, moved or
      -- re-opened) and reminders the plan skips, counted for the whole script (`tally`).
      for j = 1, #counts, 2 do
        tally[counts[j]] = (tally[counts[j]] or 0) + counts[j + 1]
      end
    end
    if check == '' then
      -- A new booking: nothing attempted, nothing dead, no earlier expiry.
      -- (its keep_until came with its fields; its document expires as it is set.)
      redis.call('EXPIREAT', bkey, keep)
      if doc == '' then redis.call('EXPIREAT', dkey, keep) end
      list_booking(prefix, clinic, booking_id, keep)
      index_booking(prefix, clinic, booking_id, contacts, keep)
    elseif redis.call('EXISTS', bkey) == 1 then
      keep_booking(prefix, clinic, booking_id, keep)
    end
  end
end
for name, n in pairs(tally) do redis.call('HINCRBY', prefix .. ':metrics', name, n) end
return out
"""


def apply_args(
    clinic: str, booking_id: str, check: str | list[str], doc: str, keep: str,
    hset: list[str], hdel: list[str], due: list[str], rm_due: list[str],
    rm_lease: list[str], rm_dead: list[str], emits: list[Any], unindex: str,
    guard: list[Any] | None, contacts: str, was: Mapping[str, str],
) -> list[str | bytes]:
    """One booking's arguments of the apply script (see _APPLY). `due` is (key, score, ...);
    `was` the hash as read (for the skipped reminders counted: those not skipped before)."""
    base = f"{clinic}/{booking_id}/"
    zadd: list[str] = []
    tally: dict[str, int] = {}
    for n in range(0, len(due), 2):
        key = due[n]
        zadd += [due[n + 1], base + key]
        name = f"scheduled|{clinic}|{_channel_of(key)}"
        tally[name] = tally.get(name, 0) + 1
    for n in range(0, len(hset), 2):
        field, value = hset[n], hset[n + 1]
        if value[:1] == "K" and ":" in field and field[-1:] != "+" and \
                was.get(field, "")[:1] != "K":
            name = f"skipped|{clinic}|{_channel_of(field)}"
            tally[name] = tally.get(name, 0) + 1
    counts = [x for kv in tally.items() for x in kv]
    head = _dumps([clinic, booking_id, check, keep, hset, hdel, zadd, emits, unindex,
                   guard if guard is not None else False, counts, contacts, rm_due, rm_lease,
                   rm_dead])
    return [head, doc]


def _channel_of(key: str) -> str:
    """What the script's `string.match(key, ':([^:]*)$')` finds ('' without a ':')."""
    head, colon, channel = key.rpartition(":")
    return channel if colon else ""


def _dumps(value: Any) -> bytes:
    """Compact JSON (UTF-8) for the scripts' arguments."""
    return orjson.dumps(value)


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


class Begun(str):
    """What `Store.begin_send` answers: the verdict itself ("ok", "ok sms", or why the task
    is dropped), as a str; and, with "ok" or "ok sms", what the begin script read in the
    same atomic step (`read` True): `fields`, the booking's hash; `doc`, its document (None
    if gone); `secret`, the stored unsubscribe secret's text for an email (None if not
    asked for, or not made yet)."""

    read: bool
    fields: dict[str, str]
    doc: str | None
    secret: str | None

    def __new__(cls, verdict: str, fields: dict[str, str] | None = None,
                doc: str | None = None, secret: str | None = None) -> Begun:
        self = super().__new__(cls, verdict)
        self.read = fields is not None
        self.fields = fields or {}
        self.doc, self.secret = doc, secret
        return self


class _BeginScript:
    """The begin script, answering a `Begun` (its reply is {verdict, hash, doc, secret})."""

    def __init__(self, script: Callable[..., Any]) -> None:
        self._script = script

    def __call__(self, *, keys: Sequence[str], args: Sequence[Any]) -> Begun:
        reply = self._script(keys=keys, args=args)
        if isinstance(reply, (str, bytes)):  # a plain verdict
            return Begun(str(reply))
        verdict = str(reply[0])
        if len(reply) < 3:
            return Begun(verdict)
        flat = reply[1] if verdict != "contacts changed" else None
        fields = None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))
        return Begun(verdict, fields, _str_or_none(reply[2]),
                     _str_or_none(reply[3]) if len(reply) > 3 else None)


def _str_or_none(value: Any) -> str | None:
    """A script's string, or None for its nil (Lua's false reaches a RESP3 client as None or
    as False, depending on the Redis version)."""
    return value if isinstance(value, str) else None


class OptOut(tuple[int, list[str]]):
    """`Store.opt_out`'s answer: (reminders skipped, booking ids touched), and `first`:
    whether this call opted the address out (False: it already was, e.g. a second STOP)."""

    first: bool

    def __new__(cls, skipped: int, touched: list[str], *, first: bool) -> OptOut:
        self = super().__new__(cls, (skipped, touched))
        self.first = first
        return self


@dataclass(frozen=True)
class OptIn:
    """`Store.opt_in`'s answer: whether the address was opted out (its truth value) and how
    many reminders were put back into the schedule."""

    was: bool
    resumed: int

    def __bool__(self) -> bool:
        return self.was


def _resumable(fields: Mapping[str, str], doc: str | None, channel: str, contact: str,
               now: float, critical: str = "", pause: str | None = None,
               ) -> list[tuple[float, str, ZoneInfo, bool, bool]]:
    """The reminders of a stored booking that an opt-in of `contact` from `channel` puts
    back: (due, key, the patient's timezone, whether its step is care-critical (`critical`:
    "<treatment>/<step>" space-separated; the pause message again for a new date as the
    booking's `pause` step), whether the patient takes email). Those the opt-out skipped
    (reason "opted_out: ", at STOP or at their begin) in a scheduled booking (in a cancelled
    one, only the notice of its cancel) whose patient
    still has this address and takes this channel, due (and not expired) after `now` (in a
    held booking too: its release puts them into the schedule); a message again for a new
    date too (again-<step>, repause), and a change notice not expired (at its time, or now
    if that passed: it is meant for any time before its expiry, and without it the patient
    never hears of the move or the cancel), each only of the booking's latest change
    (`seq`): one a later change superseded names a date no longer true, and that change
    added its own. An SMS opt-in also puts back a care-critical
    email step its begin skipped while the patient was unsubscribed from email and opted out
    of SMS (a change notice counts, as for the scripts' `is_critical`) (it goes by SMS;
    not one whose own SMS carries the step; never "by email": its
    last flag is false). A step the booking no longer plans is never
    among them: a change of the booking cancels such a skipped reminder, and the same
    booking planned again (a clinic's sync, `recap`) keeps it skipped with a reason that
    is no longer "opted_out: " ("not sent: <why>; no longer in the plan since",
    worker/reconcile.py)."""
    status = fields.get("status")
    if status not in (Status.SCHEDULED, Status.HELD, Status.CANCELLED) or doc is None:
        return []
    try:
        parsed = json.loads(doc)
        patient = parsed["patient"]
        address = patient["phone" if channel == "sms" else "email"]
        tz = ZoneInfo(patient["timezone"])
    except (ValueError, KeyError, TypeError):  # a stored document is valid: not expected
        return []
    if not isinstance(address, str) or normal_contact(channel, address) != contact \
            or channel not in (patient.get("channels") or []):
        return []
    protected = {what.partition("/")[2] for what in critical.split()
                 if what.partition("/")[0] == parsed.get("treatment")}
    protected |= set(NOTICE_STEPS)  # care-critical as the scripts' `is_critical` counts them
    email = "email" in (patient.get("channels") or []) and bool(patient.get("email"))
    out = []
    for key, value in fields.items():
        step = key.split(":", 1)[0].split("#", 1)[0]
        if not is_reminder_field(key):
            continue
        if is_notice(key) and key.split(":", 1)[0].partition("#")[2] != fields.get("seq"):
            continue  # superseded by a later change (which added its own)
        if status == Status.CANCELLED and step != "cancelled":
            continue  # a cancelled booking sends only the notice of its cancel
        # An SMS opt-in also brings back a care-critical email step skipped at its begin
        # while the patient, unsubscribed from email, was opted out of SMS too: its begin
        # sends it by SMS now ('ok sms'), unless the step's own SMS carries it. Counted as
        # an SMS, never by email (the patient unsubscribed from it).
        by_sms = channel == "sms" and key.endswith(":email") \
            and key[: -len("email")] + "sms" not in fields
        if not key.endswith(f":{channel}") and not by_sms:
            continue
        r = _split(value, len(REMINDER_SLOTS))
        if STATUS_OF.get(r[0]) != Status.SKIPPED or not r[8].startswith(OPTED_OUT):
            continue
        due = float(r[3] or r[2] or 0)
        if r[4] and float(r[4]) <= now:
            continue  # expired while opted out
        if step in NOTICE_STEPS:
            due = max(due, now)  # a change notice is meant for any time before its expiry
        elif due <= now:
            continue  # its time passed while opted out: not sent late
        step = base_step(step, pause)
        if by_sms and step not in protected:
            continue
        out.append((due, key, tz, step in protected, email and not by_sms))
    return out


# `connect` makes the client with decode_responses=True, so every reply is str; redis-py
# still types replies as `bytes | str`. These narrow the types where a reply is read.
def _flat_hash(flat: Sequence[Any]) -> dict[str, str]:
    """A hash as a script answers HGETALL's reply: [field, value, ...]."""
    return {str(k): str(v) for k, v in zip(flat[0::2], flat[1::2], strict=True)}


def _str_hash(reply: Any) -> dict[str, str]:
    return cast(dict[str, str], reply)


def ref_of(clinic: str, booking_id: str, key: str) -> str:
    return f"{clinic}/{booking_id}/{key}"


def split_ref(ref: str) -> tuple[str, str, str]:
    clinic, booking_id, key = ref.split("/", 2)
    return clinic, booking_id, key


def _utc(when: datetime) -> str:
    """`utc_iso` for an aware datetime, faster (the timeline's form of an instant)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# An instant's stored epoch (`_num(timestamp)`) and timeline form (`_utc`), memoised: the
# bookings of a batch share their instants (the same days, zones and steps). Keyed by the
# instant (equal instants in any zone are one key, and both forms depend only on it).
_STAMPS: dict[datetime, tuple[str, str]] = {}


def _stamps(when: datetime) -> tuple[str, str]:
    hit = _STAMPS.get(when)
    if hit is None:
        if len(_STAMPS) >= 65536:
            _STAMPS.clear()
        hit = _STAMPS[when] = (_num(when.timestamp()), _utc(when))
    return hit


# An instant's stored epoch alone (`_stamps` without the timeline's form), memoised alike.
_EPOCHS: dict[datetime, str] = {}


# The same by the instant's exact microseconds since the epoch (a plan record's instants).
_MICRO_EPOCHS: dict[int, str] = {}
_DUE_OF = itemgetter(1)  # a reminder record's due instant (microseconds)


def _micro_epoch(micros: int) -> str:
    """`_epoch_stamp` of the instant `micros` microseconds after the epoch, kept in
    `_MICRO_EPOCHS`. The same text: an aware datetime's `timestamp()` is its microseconds
    since the epoch over 10**6 (an exact integer division, correctly rounded), as here."""
    if len(_MICRO_EPOCHS) >= 65536:
        _MICRO_EPOCHS.clear()
    seconds, fraction = divmod(micros, 1_000_000)
    stamp = _MICRO_EPOCHS[micros] = str(seconds) if not fraction else repr(micros / 1_000_000)
    return stamp


def _epoch_stamp(when: datetime) -> str:
    """`_stamps(when)[0]`, kept in `_EPOCHS`."""
    if len(_EPOCHS) >= 65536:
        _EPOCHS.clear()
    stamp = _EPOCHS[when] = _num(when.timestamp())
    return stamp


_KEY_PARTS: dict[str, tuple[str, str, int]] = {}


def _key_parts(key: str) -> tuple[str, str, int]:
    """`key_parts`, memoised (a protocol has a few dozen keys)."""
    hit = _KEY_PARTS.get(key)
    if hit is None:
        if len(_KEY_PARTS) >= 4096:
            _KEY_PARTS.clear()
        hit = _KEY_PARTS[key] = key_parts(key)
    return hit


def _entry_order(entry: dict[str, Any]) -> tuple[str, str]:
    return entry["due_at"] or "", entry["id"]


def _to_the_second(iso: str | None) -> str:
    """An instant as a reason's words say it: "2026-11-24T02:36:59Z", not
    "2026-11-24T02:36:59.689449Z" (the JSON fields keep their precision)."""
    return re.sub(r"\.\d+(?=Z$|[+-]\d\d:\d\d$)", "", iso or "")


def _iso(epoch: float | str | None) -> str | None:
    if epoch in (None, ""):
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat().replace(  # type: ignore[arg-type]
        "+00:00", "Z")


# --- the reminder codec (the Lua prelude's `load` / `save` in Python) --------------------

def _split(raw: str | None, n: int) -> list[str]:
    parts = raw.split("|", n - 1) if raw else []
    return parts + [""] * (n - len(parts))


def _without_flag(main: str, flag: str) -> str:
    """A stored reminder's main field without `flag` among its flags (before the "#")."""
    r = _split(main, len(REMINDER_SLOTS))
    head, sep, tail = r[7].partition("#")
    r[7] = head.replace(flag, "") + sep + tail
    return _join(r)


def _with_flag(main: str, flag: str) -> str:
    """A stored reminder's main field with `flag` among its flags (before the "#")."""
    r = _split(main, len(REMINDER_SLOTS))
    head, sep, tail = r[7].partition("#")
    if flag not in head:
        r[7] = flag + head + sep + tail
    return _join(r)


def _critical_key(key: str, protected: frozenset[str], pause: str | None) -> bool:
    """Whether reminder `key` is of a care-critical step (`protected`: the plan's; `pause`:
    its pause step, that of a repause), as the begin's `is_critical` reads it: a change
    notice always, a message again or a repause as the step it sends again (`base_step`)."""
    step = key_parts(key)[0]
    return step in NOTICE_STEPS or base_step(step, pause) in protected


def _flag_by_sms(hset: list[str], plan: Plan,
                 values: Mapping[str, str] | None = None) -> list[str]:
    """Flag "s" the emails going by SMS (`by_sms_keys`) among a booking's reminders as a
    write leaves them (`_rewrite_flags`). Return the keys flagged."""
    pause = parse_notice_steps(plan.notice_steps)[0]
    return _rewrite_flags(hset, values or {}, lambda final: by_sms_keys(
        final, plan.protected, pause), lambda main: _with_flag(main, "s"))


def _unflag_carried(hset: list[str], values: Mapping[str, str]) -> list[str]:
    """Take the flag "s" off the emails carried by their step's own SMS (`carried_keys`)
    among a booking's reminders as a write leaves them (`_rewrite_flags`). Return the keys
    unflagged."""
    return _rewrite_flags(hset, values, carried_keys, lambda main: _without_flag(main, "s"))


def _rewrite_flags(hset: list[str], values: Mapping[str, str],
                   pick: Callable[[Mapping[str, str]], list[str]],
                   change: Callable[[str], str]) -> list[str]:
    """A booking's reminders as a write leaves them: `values` (its reminders' main fields
    as stored; none for a new booking) with `hset` (the write's "field, value, ..." list)
    over them. Each of those `pick` names is rewritten by `change` in `hset` (added to it
    if the write left it alone). Return the keys picked."""
    final = dict(values)
    at: dict[str, int] = {}
    for i in range(0, len(hset), 2):
        if is_reminder_field(hset[i]):
            final[hset[i]] = hset[i + 1]
            at[hset[i]] = i + 1
    keys = pick(final)
    for key in keys:
        value = change(final[key])
        if key in at:
            hset[at[key]] = value
        else:
            hset += [key, value]
    return keys


def carried_keys(values: Mapping[str, str]) -> list[str]:
    """The emails among a booking's reminders (`values`, as `by_sms_keys` takes them) flagged
    "s" and still to go (scheduled, retrying) whose step's own SMS carries the step (there,
    neither skipped nor cancelled: a write gave it back, the unsubscribe's re-cap say): their
    begin skips them ("the SMS of this step carries it", `own_sms_goes`), so they go by SMS
    no longer, and the SMS cap no longer counts them (the step's SMS counts)."""
    out = []
    for key, value in values.items():
        if not key.endswith(":email"):
            continue
        r = _split(value, len(REMINDER_SLOTS))
        if r[0] not in ("S", "R") or "s" not in r[7].split("#", 1)[0]:
            continue
        own = values.get(key[: -len("email")] + "sms")
        if own is not None and own[:1] not in ("K", "C"):
            out.append(key)
    return out


def by_sms_keys(values: Mapping[str, str], protected: frozenset[str],
                pause: str | None) -> list[str]:
    """The emails among a booking's reminders (`values`: each key's main field as stored)
    that go by SMS to a patient who lists email but unsubscribed from it, and lists SMS
    with a phone (the caller's to check, as the begin's `allows`), and are not
    flagged "s" yet: still to go (scheduled, retrying), of a care-critical step, and not
    carried by the step's own SMS (none, or skipped or cancelled): the begin sends them by
    SMS ("ok sms"). Flagged when written (and by the unsubscribe, `_OPT_OUT`), the SMS cap
    counts them as SMS from then on (`_sms_slots`): the patient's other bookings and START
    too, not only once they went."""
    out = []
    for key, value in values.items():
        if not key.endswith(":email"):
            continue
        r = _split(value, len(REMINDER_SLOTS))
        if r[0] not in ("S", "R") or "s" in r[7].split("#", 1)[0]:
            continue
        own = values.get(key[: -len("email")] + "sms")
        if own is not None and own[:1] not in ("K", "C"):
            continue
        if _critical_key(key, protected, pause):
            out.append(key)
    return out


def _join(parts: list[str]) -> str:
    last = len(parts)
    while last > 1 and parts[last - 1] == "":
        last -= 1
    return "|".join(parts[:last])


def _num(value: str | float) -> str:
    """An epoch as stored: whole seconds without ".0"; a fraction exactly (repr)."""
    x = float(value)
    return str(int(x)) if x.is_integer() else repr(x)


def _epoch(slot: str) -> str:
    """An epoch as the record shows it (what `repr(datetime.timestamp())` gives)."""
    return repr(float(slot)) if slot else ""


def is_reminder_field(name: str) -> bool:
    return ":" in name and not name.endswith("+")


def key_parts(key: str) -> tuple[str, str, int]:
    """Return (step, channel, occurrence) of a reminder key "<step>[#<n>]:<channel>"."""
    head, _, channel = key.rpartition(":")
    step, _, occurrence = head.partition("#")
    return step, channel, int(occurrence) if occurrence.isdigit() else 1


def _inline(text: str) -> str:
    return "\\" + text if text[:1] in ("@", "\\") else text


def _text(slot: str, texts: Mapping[str, str]) -> str:
    if slot[:1] == "@":
        return texts.get(slot[1:], "")
    if slot[:1] == "\\":
        return slot[1:]
    return slot


def _text_ids(main: str) -> list[str]:
    """Return the text ids a reminder's field refers to (note, template, reason)."""
    r = _split(main, len(REMINDER_SLOTS))
    ids = [x for x in (r[5], r[6]) if x]
    if r[8][:1] == "@":
        ids.append(r[8][1:])
    return ids


def decode_reminder(
    key: str, main: str, attempt: str | None, texts: Mapping[str, str]
) -> dict[str, str]:
    """Return a reminder's record as its logical fields (step, channel, due_epoch, ...)."""
    r = _split(main, len(REMINDER_SLOTS))
    a = _split(attempt, len(ATTEMPT_SLOTS))
    step, channel, occurrence = key_parts(key)
    flags = r[7]
    at_booking = "b" in flags
    if "#" in flags:
        occurrence = int(flags.split("#", 1)[1])
    planned = _epoch(r[2])
    record = {
        "step": step,
        "channel": channel,
        "template": texts.get(r[6], "") if r[6] else step,
        "occurrence": str(occurrence),
        "planned_epoch": planned,
        "due_epoch": _epoch(r[3]) if r[3] else planned,
        "expires_epoch": _epoch(r[4]),
        "expires_note": texts.get(r[5], "") if r[5] else "",
        "status": STATUS_OF[r[0]],
        "version": r[1],
        "reason": _text(r[8], texts),
        "at_booking": "1" if at_booking else "0",
        "attempts": a[1].partition("+")[0] or "0",
    }
    if "+" in a[1]:  # attempts made before a move or a replay gave it a fresh budget
        record["earlier"] = a[1].partition("+")[2]
    if "s" in flags.split("#", 1)[0]:  # an email that went (or goes) by SMS
        record["by_sms"] = "1"
    if "r" in flags.split("#", 1)[0]:  # replayed, not counted since by a cap decision
        record["replayed"] = "1"
    optional = {
        "claim": a[0],
        "tok": a[2],
        "sent_at": _iso(a[3]) or "",
        "sent_version": a[4],
        "last_error": a[5],
    }
    record.update((k, v) for k, v in optional.items() if v)
    return record


def encode_reminder(
    key: str,
    fields: Mapping[str, str],
    main: str = "",
    attempt: str = "",
    *,
    text_id: Callable[[str], str],
) -> tuple[str, str]:
    """Return a reminder's two stored fields after writing its logical `fields` over them.

    Slots the fields do not name keep their stored form (an inline reason stays inline).
    Words (expires_note, reason) become text ids through `text_id`. The flags "s" and "r"
    are kept unless `fields` plan it afresh (planned_epoch). Only the fields an
    upsert writes are known: status, version, step, channel, template, occurrence,
    planned_epoch, due_epoch, expires_epoch, expires_note, reason, at_booking, attempts,
    earlier.
    """
    r = _split(main, len(REMINDER_SLOTS))
    a = _split(attempt, len(ATTEMPT_SLOTS))
    tries = list(a[1].partition("+")[0::2])  # attempts of its budget, earlier ones
    step, channel, key_occurrence = key_parts(key)
    flags = r[7]
    at_booking = "b" in flags
    occurrence = int(flags.split("#", 1)[1]) if "#" in flags else key_occurrence
    due: str | None = None
    for name, value in fields.items():
        if name == "status":
            r[0] = STATUS_CODE[value]
        elif name == "version":
            r[1] = value
        elif name == "planned_epoch":
            r[2] = _num(value)
        elif name == "due_epoch":
            due = _num(value) if value else ""
        elif name == "expires_epoch":
            r[4] = _num(value) if value else ""
        elif name == "expires_note":
            r[5] = text_id(value) if value else ""
        elif name == "template":
            r[6] = "" if value == step else text_id(value)
        elif name == "occurrence":
            occurrence = int(value)
        elif name == "at_booking":
            at_booking = value == "1"
        elif name == "reason":
            r[8] = "@" + text_id(value) if value else ""
        elif name == "attempts":
            tries[0] = value
        elif name == "earlier":
            tries[1] = value
        elif name in ("step", "channel"):
            if value != (step if name == "step" else channel):
                raise ValueError(f"reminder {key!r}: {name} {value!r} is not the key's")
        else:
            raise ValueError(f"reminder {key!r}: cannot store field {name!r}")
    if due is not None:
        r[3] = "" if due == r[2] else due
    n, earlier = (int(x or 0) for x in tries)
    a[1] = f"{n}+{earlier}" if earlier else (str(n) if n else "")
    # The SMS cap's flags ("s", "r") stay unless the reminder is planned afresh (a new
    # planned time): a write of its expiry, status or reason alone keeps what they say.
    kept = "" if "planned_epoch" in fields else flags.split("#", 1)[0].replace("b", "")
    r[7] = kept + ("b" if at_booking else "") + (
        f"#{occurrence}" if occurrence != key_occurrence else "")
    return _join(r), _join(a)


def _text_id(text: str, length: int) -> str:
    digest = hashlib.blake2b(text.encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode()[:length]


CONTACT_ID_BYTES = 12  # of the HMAC: 16 characters in a key name, collisions out of reach
CONTACT_SECRET = "contact"  # the server secret that keys contact ids (worker/secrets.py)


def _contact_value(kind: str, value: str) -> str:
    if kind not in ("phone", "email"):
        raise ValueError(f"a contact is a phone or an email, not {kind!r}")
    return normal_contact("email" if kind == "email" else "sms", value)


def contact_id(kind: str, value: str, secret: bytes) -> str:
    """The contact index's id of a patient contact: `kind` "phone" (E.164) or "email".

    HMAC-SHA256 keyed with the server secret "contact" (`Store.contact_secret`): a key name
    gives nothing back to someone who can list keys but not read that secret (an unkeyed
    hash of a phone number is reversed by trying every number in minutes)."""
    if len(secret) < 16:
        raise ValueError("a contact id needs a secret of at least 16 bytes")
    mac = _hmac_sha256(secret, f"{kind}:{_contact_value(kind, value)}".encode())
    # `base64.urlsafe_b64encode(...).decode()`, without its two Python-level calls.
    return binascii.b2a_base64(mac[:CONTACT_ID_BYTES], newline=False).translate(
        _URLSAFE).decode()


_URLSAFE = bytes.maketrans(b"+/", b"-_")


# Per secret, SHA-256 already fed its inner and outer padded key (RFC 2104): an HMAC is then
# two copies and updates, about 1 us, where `hmac.digest` sets the key up again each call
# (about 5 us; an intake computes two or three per booking).
_HMAC_PADS: dict[bytes, tuple[Any, Any]] = {}


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of `message` under `key` (what `hmac.digest(key, message, "sha256")`
    returns; tests/test_keys.py compares them)."""
    pads = _HMAC_PADS.get(key)
    if pads is None:
        block = hashlib.sha256(key).digest() if len(key) > 64 else key
        block = block.ljust(64, b"\0")
        pads = (hashlib.sha256(bytes(b ^ 0x36 for b in block)),
                hashlib.sha256(bytes(b ^ 0x5C for b in block)))
        if len(_HMAC_PADS) >= 16:
            _HMAC_PADS.clear()
        _HMAC_PADS[key] = pads
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return cast(bytes, outer.digest())


def legacy_contact_id(kind: str, value: str) -> str:
    """The unkeyed id that bookings stored before contact ids were keyed are indexed under:
    read only (`bookings_for_contact`), until those bookings are stored again or expire."""
    digest = hashlib.sha256(f"{kind}:{_contact_value(kind, value)}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:CONTACT_ID_BYTES]).decode()


def _contact_norms(docs: Iterable[str | None]) -> str:
    """The scripts' `norms` (see `contact_of` in _PRELUDE): each document's patient email
    and phone as written, and normalised (worker/optout.py `normal_contact`), as JSON."""
    norms: dict[str, dict[str, str]] = {"email": {}, "sms": {}}
    for doc in docs:
        if doc is None:
            continue
        try:
            patient = json.loads(doc).get("patient") or {}
        except (ValueError, AttributeError):
            continue
        for channel, name in (("email", "email"), ("sms", "phone")):
            value = patient.get(name) if isinstance(patient, dict) else None
            if isinstance(value, str):
                norms[channel][value] = normal_contact(channel, value)
    return json.dumps(norms, ensure_ascii=False, separators=(",", ":"))


def booking_contacts(booking: Booking, secret: bytes) -> str:
    """The booking hash's `contacts` field: its patient's contact ids, space-separated
    (`secret`: `Store.contact_secret`)."""
    patient = booking.patient
    ids = [contact_id(kind, value, secret)
           for kind, value in (("phone", patient.phone), ("email", patient.email)) if value]
    return " ".join(ids)


def medications_digest(medications_json: str) -> str:
    """What `released_for` stores: a digest of the medications the clinic reviewed."""
    return hashlib.blake2b(medications_json.encode(), digest_size=8).hexdigest()


@dataclass
class _Stored:
    """One booking as read: its hash, its document, and its reminders decoded."""

    fields: dict[str, str]
    doc: str | None
    reminders: dict[str, dict[str, str]]
    # Where each of its scheduled and retrying reminders is in the due set (its score),
    # when read for a timeline (`Store._next_tries`).
    scores: dict[str, str] = field(default_factory=dict)


@dataclass
class _Round:
    """Bookings for one apply script: as read, as prepared, and those left for later."""

    batch: list[tuple[int, tuple[Booking, Plan]]]
    stored: list[_Stored]
    later: list[int]
    caps: list[_CapsRead | None] = field(default_factory=list)
    prepared: list[_Prepared] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    timelines: bool = True  # False: each booking's timeline is only its version
    # Each booking's `model_dump_json()` as the caller had it, by position in its items
    # (`upsert_many`'s `docs`), or None: made here.
    docs: Sequence[str] | None = None
    # Each plan's `plan_record` as the caller had it (`upsert_many`'s `records`), or None.
    records: Sequence[PlanRecord] | None = None
    # "<clinic>/<booking id>" of the batch's bookings before these whose check failed in an
    # earlier apply (the script makes a booking whose SMS cap read one of them wait too).
    stale: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # of these, those whose check failed


@dataclass
class FirstRead:
    """`Store.read_first`: the first pass of `upsert_many` over `items`, read."""

    items: list[tuple[Booking, Plan]]
    timelines: bool
    round: _Round
    # Positions in `round.batch` whose SMS cap's read the bookings still to be written
    # before these may change (`read_first`'s `after`): read again by `upsert_many`.
    unsure: list[int] = field(default_factory=list)


@dataclass
class _CapsRead:
    """What the SMS cap read of a patient's other bookings: their SMS times, and the guard
    the apply script checks (nothing it read changed) before writing."""

    taken: list[datetime]
    guard: list[Any]
    # Whether the patient takes email and has not unsubscribed from it (read unfenced, as at
    # send time: an unsubscribe landing after this read skips that email at its begin).
    email: bool = True
    # Those of `taken` that went beyond the cap (care-critical: `cap_sms`'s `beyond`).
    beyond: list[datetime] = field(default_factory=list)


@dataclass
class SendCapsRead:
    """What the SMS cap at send time read of a patient's SMS at the clinic (`send_caps_read`):
    when the others go or went, and the guard the finish checks (nothing of it changed)."""

    taken: list[datetime]
    guard: list[Any]
    emailed: bool = False  # the SMS's step has an email copy that goes or went


@dataclass
class SendCapped:
    """The SMS cap's decision at send time, for `Store.finish`: made from `read`; `by_email`:
    when the email that carries the step instead goes (`email_reason`: its reason;
    `email_goes`: the SMS's reason should the step's own email copy go after all); `tried`:
    the attempt was made (a retry turned into a skip keeps it counted)."""

    read: SendCapsRead
    by_email: datetime | None = None
    email_reason: str = ""
    email_goes: str = ""
    tried: bool = False


@dataclass
class _Prepared:
    """One booking's upsert, ready for the apply script."""

    args: list[str | bytes]  # the apply script's arguments for it (`apply_args`)
    timeline: dict[str, Any]


class Store:
    """The schedule: bookings, their reminders, the due and lease sets, the ledger."""

    TEXT_ID_LENGTH = 6  # characters of a text id (longer only when two texts would share one)

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "reminders",
        *,
        retention_days: float = 90,
        hooks: Callable[[str], str] | None = None,
    ) -> None:
        """`hooks(clinic)`: the clinic events it takes, space-separated (webhooks.hooks_of)."""
        self.redis = client
        self._hooks = hooks or (lambda clinic: "")
        self.prefix = prefix
        self.retention_seconds = int(retention_days * 86400)
        self.due_key = f"{prefix}:due"
        self.lease_key = f"{prefix}:lease"
        self.dead_key = f"{prefix}:dead"
        self.layout_key = f"{prefix}:layout"
        self.texts_key = f"{prefix}:t"
        script = client.register_script
        self._claim = script(_PRELUDE + _CLAIM)
        self._left = script(_PRELUDE + _LEFT)
        self._begin = _BeginScript(script(_PRELUDE + _BEGIN_SEND))
        self._finish = script(_PRELUDE + _CAPS_GUARD + _FINISH)
        self._restamp = script(_PRELUDE + _CAPS_GUARD + _RESTAMP)
        self._requeue = script(_PRELUDE + _REQUEUE)
        self._still_owned = script(_STILL_OWNED)
        self._cancel = script(_PRELUDE + _READ_BOOKING + _CANCEL)
        self._read_bookings = script(_PRELUDE + _READ_BOOKING + _READ)
        self._revive = script(_PRELUDE + _REVIVE)
        self._opt_out = script(_PRELUDE + _OPT_OUT)
        self._apply = script(_PRELUDE + _APPLY)
        self._caps_first = script(_CAPS_FIRST)
        self._invite_seq = script(_INVITE_SEQUENCE)
        self._layout_ok = False
        # text -> its id (known not to collide). Shared by the API's threads: rebuilt from
        # `list(items())`, a copy taken in one step, so another thread's insert cannot
        # break the iteration ("dictionary changed size").
        self._ids: dict[str, str] = {}
        # A new booking's reminder apart from its instants, per kind (`_reminder_static`).
        self._static: dict[tuple[Any, ...], Any] = {}
        # The same per plan record's static tuple, by its id, per hold (`_new_from_record`).
        self._kinds: dict[tuple[bool, str], dict[int, tuple[Any, ...]]] = {}
        self._texts: dict[str, str] = {}  # text id -> text, as read from Redis
        self._taken: set[str] = set()  # ids that name other words
        self._contact_secret: bytes | None = None
        self._contact_ids: dict[tuple[str, str], str] = {}  # (kind, value) -> `contact_id`
        self._digests: dict[tuple[Any, ...], str] = {}  # medications -> their digest
        self._last_stamp: tuple[datetime, str] | None = None  # `_stamp_of`
        self._local = threading.local()  # this thread's attempt: see `reading`

    # --- keys ----------------------------------------------------------------------

    def booking_key(self, clinic: str, booking_id: str) -> str:
        return f"{self.prefix}:b:{clinic}/{booking_id}"

    def doc_key(self, clinic: str, booking_id: str) -> str:
        return f"{self.prefix}:d:{clinic}/{booking_id}"

    def attempts_key(self, ref: str) -> str:
        return f"{self.prefix}:a:{ref}"

    def ledger_key(self, ref: str) -> str:
        return f"{self.prefix}:ledger:{ref}"

    def bookings_key(self, clinic: str) -> str:
        return f"{self.prefix}:bookings:{clinic}"

    def optout_key(self, clinic: str) -> str:
        """HASH "<channel>:<address>" -> why (the patient's words and when) of opted-out
        addresses (worker/optout.py): kept until the patient opts in again."""
        return f"{self.prefix}:optout:{clinic}"

    def consent_key(self, clinic: str) -> str:
        """HASH `consent_field` -> what the clinic was told of that contact's consent
        (worker/webhooks.py `tell_consent`: "1" told opted out, "0" opted out and not told
        yet; no field: told nothing, or opted out before this record existed)."""
        return f"{self.prefix}:ev:consent:{clinic}"

    def consent_field(self, channel: str, contact: str) -> str:
        """`contact`'s field in `consent_key`: "<channel>:<contact id>" (keyed: no number
        or address in it)."""
        kind = "email" if channel == "email" else "phone"
        return f"{channel}:{self.contact_id(kind, normal_contact(channel, contact))}"

    # --- layout ----------------------------------------------------------------------

    def _ready(self) -> None:
        """Check once that the data under the prefix is of this layout (see the docstring)."""
        if self._layout_ok:
            return
        found = cast(str | None, self.redis.get(self.layout_key))
        if found is None:
            old = next(iter(self.redis.scan_iter(match=f"{self.prefix}:[kr]:*", count=1000)),
                       None)
            if old is not None:
                raise StoreLayoutError(
                    self.layout_key,
                    f"Redis holds schedule data of store layout 1 under the prefix "
                    f"{self.prefix!r} (e.g. {old}); this version reads layout {LAYOUT} only: "
                    "stop beat, the workers and the API, then run `reminders migrate` "
                    "(`--dry-run` first to see what it converts)",
                )
            self.redis.set(self.layout_key, LAYOUT, nx=True)
            found = cast(str | None, self.redis.get(self.layout_key))
        if found != LAYOUT:
            raise StoreLayoutError(
                self.layout_key,
                f"Redis holds schedule data of store layout {found} under the prefix "
                f"{self.prefix!r}; this version reads layout {LAYOUT} only",
            )
        self._layout_ok = True

    # --- texts ---------------------------------------------------------------------

    def _intern(self, text: str, chunk: dict[str, str]) -> str:
        """Return the id `text` is stored under; note it in `chunk` (id -> text) to write."""
        tid = self._ids.get(text)
        if tid is None:
            length = self.TEXT_ID_LENGTH
            while True:
                tid = _text_id(text, length)
                other = chunk.get(tid, self._texts.get(tid))
                if tid not in self._taken and other in (None, text):
                    break
                length += 2
            self._ids[text] = tid
        chunk[tid] = text
        return tid

    def _resolve(self, ids: Iterable[str]) -> Mapping[str, str]:
        """Return the texts cache after reading any of `ids` it does not have."""
        missing = sorted({i for i in ids if i not in self._texts})
        if missing:
            values = cast(list[str | None], self.redis.hmget(self.texts_key, missing))
            self._texts.update((i, v) for i, v in zip(missing, values, strict=True) if v)
        return self._texts

    # --- reading -------------------------------------------------------------------

    def _read(self, keys: Sequence[tuple[str, str]], *, scores: bool = False
              ) -> list[_Stored]:
        """Read bookings in one round trip (one script: each booking's hash and document
        read in the same step, never a write between them), and the texts they name not yet
        known in one more (texts never change under their id). `scores`: also where their
        pending reminders are in the due set (`_Stored.scores`, for a timeline)."""
        if not keys:
            return []
        calls = [([self.due_key, *(k for clinic, booking_id in part
                                   for k in (self.booking_key(clinic, booking_id),
                                             self.doc_key(clinic, booking_id)))],
                  ["1" if scores else "", *(f"{clinic}/{booking_id}"
                                            for clinic, booking_id in part)])
                 for part in (keys[n:n + READ_CHUNK] for n in range(0, len(keys), READ_CHUNK))]
        if len(calls) == 1:
            rows = self._read_bookings(keys=calls[0][0], args=calls[0][1])
        else:
            # A script per READ_CHUNK bookings (a few milliseconds of Redis each, not one
            # long script), all in one round trip.
            pipe = self.redis.pipeline(transaction=False)
            for call_keys, call_args in calls:
                pipe.evalsha(self._read_bookings.sha, len(call_keys), *call_keys, *call_args)
            replies = pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception):
                    # Its traceback holds redis-py's frames that hold it (a cycle), and
                    # through them this call's and the caller's: a whole store batch of
                    # bookings and plans was kept until a full garbage collection.
                    reply.__traceback__ = None
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                replies = [self._read_bookings(keys=k, args=a) for k, a in calls]  # loads it
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            rows = [row for reply in replies for row in reply]
        return self._stored_rows(rows)

    def _scripted(self, script: Any, calls: list[list[Any]]) -> list[Any]:
        """Run a read-only `script` (no KEYS) once per argument list of `calls`: one call
        as is, several in one pipelined round trip (the script not loaded yet: it is
        loaded, and each call made again)."""
        if len(calls) == 1:
            return [script(args=calls[0])]
        pipe = self.redis.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(script.sha, 0, *args)
        replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                reply.__traceback__ = None  # a cycle through the caller's frames (`_read`)
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            replies = [script(args=args) for args in calls]  # loads it
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _stored_rows(self, rows: Sequence[Sequence[Any]]) -> list[_Stored]:
        """Bookings as `read_booking` (Lua) answers them: {hash, document, due scores}."""
        hashes = [_flat_hash(row[0]) if row[0] else {} for row in rows]
        if not any(hashes):  # none stored (new bookings): nothing to decode
            return [_Stored({}, None, {}, _flat_hash(row[2]) if row[2] else {}) for row in rows]
        texts = self._resolve(
            tid
            for h in hashes
            for f, v in h.items()
            if is_reminder_field(f)
            for tid in _text_ids(v)
        )
        return [
            _Stored(
                h,
                cast(str | None, row[1]) if h else None,
                {
                    f: decode_reminder(f, v, h.get(f + "+"), texts)
                    for f, v in h.items()
                    if is_reminder_field(f)
                },
                _flat_hash(row[2]),
            )
            for h, row in zip(hashes, rows, strict=True)
        ]

    def _one(self, ref: str, *extra: str) -> tuple[dict[str, str], list[str | None]]:
        """Return one reminder's record ({} if none) and booking fields `extra`."""
        clinic, booking_id, key = split_ref(ref)
        values = cast(
            list[str | None],
            self.redis.hmget(self.booking_key(clinic, booking_id), [key, key + "+", *extra]),
        )
        main, attempt = values[0], values[1]
        if main is None:
            return {}, values[2:]
        return decode_reminder(key, main, attempt, self._resolve(_text_ids(main))), values[2:]

    # --- bookings --------------------------------------------------------------------

    def upsert(
        self, booking: Booking, plan: Plan, now: datetime, *, release: bool = False
    ) -> dict[str, Any]:
        """Store `plan` for `booking`, reconciled with what is stored; return the timeline.

        See worker/reconcile.py for the rule. The version goes up only when something
        changed, so submitting the same booking again is a no-op. The write applies only
        if the booking is still as it was read: a concurrent claim, finish or cancel is
        either before or after this.
        """
        return self.upsert_many([(booking, plan)], now, release=release)[0]

    def upsert_many(
        self, items: list[tuple[Booking, Plan]], now: datetime, *, release: bool = False,
        previous: list[str | None] | None = None, timelines: bool = True,
        docs: Sequence[str] | None = None, idle: Callable[[], object] | None = None,
        records: Sequence[PlanRecord] | None = None, first: FirstRead | None = None,
    ) -> list[dict[str, Any]]:
        """`upsert` each (booking, plan), in a few round trips per chunk; return the timelines.

        `timelines` False: each is only `{"version": n}` (for a caller that shows none:
        building a timeline per booking is a good part of the work).

        `previous`, when given (a list as long as `items`), gets each booking's version as
        it was before its write (None: it was not stored), read in the same step as the
        write, so a caller tells new, changed and unchanged bookings apart without reading.

        First every booking is read at once (one pipelined read of their hashes, and the
        SMS cap's reads); then the apply scripts go one chunk at a time, each chunk
        prepared in Python while Redis applies the one before (Redis works on the other
        core). A booking id (or a capped patient) met again in the batch waits until that
        pass is done, as does a booking that changed between the read and its apply, and
        any later booking whose SMS cap read one of those (`_wait_for_later`; the apply
        script's `stale`): each is then read and reconciled again, in input order, so the
        result is that of upserting them one by one.

        `docs`, when given (as long as `items`): each booking's `model_dump_json()`, as the
        caller already has it (`reminders book`'s check made it), not made again here.

        `records`, when given (as long as `items`): each plan's `plan_record`, the record it
        was decoded from (`reminders book` decodes its plans from these): a new booking's
        reminders are then stored from the record's parts, each kind worked out once
        (`_prepare_new`), not taken apart again from the reminder objects.

        `idle`, when given: called once each time this thread has an apply chunk prepared
        and waits for Redis to apply the one before (Redis works on the other core): a
        caller's own work that touches no Redis, a few milliseconds at a time, instead of
        with Redis idle between calls.

        `first`, when given: the first pass's read of these `items` (`read_first`), made
        earlier (`reminders book` reads its next batch while Redis applies this one); the
        caps it marks unsure, and every cap's email opt-out, are read again here.
        """
        if docs is not None and len(docs) != len(items):
            raise ValueError("docs: one per booking")
        if records is not None and len(records) != len(items):
            raise ValueError("records: one per booking")
        if first is not None and (first.items is not items or first.timelines != timelines):
            raise ValueError("first: read of other items")
        self._ready()
        out: list[dict[str, Any] | None] = [None] * len(items)
        before: list[str | None] = [None] * len(items) if previous is None else previous
        ahead = first is not None  # read earlier (`read_first`), not here and now
        first = first or self.read_first(items, timelines=timelines)
        read = first.round
        if read.batch:
            if first.unsure:  # read again now, as if not read ahead (`read_first`)
                fresh = self._caps_read([read.batch[n][1] for n in first.unsure])
                for n, caps_read in zip(first.unsure, fresh, strict=True):
                    read.caps[n] = caps_read
            if ahead:
                # The email opt-outs the others' cap read, read again now: no write of
                # theirs changes with an unsubscribe, which the apply's guard would see.
                unsure = set(first.unsure)
                self._emails_again([(read.batch[n][1], caps_read)
                                    for n, caps_read in enumerate(read.caps)
                                    if caps_read is not None and n not in unsure])
            self._wait_for_later(read, items)
            stored, caps = read.stored, read.caps
            redo = list(read.later)
            if len(read.batch) <= APPLY_CHUNK:  # one chunk (a single PUT): nothing to overlap
                ready = self._prepared(_Round(read.batch, stored, [], caps,
                                              timelines=timelines, docs=docs,
                                              records=records), now, release)
                redo += self._settle(ready, self._send(ready), now, release, out, before)
                self._upsert_rounds(sorted(redo), items, now, release, out, before, timelines,
                                    docs, records)
                return cast(list[dict[str, Any]], out)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-apply") as pool:
                sent: tuple[_Round, Future[Any]] | None = None
                failed: list[str] = []  # of the chunks applied so far (see `_Round.stale`)
                for start in range(0, len(read.batch), APPLY_CHUNK):
                    part = slice(start, start + APPLY_CHUNK)
                    ready = self._prepared(
                        _Round(read.batch[part], stored[part], [], caps[part],
                               timelines=timelines, docs=docs, records=records), now,
                        release)
                    if sent is not None:
                        if idle is not None:
                            idle()
                        redo += self._settle(sent[0], sent[1].result(), now, release, out,
                                             before)
                        failed += sent[0].failed
                    ready.stale = list(failed)
                    sent = (ready, pool.submit(self._send, ready))
                assert sent is not None
                if idle is not None:
                    idle()
                redo += self._settle(sent[0], sent[1].result(), now, release, out, before)
            self._upsert_rounds(sorted(redo), items, now, release, out, before, timelines,
                                docs, records)
        return cast(list[dict[str, Any]], out)

    def _emails_again(self, reads: list[tuple[tuple[Booking, Plan], _CapsRead]]) -> None:
        """Each SMS cap's read (`_caps_read`) of whether its patient takes email and has not
        unsubscribed from it, read again now (one script per READ_CHUNK, one round trip)."""
        asks = [(booking, caps_read) for (booking, _), caps_read in reads
                if booking.patient.email is not None and "email" in booking.patient.channels]
        if not asks:
            return
        calls = [["+inf", 1, 0, *(x for booking, _ in asks[part:part + READ_CHUNK] for x in (
            self.optout_key(booking.clinic),
            "email:" + normal_contact("email", cast(str, booking.patient.email))))]
            for part in range(0, len(asks), READ_CHUNK)]
        exists = [e for reply in self._scripted(self._caps_first, calls) for e in reply]
        for (_, caps_read), out in zip(asks, exists, strict=True):
            caps_read.email = not out

    def read_first(self, items: list[tuple[Booking, Plan]], *, timelines: bool = True,
                   after: Sequence[tuple[Booking, Plan]] = ()) -> FirstRead:
        """`upsert_many`'s first pass over `items`, read (each booking's hash, document and
        due scores, and the SMS cap's read of its patient's other bookings), to give it as
        its `first`. Only reads: a caller may read its next batch in another thread while
        this store applies one (`reminders book`, worker/batch.py `ReadAhead`).

        `after`: bookings still to be written before these (the batch before, none of them
        one of these), whose writes may land after this read. What they change of it is
        only the SMS cap's read of a patient's other bookings: that of each booking whose
        patient's phone is one of theirs, or that read one of them, is read again when
        `upsert_many` begins (`FirstRead.unsure`), as if not read ahead. (A write landing
        between a read and its apply that it does not know of, another command's or the
        API's, fails the apply's check, as always: the booking is read and written again.
        But an email unsubscribe, which no apply's check reads: `upsert_many` reads again
        as it begins whether each capped patient has unsubscribed from email, as the cap
        read in turn would.)
        """
        self._ready()
        first = self._select(list(range(len(items))), items, whole=True)
        unsure: list[int] = []
        if first.batch:
            # The due scores too for the answers' timelines (`next_try_at`, as GET shows).
            first.stored = self._read([item[0].key for _, item in first.batch],
                                      scores=timelines)
            first.caps = self._caps_read([item for _, item in first.batch])
            if after and any(read is not None for read in first.caps):
                phones = {(b.clinic, self.contact_id("phone", b.patient.phone))
                          for b, _ in after if b.patient.phone}
                ids = {b.key for b, _ in after}
                unsure = [n for n, ((_, (booking, _)), read) in enumerate(
                    zip(first.batch, first.caps, strict=True)) if read is not None and (
                        (booking.clinic, read.guard[0]) in phones
                        or any((booking.clinic, other) in ids for other in read.guard[3]))]
        return FirstRead(items, timelines, first, unsure)

    def _upsert_rounds(
        self,
        todo: list[int],
        items: list[tuple[Booking, Plan]],
        now: datetime,
        release: bool,
        out: list[dict[str, Any] | None],
        before: list[str | None],
        timelines: bool = True,
        docs: Sequence[str] | None = None,
        records: Sequence[PlanRecord] | None = None,
    ) -> None:
        """Read, prepare and apply the bookings at `todo` until every one is written,
        APPLY_CHUNK at a time."""
        while todo:
            ready = self._round(todo[:APPLY_CHUNK], items, now, release, timelines, docs,
                                records)
            todo = sorted(self._settle(ready, self._send(ready), now, release, out, before)
                          + todo[APPLY_CHUNK:])

    def _select(self, todo: list[int], items: list[tuple[Booking, Plan]], *,
                whole: bool = False) -> _Round:
        """The bookings at `todo` that can go in one pass: the same booking again waits
        for the next, to be reconciled against what the first wrote. So does another
        booking of a patient already in the pass under an SMS cap: the cap reads the
        patient's other bookings, which the first one's write changes (its guard would
        refuse it, and every later pass would read them all again for nothing)."""
        seen: set[tuple[str, str]] = set()
        patients: set[tuple[str, str]] = set()
        batch: list[tuple[int, tuple[Booking, Plan]]] = []
        later: list[int] = []
        for i in todo:
            booking, planned = items[i]
            key = booking.key
            patient = ((booking.clinic, booking.patient.phone)
                       if planned.caps is not None and booking.patient.phone else None)
            if key in seen or (patient is not None and patient in patients):
                later.append(i)
            else:
                batch.append((i, items[i]))
            if patient is not None:  # a later booking of the patient waits for this one
                patients.add(patient)
            seen.add(key)
        return _Round(batch, [], later)

    def _wait_for_later(self, ready: _Round, items: list[tuple[Booking, Plan]]) -> None:
        """Move to `ready.later` each booking whose SMS cap read another booking that is
        written in a later round and comes before it in `items` (or that moves there now):
        one by one, that one is written first (a patient's phone corrected, say: it leaves
        the phone this booking's cap counts)."""
        if not ready.later:
            return
        waiting: dict[tuple[str, str], int] = {}  # booking -> its first position left for later
        for i in ready.later:
            waiting.setdefault(items[i][0].key, i)
        keep: list[int] = []
        for n, ((i, (booking, _)), read) in enumerate(zip(ready.batch, ready.caps,
                                                          strict=True)):
            if read is not None and any(
                    waiting.get((booking.clinic, other), i) < i for other in read.guard[4][0::2]):
                ready.later.append(i)
                waiting.setdefault(booking.key, i)
            else:
                keep.append(n)
        if len(keep) < len(ready.batch):
            ready.batch = [ready.batch[n] for n in keep]
            ready.stored = [ready.stored[n] for n in keep]
            ready.caps = [ready.caps[n] for n in keep]
            ready.later.sort()

    def _round(
        self, todo: list[int], items: list[tuple[Booking, Plan]], now: datetime, release: bool,
        timelines: bool = True, docs: Sequence[str] | None = None,
        records: Sequence[PlanRecord] | None = None,
    ) -> _Round:
        """Read and prepare the bookings at `todo` that can go in one round (`_select`)."""
        ready = self._select(todo, items)
        ready.timelines, ready.docs, ready.records = timelines, docs, records
        ready.stored = self._read([item[0].key for _, item in ready.batch], scores=timelines)
        ready.caps = self._caps_read([item for _, item in ready.batch])
        self._wait_for_later(ready, items)
        return self._prepared(ready, now, release)

    # The SMS cap across a patient's bookings reads at most this many of their other
    # bookings at the clinic; a patient with more is capped against those that can share a
    # day or a week with this booking's SMS (kept until at least its first SMS, less
    # CAPS_REACH, plus the retention: an index entry's score is its booking's last reminder
    # plus the retention, or later), the ones that expire first among them.
    CAPS_OTHERS_MAX = 50
    CAPS_REACH = timedelta(days=8)  # a week either way, and a day for the patient's zone

    def _caps_read(self, items: list[tuple[Booking, Plan]]) -> list[_CapsRead | None]:
        """For each booking whose plan has SMS under a cap: its patient's other SMS at the
        clinic (scheduled or going, or sent) from the contact index, in two round trips."""
        # Over the plan as planned before the cap (`Plan.uncapped`): a re-submission is
        # capped again from it (`_capped_plan`).
        # And for one whose care-critical emails may go by SMS (its patient unsubscribed
        # from email, read here): flagged as SMS when written (`by_sms_keys`).
        wanted = [n for n, (b, p) in enumerate(items)
                  if p.caps is not None and b.patient.phone and (
                      scheduled_sms(p) or critical_email(p, b))]
        out: list[_CapsRead | None] = [None] * len(items)
        if not wanted:
            return out
        since = f"({time.time()!r}"
        limit = self.CAPS_OTHERS_MAX + 1  # itself too
        # The cap sends by email only to a patient who has not unsubscribed from it (as
        # dispatch `_capped`): else the email is skipped at its begin and the step lost.
        asks_email = [n for n in wanted if items[n][0].patient.email is not None
                      and "email" in items[n][0].patient.channels]
        # Each patient's first members of the contact index, and the email opt-out: one
        # script per READ_CHUNK bookings (`_CAPS_FIRST`), all in one round trip.
        calls: list[list[Any]] = []
        sizes: list[int] = []
        for part in range(0, len(wanted), READ_CHUNK):  # asks_email: at most as many
            ckeys = [self.contact_key(items[n][0].clinic, "phone",
                                      cast(str, items[n][0].patient.phone))
                     for n in wanted[part:part + READ_CHUNK]]
            optouts = [x for n in asks_email[part:part + READ_CHUNK] for x in (
                self.optout_key(items[n][0].clinic),
                "email:" + normal_contact("email", cast(str, items[n][0].patient.email)))]
            calls.append([since, limit, len(ckeys), *ckeys, *optouts])
            sizes.append(len(ckeys))
        members: list[list[str]] = []
        exists: list[int] = []
        for size, reply in zip(sizes, self._scripted(self._caps_first, calls), strict=True):
            members += reply[:size]
            exists += reply[size:]
        email = {n: not out for n, out in zip(asks_email, exists, strict=True)}
        # More than the cap reads: the ones that expire first may be visits long past, and
        # those that share this booking's days unread (found by review). Read from the first
        # that can share them instead (CAPS_OTHERS_MAX).
        starts = [since] * len(wanted)
        pipe = self.redis.pipeline(transaction=False)
        again: list[int] = []
        for k, n in enumerate(wanted):
            if len(members[k]) < limit:
                continue
            booking, planned = items[n]
            first = min(r.due_at for r in _as_planned(planned)  # the cap moves SMS later
                        if r.status == Status.SCHEDULED and (r.channel == "sms" or (
                            r.channel == "email" and r.step in planned.protected)))
            reach = (first - self.CAPS_REACH).timestamp() + self.retention_seconds
            if reach <= float(since[1:]):
                continue
            starts[k] = f"({reach!r}"
            pipe.zrangebyscore(self.contact_key(booking.clinic, "phone",
                                                cast(str, booking.patient.phone)),
                               starts[k], "+inf", start=0, num=limit)
            again.append(k)
        for k, found in zip(again, pipe.execute() if again else [], strict=True):
            members[k] = cast(list[str], found)
        pipe = self.redis.pipeline(transaction=False)
        asked: list[tuple[int, list[str]]] = []
        for n, ids in zip(wanted, members, strict=True):
            booking = items[n][0]
            others = [i for i in ids if i != booking.booking_id]
            for other in others:
                pipe.hgetall(self.booking_key(booking.clinic, other))
            asked.append((n, others))
        read = [_str_hash(h) for h in pipe.execute()]
        # The reasons of their SMS, to tell those beyond the cap (`_beyond_cap`).
        texts = self._resolve(tid for h in read for tid in _sms_reason_ids(h))
        hashes = iter(read)
        for (n, others), ids, start in zip(asked, members, starts, strict=True):
            booking = items[n][0]
            taken: list[datetime] = []
            beyond: list[datetime] = []
            versions: list[str] = []
            for other in others:
                h = next(hashes)
                # Its version and its SMS moves at send time (`smsv`, see _FINISH).
                versions += [other, f"{h.get('version', '')}/{h.get('smsv', '')}"]
                taken += _sms_times(h)
                beyond += _beyond_cap(h, texts)
            guard = [self.contact_id("phone", cast(str, booking.patient.phone)), start, limit,
                     ids, versions]
            out[n] = _CapsRead(taken, guard, email.get(n, False), beyond)
        return out

    def send_caps_read(self, ref: str, phone: str, at: datetime) -> SendCapsRead:
        """The patient's SMS at the clinic (sent, or still to go) other than `ref`'s, for an
        SMS whose time moves to `at` at send time: those of every booking in the contact index
        of `phone` that can share a week with `at` (at most CAPS_OTHERS_MAX of them, the ones
        kept longest left out), and of `ref`'s own booking; with the guard the finish checks.
        Two round trips; read outside the finish's script, which checks that all of it is
        unchanged (`SendCapped`)."""
        self._ready()
        clinic, booking_id, key = split_ref(ref)
        reach = (at - self.CAPS_REACH).timestamp() + self.retention_seconds
        since = f"({max(time.time(), reach)!r}"
        limit = self.CAPS_OTHERS_MAX + 1
        ckey = self.contact_key(clinic, "phone", phone)
        members = cast(list[str], self.redis.zrangebyscore(ckey, since, "+inf", start=0,
                                                           num=limit))
        ids = list(dict.fromkeys([*members, booking_id]))
        pipe = self.redis.pipeline(transaction=False)
        for other in ids:
            pipe.hgetall(self.booking_key(clinic, other))
        slots: list[str] = []
        emailed = False
        for other, h in zip(ids, pipe.execute(), strict=True):
            fields = _str_hash(h)
            if other == booking_id:
                copy = _split(fields.get(key[: -len("sms")] + "email"), len(REMINDER_SLOTS))
                emailed = STATUS_OF.get(copy[0]) in PENDING | {Status.SENT}
            slots += [f"{other}|{when}" for when in _sms_slots(
                fields, key if other == booking_id else "")]
        taken = [datetime.fromtimestamp(float(s.rsplit("|", 1)[1]), UTC) for s in slots]
        return SendCapsRead(taken, [ckey, since, limit, members, ids, slots], emailed)

    def _by_email_again(self, booking: Booking, stored: _Stored) -> frozenset[str]:
        """The stored emails still to go (not sending) flagged as going by SMS (flag "s":
        the patient had unsubscribed from email) that no longer go by SMS, as their begin
        will say: the document's address is not unsubscribed (a new address the clinic
        sent, say: they go by email), or the booking no longer allows SMS ("sms" withdrawn
        from the patient's channels, or no phone: the begin's `allows` refuses SMS, so they
        go by email or are skipped, never by SMS). This write clears their flag, so the SMS
        cap stops counting them and the timeline no longer says `via: sms` (as `opt_in`
        does for an address subscribed again). The opt-out is read unfenced, as the cap's
        own read (`_caps_read`) and the send time read it."""
        if not stored.reminders:  # a new booking
            return frozenset()
        keys = frozenset(k for k, r in stored.reminders.items()
                         if r.get("by_sms") == "1" and k.endswith(":email")
                         and r.get("status") in (Status.SCHEDULED, Status.RETRYING))
        if not keys:
            return frozenset()
        patient = booking.patient
        if "sms" not in patient.channels or patient.phone is None:
            return keys
        if not patient.email or self.redis.hexists(
                self.optout_key(booking.clinic),
                "email:" + normal_contact("email", patient.email)):
            return frozenset()
        return keys

    def _capped_plan(
        self, booking: Booking, planned: Plan, stored: _Stored, read: _CapsRead | None,
        now: datetime, release: bool, unflag: frozenset[str] = frozenset(),
        kept: frozenset[str] = frozenset(),
    ) -> Plan:
        """`planned` capped against the patient's other SMS (`read`) and, for a booking
        stored already, its own: those it sent count where they went, as do the notices and
        the messages again (`again_fields`, `repause_fields`) it keeps or this change adds;
        its reminders already sent are history (`cap_plan`), not SMS to count again, except
        those that go again for a new date, capped as new SMS. The same count as at send
        time (`send_caps_read`). What it reads of the booking is the apply's own check.
        `unflag`: its emails no longer going by SMS (`_by_email_again`), not counted.
        `kept`: keys this write leaves as stored (`_Recap` after the visit: the steps whose
        time has passed), history to the cap too: its SMS still to go among them count
        where they are stored, and none of them is moved."""
        if not stored.fields:
            if read is None or not read.taken and read.email == (
                    "email" in booking.patient.channels):
                # Nothing else to count, and email as the planner took it (listed or not):
                # the planner's own cap is the answer (`cap_plan` would work it out again
                # for a patient without email, to the same reminders).
                return planned
            return cap_plan(planned, booking, read.taken, email=read.email)
        kind = self._replan_kind(booking, planned, stored, release)
        same_day = _same_day(kind, booking, stored.fields, stored.doc)
        planned = sent_elsewhere(planned, booking, stored.reminders, now, kind is not None,
                                 same_day)
        if read is None:
            return planned
        base = _as_planned(planned)
        if kind is None and "email" in booking.patient.channels:
            # A message again for a new date that the cap sent by email at the move (its
            # step's SMS sent for the old date; the email no step's own reminder) stays as
            # the move planned it, not dropped for its sent SMS as history.
            keys = {r.key for r in base}
            by_email = {r.key for r in base if r.channel == "sms"
                        and r.status == Status.SCHEDULED
                        and stored.reminders.get(r.key, {}).get("status") == Status.SENT
                        and r.key[: -len("sms")] + "email" not in keys
                        and stored.reminders.get(r.key[: -len("sms")] + "email", {}).get(
                            "status") in PENDING}
            if by_email:
                base = [replace(r, key=r.key[: -len("sms")] + "email", channel="email")
                        if r.key in by_email else r for r in base]
                planned = replace(planned, uncapped=base)
        booking_fields = {k: v for k, v in stored.fields.items() if ":" not in k}
        again = again_keys(base, planned.notice_steps, stored.reminders, booking.starts_at,
                           now, same_day) if kind is not None else frozenset()
        history = frozenset(r.key for r in base
                            if stored.reminders.get(r.key, {}).get("status") == Status.SENT)
        # Sent; and still to go, the store's own (notices, messages again) that a
        # re-submission without a move keeps (`again_planned`: its step's reminder is
        # history here, which the cap leaves as planned).
        as_planned = replace(planned, reminders=base)
        fields = stored.fields
        if unflag:
            fields = {**fields, **{k: _without_flag(fields[k], "s") for k in unflag}}
        released = fields.get("status") == Status.HELD and self._replan_status(
            booking, planned, stored, release) == Status.SCHEDULED
        at_stored: dict[str, PlannedReminder] = {}
        if released:
            # Released: the store's own still to go go back into the schedule with it.
            fields = {**fields, "status": Status.SCHEDULED}
            if kind is None:
                # Its SMS at booking held back for a time still ahead are capped at that time
                # (the reconcile keeps it if they fit), counting what went while it was held
                # (its hold notice) and the SMS the patient's other bookings took meanwhile.
                at_stored = {
                    r.key: replace(r, due_at=datetime.fromtimestamp(float(
                        stored.reminders[r.key]["planned_epoch"]), UTC))
                    for r in base if r.channel == "sms" and r.at_booking
                    and r.status == Status.SCHEDULED
                    and stored.reminders.get(r.key, {}).get("status") == Status.SCHEDULED
                    and stored.reminders[r.key].get("at_booking") == "1"
                    and float(stored.reminders[r.key].get("planned_epoch") or 0) > now.timestamp()}
                if at_stored:
                    base = [at_stored.get(r.key, r) for r in base]
                    planned = replace(planned, uncapped=base, reminders=[
                        at_stored.get(r.key, r) for r in planned.reminders])
        offered = booking.patient.channels
        own = [datetime.fromtimestamp(float(when), UTC) for when in _sms_slots(
            fields, pending=lambda key: key in kept or (
                kind is None and is_notice(key) and again_planned(key, as_planned)
                and not notice_off(key, offered)))]
        if kind is None and fields.get("status") != Status.HELD:
            # A notice the patient's channels moved onto SMS (`notice_elsewhere`).
            own += [datetime.fromtimestamp(float(f["due_epoch"]), UTC)
                    for _, f in notice_elsewhere(withdrawn_notices(stored.reminders, offered),
                                                 stored.reminders, offered, 0)
                    if f["channel"] == "sms" and f["due_epoch"]]
        if kind is not None:  # this change's own notices
            seq = int(booking_fields.get("seq") or 0) + 1
            old_start = _told_start(stored.fields, stored.doc)
            notices, _ = plan_notices(
                "rescheduled", self._as_sending(*booking.key, stored.reminders), booking,
                planned.notice_steps, seq=seq,
                now=now, window=planned.window or SendWindow(),
                before=datetime.fromisoformat(old_start) if old_start else None,
                planned_for=_doc_start(stored.doc))
            own += [n.due_at for n in notices if n.channel == "sms"]
        # Its own SMS at its provider now (sending) that the reconcile keeps as it is (same
        # planned time, or due now in both plans): left to its attempt and counted where it
        # goes, not capped again; moved, its delivery would be recorded beside a new plan
        # sending the step again (two of one message).
        # A plan older than the stored write (made before it landed): its late SMS, planned
        # for that write's "now", are due now too (worker/reconcile.py `written_epoch`).
        now_epoch = max(now.timestamp(), written_epoch(stored.fields))
        in_flight = frozenset(
            r.key for r in base if r.channel == "sms" and r.status == Status.SCHEDULED
            and stored.reminders.get(r.key, {}).get("status") == Status.SENDING
            and (stored.reminders[r.key].get("planned_epoch") == repr(r.due_at.timestamp())
                 or (float(stored.reminders[r.key].get("planned_epoch") or "inf") <= now_epoch
                     and r.due_at <= now)))
        own += [datetime.fromtimestamp(float(stored.reminders[key]["due_epoch"]), UTC)
                for key in in_flight - kept if stored.reminders[key].get("due_epoch")]
        # Its SMS still to go as the cap left them, which keep their days if they fit within
        # the cap (an unchanged booking keeps its decisions; `cap_sms`). Not after a move:
        # its SMS are planned afresh.
        held = {} if kind is not None else {
            key: (float(r["planned_epoch"]), r["reason"]) for key, r in stored.reminders.items()
            if r["channel"] == "sms" and r["status"] == Status.SCHEDULED and r["planned_epoch"]}
        held.update({key: (r.due_at.timestamp(), r.reason) for key, r in at_stored.items()})
        return cap_plan(planned, booking, read.taken, (history - again) | in_flight | kept,
                        own, email=read.email, held=held, beyond=read.beyond)

    def _replan_kind(
        self, booking: Booking, planned: Plan, stored: _Stored, release: bool
    ) -> str | None:
        """The change kind `_prepare_reconciled` will find (`_change_kind`: a document
        unchanged has the same start), before the cap."""
        return self._change_kind(booking, stored.fields, stored.doc,
                                 self._replan_status(booking, planned, stored, release))

    def _replan_status(
        self, booking: Booking, planned: Plan, stored: _Stored, release: bool
    ) -> str:
        """The status the reconcile will give the booking."""
        status = planned.status
        if status == Status.HELD:  # the reconcile's rule: released for these medications
            medications = self._medications_digest(booking)
            if (medications if release else stored.fields.get("released_for", "")) \
                    == medications:
                status = Status.SCHEDULED
        return str(status)

    def _prepared(self, ready: _Round, now: datetime, release: bool) -> _Round:
        texts: dict[str, str] = {}
        ready.prepared = []
        docs, records = ready.docs, ready.records
        for (i, (booking, planned)), stored, read in zip(ready.batch, ready.stored, ready.caps,
                                                         strict=True):
            unflag = self._by_email_again(booking, stored)
            capped = self._capped_plan(booking, planned, stored, read, now, release, unflag)
            # Listed, but unsubscribed from email (as the cap read it): its care-critical
            # emails go by SMS, flagged as such when written (`by_sms_keys`), if the patient
            # allows SMS for this booking (as the begin's `allows`: else they are skipped).
            by_sms = read is not None and not read.email \
                and "email" in booking.patient.channels and booking.patient.email is not None \
                and "sms" in booking.patient.channels and booking.patient.phone is not None
            ready.prepared.append(self._prepare(
                booking, capped, stored, now, release, texts, read.guard if read else None,
                timeline=ready.timelines, unflag=unflag, by_sms=by_sms,
                doc=docs[i] if docs is not None else None,
                # The plan's record, for the plan as decoded from it (not capped again here).
                record=records[i] if records is not None and capped is planned else None))
        args: list[Any] = [self.prefix, len(texts)]
        for tid, text in texts.items():
            args += [tid, text]
        for p in ready.prepared:
            args += p.args
        ready.texts, ready.args = texts, args
        return ready

    def _send(self, ready: _Round) -> Any:
        return self._apply(
            keys=[self.due_key, self.lease_key, self.dead_key, self.layout_key, self.texts_key],
            args=[ready.args[0], _dumps(ready.stale), *ready.args[1:]],
        )

    def _settle(
        self, ready: _Round, reply: Any, now: datetime, release: bool,
        out: list[dict[str, Any] | None], before: list[str | None],
    ) -> list[int]:
        """Take in an apply's reply; fill `out`; return the positions to do again."""
        while reply[0] == "collision":  # nothing was written: prepare with a longer id
            self._taken.add(str(reply[1]))
            self._ids = {t: i for t, i in list(self._ids.items()) if i != reply[1]}
            self._static.clear()  # it names texts by their ids
            self._kinds.clear()
            reply = self._send(self._prepared(ready, now, release))
        if reply[0] == "layout":
            self._layout_ok = False
            self._ready()  # raises: another layout's data appeared under the prefix
        failed = {int(x) - 1 for x in reply[1:]}
        self._texts.update(ready.texts)
        redo = list(ready.later)
        for n, ((i, (booking, _)), p, stored) in enumerate(zip(ready.batch, ready.prepared,
                                                                ready.stored, strict=True)):
            if n in failed:
                redo.append(i)
                ready.failed.append(f"{booking.clinic}/{booking.booking_id}")
            else:
                out[i] = p.timeline
                before[i] = stored.fields.get("version") if stored.fields else None
        return sorted(redo)

    def _prepare(
        self,
        booking: Booking,
        plan: Plan,
        stored: _Stored,
        now: datetime,
        release: bool,
        texts: dict[str, str],
        guard: list[Any] | None = None,
        *,
        timeline: bool = True,
        unflag: frozenset[str] = frozenset(),
        doc: str | None = None,
        record: PlanRecord | None = None,
        by_sms: bool = False,
    ) -> _Prepared:
        """Return the apply script's input for one booking, and its timeline after it (only
        its version unless `timeline`). `unflag`: `_by_email_again`. `by_sms`: the patient
        lists email but unsubscribed from it, and lists SMS with a phone, so its emails going
        by SMS are flagged as such (`by_sms_keys`). `doc`: the booking's
        `model_dump_json()` if the caller has it. `record`: the `plan_record` `plan` was
        decoded from, if the caller has it (used for a new booking).

        A store whose `_reconcile` seam is overridden sees every booking there, new ones too
        (the HTTP API checks If-Match in it).
        """
        if not stored.fields and self._plain_reconcile:
            return self._prepare_new(booking, plan, now, release, texts, guard,
                                     timeline=timeline, doc=doc, record=record, by_sms=by_sms)
        return self._prepare_reconciled(booking, plan, stored, now, release, texts, guard,
                                        timeline=timeline, unflag=unflag, doc=doc,
                                        by_sms=by_sms)

    def _prepare_new(
        self, booking: Booking, plan: Plan, now: datetime, release: bool, texts: dict[str, str],
        guard: list[Any] | None = None, *, timeline: bool = True, doc: str | None = None,
        record: PlanRecord | None = None, by_sms: bool = False,
    ) -> _Prepared:
        """The common case, a booking not stored yet, without the general reconcile.

        The same result as reconciling against nothing (tests/test_store_layout.py checks
        it): every planned reminder is written with version 1 as planned, scheduled ones due
        unless the booking is held; the booking takes the plan's status unless the clinic
        released exactly these medications.

        `record`: the `plan_record` that `plan` was decoded from (`reminders book`). Its
        reminders' static parts are shared tuples, one per kind of reminder, and its
        instants whole microseconds: without a timeline to build, each reminder's stored
        form is then made from those (`_new_from_record`), its kind looked up by the
        tuple's identity and its epoch by the integer, not from the reminder's attributes
        and datetimes (the same text: tests/test_intake_fast.py compares the two).

        `by_sms`: the patient lists email but unsubscribed from it: its emails going by SMS
        are written flagged "s" (`by_sms_keys`), whichever loop made them.
        """
        clinic, booking_id = booking.key
        if doc is None:
            doc = booking.model_dump_json()
        medications = self._medications_digest(booking)
        released_for = medications if release else ""
        status = plan.status
        if status == Status.HELD and released_for == medications:
            status = Status.SCHEDULED
        held = status == Status.HELD
        hold_reason = (plan.hold_reason or "") if held else ""
        stamp = self._stamp_of(now)
        records = record[2] if record is not None and not timeline else None
        if records is not None and (decoded_from(plan, record)
                                    or len(records) == len(plan.reminders)):
            # The last instant from the record's microseconds: an instant's `timestamp()` is
            # its microseconds over 10**6 (see `_micro_epoch`).
            last_epoch = booking.starts_at.timestamp()
            if records:
                last_epoch = max(last_epoch, max(map(_DUE_OF, records)) / 1_000_000)
            keep = math.ceil(last_epoch + self.retention_seconds)
        else:
            records = None
            # In UTC, as the plan's instants are (decoded): compared without the zone's
            # offset worked out at each comparison.
            last = booking.starts_at.astimezone(UTC)
            for r in plan.reminders:
                if r.due_at > last:
                    last = r.due_at
            keep = math.ceil(last.timestamp() + self.retention_seconds)
        contacts = self._booking_contacts(booking)
        # The booking's fields, those not empty (status, version, the stamps and keep_until
        # never are), in this order.
        hset = ["status", str(status), "version", "1"]
        if plan.window:
            hset += ["window", f"{plan.window.start}-{plan.window.end}"]
        if hold_reason:
            hset += ["hold_reason", hold_reason]
        if released_for:
            hset += ["released_for", released_for]
        if stamp:
            hset += ["updated_at", stamp, "created_at", stamp]
        hset += ["keep_until", str(keep)]
        if contacts:
            hset += ["contacts", contacts]
        if plan.late_pause:
            hset += ["late_pause", "1"]
        if plan.notice_steps:
            hset += ["ns", self._intern(plan.notice_steps, texts)]
        # The apply script's input as `apply_args` makes it, built here: its due entries
        # (score, ref) and the metrics' counts per channel (scheduled, skipped).
        zadd: list[str] = []
        base = f"{clinic}/{booking_id}/"
        scheduled: dict[str, int] = {}
        skipped: dict[str, int] = {}
        entries = []
        static = self._static
        epochs = _EPOCHS
        if records is not None:
            self._new_from_record(records, held, hold_reason, base, hset, zadd, scheduled,
                                  skipped, texts)
        for r in () if records is not None else plan.reminders:
            # What does not depend on the booking's instants is worked out once per kind of
            # reminder (a protocol has a few dozen): `_reminder_static`.
            hit = static.get((r.key, r.step, r.channel, r.template, r.occurrence,
                              r.status == Status.SKIPPED, r.reason, r.at_booking,
                              r.expires_note, held, hold_reason))
            if hit is None:
                hit = self._reminder_static(r, held, hold_reason)
            if hit is False:  # released: the hold notice has nothing to say
                continue
            head, tail, goes_due, shown_status, reason, used = hit
            if used:
                texts.update(used)
            if timeline:
                planned, due_iso = _stamps(r.due_at)
            else:  # its stored epoch only
                planned = epochs.get(r.due_at) or _epoch_stamp(r.due_at)
            if r.expires_at is not None:
                if timeline:
                    expires, expires_iso = _stamps(r.expires_at)
                else:
                    expires = epochs.get(r.expires_at) or _epoch_stamp(r.expires_at)
                hset += [r.key, f"{head}{planned}||{expires}{tail}"]
            else:
                hset += [r.key, f"{head}{planned}||{tail}" if tail else head + planned]
            if goes_due:
                zadd += [planned, base + r.key]
                scheduled[r.channel] = scheduled.get(r.channel, 0) + 1
            elif head[0] == "K":
                skipped[r.channel] = skipped.get(r.channel, 0) + 1
            if timeline:
                entry: dict[str, Any] = {
                    "id": r.key,
                    "step": r.step,
                    "channel": r.channel,
                    "due_at": due_iso,
                    "status": shown_status,
                    "attempts": 0,
                    "sent_at": None,
                    "reason": reason,
                }
                if r.expires_at is not None:
                    entry["expires_at"] = expires_iso
                entries.append(entry)
        if by_sms:
            flagged = _flag_by_sms(hset, plan)
            for entry in entries:
                if entry["id"] in flagged:  # as the timeline shows them (`_timeline_entry`)
                    entry["via"] = "sms"
                    entry["reason"] = f"{entry['reason']}; {BY_SMS}" if entry["reason"] \
                        else BY_SMS
        shown_timeline: dict[str, Any] = {"version": 1}
        if timeline:
            entries.sort(key=_entry_order)
            shown: str = status
            if (status == Status.SCHEDULED and entries
                    and all(e["status"] in TERMINAL for e in entries)
                    and booking.starts_at <= datetime.now(UTC)):
                shown = Status.COMPLETED
            shown_timeline = {"clinic": clinic, "booking_id": booking_id,
                              "status": str(shown), "version": 1,
                              "hold_reason": hold_reason or None,
                              "late_pause": bool(plan.late_pause), "reminders": entries}
        emits = (self._held_events(booking, 1, hold_reason, bool(plan.late_pause)) if held
                 else self._late_pause_events(booking, 1, plan.late_pause))
        counts: list[str | int] = []
        for what, tally in (("scheduled", scheduled), ("skipped", skipped)):
            for channel, n in tally.items():
                counts += [f"{what}|{clinic}|{channel}", n]
        args: list[str | bytes] = [
            _dumps([clinic, booking_id, "", str(keep), hset, [], zadd, emits, "",
                    guard if guard is not None else False, counts, contacts, [],
                    [], []]),
            doc]
        return _Prepared(args, shown_timeline)

    def _stamp_of(self, now: datetime) -> str:
        """`utc_iso(now)`, kept for the last `now` (a batch's bookings share one)."""
        last = self._last_stamp
        if last is not None and last[0] is now:
            return last[1]
        stamp = utc_iso(now) or ""
        self._last_stamp = (now, stamp)
        return stamp

    _STATIC_MAX = 4096  # kinds of reminder kept by `_reminder_static`

    def _new_from_record(
        self, records: tuple[ReminderRecord, ...], held: bool, hold_reason: str, base: str,
        hset: list[str], zadd: list[str], scheduled: dict[str, int], skipped: dict[str, int],
        texts: dict[str, str],
    ) -> None:
        """`_prepare_new`'s loop over the reminders without a timeline, from the plan's
        record (`records`, one per reminder of the plan, in order): each reminder's
        stored field and value onto `hset`, its due entry onto `zadd`, its channel counted in
        `scheduled` or `skipped`, the texts it names into `texts`. What `_reminder_static`
        gives a kind is kept here by the identity of the record's static tuple (for this
        hold), with the key, channel and value's parts it makes (a miss is worked out from the
        reminder the record holds, as the general loop does, without making the plan's
        others: `plan_from_record(lazy=True)`); an epoch's stored form from its
        microseconds (`_micro_epoch`)."""
        kinds = self._kinds.get((held, hold_reason))
        if kinds is None:
            if len(self._kinds) >= 64:
                self._kinds.clear()
            kinds = self._kinds[(held, hold_reason)] = {}
        stamps = _MICRO_EPOCHS
        for entry in records:
            shared, due, expires = entry
            hit = kinds.get(id(shared))
            if hit is None or hit[0] is not shared:
                hit = self._record_kind(shared, reminder_from_record(entry), held,
                                        hold_reason, kinds)
            if hit[1] is None:  # released: the hold notice has nothing to say
                continue
            _, key, channel, head, tail, goes_due, used = hit
            if used:
                texts.update(used)
            planned = stamps.get(due) or _micro_epoch(due)
            if expires is not None:
                expiry = stamps.get(expires) or _micro_epoch(expires)
                hset += [key, f"{head}{planned}||{expiry}{tail}"]
            else:
                hset += [key, f"{head}{planned}||{tail}" if tail else head + planned]
            if goes_due:
                zadd += [planned, base + key]
                scheduled[channel] = scheduled.get(channel, 0) + 1
            elif head[0] == "K":
                skipped[channel] = skipped.get(channel, 0) + 1

    def _record_kind(
        self, shared: tuple[Any, ...], r: PlannedReminder, held: bool, hold_reason: str,
        kinds: dict[int, tuple[Any, ...]],
    ) -> tuple[Any, ...]:
        """What `_new_from_record` keeps for the kind of reminder `r` (whose record's static
        tuple is `shared`): (shared, key, channel, head, tail, goes due, texts named), with
        key None for a hold notice of a booking not held (`_reminder_static`'s False)."""
        hit = self._static.get((r.key, r.step, r.channel, r.template, r.occurrence,
                                r.status == Status.SKIPPED, r.reason, r.at_booking,
                                r.expires_note, held, hold_reason))
        if hit is None:
            hit = self._reminder_static(r, held, hold_reason)
        if hit is False:
            value: tuple[Any, ...] = (shared, None, None, "", "", False, {})
        else:
            head, tail, goes_due, _, _, used = hit
            value = (shared, r.key, r.channel, head, tail, goes_due, used)
        if len(kinds) >= self._STATIC_MAX:
            kinds.clear()
        kinds[id(shared)] = value
        return value

    def _reminder_static(
        self, r: PlannedReminder, held: bool, hold_reason: str
    ) -> tuple[str, str, bool, str, str | None, dict[str, str]] | Literal[False]:
        """What a new booking's reminder stores and shows apart from its instants: the
        stored form's head and tail (its planned and expiry epochs go between), whether it
        goes due, its status and reason as the timeline shows them, and the texts it names
        (id -> text); False for a hold notice of a booking not held. Memoised in
        `_static` by everything it depends on (forgotten when a text id changes)."""
        notice = is_hold_notice(r.key)
        skipped = r.status == Status.SKIPPED
        value: tuple[str, str, bool, str, str | None, dict[str, str]] | Literal[False]
        if notice and not held:
            value = False
        else:
            step, channel, occurrence = _key_parts(r.key)
            if (r.step, r.channel) != (step, channel):
                raise ValueError(f"reminder {r.key!r}: step or channel is not the key's")
            used: dict[str, str] = {}
            intern = self._intern
            flags = ("b" if r.at_booking else "") + (
                f"#{r.occurrence}" if r.occurrence != occurrence else "")
            tail = _join([
                intern(r.expires_note, used) if r.expires_note else "",
                "" if r.template == step else intern(r.template, used),
                flags,
                "@" + intern(r.reason, used) if r.reason else "",
            ])
            value = (("K" if skipped else "S") + "|1|", "|" + tail if tail else "",
                     not skipped and (notice or not held),
                     str(Status.SKIPPED if skipped else Status.SCHEDULED),
                     f"booking held: {hold_reason}" if held and not skipped and not notice
                     else r.reason or None, used)
        if len(self._static) >= self._STATIC_MAX:
            self._static.clear()
            self._kinds.clear()
        self._static[(r.key, r.step, r.channel, r.template, r.occurrence,
                      skipped, r.reason, r.at_booking, r.expires_note, held, hold_reason)] = value
        return value

    def _held_events(
        self, booking: Booking, version: int, reason: str, late: bool = False
    ) -> list[Any]:
        """The clinic events of a new hold: the webhook, and the alert email."""
        return self._booking_events(booking, "booking.held", version, reason, late)

    def _late_pause_events(self, booking: Booking, version: int, reason: str | None
                           ) -> list[Any]:
        """The clinic events of a booking too late for the full retinoid pause (planner
        `late_pause`): the webhook, and the alert email."""
        if not reason:
            return []
        return self._booking_events(booking, "booking.late_pause", version, reason, True)

    def _booking_events(
        self, booking: Booking, etype: str, version: int, reason: str, late: bool
    ) -> list[Any]:
        hooks = self._hooks(booking.clinic).split()
        fields = {"booking_id": booking.booking_id, "version": version, "reason": reason,
                  "treatment": booking.treatment, "starts_at": booking.starts_at.timestamp(),
                  "late_pause": late}
        return [[kind, etype, fields]
                for kind, wanted in (("webhook", etype), ("alert", "alert"))
                if wanted in hooks]

    def _prepare_reconciled(
        self,
        booking: Booking,
        plan: Plan,
        stored: _Stored,
        now: datetime,
        release: bool,
        texts: dict[str, str],
        guard: list[Any] | None = None,
        *,
        timeline: bool = True,
        unflag: frozenset[str] = frozenset(),
        doc: str | None = None,
        by_sms: bool = False,
    ) -> _Prepared:
        """Reconcile (worker/reconcile.py) with the booking as stored; `unflag`, its emails
        no longer going by SMS (`_by_email_again`), lose their flag "s"; with `by_sms` (the
        patient lists email but unsubscribed from it) its emails going by SMS as written
        gain it (`by_sms_keys`), so an unchanged booking stored before they did is written
        too, and those its step's own SMS carries (given back by this write or an earlier
        one: `carried_keys`) lose it. `doc`: the booking's `model_dump_json()` if the caller
        has it."""
        clinic, booking_id = booking.key
        if doc is None:
            doc = booking.model_dump_json()
        doc = _same_booking_doc(stored.doc, doc)
        medications = self._medications_digest(booking)
        window = f"{plan.window.start}-{plan.window.end}" if plan.window else ""
        planned_keys = {r.key for r in plan.reminders}
        booking_fields = {k: v for k, v in stored.fields.items() if ":" not in k}
        stored_booking = dict(booking_fields)
        if stored.doc is not None and stored.fields:
            stored_booking["doc"] = stored.doc
        # The change notices are the store's, not the plan's: the reconcile never sees them.
        records = {k: stored.reminders.get(k, {})
                   for k in sorted(stored.reminders.keys() | planned_keys) if not is_notice(k)}
        result = self._reconcile(stored_booking, records, plan, doc, medications, release, now)
        # Reminders at their provider now that this change moves: should their attempt
        # deliver, it counts as this reminder's send (`_in_flight_gone`, the finish script).
        # Noted at a cancel (being sent then, now `cancelled`), for a re-open: read as still
        # being sent, and noted again under the same attempt's version if the re-open's plan
        # would not send it again; else dropped (its delivery is history beside the new plan).
        noted = booking_fields.get("gone", "").split()
        at_cancel = {entry.rpartition("@")[0]: entry for entry in noted
                     if stored.reminders.get(entry.rpartition("@")[0], {}).get("status")
                     == Status.CANCELLED}
        # Rescheduled (or cancelled) by an earlier change while its attempt was at its
        # provider, and that attempt still at work (`flying`: "<key>@<the attempt's
        # version>"), or put back in the schedule while it is (claimed again past its
        # lease, the new claim found its ledger held: its version is the attempt's): read
        # as being sent by it, as one noted at a cancel is, so that a change moving it
        # where a move would not send it again notes it (without this, its delivery was
        # recorded beside a plan that sent it once more).
        flown = {entry.rpartition("@")[0]: entry
                 for entry in booking_fields.get("flying", "").split()}
        flown = {k: flown.get(k) or f"{k}@{records[k].get('version', '')}"
                 for k in self._in_flight_keys(clinic, booking_id, [
                     k for k, r in records.items() if r.get("status") != Status.SENDING
                     and (k in flown or (k not in at_cancel and r.get("status") in PENDING
                                         and r.get("reason") == IN_FLIGHT_REQUEUED))])}
        flying = " ".join(sorted({**flown, **{
            k: f"{k}@{r.get('version', '')}" for k, r in records.items()
            if r.get("status") == Status.SENDING}}.values()))
        being_sent = at_cancel | flown
        sending = {k: {**r, "status": Status.SENDING} if k in being_sent else r
                   for k, r in records.items()}
        # One noted by an earlier change that this one moves where it goes again for the
        # new date (sent for an old date, a message before the visit whose new time is
        # ahead): no longer noted, its delivery is history beside the new plan, which sends
        # it for the new date (noted, it was recorded as the reminder's send: none for it).
        gone = " ".join(sorted(set(
            [entry for entry in noted
             if stored.reminders.get(entry.rpartition("@")[0], {}).get("status") in PENDING
             and not _again_as_sent(plan, records, entry.rpartition("@")[0],
                                    booking.starts_at, now)]
            + [being_sent.get(key) or f"{key}@{records[key].get('version', '')}"
               for key in _in_flight_gone(plan, sending, booking.starts_at, now)])))
        last = max([r.due_at.timestamp() for r in plan.reminders]
                   + [booking.starts_at.timestamp()])
        keep = str(math.ceil(last + self.retention_seconds))
        window_changed = booking_fields.get("window", "") != window
        reminders = {k: dict(v) for k, v in stored.reminders.items()}
        contacts = self._booking_contacts(booking)
        had = booking_fields.get("contacts", "")
        late_reason = _late_pause(plan, booking, stored.reminders)
        late = "1" if late_reason else ""
        was_late = booking_fields.get("late_pause", "")
        # Read only for a patient unsubscribed from email (a re-submission's speed).
        stored_values = {k: v for k, v in stored.fields.items()
                         if is_reminder_field(k)} if by_sms else {}
        if (not result.changed and not result.changes and not window_changed
                and had == contacts and was_late == late and not unflag
                and not (by_sms and (by_sms_keys(stored_values, plan.protected,
                                                 parse_notice_steps(plan.notice_steps)[0])
                                     or carried_keys(stored_values)))):
            # Unchanged as planned from what the SMS cap read: still the guard (what it read
            # may have changed since, by an earlier booking of the batch, say).
            args = apply_args(clinic, booking_id,
                              ["-", *(x for kv in stored.fields.items() for x in kv)], "",
                              keep, [], [], [], [], [], [], [], "", guard, "", {})
            return _Prepared(args, self._shown(timeline, clinic, booking_id, booking_fields,
                                                      reminders, stored.doc,
                                                      self._next_tries(stored)))
        version = int(booking_fields.get("version", 0)) + (1 if result.changed else 0)
        stamp = utc_iso(now) or ""
        kind = (self._change_kind(booking, stored.fields, stored.doc, str(result.status))
                if stored.doc != doc or booking_fields.get("status") == Status.CANCELLED
                or booking_fields.get("held_from") or reopened(stored.fields) else None)
        new_fields = {
            "status": str(result.status),
            "version": str(version),
            "window": window,
            "hold_reason": result.hold_reason,
            "released_for": result.released_for,
            "updated_at": stamp if result.changed else booking_fields.get("updated_at", stamp),
            "created_at": booking_fields.get("created_at") or stamp,
            "contacts": contacts,
            "late_pause": late,
            "gone": gone,
            "flying": flying,
            "ns": self._intern(plan.notice_steps, texts) if plan.notice_steps else "",
            # Held: the start the patient was told before the hold (a move while held says
            # nothing; its release tells it, `_told_start`). Nothing went out yet (held from
            # the start, its hold message still to go): no date told, none kept; the hold
            # message names the booking's start when it goes (worker/notices.py `as_told`).
            "held_from": (_told_start(booking_fields, stored.doc) or ""
                          if result.status == Status.HELD and stored.doc is not None
                          and any(went_out(r) for r in stored.reminders.values()) else ""),
            # Held as it is booked again after a cancel: its release re-opens it.
            "reopened": ("1" if result.status == Status.HELD and (
                booking_fields.get("status") == Status.CANCELLED
                or reopened(stored.fields)) else ""),
        }
        if "confirmed_at" in booking_fields and stored.doc is not None and (
                booking_fields.get("status") == Status.CANCELLED
                or datetime.fromisoformat(json.loads(stored.doc)["starts_at"])
                != booking.starts_at):
            # The patient confirmed the visit as it was (its date), not this one.
            new_fields["confirmed_at"] = ""
        notices: list[NoticeReminder] = []
        if kind is not None:
            seq = int(booking_fields.get("seq") or 0) + 1
            old_start = _told_start(stored.fields, stored.doc)
            notices, paused = plan_notices(
                "rescheduled", self._as_sending(clinic, booking_id, stored.reminders), booking,
                plan.notice_steps, seq=seq, now=now,
                window=plan.window or SendWindow(),
                before=datetime.fromisoformat(old_start) if old_start else None,
                planned_for=_doc_start(stored.doc))
            # Booked again after a cancel the patient never heard of (its notice superseded
            # before it went): to them the visit moves from the date they were told.
            unheard = [r for k, r in stored.reminders.items()
                       if k.startswith(f"cancelled#{seq - 1}:")]
            moved_from = (_num(datetime.fromisoformat(old_start).timestamp())
                          if old_start and (kind == "moved" or (
                              unheard and not any(went_out(r) for r in unheard)
                              and datetime.fromisoformat(old_start) != booking.starts_at))
                          else "")
            told = _told_by(stored.reminders, seq - 1,
                            datetime.fromisoformat(old_start) if old_start else None)
            before = booking_fields.get("moved_from", "")
            if before and float(before) == booking.starts_at.timestamp():
                before = ""  # moved back to the date told: no previous date to name
            untold = ""
            if moved_from and told and not any(went_out(r) for r in told.values()):
                # The last move's notice never went out: the patient still knows the date
                # before it ("moved from" that one, or from nothing if it is the date again).
                moved_from, untold = before, booking_fields.get("untold", "")
            elif moved_from and told and not _told_sent(told):
                # Being sent now: it may go out or not; the send of this move's notice
                # reads which (worker/notices.py `as_told_fields`).
                untold = f"{_told_prefixes(told)}|{before}"
            new_fields |= {
                "seq": str(seq),
                "moved_from": moved_from,
                "paused": "1" if paused else "",
                "untold": untold,
            }
        hset: list[str] = []
        hdel: list[str] = []
        for name, value in new_fields.items():
            if value:
                if booking_fields.get(name) != value:
                    hset += [name, value]
                booking_fields[name] = value
            elif name in booking_fields:
                hdel.append(name)
                del booking_fields[name]
        due: list[str] = []
        rm_due: list[str] = []
        rm_lease: list[str] = []
        rm_dead: list[str] = []

        def text_id(text: str) -> str:
            return self._intern(text, texts)

        # Its emails going by email again: their stored form without the flag "s".
        unflagged = {k: _without_flag(stored.fields[k], "s") for k in unflag}
        for key in unflag:
            reminders[key].pop("by_sms", None)

        def cancel(key: str, reason: str) -> None:
            """A stored reminder of the store's own (a notice, a message again) called off."""
            fields = {"status": Status.CANCELLED, "version": str(version), "reason": reason}
            main, _ = encode_reminder(key, fields, unflagged.get(key, stored.fields.get(key, "")),
                                      text_id=text_id)
            hset.extend([key, main])
            reminders[key] = reminders.get(key, {}) | fields
            rm_due.append(key)
            rm_lease.append(key)
            rm_dead.append(key)

        def add(key: str, fields: dict[str, str], due_epoch: str | None) -> None:
            """A new reminder of the store's own, scheduled at `due_epoch` if given."""
            main, _ = encode_reminder(key, fields, text_id=text_id)
            hset.extend([key, main])
            reminders[key] = fields
            if due_epoch is not None:
                due.extend([key, due_epoch])

        if kind is not None:
            for key, record in stored.reminders.items():
                # A dead letter too (never sent): a replay must not send it after this one;
                # and one the patient's opt-out skipped, which START no longer brings back
                # (only the latest change's), as the reconcile cancels the plan's own.
                if is_notice(key) and (record.get("status") in PENDING | {Status.FAILED} or (
                        record.get("status") == Status.SKIPPED
                        and record.get("reason", "").startswith(OPTED_OUT))):
                    reason = "superseded by a later change"
                    if record.get("status") == Status.FAILED:  # why it failed first stays
                        reason += f"; it had failed before: {record.get('reason', '')}"
                    cancel(key, reason)
            for notice in notices:
                add(notice.key, notice_fields(notice, version),
                    _num(notice.due_at.timestamp()))
            for key, fields in [
                    *repause_fields(plan, stored.reminders, seq, version, now,
                                    _same_day(kind, booking, stored.fields, stored.doc)),
                    *again_fields(plan, stored.reminders, booking.starts_at, seq, version, now)]:
                add(key, fields, _num(float(fields["due_epoch"]))
                    if result.status == Status.SCHEDULED else None)
        else:
            # A message again for the new date goes while the plan has its step on its
            # channel: the patient's channels (consent) or the SMS cap changed that, and the
            # plan's own reminder of the step carries it now (or nothing does).
            # Released from a hold: the store's own reminders still to go (a notice, a
            # message again) go back into the schedule as the reconcile puts back the plan's
            # (a begin during the hold took them out of it).
            released = (stored.fields.get("status") == Status.HELD
                        and result.status == Status.SCHEDULED)
            # A change notice on a channel the patient no longer takes (consent withdrawn):
            # cancelled, and the change told on a channel they take (`notice_elsewhere`).
            offered = booking.patient.channels
            withdrawn = withdrawn_notices(stored.reminders, offered)
            for key, record in stored.reminders.items():
                sms = key[: -len("email")] + "sms" if key.endswith(":email") else ""
                if record.get("status") in PENDING and (notice_off(key, offered) or (
                        not again_planned(key, plan) and not (
                        # By email for its SMS (the cap at send time, `cap_at_send`): it
                        # goes while the plan has its step on SMS and the patient email.
                        sms and "email" in booking.patient.channels
                        and stored.reminders.get(sms, {}).get("status") == Status.SKIPPED
                        and again_planned(sms, plan)))):
                    cancel(key, self._gone)
                elif released and is_notice(key) and record.get("due_epoch") \
                        and record.get("status") in (Status.SCHEDULED, Status.RETRYING):
                    due += [key, record["due_epoch"]]
            for key, fields in notice_elsewhere(withdrawn, stored.reminders, offered, version):
                add(key, fields, fields["due_epoch"]
                    if result.status == Status.SCHEDULED else None)

        # A reminder an earlier change took off `sending` (rescheduled, cancelled) while its
        # attempt is still at the provider: that attempt still counts, as the reconcile keeps
        # the count of one being sent (worker/reconcile.py `reconcile_one`).
        counting = self._in_flight_keys(clinic, booking_id, [
            c.key for c in result.changes if c.fields is not None
            and c.fields.get("attempts") == "0"
            and records.get(c.key, {}).get("status") not in (None, Status.SENT, Status.SENDING)
            and records.get(c.key, {}).get("attempts", "0") not in ("", "0")])
        for change in result.changes:
            key = change.key
            if change.fields is not None:
                fields = dict(change.fields)
                if key in counting:  # this budget's count kept: none of it earlier
                    fields["attempts"] = records[key]["attempts"]
                    fields["earlier"] = records[key].get("earlier", "0")
                if change.bump:
                    fields["version"] = str(version)
                    rm_lease.append(key)
                main, attempt = encode_reminder(
                    key, fields, unflagged.get(key, stored.fields.get(key, "")),
                    stored.fields.get(key + "+", ""), text_id=text_id,
                )
                hset += [key, main]
                if attempt:
                    hset += [key + "+", attempt]
                elif key + "+" in stored.fields:
                    hdel.append(key + "+")
                reminders[key] = reminders.get(key, {}) | fields
            if change.schedule == "due":
                due += [key, _num(change.due_epoch or 0.0)]
                rm_dead.append(key)
            elif change.schedule == "remove":
                rm_due.append(key)
                rm_lease.append(key)
                rm_dead.append(key)
            elif change.schedule == "hold":
                rm_due.append(key)
                if change.fields is not None:  # rewritten: no longer a dead letter
                    rm_dead.append(key)
        if unflag:
            written = set(hset[0::2])
            hset += [x for k in sorted(unflag) if k not in written for x in (k, unflagged[k])]
        flagged = _flag_by_sms(hset, plan, stored_values) if by_sms else []
        for key in flagged:
            reminders[key] = {**reminders.get(key, {}), "by_sms": "1"}
        # Its emails flagged "s" whose step's own SMS this write gives back (or left): they
        # go by SMS no longer (their begin skips them), so the cap stops counting them.
        carried = _unflag_carried(hset, stored_values) if by_sms else []
        for key in carried:
            reminders.get(key, {}).pop("by_sms", None)
        if unflag or flagged or carried:
            # No longer, or now, SMS for the cap: the cap guards of other writes that read
            # this booking's SMS read them again (as `opt_in`'s unflag bumps it).
            smsv = str(int(booking_fields.get("smsv") or 0) + 1)
            hset += ["smsv", smsv]
            booking_fields["smsv"] = smsv
        new = not stored.fields
        if new:  # nothing of it can be due, leased or dead-lettered yet
            rm_due, rm_lease, rm_dead = [], [], []
            hset += ["keep_until", keep]
        if not new:
            # A reminder being sent that this change takes out of the plan keeps its lease:
            # should its attempt's worker be lost at the provider (its batch task was
            # acknowledged at the hand-over: never given again), the pump's claim looks at it
            # once the lease runs out and tells the booking complete then (`_LEFT`). One due
            # again that was not being sent leaves the lease set (a lease such a change left):
            # the due set brings it at its time. One left without a pending status keeps
            # whatever lease it has: a later change (planned again as skipped for another
            # reason: its stored status no longer `sending`) must not drop a kept lease.
            rm_lease = [k for k in rm_lease if reminders.get(k, {}).get("status") in PENDING
                        or (k not in reminders
                            and stored.reminders.get(k, {}).get("status") != Status.SENDING)]
            rm_lease += [k for k in due[0::2] if k not in rm_lease
                         and stored.reminders.get(k, {}).get("status") != Status.SENDING]
        changed_doc = stored.doc != doc or new
        # Told complete (the finish's booking.completed), and this change gives it reminders
        # to send again (a move, a re-open, a release): told again once those are done.
        if "completed_told" in booking_fields and any(
                r.get("status") in PENDING for r in reminders.values()):
            hdel.append("completed_told")
            del booking_fields["completed_told"]
        check: str | list[str] = "" if new else [x for kv in stored.fields.items() for x in kv]
        # A hold the clinic has not been told of: a new one, or one for another reason.
        was = stored.fields
        emits = (self._held_events(booking, version, result.hold_reason, bool(late))
                 if result.status == Status.HELD
                 and (was.get("status") != Status.HELD
                      or was.get("hold_reason", "") != result.hold_reason)
                 else [])
        if result.status != Status.HELD and late and (
                was_late != late or was.get("status") == Status.HELD):
            emits += self._late_pause_events(booking, version, late_reason)
        # This change ends the last reminders it had to send (a step no longer planned, a
        # channel withdrawn): nothing more goes, told complete as the finish tells it. Not
        # while an attempt it overtakes is at work (at the provider: it may still deliver):
        # that attempt's finish tells it, as STOP leaves a reminder in flight to its attempt.
        # Also one an earlier change took off `sending` (a move rescheduled it: `flying`)
        # while its attempt is still at work: any pending one is looked at, not only those
        # stored as `sending`. Read by the write itself (`_APPLY`, "completed"), atomically
        # with it: read here, an attempt ending between the read and the write (overtaken,
        # it rewrites nothing the write's check would see) would find the reminder still
        # to go and tell nothing, and the write nothing either.
        if (result.status == Status.SCHEDULED and "completed_told" not in booking_fields
                and any(r.get("status") in PENDING for r in stored.reminders.values())
                and not any(r.get("status") in PENDING for r in reminders.values())
                and "booking.completed" in self._hooks(clinic).split()):
            emits.append(["completed", "booking.completed",
                          [k for k, r in stored.reminders.items()
                           if r.get("status") in PENDING]])
        unindex = " ".join(sorted(set(had.split()) - set(contacts.split())))
        args = apply_args(clinic, booking_id, check, doc if changed_doc else "", keep, hset,
                          hdel, due, rm_due, rm_lease, rm_dead, emits, unindex, guard, contacts,
                          stored.fields)
        # A reminder handed back unbegun that this write leaves where it is in the due set
        # shows its next try as GET of this version will (the hash it was read with is
        # checked by the apply); one the write puts in or takes out of the due set, not.
        moved = {*due[0::2], *rm_due}
        kept = _Stored(stored.fields, stored.doc, reminders,
                       {k: v for k, v in stored.scores.items() if k not in moved})
        return _Prepared(args, self._shown(timeline, clinic, booking_id, booking_fields,
                                           reminders, doc, self._next_tries(kept)))

    def _in_flight(self, clinic: str, booking_id: str, keys: list[str]) -> bool:
        """Whether an attempt begun on one of `keys` is still at work: the send ledger holds
        its token and the attempt log has no finish of it yet (read unfenced). The upsert's
        write reads the same within itself (`_PRELUDE`'s `at_work`, in `_APPLY`): an
        overtaken attempt's finish changes nothing in the booking's hash that the write's
        check would see."""
        return bool(self._in_flight_keys(clinic, booking_id, keys))

    def _in_flight_keys(self, clinic: str, booking_id: str, keys: list[str]) -> set[str]:
        """Those of `keys` whose attempt is still at work (as `_in_flight`)."""
        if not keys:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            ref = ref_of(clinic, booking_id, key)
            pipe.get(self.ledger_key(ref))
            pipe.lindex(self.attempts_key(ref), -1)
        replies = pipe.execute()
        return {key for key, ledger, last in zip(keys, replies[0::2], replies[1::2], strict=True)
                if ledger and ledger != "sent"
                and (last is None or json.loads(last).get("tok") != ledger)}

    def _as_sending(
        self, clinic: str, booking_id: str, reminders: Mapping[str, Mapping[str, str]],
    ) -> Mapping[str, Mapping[str, str]]:
        """`reminders` as a change notice counts what went out: one an earlier change took
        off `sending` (a move rescheduled it, a cancel cancelled it) while its attempt is
        still at the provider, or one of unknown outcome waiting for its ledger to expire,
        shows as `sending` (it may go out, or have: "a message being sent at the moment of
        the change counts as gone out"). Without this, a move then a cancel (or a second
        move) while it is at the provider, or a move after a send cut after the hand-over,
        told the patient nothing, though it went out naming the old date."""
        keys = [k for k, r in reminders.items()
                if r and r.get("status") not in (Status.SENT, Status.SENDING)
                and not r.get("sent_at")]
        # Its ledger holds an attempt's token: at its provider, or of unknown outcome (kept
        # until it expires: the provider may have it), as worker/dispatch.py
        # `_told_in_flight` reads it (a notice waits for it to go or not).
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(self.ledger_key(ref_of(clinic, booking_id, key)))
        flying = {key for key, ledger in zip(keys, pipe.execute() if keys else [], strict=True)
                  if ledger and ledger != "sent"}
        if not flying:
            return reminders
        return {k: {**r, "status": Status.SENDING} if k in flying else r
                for k, r in reminders.items()}

    @staticmethod
    def _change_kind(
        booking: Booking, stored: Mapping[str, str], doc: str | None, status: str
    ) -> str | None:
        """Return "moved" or "reopened" if this upsert changes what the patient was told of
        the appointment (worker/notices.py), else None. A held booking says nothing.
        `stored`: the booking's hash as stored, its reminders' fields too (`reopened`)."""
        if doc is None or status != Status.SCHEDULED:
            return None
        if stored.get("status") == Status.CANCELLED or reopened(stored):
            return "reopened"
        old = _told_start(stored, doc)
        if old and datetime.fromisoformat(old) != booking.starts_at:
            return "moved"
        return None

    # Why a reminder still to go is cancelled when the booking's new plan no longer has it
    # (worker/reconcile.py `reconcile`'s `gone`): the clinic changed the booking. (`_Recap`:
    # the patient's email unsubscribe.)
    _gone = AFTER_A_CHANGE

    @property
    def _plain_reconcile(self) -> bool:
        return "_reconcile" not in vars(self) and type(self)._reconcile is Store._reconcile

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
        """Cancel a booking: nothing not yet sent will be sent; history stays.

        If messages had gone out, the patient is told (worker/notices.py): the notices are
        added by the same step, which applies only if the booking is still as read.
        """
        self._ready()
        while True:
            check, adds, texts = self._cancel_notices(clinic, booking_id, now)
            reply = self._cancel(
                keys=[self.booking_key(clinic, booking_id), self.due_key, self.lease_key,
                      self.dead_key, self.doc_key(clinic, booking_id)],
                args=[reason, utc_iso(now) or "", self.retention_seconds, self.prefix, clinic,
                      booking_id, check, adds, json.dumps(texts) if texts else ""],
            )
            outcome = str(reply[0] if isinstance(reply, list) else reply)
            if outcome.startswith("collision:"):  # words of another text: a longer id
                taken = outcome.split(":", 1)[1]
                self._taken.add(taken)
                self._ids = {t: i for t, i in list(self._ids.items()) if i != taken}
                continue
            if outcome != "changed":
                break
        if outcome == "cancelled":
            self._texts.update(texts)
        if outcome == "missing":
            raise NotFound(f"{clinic}/{booking_id}")
        # The booking as this cancel left it, read by the script in the same step: a write
        # landing after it (a PUT opening it again) is not answered as this DELETE's result.
        (stored,) = self._stored_rows([reply[1:]])
        return self._timeline(clinic, booking_id, stored)

    def _cancel_notices(
        self, clinic: str, booking_id: str, now: datetime
    ) -> tuple[str, str, dict[str, str]]:
        """Return the cancel script's check, notices and their texts ("" and {}: none).

        The check is the booking's hash as read, always (with notices or not, "[]" when
        missing): a reminder claimed or sent after this read (the pause message going
        out) changes the hash, so the cancel reads again and plans the notice it now needs.
        """
        (stored,) = self._read([(clinic, booking_id)])
        fields = stored.fields
        status = fields.get("status")
        # Missing or cancelled as read ("[]" for missing) fences too: the script answers
        # "missing" or "already" while it still is, and "changed" once a PUT has made it
        # live since (created, booked again), whose messages may have gone out meanwhile.
        check = json.dumps([x for kv in fields.items() for x in kv], ensure_ascii=False)
        if not fields or status not in (Status.SCHEDULED, Status.HELD):
            return check, "", {}
        # Held as booked again after a cancel, and its hold message named the new date.
        hold_told = status == Status.HELD and _told_by_hold(fields, stored.reminders)
        if stored.doc is None or not fields.get("ns") or (
                status == Status.HELD and reopened(fields) and not hold_told and any(
                    went_out(r) for k, r in stored.reminders.items()
                    if k.startswith(f"cancelled#{fields.get('seq') or 0}:"))):
            return check, "", {}  # (held since booked again after a cancel told: told so)
        notice_steps = self._resolve([fields["ns"]]).get(fields["ns"], "")
        try:
            booking = Booking.model_validate_json(stored.doc)
        except ValueError:
            return check, "", {}
        start, _, end = fields.get("window", "").partition("-")
        window = (SendWindow.model_construct(start=int(start), end=int(end)) if start and end
                  else SendWindow())
        seq = int(fields.get("seq") or 0) + 1
        # Held: the patient knows the start told before the hold (a move while held is
        # told at its release).
        held_from = (_told_start(fields, stored.doc) if status == Status.HELD and not hold_told
                     else None)
        before = datetime.fromisoformat(held_from) if held_from else None
        notices, paused = plan_notices("cancelled",
                                       self._as_sending(clinic, booking_id, stored.reminders),
                                       booking, notice_steps,
                                       seq=seq, now=now, window=window, before=before,
                                       planned_for=booking.starts_at)
        if not notices:
            return check, "", {}
        version = int(fields.get("version") or 0) + 1
        texts: dict[str, str] = {}
        # The last move's notice never went out: the patient knows the date before it.
        told = _told_by(stored.reminders, seq - 1, booking.starts_at)
        if told and not any(went_out(r) for r in told.values()) and any(
                went_out(r) for k, r in stored.reminders.items()
                if k.startswith(f"cancelled#{seq - 2}:")):
            # Booked again after a cancel the patient was told of, and they never heard it
            # was: they know it is cancelled, nothing more to say.
            return check, "", {}
        told_start, untold = _num(before.timestamp()) if before else "", ""
        if told and not any(went_out(r) for r in told.values()):
            told_start, untold = fields.get("moved_from", ""), fields.get("untold", "")
        elif told and not _told_sent(told):  # being sent: the send reads
            untold = f"{_told_prefixes(told)}|{fields.get('moved_from', '')}"
        adds: list[str] = ["seq", str(seq), "", "paused", "1" if paused else "", "",
                           "told_start", told_start, "", "untold", untold, ""]
        for notice in notices:
            main, _ = encode_reminder(notice.key, notice_fields(notice, version),
                                      text_id=lambda text: self._intern(text, texts))
            adds += [notice.key, main, _num(notice.due_at.timestamp())]
        return check, json.dumps(adds, ensure_ascii=False), texts

    def booking_doc(self, clinic: str, booking_id: str) -> dict[str, Any]:
        self._ready()
        raw = self.redis.get(self.doc_key(clinic, booking_id))
        if raw is None:
            raise NotFound(f"{clinic}/{booking_id}")
        return json.loads(raw)  # type: ignore[no-any-return]

    def timeline(self, clinic: str, booking_id: str) -> dict[str, Any]:
        """Return the booking's timeline in the DESIGN.md JSON shape."""
        self._ready()
        (stored,) = self._read([(clinic, booking_id)], scores=True)
        if not stored.fields:
            raise NotFound(f"{clinic}/{booking_id}")
        return self._timeline(clinic, booking_id, stored)

    def _timeline(self, clinic: str, booking_id: str, stored: _Stored) -> dict[str, Any]:
        """The timeline of a booking read in one step (its hash, document and due scores:
        `read_booking`), so its status, reminders and version describe one state."""
        booking = {k: v for k, v in stored.fields.items() if ":" not in k}
        return self._timeline_of(clinic, booking_id, booking, stored.reminders, stored.doc,
                                 self._next_tries(stored))

    @staticmethod
    def _next_tries(stored: _Stored) -> dict[str, str]:
        """When each reminder handed back to the schedule unbegun is tried next (its score
        in the due set, epoch seconds), for the timeline: a hand-back keeps the reminder's
        due (the SMS cap counts it on that day, `_REQUEUE`), already past. Only a pending
        reminder whose due has passed can be one. The scores were read with the booking."""
        now = time.time()
        out: dict[str, str] = {}
        for k, score in stored.scores.items():
            r = stored.reminders.get(k, {})
            if r.get("status") in (Status.SCHEDULED, Status.RETRYING) and r.get("due_epoch") \
                    and float(r["due_epoch"]) <= now \
                    and abs(float(score) - float(r["due_epoch"])) > 0.001:
                out[k] = _num(float(score))
        return out

    def _shown(
        self, timeline: bool, clinic: str, booking_id: str, booking: Mapping[str, str],
        records: Mapping[str, Mapping[str, str]], doc: str | None,
        next_tries: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The booking's timeline, or only its version (`timeline` False); `next_tries`:
        `_next_tries` of the reminders the write leaves in the due set as read."""
        if not timeline:
            return {"version": int(booking["version"])}
        return self._timeline_of(clinic, booking_id, booking, records, doc, next_tries)

    @staticmethod
    def _timeline_of(
        clinic: str,
        booking_id: str,
        booking: Mapping[str, str],
        records: Mapping[str, Mapping[str, str]],
        doc: str | None,
        next_tries: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The timeline of these records, its reminders in the order they are due (by the
        instant, then by id)."""
        tries = next_tries or {}
        reminders = [_timeline_entry(key, rec, tries.get(key))
                     for key, rec in records.items() if rec]
        # By the instant, not the text: "09:45:24.500000Z" sorts before "09:45:24Z" as text.
        reminders.sort(key=lambda r: (float(records[r["id"]].get("due_epoch") or "-inf"),
                                      r["id"]))
        status = booking["status"]
        if status == Status.HELD:
            for r in reminders:
                if r["status"] in PENDING and not is_hold_notice(r["id"]):
                    r["reason"] = f"booking held: {booking.get('hold_reason')}"
        if (
            status == Status.SCHEDULED
            and reminders
            and all(r["status"] in TERMINAL for r in reminders)
            and doc is not None
        ):
            if datetime.fromisoformat(json.loads(doc)["starts_at"]) <= datetime.now(UTC):
                status = Status.COMPLETED
        return {
            "clinic": clinic,
            "booking_id": booking_id,
            "status": str(status),
            "version": int(booking["version"]),
            "hold_reason": booking.get("hold_reason") or None,
            **{name: _iso(booking[name]) for name in REPLY_FIELDS if booking.get(name)},
            "late_pause": booking.get("late_pause") == "1",
            "reminders": reminders,
        }

    # --- pump ------------------------------------------------------------------------

    def claim_due(self, limit: int, lease_seconds: int) -> list[Claim]:
        """Atomically lease up to `limit` due reminders (Redis's clock decides 'due')."""
        self._ready()
        run_key = f"{self.prefix}:claimrun:{uuid.uuid4().hex}"
        rows = self._claim(
            keys=[self.due_key, self.lease_key, run_key],
            args=[limit, lease_seconds, self.prefix],
        )
        for ref in [r[0] for r in rows if not r[1]]:  # out of the plan while being sent
            clinic, booking_id, key = split_ref(ref)
            self._left(keys=[self.booking_key(clinic, booking_id), self.ledger_key(ref),
                             self.lease_key, self.attempts_key(ref)],
                       args=[ref, key, self._hooks(clinic), self.prefix, IN_FLIGHT_MARGIN])
        return [Claim(ref=r[0], version=r[1], claim=r[2]) for r in rows if r[1]]

    def next_due_in(self) -> float | None:
        """Return seconds until the earliest due reminder (negative if overdue), or None."""
        first = self.redis.zrange(self.due_key, 0, 0, withscores=True)
        if not first:
            return None
        return float(first[0][1]) - time.time()

    # --- sending ---------------------------------------------------------------------

    def begin_send(self, ref: str, version: str, claim: str, token: str, ledger_ms: int,
                   *, critical: str = "", secret: str | None = None) -> Begun:
        """Fence the task, check the patient's opt-out and take the ledger; return "ok",
        "ok sms" (an email of a care-critical step to send by SMS: the patient unsubscribed
        from email, and the step has no SMS of its own that goes) or why to drop the task
        ("opted out", or "carried by its own sms": skipped with the reason).

        The answer is a `Begun`: with "ok" it carries the booking's hash and document as the
        same script read them, and, given `secret` (a server secret's name,
        worker/secrets.py), that secret as stored: one round trip in all.
        `critical`: the care-critical steps, space-separated "<treatment>/<step>".
        """
        if "|" in token:
            raise ValueError("an attempt's token must not contain '|'")
        self._ready()
        clinic, booking_id, key = split_ref(ref)
        dkey = self.doc_key(clinic, booking_id)
        keys = [self.booking_key(clinic, booking_id), self.ledger_key(ref), self.lease_key,
                dkey, self.optout_key(clinic)]
        if secret is not None:
            from .secrets import secret_key

            keys.append(secret_key(self.prefix, secret))
        # The script normalises ASCII addresses itself; others need Python's (`norms`).
        norms = "{}"
        for _ in range(_NORMS_TRIES):  # again only if the patient's addresses changed
            verdict = self._begin(
                keys=keys,
                args=[key, version, claim, token, ledger_ms, ref, critical,
                      self._hooks(clinic), self.prefix, norms],
            )
            if verdict != "contacts changed":
                return verdict if isinstance(verdict, Begun) else Begun(str(verdict))
            doc = verdict.doc if isinstance(verdict, Begun) else None
            if doc is None:
                doc = cast(str | None, self.redis.get(dkey))
            norms = _contact_norms([doc])
        raise RuntimeError(f"begin {ref}: the patient's addresses kept changing")

    def begun_record(self, ref: str, begun: Begun) -> tuple[dict[str, str], dict[str, str]]:
        """`record_and_booking`, from what the begin read (no round trip if it read it)."""
        if not begun.read:
            return self.record_and_booking(ref)
        return self._record_of(ref, begun.fields, begun.doc)

    @contextmanager
    def reading(self, ref: str, begun: Begun) -> Iterator[None]:
        """Within: this thread's `plan_dates` of the booking of `ref` answer from the hash
        the begin script read (in the same atomic step as its fence), without a round trip.
        Anything that changes meanwhile is caught by the fence before the hand-over
        (`still_owned`) and the finish."""
        clinic, booking_id, _ = split_ref(ref)
        before = getattr(self._local, "fields", None)
        self._local.fields = (self.booking_key(clinic, booking_id), begun.fields) \
            if begun.read else None
        try:
            yield
        finally:
            self._local.fields = before

    def ledger_ttl(self, ref: str) -> float:
        """Return seconds until an in-flight attempt's ledger entry expires (0 if none)."""
        return max(0, int(self.redis.pttl(self.ledger_key(ref)))) / 1000

    def record_and_booking(self, ref: str) -> tuple[dict[str, str], dict[str, str]]:
        """Return a reminder's record and its booking's fields (with "doc"), in one round trip
        (and one more for texts this process has not read yet); only this reminder decoded."""
        self._ready()
        clinic, booking_id, _ = split_ref(ref)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.booking_key(clinic, booking_id))
        pipe.get(self.doc_key(clinic, booking_id))
        raw, doc = pipe.execute()
        return self._record_of(ref, _str_hash(raw), doc)

    def _record_of(self, ref: str, fields: dict[str, str], doc: str | None
                   ) -> tuple[dict[str, str], dict[str, str]]:
        key = split_ref(ref)[2]
        booking = {k: v for k, v in fields.items() if ":" not in k}
        if fields and doc is not None:  # as _read: a document only beside its booking
            booking["doc"] = doc
        if not booking.get("reopened") and reopened(fields):  # stored before the mark
            booking["reopened"] = "1"
        main = fields.get(key)
        if main is None:
            return {}, booking
        texts = self._resolve(_text_ids(main))
        return decode_reminder(key, main, fields.get(key + "+"), texts), booking

    def record(self, ref: str) -> dict[str, str]:
        """Return a reminder's record as its logical fields ({} if there is none)."""
        self._ready()
        return self._one(ref)[0]

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
        capped: SendCapped | None = None,
        tried: bool = False,
    ) -> str:
        """Record the outcome of `attempt` (fenced; see _FINISH); return what was done.

        outcome: sent | retry | unknown | failed | defer | skip | abandon (the attempt found
        itself overtaken before sending). `at`: when to try again (retry, defer; unknown:
        not before the ledger expires); by default now on Redis's clock (the script's TIME,
        the pump's), never this host's. `entry`: the attempt log line. `fields`: reason,
        last_error, sent_at (ISO 8601). `capped`: the SMS cap's decision at send time, made
        from what `send_caps_read` read: "caps changed" (nothing written) when any of it
        changed since. `tried`: a skip of an attempt that was made (a retry turned into a
        skip): it stays counted (as `capped.tried`).
        """
        self._ready()
        clinic, booking_id, key = split_ref(ref)
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
            "" if at is None else _num(at.timestamp()),  # '': Redis's now (_FINISH)
            self.retention_seconds,
            json.dumps(line, separators=(",", ":")),
            ATTEMPT_LOG_MAX,
            self.prefix,
            clinic,
            booking_id,
            IN_FLIGHT_MARGIN,
            _stored_instant(sent_at),
            attempt.planned,
            attempt.template,
            key,
            self._hooks(clinic),
        ]
        for k, v in (fields or {}).items():
            args += [k, _stored_instant(v) if k == "sent_at" else v]
        if outcome in ("skip", "defer", "failed") and attempt.booking:
            # The send-time rule (the failure) was worked out from this booking version
            # (see _FINISH).
            args += ["booking", attempt.booking]
        if capped is not None:
            if capped.read.guard:  # empty: decided without the check (see dispatch `_capped`)
                args += ["caps", json.dumps(capped.read.guard, separators=(",", ":"))]
            if capped.by_email is not None:
                args += ["by_email", _num(capped.by_email.timestamp()),
                         "email_reason", capped.email_reason, "email_goes", capped.email_goes]
            if capped.tried:
                tried = True
        if tried:
            args += ["tried", "1"]
        return str(
            self._finish(
                keys=[
                    self.booking_key(clinic, booking_id),
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
        *,
        capped: SendCapped | None = None,
        note: str = "",
    ) -> str:
        """`note`: what the SMS cap did to the retry's time (`capped`), after the reason."""
        return self.finish(
            ref,
            attempt,
            "retry",
            at=retry_at,
            fields={"reason": f"retrying at {_to_the_second(utc_iso(retry_at))}: "
                              f"{reason}{note}",
                    "last_error": reason},
            entry=entry,
            capped=capped,
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
        self, ref: str, attempt: Attempt, reason: str, entry: dict[str, Any] | None = None,
        *, maybe_sent: bool = False,
    ) -> str:
        """`maybe_sent`: the last attempt's outcome is unknown (it may have reached the
        provider): its ledger stays until it expires, so a replay waits for it."""
        return self.finish(
            ref, attempt, "failed", fields={"reason": reason, "last_error": reason,
                                            **({"maybe_sent": "1"} if maybe_sent else {})},
            entry=entry)

    def finish_defer(
        self,
        ref: str,
        attempt: Attempt,
        at: datetime,
        reason: str,
        entry: dict[str, Any] | None = None,
        *,
        capped: SendCapped | None = None,
    ) -> str:
        return self.finish(ref, attempt, "defer", at=at, fields={"reason": reason}, entry=entry,
                           capped=capped)

    def finish_skip(
        self, ref: str, attempt: Attempt, reason: str, entry: dict[str, Any] | None = None,
        *, capped: SendCapped | None = None, extra: dict[str, str] | None = None,
        tried: bool = False,
    ) -> str:
        """`extra`: more fields (a retry turned into a skip keeps its `last_error`); `tried`:
        the attempt was made (a retry turned into a skip): it stays counted."""
        return self.finish(ref, attempt, "skip", fields={"reason": reason, **(extra or {})},
                           entry=entry, capped=capped, tried=tried)

    def restamp(self, ref: str, attempt: Attempt, at: datetime, capped: SendCapped) -> str:
        """Count the SMS `ref`, about to be sent by `attempt`, at `at` (see _RESTAMP): "ok",
        "caps changed" (nothing written: decide again) or "stale" (no longer its attempt)."""
        self._ready()
        clinic, booking_id, key = split_ref(ref)
        guard = json.dumps(capped.read.guard, separators=(",", ":")) if capped.read.guard \
            else ""
        return str(self._restamp(
            keys=[self.booking_key(clinic, booking_id)],
            args=[key, attempt.version, attempt.claim, attempt.token, _num(at.timestamp()),
                  guard, self.prefix, clinic, booking_id]))

    def still_owned(self, ref: str, attempt: Attempt,
                    send_to: tuple[str, str] | None = None, *, link: str | None = None) -> bool:
        """Return whether `attempt` still owns the reminder (checked just before sending)
        and its booking is still at the version the message was made from
        (`attempt.booking`), and, given `send_to` (channel, address), whether that address
        is not opted out.
        `link`: the id of the unsubscribe link the message carries to `send_to`'s address,
        noted (`remember_unsubscribe`) in the same round trip.

        An attempt that finds its address opted out (the patient's STOP or unsubscribe
        landed after its begin; the opt-out left the reminder to this attempt, see _OPT_OUT)
        sends nothing, and the caller's abandon puts the reminder back at once: the next
        begin applies the opt-out in full (_BEGIN_SEND), as if it had landed before this
        attempt: skipped with the reason, counted and told once, or, for a care-critical
        email step of a patient who allows SMS, sent by SMS. So does a booking changed
        since its message was made (a corrected address that someone else opted out).
        """
        self._ready()
        clinic, booking_id, key = split_ref(ref)
        keys = [self.booking_key(clinic, booking_id), self.optout_key(clinic)]
        # (ARGV[6..11]: what the link's note checks that the email goes, as below.)
        args: list[Any] = [key, "", "", 0, booking_id, attempt.version, attempt.claim,
                           attempt.token, attempt.booking,
                           "1" if key.startswith("cancelled#") else "",
                           "1" if is_hold_notice(key) else ""]
        if send_to is not None:
            channel, contact = send_to
            normal = normal_contact(channel, contact)
            args[1] = f"{channel}:{normal}"
            if link is not None:  # as `remember_unsubscribe`
                keys += [self.unsub_key(clinic, link), self.unsub_by_key(clinic, link)]
                args[2:4] = [f"{channel}:{normal}", max(1, math.ceil(self.retention_seconds))]
        fields, why, noted = self._still_owned(keys=keys, args=args)
        fields, why = [_str_or_none(v) for v in fields], _str_or_none(why)
        if why is not None:
            return False  # opted out since the begin: back to the begin's full rule
        main, extra, booking, version = cast(list[str | None], fields)
        r = _split(main, len(REMINDER_SLOTS))
        a = _split(extra, len(ATTEMPT_SLOTS))
        # A cancelled booking sends only the notice of its cancel (as _BEGIN_SEND).
        if (booking == Status.CANCELLED and key.startswith("cancelled#")
                and r[1] == version):
            booking = Status.SCHEDULED
        if booking == Status.HELD and is_hold_notice(key):  # its one message (as _BEGIN_SEND)
            booking = Status.SCHEDULED
        if attempt.booking and version != attempt.booking:
            # The booking changed after its words and address were read (a corrected phone
            # or email, a new name or locale): not sent; the abandon puts the reminder back
            # at once, and the next attempt reads the booking as it is now.
            return False
        owned = bool(
            (STATUS_OF.get(r[0]), r[1], a[0], a[2], booking)
            == (Status.SENDING, attempt.version, attempt.claim, attempt.token, Status.SCHEDULED)
        )
        # An email goes only with the address behind its link noted (the script's same rule):
        # never one whose link would answer 404.
        return owned and (link is None or send_to is None or noted == 1)

    def requeue(self, ref: str, at: datetime, reason: str, claim: str | None = None) -> bool:
        """Put a leased reminder back in the due set (another attempt holds the ledger).

        Only while it is still being sent (under `claim`, if given, and no attempt of that
        claim holds the ledger: another copy of its task is at work); return whether it was.
        An attempt that finished in the meantime keeps its outcome.
        """
        self._ready()
        clinic, booking_id, key = split_ref(ref)
        return bool(
            self._requeue(
                keys=[self.booking_key(clinic, booking_id), self.lease_key, self.due_key,
                      self.ledger_key(ref)],
                args=[ref, key, _num(at.timestamp()), claim or "", reason],
            )
        )

    def requeue_in(self, pipe: Any, claims: Sequence[tuple[str, str]], at: datetime,
                   reason: str) -> None:
        """Add a `requeue` of each (ref, claim) to `pipe` (a pipeline, transaction=False),
        each fenced by its claim as ever: many hand-backs, and other commands, in one round
        trip. `pipe.execute(raise_on_error=False)` answers each in order: 1 (handed back),
        0 (not: finished, cancelled, begun or claimed again meanwhile) or the error it met;
        Redis unreachable past the client's retries raises, as any command would."""
        self._ready()
        for ref, claim in claims:
            clinic, booking_id, key = split_ref(ref)
            self._requeue(
                keys=[self.booking_key(clinic, booking_id), self.lease_key, self.due_key,
                      self.ledger_key(ref)],
                args=[ref, key, _num(at.timestamp()), claim, reason], client=pipe)

    def plan_dates(self, clinic: str, booking_id: str,
                   silent: frozenset[str] = frozenset()) -> dict[str, datetime]:
        """Return each step's first due instant among reminders still to be (or already) sent.

        `silent`: channels the patient opted out of: their reminders not sent yet do not
        count (their begin skips them), so a step going only by those is not named."""
        self._ready()
        bkey = self.booking_key(clinic, booking_id)
        begun = getattr(self._local, "fields", None)  # see `reading`
        if begun is not None and begun[0] == bkey:
            stored = begun[1]
        else:
            stored = _str_hash(self.redis.hgetall(bkey))
        dates: dict[str, datetime] = {}
        for key, value in stored.items():
            if not is_reminder_field(key):
                continue
            r = _split(value, len(REMINDER_SLOTS))
            # The planned time, not the current one: a retry must not shift the dates shown.
            status = STATUS_OF.get(r[0])
            if r[2] and status not in (Status.SKIPPED, Status.CANCELLED) and not (
                    status != Status.SENT and key_parts(key)[1] in silent):
                step = key_parts(key)[0]
                when = datetime.fromtimestamp(float(r[2]), UTC)
                dates[step] = min(when, dates.get(step, when))
        return dates

    def invite_sequence(self, clinic: str, booking_id: str, base: int, content: str) -> int:
        """Return the SEQUENCE a calendar invite of the booking goes with, and note it (one
        round trip, atomic; worker/invites.py): `base` the sequence it was built at (the
        booking's `seq`, or a change notice's own), `content` its `content_key`. The same
        event as the last invite made for the booking: that one's sequence, so a calendar
        sees nothing new; another event (a new treatment's title or visit length, a move, a
        cancel, an edited address): one above it, so every calendar applies the update
        (RFC 5546). Noted before the hand-over: an invite made and never delivered only
        leaves a gap, which calendars accept."""
        self._ready()
        return int(self._invite_seq(keys=[self.booking_key(clinic, booking_id)],
                                    args=[base, content]))

    def repause_due(self, clinic: str, booking_id: str, seq: int) -> datetime | None:
        """Return when the pause message again of the change `seq` (`repause#<seq>:*`) goes or
        went, the earliest of its channels (None: there is none, or none goes): its stored
        time, where the plan and the SMS cap put it. From the hash the begin read, as
        `plan_dates` (see `reading`)."""
        self._ready()
        bkey = self.booking_key(clinic, booking_id)
        begun = getattr(self._local, "fields", None)
        if begun is not None and begun[0] == bkey:
            stored = begun[1]
        else:
            stored = _str_hash(self.redis.hgetall(bkey))
        head = f"{REPAUSE_STEP}#{seq}:"
        found: list[datetime] = []
        for key, value in stored.items():
            if not key.startswith(head) or not is_reminder_field(key):
                continue
            r = _split(value, len(REMINDER_SLOTS))
            if STATUS_OF.get(r[0]) in PENDING | {Status.SENT} and (r[3] or r[2]):
                found.append(datetime.fromtimestamp(float(r[3] or r[2]), UTC))
        if not found:
            # None: the pause message was being sent, not sent, when the change was written
            # (`_repauses` wants it sent): the plan's own pause reminder, rescheduled to the
            # new plan's time (the SMS cap applied), carries it again while still to go.
            pause = self.pause_step(stored.get("ns", ""))
            for key, value in stored.items():
                if pause is None or not key.startswith(f"{pause}:") \
                        or not is_reminder_field(key):
                    continue
                r = _split(value, len(REMINDER_SLOTS))
                if STATUS_OF.get(r[0]) in PENDING and (r[3] or r[2]):
                    found.append(datetime.fromtimestamp(float(r[3] or r[2]), UTC))
        return min(found) if found else None

    def attempts(self, ref: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.redis.lrange(self.attempts_key(ref), 0, -1)]
        for line in lines:
            line.pop("tok", None)
        return lines

    # --- dead letters ----------------------------------------------------------------

    def dead_letters(self, clinic: str | None = None) -> list[dict[str, Any]]:
        """Return every dead-lettered reminder (optionally one clinic's), oldest first."""
        self._ready()
        out = []
        # (member, score) pairs, the members str (decode_responses=True; see _str_hash).
        dead = cast(
            list[tuple[str, float]], self.redis.zrange(self.dead_key, 0, -1, withscores=True)
        )
        for ref, score in dead:
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
                    "attempts": attempts_made(rec),
                    "failed_at": _iso(score),
                    "reason": rec.get("reason"),
                    # An email step its attempt took by SMS (flag "s"): the SMS gateway's.
                    **({"via": "sms"} if rec.get("by_sms") == "1" else {}),
                }
            )
        return out

    def _revive_all(self, refs: Iterable[str], now: datetime, mode: str) -> list[str]:
        self._ready()
        done = []
        for ref in refs:
            clinic, booking_id, key = split_ref(ref)
            if self._revive(
                keys=[self.booking_key(clinic, booking_id), self.dead_key, self.due_key],
                args=[ref, key, mode, utc_iso(now) or "", self.retention_seconds, self.prefix,
                      clinic, booking_id],
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

    def stats(self) -> dict[str, Any]:
        """Return how much is kept: bookings per clinic, reminders by place, keys by kind."""
        self._ready()
        now = redis_time(self.redis)  # Redis's clock: the one that expires the keys
        clinics: dict[str, int] = {}
        # Reads only (a read-only replica answers it): members whose keys have expired are
        # not counted; writing a booking of the clinic drops them (`list_booking`).
        for key in self.redis.scan_iter(match=f"{self.prefix}:bookings:*", count=1000):
            clinic = key.rsplit(":", 1)[1]
            clinics[clinic] = int(self.redis.zcount(key, now, "+inf"))
        reminders = 0
        pipe = self.redis.pipeline(transaction=False)
        for key in self.redis.scan_iter(match=f"{self.prefix}:b:*", count=1000):
            pipe.hkeys(key)
            if len(pipe) >= 1000:
                reminders += sum(_count_reminders(k) for k in pipe.execute())
        reminders += sum(_count_reminders(k) for k in pipe.execute())
        counts = {"a": 0, "ledger": 0}
        for kind in counts:
            for _ in self.redis.scan_iter(match=f"{self.prefix}:{kind}:*", count=1000):
                counts[kind] += 1
        return {
            "retention_days": self.retention_seconds / 86400,
            "bookings": dict(sorted(clinics.items())),
            "bookings_total": sum(clinics.values()),
            "reminders_kept": reminders,
            "attempt_logs": counts["a"],
            "ledger_entries": counts["ledger"],
            "due": int(self.redis.zcard(self.due_key)),
            "leased": int(self.redis.zcard(self.lease_key)),
            "dead_letters": int(self.redis.zcard(self.dead_key)),
        }

    # --- patients' controls: opt-outs, replies (worker/optout.py, worker/api/inbound.py) ---

    def contact_bookings(self, clinic: str, channel: str, contact: str) -> list[str]:
        """Return the ids of the clinic's bookings whose patient has this address (the
        contact index: `bookings_for_contact`)."""
        if channel == "email":
            return self.bookings_for_contact(clinic, email=contact)
        return self.bookings_for_contact(clinic, phone=contact)

    def opt_out(self, clinic: str, channel: str, contact: str, why: str,
                *, critical: str = "",
                replan: Callable[[str, datetime], tuple[Booking, Plan]] | None = None,
                ) -> OptOut:
        """Opt `contact` out of `channel` at `clinic` now, in one atomic step (see _OPT_OUT);
        return (reminders skipped, booking ids whose reminders were skipped), whose `first`
        says whether this call opted the address out (False: it already was).

        `why` is the reason's text after "opted_out: " (the patient's words and when).
        `critical`: the care-critical steps ("<treatment>/<step>" ...) whose emails go by SMS.
        `replan` (an email address; `Catalog.replan`): then the patient's bookings at the
        clinic are capped again, as re-submitted now (`recap`; after a visit, its steps
        still ahead).
        """
        self._ready()
        contact = normal_contact(channel, contact)
        for _ in range(_NORMS_TRIES):  # again only if a booking's addresses changed
            bookings = self.contact_bookings(clinic, channel, contact)
            pipe = self.redis.pipeline(transaction=False)
            for booking_id in bookings:
                pipe.get(self.doc_key(clinic, booking_id))
            norms = _contact_norms(cast(list[str | None], pipe.execute()))
            reply = self._opt_out(
                keys=[self.optout_key(clinic), self.due_key, self.lease_key,
                      self.consent_key(clinic)],
                args=[self.prefix, clinic, channel, contact, why, "out", self._hooks(clinic),
                      critical, self.consent_field(channel, contact), norms, *bookings],
            )
            if int(reply[0]) != -1:
                break
        else:
            raise RuntimeError(f"opt-out at {clinic}: the bookings' addresses kept changing")
        if channel == "email" and replan is not None:
            self.recap(clinic, contact, replan)
        return OptOut(int(reply[1]), [str(b) for b in reply[2:]], first=bool(int(reply[0])))

    def recap(self, clinic: str, email: str,
              replan: Callable[[str, datetime], tuple[Booking, Plan]],
              now: datetime | None = None) -> list[str]:
        """Cap again the SMS of the patient of `email` at `clinic` (unsubscribed from it
        now): each of their bookings still scheduled (those with this address and those with
        one of those bookings' phones), in the order they were first written, is written
        again as a re-submission of its stored document at `now` writes it (`replan` plans
        it: `Catalog.replan`). So an SMS that the cap sent by email instead goes by SMS on a
        day with room or says why not (the email stays skipped for the unsubscribe, saying
        so, worker/reconcile.py `reconcile_one`; a care-critical step's, left to go by SMS,
        is cancelled as no longer in the plan once the patient unsubscribed, `_Recap`), and
        the SMS of a day that a care-critical email going by SMS takes give way to it, as a
        re-submission of the booking would have them. Return the ids of the bookings it
        changed.

        A booking whose visit has begun (nearly every aftercare step comes after it; the
        clinic's re-submission is refused then, as past) is planned as re-submitted just
        before its start, and of that plan only its steps still ahead are written: each step
        (an occurrence, on any channel) whose planned time has passed stays as stored (sent,
        failed, skipped, at work, or still to go), is never sent late on another channel,
        and counts for the cap where it is stored (`_Recap`); the booking's flag of a
        booking too late for the retinoid pause stays as stored too. But a step whose email
        went to its provider and was then skipped for the unsubscribe (at work when the
        patient unsubscribed, not delivered) is under way, not passed: it goes by SMS.

        Each write is fenced by the document it planned: a change of the clinic landing
        after the read (a move, a cancel) is never undone; the booking is read again and
        its new document planned, or left alone if it is no longer scheduled. An attempt at
        work when it lands is left to it, as a re-submission leaves it (worker/reconcile.py):
        never sent twice. A held booking is left to its release, which caps it. A booking
        the configuration no longer takes (`replan` raises) is left as it is."""
        now = now or datetime.now(UTC)
        ids = self.contact_bookings(clinic, "email", normal_contact("email", email))
        pipe = self.redis.pipeline(transaction=False)
        for booking_id in ids:
            pipe.get(self.doc_key(clinic, booking_id))
        phones = {cast(str, json.loads(doc)["patient"].get("phone") or "")
                  for doc in pipe.execute() if doc is not None}
        for phone in sorted(p for p in phones if p):
            ids += self.contact_bookings(clinic, "phone", phone)
        ids = list(dict.fromkeys(ids))
        pipe = self.redis.pipeline(transaction=False)
        for booking_id in ids:
            pipe.hmget(self.booking_key(clinic, booking_id), ["created_at", "status"])
        order = sorted((str(created or ""), booking_id) for booking_id, (created, status)
                       in zip(ids, pipe.execute(), strict=True)
                       if status == Status.SCHEDULED)
        changed: list[str] = []
        for _, booking_id in order:
            for _ in range(_NORMS_TRIES):  # again only if the clinic changed it meanwhile
                status = self.redis.hget(self.booking_key(clinic, booking_id), "status")
                doc = cast(str | None, self.redis.get(self.doc_key(clinic, booking_id)))
                if status != Status.SCHEDULED or doc is None:
                    break
                # After the visit: as re-submitted just before it, its steps ahead alone.
                start = datetime.fromisoformat(json.loads(doc)["starts_at"])
                after = now if start <= now else None
                try:
                    booking, planned = replan(doc, start - _JUST_BEFORE if after else now)
                except (BookingRejected, KeyError):
                    break  # as stored: the clinic's next submission is checked against it
                before: list[str | None] = [None]
                try:
                    timeline = _Recap(self, doc, after).upsert_many([(booking, planned)], now,
                                                                     previous=before,
                                                                     timelines=False)[0]
                except _Changed:
                    continue
                if str(timeline["version"]) != before[0]:
                    changed.append(booking_id)
                break
        return changed

    def opt_in(self, clinic: str, channel: str, contact: str, *,
               caps: SmsSettings | None = None, why: str = "", critical: str = "") -> OptIn:
        """Remove the opt-out of `contact` from `channel` at `clinic`, and put back into the
        schedule, at their planned time, its reminders of that channel that the opt-out
        skipped and whose time is still ahead (`_resumable`): true if it was opted out.

        Those whose time passed while the patient was opted out are not sent late (but a
        change notice not yet expired goes now: `_resumable`). An SMS
        resumes only where the clinic's SMS cap (`caps`) has room, counting the patient's
        SMS in all their bookings at the clinic (a booking stored meanwhile may have taken
        the day: then it stays skipped, its reason saying so). A care-critical SMS
        (`critical`, the steps as `opt_out` takes them) is never dropped by the cap, as when
        planned (`cap_sms`): counted first; one with no room goes by email for a patient
        who takes email and has not unsubscribed from it, else beyond the cap, saying so.
        Atomic with what was read (see _OPT_OUT).
        `why`: the patient's request and when (the resumed reminders' reason).
        """
        self._ready()
        contact = normal_contact(channel, contact)
        reason = f"opted in again: {why}" if why else "opted in again"
        kind = "email" if channel == "email" else "phone"
        index_keys = [self.contact_key(clinic, kind, contact),
                      f"{self.prefix}:c:{clinic}/{legacy_contact_id(kind, contact)}"]
        # Opted in first, then what to put back is read and decided: a STOP arriving
        # meanwhile holds (the write puts nothing back once the number is opted out again).
        was = bool(int(self._opt_out(
            keys=[self.optout_key(clinic), self.due_key, self.lease_key,
                  self.consent_key(clinic)],
            args=[self.prefix, clinic, channel, contact, reason, "optin", "", "",
                  self.consent_field(channel, contact)])[0]))
        for _ in range(_NORMS_TRIES):  # again only if a booking changed meanwhile
            now = time.time()
            bookings = self.contact_bookings(clinic, channel, contact)
            pipe = self.redis.pipeline(transaction=False)
            for booking_id in bookings:
                pipe.hgetall(self.booking_key(clinic, booking_id))
                pipe.get(self.doc_key(clinic, booking_id))
            replies = pipe.execute()
            read: list[list[Any]] = []
            unflag: list[list[str]] = []  # (booking, email key) no longer going by SMS
            taken: list[float] = []  # the patient's SMS at the clinic (sent or to go)
            candidates: list[tuple[bool, float, str, str, ZoneInfo, bool, bool]] = []
            held: dict[str, bool] = {}
            for booking_id, raw, doc in zip(bookings, replies[0::2], replies[1::2],
                                            strict=True):
                fields = _str_hash(raw)
                if not fields:
                    continue
                read.append([booking_id, [x for kv in fields.items() for x in kv]])
                held[booking_id] = fields.get("status") == Status.HELD
                if channel == "email" and doc is not None and normal_contact(
                        "email", json.loads(doc)["patient"].get("email") or "") == contact:
                    # Its emails still to go that an attempt took by SMS (flag "s") go by
                    # email now: no longer SMS for the cap (as their begin would say).
                    unflag += [[booking_id, k] for k, v in fields.items()
                               if is_reminder_field(k) and k.endswith(":email")
                               and "s" in _split(v, len(REMINDER_SLOTS))[7].split("#", 1)[0]
                               and STATUS_OF.get(_split(v, len(REMINDER_SLOTS))[0])
                               in (Status.SCHEDULED, Status.RETRYING)]
                taken += [float(when) for when in _sms_slots(fields)]
                ns = fields.get("ns", "")  # the pause step, for a repause's protection
                pause = parse_notice_steps(self._resolve([ns]).get(ns, ""))[0] if ns and any(
                    k.startswith(REPAUSE_STEP) for k in fields) else None
                found = _resumable(fields, cast(str | None, doc), channel, contact, now,
                                   critical, pause)
                if any(email for *_, email in found) and self.opted_out(
                        clinic, "email", json.loads(cast(str, doc))["patient"]["email"]):
                    # By email only to a patient who has not unsubscribed from it (read
                    # unfenced, as at send time): else that email is skipped at its begin.
                    found = [(due, key, tz, care, False) for due, key, tz, care, _ in found]
                # Care-critical ones first, at their time: the others give way (`cap_sms`).
                candidates += [(not care, due, booking_id, key, tz, care, email)
                               for due, key, tz, care, email in found]
            resume: list[list[Any]] = []
            for _, due, booking_id, key, tz, care, email in sorted(candidates):
                if held.get(booking_id):  # out of the schedule until the clinic's release
                    resume.append([booking_id, key, ""])
                    continue
                notice = key.split(":", 1)[0].split("#", 1)[0] in NOTICE_STEPS
                if channel == "sms" and caps is not None and not notice:  # (never capped)
                    counts: dict[int, int] = {}
                    for when in taken:
                        day = datetime.fromtimestamp(when, tz).toordinal()
                        counts[day] = counts.get(day, 0) + 1
                    day = datetime.fromtimestamp(due, tz).toordinal()
                    if not sms_fits(counts, day, caps.max_per_day, caps.max_per_week):
                        over = (f"{cap_words(caps)} is reached on "
                                f"{datetime.fromtimestamp(due, tz).date().isoformat()}")
                        if care and email:  # by email instead, as when planned
                            resume.append([booking_id, key, "@",
                                           f"{reason}; not resumed by SMS: {over}",
                                           key[: -len("sms")] + "email",
                                f"{reason}; by email: {over} (care-critical)", _num(due)])
                            continue
                        if not care:  # the day is taken: it stays skipped, saying so
                            resume.append([booking_id, key, "-",
                                           f"{reason}; not resumed: {over}"])
                            continue
                        taken.append(due)
                        resume.append([booking_id, key, _num(due), (
                            f"{reason}; sent although {over}: care-critical, and the "
                            f"patient takes no email")])
                        continue
                    taken.append(due)
                resume.append([booking_id, key, _num(due)])
            reply = self._opt_out(
                keys=[self.optout_key(clinic), self.due_key, self.lease_key],
                args=[self.prefix, clinic, channel, contact, reason, "in", "", "",
                      json.dumps(read, separators=(",", ":")),
                      json.dumps(resume, separators=(",", ":")),
                      json.dumps([index_keys, f"({now!r}", bookings],
                                 separators=(",", ":")),
                      json.dumps(unflag, separators=(",", ":"))],
            )
            if int(reply[0]) != -1:
                return OptIn(was, int(reply[1]))
        # The patient's bookings kept changing under every read: opted in all the same (the
        # patient asked), nothing put back; a change of a booking plans its SMS again.
        return OptIn(was, 0)

    def pause_step(self, ns: str) -> str | None:
        """The pause step id of a booking's stored plan (its "ns" text id; None: none), as
        the scripts' `is_critical` reads it for a repause."""
        return parse_notice_steps(self._resolve([ns]).get(ns, ""))[0] if ns else None

    def opted_out(self, clinic: str, channel: str, contact: str) -> str | None:
        """Return why `contact` is opted out of `channel` at `clinic`, or None."""
        field = f"{channel}:{normal_contact(channel, contact)}"
        return cast(str | None, self.redis.hget(self.optout_key(clinic), field))

    def first_in(self, what: str, seconds: int) -> bool:
        """Return True the first time `what` is asked within `seconds` (SET NX EX)."""
        return bool(self.redis.set(f"{self.prefix}:once:{what}", "1", nx=True, ex=seconds))

    def inbound_key(self, clinic: str, sid: str) -> str:
        return f"{self.prefix}:inbound:{clinic}/{sid}"

    # The latest texts of one number whose MessageSids are kept with no expiry (`took_inbound`).
    CONSENT_SIDS_MAX = 100

    def consent_sids_key(self, clinic: str, phone: str) -> str:
        """ZSET MessageSid -> when acted on: the number's STOP, START, confirm and reschedule
        texts at `clinic` (named by its contact id: no phone number in a key name)."""
        return (f"{self.prefix}:insid:{clinic}/"
                f"{self.contact_id('phone', normal_contact('sms', phone))}")

    def inbound_taken(self, clinic: str, sid: str, number: str | None = None) -> bool:
        """Whether the inbound text `sid` (its provider's MessageSid) was acted on before;
        `number`: the sender of a text kept with no expiry, whose record is read too."""
        if number is None:
            return bool(self.redis.exists(self.inbound_key(clinic, sid)))
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.inbound_key(clinic, sid))
        pipe.zscore(self.consent_sids_key(clinic, number), sid)
        taken, score = pipe.execute()
        return bool(taken) or score is not None

    def took_inbound(self, clinic: str, sid: str, number: str | None = None) -> None:
        """Note the inbound text `sid` as acted on: for `retention`, or, with `number` (its
        sender: a STOP, START, confirm or reschedule, which acts on what it finds when it
        comes), with no expiry, as long as the opt-out it could undo is kept: in the
        number's record of its last CONSENT_SIDS_MAX such texts (an old START sent again
        after the patient's later STOP must never opt them in, an old confirm never confirm
        a later visit)."""
        if number is None:
            self.redis.set(self.inbound_key(clinic, sid), "1",
                           ex=max(1, math.ceil(self.retention_seconds)))
            return
        key = self.consent_sids_key(clinic, number)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(key, {sid: time.time()})
        pipe.zremrangebyrank(key, 0, -self.CONSENT_SIDS_MAX - 1)
        pipe.execute()

    def unsub_key(self, clinic: str, token_id: str) -> str:
        return f"{self.prefix}:unsub:{clinic}/{token_id}"

    def unsub_by_key(self, clinic: str, token_id: str) -> str:
        return f"{self.prefix}:unsub-by:{clinic}/{token_id}"

    def remember_unsubscribe(self, clinic: str, token_id: str, channel: str, contact: str) -> None:
        """Note which address an unsubscribe link's id stands for (read by the route), for
        `retention` after this send: one key per address, so a patient no longer written to
        is forgotten on time however long the clinic keeps writing to others."""
        self.redis.set(self.unsub_key(clinic, token_id),
                       f"{channel}:{normal_contact(channel, contact)}",
                       ex=max(1, math.ceil(self.retention_seconds)))

    def unsubscribe_address(self, clinic: str, token_id: str) -> tuple[str, str] | None:
        """Return (channel, address) an unsubscribe link's id stands for, or None."""
        value = cast(str | None, self.redis.get(self.unsub_key(clinic, token_id)))
        if value is None:
            return None
        channel, _, contact = value.partition(":")
        return channel, contact

    def note_reply(self, clinic: str, booking_id: str, field: str, when: datetime,
                   reply: str, *, starts_at: str | None = None) -> bool:
        """Record a patient's reply on a booking (`field`: `confirmed_at`, `call_requested_at`,
        or "" for none) and
        tell the clinic (`patient.replied`, and for a call request the clinic's email), in
        one step; return False if the booking is gone, or is cancelled and `field` is
        `confirmed_at` (a cancelled visit is not confirmed).

        `starts_at`: the visit's start as the reply read it (a confirmation names its date):
        the field is set only while the booking still starts then (a move landing since is
        not confirmed); the clinic is told of the reply either way."""
        self._ready()
        bkey = self.booking_key(clinic, booking_id)
        dkey = self.doc_key(clinic, booking_id)
        hooks = self._hooks(clinic).split()
        from .webhooks import Events

        events = Events(self.redis, self.prefix)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # Watched: a write of the booking between this read and the reply's
                    # own (a move) makes it read again.
                    pipe.watch(bkey, dkey)  # type: ignore[no-untyped-call]  # redis-py stubs
                    doc = cast(str | None, pipe.get(dkey))
                    if doc is None or not pipe.exists(bkey):
                        return False
                    booking = json.loads(doc)
                    version = int(cast(str, pipe.hget(bkey, "version")) or 0)
                    # Cancelled since the reply read its visit: nothing to confirm.
                    live = not (field == "confirmed_at"
                                and pipe.hget(bkey, "status") == Status.CANCELLED)
                    pipe.multi()
                    if field and live and (starts_at is None or datetime.fromisoformat(
                            booking["starts_at"]) == datetime.fromisoformat(starts_at)):
                        pipe.hset(bkey, field, _num(when.timestamp()))
                    fields = {"booking_id": booking_id, "version": version, "reply": reply,
                              "received_at": when.timestamp()}
                    if "patient.replied" in hooks:
                        events.emit(clinic, "webhook", "patient.replied", fields, pipe=pipe)
                    if reply == "reschedule" and "alert" in hooks:
                        starts = datetime.fromisoformat(booking["starts_at"]).timestamp()
                        events.emit(clinic, "alert", "patient.replied",
                                    fields | {"treatment": booking.get("treatment", ""),
                                              "starts_at": starts}, pipe=pipe)
                    pipe.execute()
                    return live
                except redis.WatchError:
                    continue

    # --- read-only: the clinic's booking list, for the HTTP API (worker/api/bookings.py) ----
    # Added for GET /v1/bookings; reads only, layout knowledge kept here with the rest.

    def booking_ids(self, clinic: str) -> list[str]:
        """Return the clinic's booking ids whose keys have not expired, sorted."""
        ids = self.redis.zrangebyscore(self.bookings_key(clinic), time.time(), "+inf")
        return sorted(cast(list[str], ids))

    @property
    def contact_secret(self) -> bytes:
        """The key of contact ids: the server secret "contact" in Redis (made once)."""
        if self._contact_secret is None:
            from .secrets import server_secret

            self._contact_secret = server_secret(self.redis, self.prefix, CONTACT_SECRET)
        return self._contact_secret

    def contact_id(self, kind: str, value: str) -> str:
        """`contact_id` keyed with this store's secret (memoised: an upsert computes a
        patient's ids for the SMS cap's read and for the booking)."""
        found = self._contact_ids.get((kind, value))
        if found is None:
            if len(self._contact_ids) >= 32768:  # two or three a booking of a store batch
                self._contact_ids.clear()
            found = self._contact_ids[(kind, value)] = contact_id(kind, value,
                                                                  self.contact_secret)
        return found

    def _booking_contacts(self, booking: Booking) -> str:
        """`booking_contacts` with this store's secret, through the memo of `contact_id`."""
        patient = booking.patient
        phone, email = patient.phone, patient.email
        known = self._contact_ids
        if not email:
            return (known.get(("phone", phone)) or self.contact_id("phone", phone)
                    ) if phone else ""
        mail = known.get(("email", email)) or self.contact_id("email", email)
        if not phone:
            return mail
        return f"{known.get(('phone', phone)) or self.contact_id('phone', phone)} {mail}"

    def _medications_digest(self, booking: Booking) -> str:
        """`medications_digest` of the booking's medications (memoised: a few dozen
        combinations)."""
        medications = booking.medications
        key = tuple(medications.__dict__.values())
        found = self._digests.get(key)
        if found is None:
            if len(self._digests) >= 4096:
                self._digests.clear()
            found = self._digests[key] = medications_digest(medications.model_dump_json())
        return found

    def contact_key(self, clinic: str, kind: str, value: str) -> str:
        return f"{self.prefix}:c:{clinic}/{self.contact_id(kind, value)}"

    def bookings_for_contact(
        self, clinic: str, *, phone: str | None = None, email: str | None = None
    ) -> list[str]:
        """Return the ids of the clinic's stored bookings (any status, until their keys
        expire) whose patient has this phone (E.164) or this email (any case), sorted.

        Read from the contact index, which the same atomic steps that write a booking keep
        up to date (see the module docstring). Give one contact or both (the union).
        """
        self._ready()
        given = [(kind, value) for kind, value in (("phone", phone), ("email", email)) if value]
        if not given:
            raise ValueError("bookings_for_contact needs a phone or an email")
        # Bookings stored before contact ids were keyed are still in the sets of their
        # unkeyed ids until they are stored again (the apply moves them) or expire.
        keys = [key for kind, value in given
                for key in (self.contact_key(clinic, kind, value),
                            f"{self.prefix}:c:{clinic}/{legacy_contact_id(kind, value)}")]
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zrangebyscore(key, f"({now}", "+inf")
        return sorted({b for ids in pipe.execute() for b in cast(list[str], ids)})

    def bookings_exist(self, clinic: str, booking_ids: list[str]) -> list[bool]:
        """Whether each booking is stored (its status and document), as `booking_summaries`
        would give it (not None), without reading the documents."""
        self._ready()
        pipe = self.redis.pipeline(transaction=False)
        for booking_id in booking_ids:
            pipe.hexists(self.booking_key(clinic, booking_id), "status")
            pipe.exists(self.doc_key(clinic, booking_id))
        replies = pipe.execute()
        return [bool(status) and bool(doc) for status, doc in zip(replies[0::2], replies[1::2],
                                                                  strict=True)]

    def booking_summaries(
        self, clinic: str, booking_ids: list[str]
    ) -> list[dict[str, Any] | None]:
        """Return each booking's id, stored status, version, hold reason, update time,
        treatment and start (no patient data); None for one that is gone."""
        self._ready()
        pipe = self.redis.pipeline(transaction=False)
        for booking_id in booking_ids:
            pipe.hmget(self.booking_key(clinic, booking_id),
                       "status", "version", "hold_reason", "updated_at")
            pipe.get(self.doc_key(clinic, booking_id))
        replies = pipe.execute()
        out: list[dict[str, Any] | None] = []
        for booking_id, (status, version, hold, updated), doc in zip(
            booking_ids, replies[0::2], replies[1::2], strict=True
        ):
            if status is None or doc is None:
                out.append(None)
                continue
            booking = json.loads(doc)
            out.append({"booking_id": booking_id, "status": status, "version": int(version or 0),
                        "treatment": booking.get("treatment"),
                        "starts_at": booking.get("starts_at"),
                        "hold_reason": hold or None, "updated_at": updated or None})
        return out


def _sms_times(fields: Mapping[str, str]) -> list[datetime]:
    """When a stored booking's SMS go or went: sent ones, and those still to go unless the
    booking is held (a hold sends nothing until the clinic's review, whose release caps its
    plan again), but for the store's own (`is_notice`: a notice, a message again for a new
    date), which the release puts back as they are, and its hold notice, which goes while it
    is held; its emails that went or go by SMS (flag "s") count as SMS."""
    return [datetime.fromtimestamp(float(when), UTC) for when in _sms_slots(fields)]


def _sms_reason_ids(fields: Mapping[str, str]) -> list[str]:
    """The text ids of the reasons of a stored booking's SMS."""
    out = []
    for key, value in fields.items():
        if key.endswith(":sms") and is_reminder_field(key):
            reason = _split(value, len(REMINDER_SLOTS))[8]
            if reason[:1] == "@":
                out.append(reason[1:])
    return out


def _beyond_cap(fields: Mapping[str, str], texts: Mapping[str, str]) -> list[datetime]:
    """Those of `_sms_times(fields)` that went beyond the SMS cap: care-critical SMS whose
    reason says so (`BEYOND_CAP`)."""
    keys = [key for key, value in fields.items()
            if key.endswith(":sms") and is_reminder_field(key)
            and BEYOND_CAP in _text(_split(value, len(REMINDER_SLOTS))[8], texts)]
    if not keys:
        return []
    own = {"status": fields.get("status", "")}
    for key in keys:
        own[key] = fields[key]
        if key + "+" in fields:
            own[key + "+"] = fields[key + "+"]
    return _sms_times(own)


def _sms_slots(
    fields: Mapping[str, str], skip: str = "", pending: Callable[[str], bool] | None = None,
) -> list[str]:
    """`_sms_times` as stored (epoch seconds as written), leaving out the reminder `skip`
    (and, given `pending`, those still to go whose key it refuses).
    The finish script's `sms_slots` reads the same from the same hash (`SendCapsRead`)."""
    held = fields.get("status") == Status.HELD
    out = []
    for key, value in fields.items():
        if not is_reminder_field(key) or key == skip:
            continue
        r = _split(value, len(REMINDER_SLOTS))
        # An SMS; or an email that went by SMS (flag "s": the patient unsubscribed from email).
        if not (key.endswith(":sms")
                or (key.endswith(":email") and "s" in r[7].split("#", 1)[0])):
            continue
        status = STATUS_OF.get(r[0])
        if status == Status.SENT:
            a = _split(fields.get(key + "+"), len(ATTEMPT_SLOTS))
            when = a[3] or r[3] or r[2]
        elif status in PENDING and (not held or is_notice(key) or is_hold_notice(key)) and (
                pending is None or pending(key)):
            when = r[3] or r[2]
        else:
            continue
        if when:
            out.append(when)
    return out


def _count_reminders(fields: list[str]) -> int:
    return sum(1 for f in fields if is_reminder_field(f))


def _stored_instant(value: str) -> str:
    """An ISO 8601 instant as stored (epoch seconds); '' stays ''."""
    if not value:
        return ""
    return _num(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


@dataclass(frozen=True)
class Attempt:
    """One attempt at a claimed reminder: the fence it must pass to change anything."""

    version: str
    claim: str
    token: str
    # What it sends (read after begin): the planned time and template its words are for.
    planned: str = ""
    template: str = ""
    # The booking's version its words and address were read from (after begin): a change
    # of the booking alone (a corrected phone or email, a new name) leaves the reminder's
    # own version as it was, and the fence before the hand-over must still see it.
    booking: str = ""


def attempt_token(claim: str) -> str:
    """Return a new attempt's token: unique, led by its claim ("<claim>.<hex>"), so that a
    begin finding the ledger held can tell an attempt of its own claim (a second copy of the
    same task) from one of an earlier claim whose lease ran out (_BEGIN_SEND)."""
    return f"{claim}.{uuid.uuid4().hex}"


def repause_fields(
    plan: Plan, stored: Mapping[str, Mapping[str, str]], seq: int, version: int, now: datetime,
    same_day: bool = False,
) -> list[tuple[str, dict[str, str]]]:
    """Return the pause message again for the new date, per channel it had been sent on
    (`repause#<seq>:<channel>`; worker/notices.py): the plan's own reminder of the pause step
    is history once sent, so the reconcile never sends it again. `same_day`: the change is
    a move keeping the visit on the patient-local day told (`_same_day`, `_repauses`)."""
    pause, _ = parse_notice_steps(plan.notice_steps)
    out = []
    for r in plan.reminders:
        if not _repauses(r, pause, stored, now, same_day):
            continue
        out.append((f"{REPAUSE_STEP}#{seq}:{r.channel}", _again_record(
            r, REPAUSE_STEP, seq, version,
            f"the appointment moved after it had gone out: again for the new date ({r.reason})")))
    return out


def _again_record(r: PlannedReminder, step: str, occurrence: int, version: int,
                  reason: str) -> dict[str, str]:
    """The stored record of `r` sent again for a new date as `step` (a repause, an again)."""
    due = repr(r.due_at.timestamp())
    return {
        "step": step, "channel": r.channel, "template": r.template,
        "occurrence": str(occurrence), "planned_epoch": due, "due_epoch": due,
        "status": Status.SCHEDULED, "version": str(version), "reason": reason,
        "at_booking": "0", "attempts": "0",
        "expires_epoch": repr(r.expires_at.timestamp()) if r.expires_at else "",
        "expires_note": r.expires_note,
    }


def _late_pause(plan: Plan, booking: Booking,
                stored: Mapping[str, Mapping[str, str]]) -> str | None:
    """`plan.late_pause`, unless the pause message already went out early enough.

    The plan alone knows no history: once the pause step's time has passed it plans the step
    late ("now") and finds the pause too short, so the same booking sent again two days
    before its visit (a clinic's daily sync) told the clinic to call a patient who had
    paused for a week. When the plan's pause goes only late (or not at all), the pause is
    in force since the pause message (or its repause) went out: counted from the earliest
    delivery after the last notice that may have let the patient use the product again (a
    cancel notice; a move's notice that announced a repause: "you may use it until ...").
    A pause still ahead in the plan is the one the patient keeps: the plan decides."""
    if not plan.late_pause or not plan.pause_rule:
        return plan.late_pause
    pause, days = plan.pause_rule
    if any(r.step == pause and r.status == Status.SCHEDULED and _LATE not in r.reason
           for r in plan.reminders):
        return plan.late_pause
    # One being sent may be on the patient's phone already: it ends any pause told before.
    resumed = max((_epoch_of(r["sent_at"]) if r.get("sent_at") else math.inf
                   for k, r in stored.items() if went_out(r) and (
        k.startswith("cancelled#") or (k.startswith("rescheduled#") and any(
            o.startswith(f"{REPAUSE_STEP}#{k.split('#', 1)[1].split(':', 1)[0]}:")
            for o in stored)))), default=0.0)
    paused = [at for k, r in stored.items()
              if r.get("status") == Status.SENT and base_step(key_parts(k)[0], pause) == pause
              and (at := _epoch_of(r.get("sent_at", ""))) > resumed]
    if not paused:
        return plan.late_pause
    tz = ZoneInfo(booking.patient.timezone)
    began = datetime.fromtimestamp(min(paused), UTC).astimezone(tz).date()
    if (booking.starts_at.astimezone(tz).date() - began).days >= days:
        return None
    return plan.late_pause


def _epoch_of(iso: str) -> float:
    """Epoch seconds of a stored record's ISO 8601 instant (`sent_at`); 0 for none."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else 0.0


def again_fields(
    plan: Plan, stored: Mapping[str, Mapping[str, str]], start: datetime, seq: int,
    version: int, now: datetime,
) -> list[tuple[str, dict[str, str]]]:
    """Return the messages before the visit that went out for the old date, again for the
    new one (`again-<step>#<seq>:<channel>`; worker/notices.py): the plan's own reminder of
    the step is history once sent, so the reconcile never sends it again. Each takes the new
    plan's reminder of its step as it is (time, channel, expiry, reason): only one scheduled
    and still ahead, not late (its time had passed: it would come with the notice, which
    names the new date), before the visit, neither at booking nor of a series nor the pause
    step (`repause_fields`), and sent for another time than the new one."""
    pause, _ = parse_notice_steps(plan.notice_steps)
    out = []
    for r in plan.reminders:
        if not _goes_again(r, pause, stored, start, now):
            continue
        step = f"{AGAIN_PREFIX}{r.step}"
        out.append((f"{step}#{seq}:{r.channel}", _again_record(
            r, step, r.occurrence, version,
            "the appointment moved after it had gone out for the old date: again for the new "
            f"date ({r.reason})")))
    return out


def _repauses(
    r: PlannedReminder, pause: str | None, stored: Mapping[str, Mapping[str, str]],
    now: datetime, same_day: bool = False,
) -> bool:
    """Whether the pause message `r` goes again for the new date (`repause_fields`).

    Not after a move keeping the visit on the patient-local day told (`same_day`) when the
    new plan's pause time had passed too (late: it would go at the next opening only because
    the send window is closed now): the patient has that message word for word (the same
    visit date, "stop now" or "from tonight" of the same night), and the move's notice says
    to keep pausing (worker/notices.py `pause_from`: the pause begins no later than now).
    A new pause time still ahead is the one the notice announces ("you may use it until
    <date>, then stop again"): it goes."""
    return (r.step == pause and r.status == Status.SCHEDULED and r.due_at > now
            and stored.get(r.key, {}).get("status") == Status.SENT
            and not (same_day and _LATE in r.reason))


def _goes_again(
    r: PlannedReminder, pause: str | None, stored: Mapping[str, Mapping[str, str]],
    start: datetime, now: datetime,
) -> bool:
    """Whether `r`, sent for the old date, goes again for the new one (`again_fields`)."""
    record = stored.get(r.key, {})
    return not (r.step == pause or r.at_booking or "#" in r.key or is_hold_notice(r.key)
                or r.status != Status.SCHEDULED or r.due_at <= now or r.due_at >= start
                or _LATE in r.reason or record.get("status") != Status.SENT
                or record.get("planned_epoch") == repr(r.due_at.timestamp()))


def _again_as_sent(
    plan: Plan, stored: Mapping[str, Mapping[str, str]], key: str, start: datetime,
    now: datetime,
) -> bool:
    """Whether the plan's reminder `key`, were it sent, goes again for the new date
    (`_goes_again`, `_repauses`)."""
    pause, _ = parse_notice_steps(plan.notice_steps)
    r = next((r for r in plan.reminders if r.key == key), None)
    if r is None:
        return False
    as_sent = {**stored, key: {**stored.get(key, {}), "status": Status.SENT}}
    return _goes_again(r, pause, as_sent, start, now) or _repauses(r, pause, as_sent, now)


def _in_flight_gone(
    plan: Plan, stored: Mapping[str, Mapping[str, str]], start: datetime, now: datetime,
) -> list[str]:
    """The keys of reminders being sent now (claimed, maybe at their provider) whose time
    the change moves and that a move would not send again had they gone a moment before it
    (a step after the visit, at booking, of a series, late, or whose new time has passed:
    not `_goes_again` nor `_repauses` with it as sent). The change reschedules them as any;
    the booking's field `gone` notes "<key>@<version>" of each, and should that attempt
    deliver after all, the finish records the delivery as the reminder's send: a message
    being sent at the moment of a change counts as gone out, once (without the note it was
    recorded beside the new plan, which sent it again at its new time). Should the attempt
    fail, or never begin, the new plan's reminder goes at its new time. One that goes again
    for the new date is not noted: its new time is the message again."""
    pause, _ = parse_notice_steps(plan.notice_steps)
    out = []
    for r in plan.reminders:
        record = stored.get(r.key, {})
        if (record.get("status") != Status.SENDING or r.status != Status.SCHEDULED
                or record.get("planned_epoch") == repr(r.due_at.timestamp())):
            continue
        as_sent = {**stored, r.key: {**record, "status": Status.SENT}}
        if not (_goes_again(r, pause, as_sent, start, now)
                or _repauses(r, pause, as_sent, now)):
            out.append(r.key)
    return out


def again_keys(
    reminders: list[PlannedReminder], notice_steps: str,
    stored: Mapping[str, Mapping[str, str]], start: datetime, now: datetime,
    same_day: bool = False,
) -> frozenset[str]:
    """The keys of `reminders` sent for the old date that a move sends again for the new
    one (`repause_fields`, `again_fields`): the SMS cap counts them as new SMS."""
    pause, _ = parse_notice_steps(notice_steps)
    return frozenset(r.key for r in reminders if _repauses(r, pause, stored, now, same_day)
                     or _goes_again(r, pause, stored, start, now))


# The reason of a plan's reminder that carries its step for a new date on a channel the
# step did not go on for the old one (`sent_elsewhere`): a later re-submission without a
# move finds it there and keeps it.
_CARRIES_AGAIN = "for the old date: again for the new date ("


def _begun(record: Mapping[str, str]) -> bool:
    """Whether a reminder being sent (`sending`) has had its attempt begun by its current
    claim (its token is that claim's, `attempt_token`): at its provider, or of unknown
    outcome. A claim alone (handed to a send task, in the broker or a sender's queue) sets
    `sending` too, and keeps the token of an earlier claim's attempt."""
    claim = record.get("claim") or ""
    return bool(claim) and (record.get("tok") or "").startswith(claim + ".")


def sent_elsewhere(
    plan: Plan, booking: Booking, stored: Mapping[str, Mapping[str, str]], now: datetime,
    moved: bool, same_day: bool = False,
) -> Plan:
    """`plan` with each reminder whose step (same occurrence) already went out on another
    channel, one the plan no longer sends it on, skipped, saying so: the patient has it, and a
    change of their channels does not send it again (nor does the SMS cap count it). A step
    the plan sends on both channels keeps each copy. Not when that one goes again for a new
    date (`again_keys`: the plan's own reminder then carries it, `again_planned`, and says
    so): only after a move since it went, this change (`moved`, the change kind of
    `_change_kind`, which alone makes messages again) or an earlier one whose copy for the
    new date is still to go (an again or repause of the step on that channel, or this
    reminder as that move's carrier). A step's time changed without a move (a corrected
    timezone, a narrower send window, a protocol edit) sends nothing again. One at its
    provider now (sending), on a channel the patient still takes, counts as gone and takes
    the reminder's place as it is (its attempt decides: sent, or retried there), so the
    step does not go on both. A step the plan sends on both channels keeps each copy, but
    a copy skipped at its time (its SMS without room: "its email goes") stays skipped as
    stored once its other copy went and the plan, the step's time passed, has it late: it
    is not sent late as a second copy (a re-submission, the unsubscribe's re-cap)."""
    pause, _ = parse_notice_steps(plan.notice_steps)
    tz = ZoneInfo(booking.patient.timezone)
    planned = {r.key for r in _as_planned(plan)}

    def again_to_go(r: PlannedReminder, channel: str) -> bool:
        """Whether an earlier move's copy of `r`'s step for the new date is still to go."""
        own = stored.get(r.key, {})
        # Without a move the plan's reminder on a new channel is new here and skipped as
        # sent elsewhere, never pending: one still to go is a move's carrier, whatever its
        # reason now (a retry's, a defer's or the opt-in's replaced `_CARRIES_AGAIN`), and so
        # is one the patient's opt-out skipped (START puts it back).
        if own.get("status") in PENDING or (own.get("status") == Status.SKIPPED
                                            and own.get("reason", "").startswith(OPTED_OUT)):
            return True
        prefix = f"{REPAUSE_STEP}#" if r.step == pause else f"{AGAIN_PREFIX}{r.step}#"
        return any(key.startswith(prefix) and key.endswith(f":{channel}")
                   and record.get("status") in PENDING for key, record in stored.items())

    def skipped(r: PlannedReminder) -> PlannedReminder:
        if r.status != Status.SCHEDULED or stored.get(r.key, {}).get("status") == Status.SENT:
            return r
        for channel in ("email", "sms"):
            key = r.key[: -len(r.channel)] + channel
            record = stored.get(key, {})
            status = record.get("status")
            if channel == r.channel or status not in (Status.SENT, Status.SENDING):
                continue
            if status == Status.SENDING and not _begun(record):
                # Only handed to a send task (claimed): not at its provider. The plan's
                # reminder takes its place (this change reschedules or cancels it and its
                # task finds its claim stale), as for any reminder the change moves.
                continue
            if key in planned:  # a step the plan sends on both channels: each copy goes,
                own = stored.get(r.key, {})
                if own.get("status") == Status.SKIPPED and _LATE in r.reason:
                    # but for one skipped at its time (the cap's day full: its email goes)
                    # that the plan, its time passed, would send late beside the copy gone.
                    return replace(r, status=Status.SKIPPED, reason=own.get("reason", ""))
                continue
            name = "SMS" if channel == "sms" else channel
            other = replace(r, key=key, channel=channel)
            as_sent = stored if status == Status.SENT else {
                **stored, key: {**record, "status": Status.SENT}}
            if (_repauses(other, pause, as_sent, now, same_day) or _goes_again(
                    other, pause, as_sent, booking.starts_at, now)) and (
                    moved or again_to_go(r, channel)):
                return replace(r, reason=(f"the appointment moved after it had gone out by "
                                          f"{name} {_CARRIES_AGAIN}{r.reason})"))
            if status == Status.SENDING:
                if channel not in booking.patient.channels:
                    continue  # withdrawn: not retried there should it fail
                # At its provider now: the step stays on that channel, the copy kept as it
                # is (its planned time: the reconcile leaves it to its attempt), not sent
                # on this one too; should it fail, it is retried there.
                planned_at = datetime.fromtimestamp(float(record["planned_epoch"]), UTC)
                return replace(other, due_at=planned_at, reason=(
                    f"{r.reason}; by {name}: its copy on that channel was being sent"))
            sent_at = record.get("sent_at") or ""
            day = (datetime.fromisoformat(sent_at).astimezone(tz).date().isoformat()
                   if sent_at else "an earlier day")
            return replace(r, status=Status.SKIPPED,
                           reason=f"not sent: already sent by {name} on {day}")
        return r

    reminders = [skipped(r) for r in plan.reminders]
    # The plan as planned before the cap too, which the store caps again (`cap_plan`): its
    # cap may have sent such a step by the channel it went on (the copy stored as sent,
    # nothing to skip in `reminders`), its SMS still there for the store's cap to place.
    uncapped = [skipped(r) for r in plan.uncapped] if plan.uncapped is not None else None
    if all(a is b for a, b in zip(reminders, plan.reminders, strict=True)) and (
            uncapped is None or all(a is b for a, b in zip(
                uncapped, cast(list[PlannedReminder], plan.uncapped), strict=True))):
        return plan
    return replace(plan, reminders=reminders, uncapped=uncapped)


def _as_planned(p: Plan) -> list[PlannedReminder]:
    """A plan's reminders as planned before the SMS cap."""
    return p.uncapped if p.uncapped is not None else p.reminders


def again_planned(key: str, plan: Plan) -> bool:
    """Whether a message again for a new date (`repause#<seq>:<channel>`, `again-<step>#<seq>:
    <channel>`) still has its step in the plan on its channel (True for any other key). Not
    there: the patient no longer takes that channel, or the SMS cap sends the step by email."""
    step, channel = key.split(":", 1)[0].split("#", 1)[0], key.rpartition(":")[2]
    if step != REPAUSE_STEP and not step.startswith(AGAIN_PREFIX):
        return True
    step = base_step(step, parse_notice_steps(plan.notice_steps)[0])
    return any(r.step == step and r.channel == channel for r in plan.reminders)


def _same_day(kind: str | None, booking: Booking, fields: Mapping[str, str],
              doc: str | None) -> bool:
    """Whether change `kind` is a move keeping the visit on the patient-local day the
    patient was told (`_told_start`): a later hour, say (`_repauses`)."""
    old = _told_start(fields, doc) if kind == "moved" else None
    if not old:
        return False
    tz = ZoneInfo(booking.patient.timezone)
    return (datetime.fromisoformat(old).astimezone(tz).date()
            == booking.starts_at.astimezone(tz).date())


def _same_booking_doc(stored: str | None, doc: str) -> str:
    """`stored` if `doc` is the same booking, its start the same instant written with another
    UTC offset (a clinic's system sending its local time, its nightly sync UTC), else `doc`.
    Re-submitting the same booking is an idempotent upsert (DESIGN.md): it was a change, a
    new version and its dead letters sent again as "booking changed"."""
    if stored is None or stored == doc:
        return doc
    try:
        old, new = json.loads(stored), json.loads(doc)
        was, now = old.get("starts_at"), new.get("starts_at")
        same = (isinstance(was, str) and isinstance(now, str) and was != now
                and datetime.fromisoformat(was) == datetime.fromisoformat(now))
    except (ValueError, AttributeError):
        return doc
    return stored if same and dict(new, starts_at=was) == old else doc


def _doc_start(doc: str | None) -> datetime | None:
    """The appointment's start the stored document (and so its stored plan) is for."""
    start = json.loads(doc or "{}").get("starts_at")
    return datetime.fromisoformat(start) if start else None


def _told_start(fields: Mapping[str, str], doc: str | None) -> str | None:
    """The appointment's start (ISO 8601) the patient was last told of, as stored: while
    held, the one before the hold (`held_from`); cancelled, the one its cancel names
    (`told_start`); else the stored document's."""
    if fields.get("status") == Status.HELD and fields.get("held_from"):
        return fields["held_from"]
    if fields.get("status") == Status.CANCELLED and fields.get("told_start"):
        # Cancelled: the date its cancel names (the one told before a hold, say).
        return datetime.fromtimestamp(float(fields["told_start"]), UTC).isoformat()
    start = json.loads(doc or "{}").get("starts_at")
    return str(start) if start else None


def _told_by(
    reminders: Mapping[str, Mapping[str, str]], seq: int, start: datetime | None = None,
) -> dict[str, Mapping[str, str]]:
    """The reminders that tell the patient the date of move `seq` (or re-open): its notices,
    and the messages before the visit (`start`, the date it moved to) sent for it, again
    (`again-<step>`, `repause`) or the plan's own, planned at or after it (of its version
    or later) and sent (or being sent) since: each names the date ("see you on <date>", the
    prep, the pause message); the date was told once one of them went out. A plan's own
    counts by the version its words went for (`sent_version`): an attempt rendered for the
    old date and delivered after the move is recorded as sent under the move's version."""
    tail = f"#{seq}:"
    told = {k: r for k, r in reminders.items() if tail in k and (
        k.startswith(("rescheduled#", f"{REPAUSE_STEP}#", AGAIN_PREFIX)))}
    since = [int(r.get("version") or 0) for k, r in told.items() if k.startswith("rescheduled#")]
    if since and start is not None:
        told |= {k: r for k, r in reminders.items() if not is_notice(k)
                 and r.get("status") in (Status.SENT, Status.SENDING)
                 and int((r.get("sent_version") if r.get("status") == Status.SENT else None)
                         or r.get("version") or 0) >= min(since)
                 and float(r.get("planned_epoch") or "inf") < start.timestamp()}
    return told


def reopened(fields: Mapping[str, str]) -> bool:
    """Whether a booking is held as it was booked again after a cancel (its release re-opens
    it; a cancel while so held tells nothing more): marked `reopened` since 7a8337b; one
    stored before that is known by its hash (`fields`, with its reminders' fields) alone:
    held, and its last change told the patient was a cancel (`cancelled#<seq>:<channel>` of
    its current `seq`; a re-open or a move since would have taken the next seq)."""
    if fields.get("reopened"):
        return True
    seq = fields.get("seq")
    return fields.get("status") == Status.HELD and bool(seq) and any(
        k.startswith(f"cancelled#{seq}:") for k in fields)


def _told_by_hold(fields: Mapping[str, str], reminders: Mapping[str, Mapping[str, str]]) -> bool:
    """Whether a booking held as it was booked again after a cancel (`reopened`) told the
    patient its new date by its hold message ("we will call you before your <date> visit"),
    sent (or being sent) since that cancel."""
    if not reopened(fields):
        return False
    since = max((int(r.get("version") or 0) for k, r in reminders.items()
                 if k.startswith(f"cancelled#{fields.get('seq') or 0}:")), default=0)
    return any(is_hold_notice(k) and went_out(r)
               and int(r.get("sent_version") or r.get("version") or 0) > since
               for k, r in reminders.items())


def _told_sent(told: Mapping[str, Mapping[str, str]]) -> bool:
    """Whether one of `told` went out for certain: a plan's own by its status (its
    `sent_at` may be a delivery for an earlier date, recorded beside the new plan)."""
    return any(sent(r) if is_notice(k) else r.get("status") == Status.SENT
               for k, r in told.items())


def _told_prefixes(told: Mapping[str, Mapping[str, str]]) -> str:
    """The keys of `told` as `untold` stores them (space apart): the store's own without
    their channels; a plan's own whole, with the version it is being sent for
    ("day-before:sms@5"): neither its copy on the other channel nor a delivery of it for an
    earlier date told the new one (worker/dispatch.py `_went`)."""
    return " ".join(sorted({k.rpartition(":")[0] if is_notice(k)
                            else f"{k}@{r.get('version') or 0}" for k, r in told.items()}))


def notice_off(key: str, offered: Sequence[str]) -> bool:
    """Whether `key` is a change notice on a channel the patient no longer takes."""
    return key.split("#", 1)[0] in NOTICE_STEPS and key.rpartition(":")[2] not in offered


def withdrawn_notices(
    stored: Mapping[str, Mapping[str, str]], offered: Sequence[str]
) -> dict[str, Mapping[str, str]]:
    """The changes (`<kind>#<seq>`) with a notice still to go on a channel the patient no
    longer takes (their SMS consent withdrawn, say), each with one such record."""
    out: dict[str, Mapping[str, str]] = {}
    for key, record in stored.items():
        if record.get("status") in PENDING and notice_off(key, offered):
            out.setdefault(key.rpartition(":")[0], record)
    return out


def notice_elsewhere(
    withdrawn: Mapping[str, Mapping[str, str]], stored: Mapping[str, Mapping[str, str]],
    offered: Sequence[str], version: int,
) -> list[tuple[str, dict[str, str]]]:
    """Return, for each change (`<kind>#<seq>`) whose notice still to go was cancelled for a
    channel the patient no longer takes (`withdrawn`: one such record each), the same notice
    on the first channel the patient takes, unless one of that change is to go or went out
    on a channel they take: the patient still hears of the move or cancel."""
    out = []
    for change, record in withdrawn.items():
        if any(k.rpartition(":")[0] == change and k.rpartition(":")[2] in offered
               and (r.get("status") in PENDING or went_out(r)) for k, r in stored.items()):
            continue
        key = f"{change}:{offered[0]}"
        if key in stored and stored[key].get("status") != Status.CANCELLED:
            continue  # it was there and did not go (expired, refused): not again
        # (Cancelled: a channel withdrawn before it went, now given back: it goes.)
        due = record.get("due_epoch") or record.get("planned_epoch") or ""
        out.append((key, {
            "step": record.get("step", ""), "channel": offered[0],
            "template": record.get("template", ""), "occurrence": record.get("occurrence", ""),
            "planned_epoch": record.get("planned_epoch") or due, "due_epoch": due,
            "status": Status.SCHEDULED, "version": str(version),
            "reason": record.get("reason", ""), "at_booking": "0", "attempts": "0",
            "expires_epoch": record.get("expires_epoch", ""),
            "expires_note": record.get("expires_note", ""),
        }))
    return out


def notice_fields(notice: NoticeReminder, version: int) -> dict[str, str]:
    """Return the stored fields of a new change notice (worker/notices.py)."""
    due = repr(notice.due_at.timestamp())
    return {
        "step": notice.step, "channel": notice.channel, "template": notice.step,
        "occurrence": notice.key.split("#", 1)[1].split(":", 1)[0], "planned_epoch": due,
        "due_epoch": due, "status": Status.SCHEDULED, "version": str(version),
        "reason": notice.reason, "at_booking": "0", "attempts": "0",
        "expires_epoch": repr(notice.expires_at.timestamp()),
        "expires_note": notice.expires_note,
    }


def attempts_made(rec: Mapping[str, str]) -> int:
    """Every attempt made at a reminder, as the clinic is shown it: those of its budget now
    (`attempts`, afresh after a move or a replay) and those before (`earlier`)."""
    return int(rec.get("attempts") or 0) + int(rec.get("earlier") or 0)


def _timeline_entry(key: str, rec: Mapping[str, str], next_try: str | None = None
                    ) -> dict[str, Any]:
    """One reminder as the timeline shows it; `next_try`: when a reminder handed back to the
    schedule is tried next (`Store._next_tries`), shown beside its due (`next_try_at`) and
    in its reason."""
    entry: dict[str, Any] = {
        "id": key,
        "step": rec.get("step"),
        "channel": rec.get("channel"),
        "due_at": _iso(rec.get("due_epoch")),
        "status": rec.get("status"),
        "attempts": attempts_made(rec),
        "sent_at": rec.get("sent_at") or None,
        "reason": rec.get("reason") or None,
    }
    if rec.get("expires_epoch"):
        entry["expires_at"] = _iso(rec["expires_epoch"])
    if rec.get("sent_version"):
        entry["sent_version"] = int(rec["sent_version"])
        if entry["status"] in PENDING:
            # Delivered for an earlier version; the new plan sends it again.
            note = (f"already sent at {_to_the_second(entry['sent_at'])} for version "
                    f"{entry['sent_version']}")
            entry["reason"] = f"{entry['reason']}; {note}" if entry["reason"] else note
    if next_try:
        entry["next_try_at"] = _iso(next_try)
        note = f"next try at {_to_the_second(entry['next_try_at'])}"
        entry["reason"] = f"{entry['reason']}; {note}" if entry["reason"] else note
    if rec.get("by_sms") == "1" and (entry["status"] in PENDING
                                     or entry["status"] in (Status.SENT, Status.FAILED)):
        # An email step its attempt took by SMS (flag "s": the patient unsubscribed from
        # email; a care-critical step): the key still says email, the patient got a text.
        entry["via"] = "sms"
        entry["reason"] = f"{entry['reason']}; {BY_SMS}" if entry["reason"] else BY_SMS
    return entry


def connect(url: str) -> redis.Redis:
    """Return a client of the Redis at `url` that decodes replies to str and rides out a short
    outage (worker/connections.py, profile WORKER; the service itself builds its clients with
    `connections.client`, which also follows a Sentinel failover).

    Connection errors and timeouts are retried with jittered exponential backoff (about
    30 s in all). Every script is safe to run twice (claims hand back after the lease;
    begin and finish are idempotent for the same token; an apply checks what it read).
    """
    from .connections import from_url

    return from_url(url)


class _Changed(Exception):
    """`Store.recap`: the booking is no longer the one it planned (the clinic changed it)."""


class _Recap(Store):
    """One write of `Store.recap`, applied only while the booking is still scheduled with
    the document it planned (checked in the reconcile, inside the write's read-check-apply:
    a change landing between its read and its apply makes it read again and check again).

    `after`: the visit has begun (the write's now; None: not yet). Its plan, made as if
    re-submitted just before the start, is written only for the steps still ahead: the
    keys of each step whose time has passed (`_passed`) are left as stored by the
    reconcile, and are history to the SMS cap (counted where they are stored, never
    moved); the booking's late-pause flag stays as stored.

    A copy of the store (client, scripts, caches: whatever it holds), differing in its
    `_reconcile` and `_capped_plan` seams, as the API's If-Match check
    (worker/api/conditional.py), and in the words of what it cancels (`_gone`): the clinic
    changed nothing, the patient's unsubscribe took it out of the plan (an email the cap
    sent instead of a care-critical SMS, which now goes by SMS). One the unsubscribe
    skipped stays skipped, saying so (worker/reconcile.py `reconcile_one`: the same
    document planned again)."""

    _gone = "no longer in the plan once the patient unsubscribed from email"

    def __init__(self, store: Store, doc: str, after: datetime | None = None) -> None:
        self.__dict__.update(store.__dict__)
        self.doc = doc
        self.after = after

    def _passed(self, stored: Mapping[str, Mapping[str, str]], plan: Plan) -> frozenset[str]:
        """The keys, stored or planned, of each step occurrence (on any channel: a step the
        cap sent by email is the same step) whose time has passed by `after`: the plan has
        it due by then (as planned before the cap, which only moves an SMS later; a step
        before the visit, planned just before it, is late or skipped: due by then too).
        Not a step whose email had gone to its provider and was then skipped for the email
        unsubscribe (attempted: at work when the patient unsubscribed, and not delivered;
        the begin that skips it caps the bookings again, worker/dispatch.py
        `_recap_stand_in`): under way, it goes by SMS as a step still ahead does."""
        if self.after is None:
            return frozenset()
        at = self.after.timestamp()
        planned = [*plan.reminders, *_as_planned(plan)]
        steps = {r.key.rpartition(":")[0] for r in planned if r.due_at.timestamp() <= at}
        steps -= {k.rpartition(":")[0] for k, r in stored.items()
                  if k.endswith(":email") and r.get("status") == Status.SKIPPED
                  and r.get("reason", "").startswith(OPTED_OUT) and attempts_made(r)}
        return frozenset(k for k in {*stored, *(r.key for r in planned)}
                         if k.rpartition(":")[0] in steps)

    def _capped_plan(
        self, booking: Booking, planned: Plan, stored: _Stored, read: _CapsRead | None,
        now: datetime, release: bool, unflag: frozenset[str] = frozenset(),
        kept: frozenset[str] = frozenset(),
    ) -> Plan:
        if self.after is None:
            return super()._capped_plan(booking, planned, stored, read, now, release, unflag,
                                        kept)
        capped = super()._capped_plan(booking, planned, stored, read, now, release, unflag,
                                      kept | self._passed(stored.reminders, planned))
        # Too late for the full retinoid pause or not: history once the visit has begun
        # (the plan made just before it finds the pause step's time passed), as stored.
        late = (capped.late_pause or "as stored") if stored.fields.get("late_pause") else None
        return replace(capped, late_pause=late, pause_rule=None)

    def _reconcile(  # type: ignore[override]  # the base is a staticmethod seam
        self, stored_booking: dict[str, str], stored: dict[str, dict[str, str]], plan: Plan,
        doc: str, medications: str, release: bool, now: datetime,
    ) -> Any:
        if stored_booking.get("doc") != self.doc \
                or stored_booking.get("status") != Status.SCHEDULED:
            raise _Changed
        result = reconcile(stored_booking, stored, plan, doc=doc, medications=medications,
                           release=release, now=now, gone=self._gone)
        if self.after is None:
            return result
        kept = self._passed(stored, plan)
        return replace(result, changes=[c for c in result.changes if c.key not in kept])
