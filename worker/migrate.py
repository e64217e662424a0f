"""`reminders migrate`: convert the schedule store's layout 1 to layout 2 (worker/store.py).

Layout 1 (before commit 85d0ea5) kept, under the prefix P:
  P:b:<clinic>/<booking>   HASH  doc (JSON), status, version, hold_reason, released_for (the
                                 medications JSON the clinic reviewed), window, keep_until,
                                 created_at, updated_at
  P:k:<clinic>/<booking>   SET   the booking's reminder keys
  P:r:<ref>                HASH  one reminder: step, channel, template, occurrence,
                                 planned_epoch, due_epoch, expires_epoch, expires_note, status,
                                 reason, at_booking, version, attempts, claim, tok, fin,
                                 sent_at (ISO 8601), sent_version, last_error
and, under the same names and meaning as layout 2: P:due, P:lease, P:dead (reminder refs),
P:a:<ref> (attempt log), P:ledger:<ref> (send ledger), P:bookings:<clinic>, P:claimrun:*.
It had no P:layout key.

What the conversion does, per booking, in one Lua script (all or nothing): it checks that
the booking's layout-1 hash and reminder records are exactly as read (else it reads them
again), renames the layout-1 hash to P:v1:b:<clinic>/<booking> (the booking key's name is
the same in both layouts), writes the layout-2 hash (every reminder as its positional
fields, the planner's words in P:t), the document to P:d, and applies retention as every
layout-2 write does (`keep_booking`: the expiry of the booking, its attempt logs and sent
ledgers, P:bookings:<clinic>, the contact index). The due, lease and dead-letter sets, the
attempt logs and the ledger are the same keys with the same members and scores in both
layouts, so they are left as they are: a reminder sent stays sent (its ledger says "sent"),
a pending one stays due at the same instant, a leased one is claimed again when its lease
expires, a dead letter stays one. Fields layout 2 has gained are filled as the current
upsert would for the booking: `contacts` (and the contact index), `ns` (the protocol's
notice steps), `late_pause` (from the stored reminders of the pause step), `released_for`
as the digest of the reviewed medications. `seq`, `paused` and `moved_from` stay absent
(no change notice was ever planned). No clinic event and no metric comes from a migration.

A booking whose layout-1 hash has no `doc` field is converted already: a re-run (after a
crash, or with the same data) skips it, so a run interrupted anywhere and run again ends in
the same state. P:layout is set to 2 only when no layout-1 booking is left; then the
layout-1 keys (P:k:*, P:r:*, P:v1:b:*) are deleted, unless `keep_old`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis
from pydantic import ValidationError

from .catalog import Catalog
from .health import age_of, beat_key, pump_key
from .models import Booking
from .planner import PlannedReminder, late_pause, pause_rule
from .status import Status
from .store import (
    _PRELUDE,
    ATTEMPT_SLOTS,
    LAYOUT,
    REMINDER_SLOTS,
    STATUS_CODE,
    Store,
    _inline,
    _join,
    _split,
    _stored_instant,
    booking_contacts,
    encode_reminder,
    medications_digest,
)

# The booking fields of layout 1 that layout 2 keeps as they are (plain words).
_BOOKING_FIELDS = ("status", "version", "window", "created_at", "updated_at", "keep_until",
                   "hold_reason")
_BOOKING_STATUSES = {str(s) for s in (Status.SCHEDULED, Status.HELD, Status.CANCELLED)}
# A reminder's logical fields as layout 1 stored them and `encode_reminder` takes them.
_LOGICAL = ("status", "version", "step", "channel", "template", "occurrence", "planned_epoch",
            "due_epoch", "expires_epoch", "expires_note", "at_booking", "attempts")
_OBSOLETE = "no longer in the plan after a change"  # worker/reconcile.py's reason
CHUNK = 200  # bookings read together and written in one pipeline
_TRIES = 5  # re-reads of a booking that changed between the read and the write

_CONVERT = """
local bkey, v1key, dkey, texts_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, clinic, booking_id, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local check, doc, fields, texts = cjson.decode(ARGV[5]), ARGV[6], cjson.decode(ARGV[7]),
  cjson.decode(ARGV[8])
if redis.call('HEXISTS', bkey, 'doc') == 0 then return 'done' end
-- Every hash read (the booking's, each reminder's) must be as read: {key, {f, v, ...}}.
for _, c in ipairs(check) do
  local flat = redis.call('HGETALL', c[1])
  local expected = c[2]
  if #flat ~= #expected then return 'changed' end
  local want = {}
  for j = 1, #expected, 2 do want[expected[j]] = expected[j + 1] end
  for j = 1, #flat, 2 do
    if want[flat[j]] ~= flat[j + 1] then return 'changed' end
  end
end
for id, text in pairs(texts) do
  local cur = redis.call('HGET', texts_key, id)
  if cur and cur ~= text then return 'collision:' .. id end
end
for id, text in pairs(texts) do redis.call('HSET', texts_key, id, text) end
redis.call('RENAME', bkey, v1key)
redis.call('HSET', bkey, unpack(fields))
redis.call('SET', dkey, doc)
keep_booking(prefix, clinic, booking_id, keep)
return 'ok'
"""


class MigrationRefused(Exception):
    """The migration must not run now (a worker is running, an unknown layout)."""


@dataclass
class Converted:
    """One layout-1 booking, ready for the conversion script (or why it cannot be)."""

    clinic: str
    booking_id: str
    statuses: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    problem: str | None = None
    converted_before: bool = False
    warnings: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """What a run did (or, in a dry run, would do)."""

    prefix: str
    dry_run: bool
    layout_before: str | None
    converted: list[str] = field(default_factory=list)
    already: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (booking, why)
    orphans: list[str] = field(default_factory=list)  # P:k sets with no booking hash
    warnings: list[str] = field(default_factory=list)
    reminders: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    layout_set: bool = False
    removed: int = 0
    kept_old: bool = False
    # At layout 2 already with no layout-1 key left: nothing was looked at or written.
    nothing_to_do: bool = False

    @property
    def ok(self) -> bool:
        return not self.skipped

    def as_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix, "dry_run": self.dry_run, "layout_before": self.layout_before,
            "converted": len(self.converted), "already_converted": self.already,
            "skipped": [{"booking": b, "reason": why} for b, why in self.skipped],
            "orphans": self.orphans, "warnings": self.warnings,
            "reminders": dict(sorted(self.reminders.items())),
            "dead_letters": self.dead_letters, "layout_set": self.layout_set,
            "layout_1_keys_removed": self.removed, "kept_old": self.kept_old, "ok": self.ok,
            "nothing_to_migrate": self.nothing_to_do,
        }

    def lines(self) -> list[str]:
        if self.nothing_to_do:
            return [f"store layout {LAYOUT} under prefix {self.prefix!r}: nothing to migrate "
                    "(no layout-1 key left)"]
        verb = "would convert" if self.dry_run else "converted"
        out = [f"store layout {self.layout_before or '1 (no P:layout key)'} under prefix "
               f"{self.prefix!r}: {verb} {len(self.converted)} bookings; "
               f"{self.already} converted before; {len(self.skipped)} not convertible"]
        if self.reminders:
            counts = ", ".join(f"{status} {n}" for status, n in sorted(self.reminders.items()))
            out.append(f"reminders {verb}: {counts} (dead letters {self.dead_letters})")
        for booking, why in self.skipped:
            out.append(f"not converted: {booking}: {why}")
        for base in self.orphans:
            out.append(f"ignored: {base}: reminder keys with no booking hash (expired); their "
                       "layout-1 keys are removed with the rest")
        out += [f"warning: {w}" for w in self.warnings]
        if self.dry_run:
            out.append("dry run: nothing was written")
        elif self.skipped:
            out.append(f"{self.prefix}:layout not set: fix or delete the bookings above and "
                       "run `reminders migrate` again (the converted ones are kept)")
        else:
            out.append(f"{self.prefix}:layout is {LAYOUT}" + (
                "; the layout-1 keys are kept (--keep-old)" if self.kept_old
                else f"; {self.removed} layout-1 keys removed"))
        return out


class Migration:
    """Layout 1 -> 2 under one prefix (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, catalog: Catalog, *,
                 dry_run: bool = False, keep_old: bool = False,
                 crash_after: int | None = None) -> None:
        """`crash_after`: a test hook, the process exits abruptly after converting that many
        bookings (a crash half-way)."""
        self.redis = client
        self.prefix = prefix
        self.catalog = catalog
        self.dry_run = dry_run
        self.keep_old = keep_old
        self.crash_after = crash_after
        # The store's own text interning (ids as its upserts make them).
        self.store = Store(client, prefix)
        self._convert = client.register_script(_PRELUDE + _CONVERT)

    # --- is it safe to run? -----------------------------------------------------------

    def up_to_date(self) -> bool:
        """Whether the store is at layout 2 with no layout-1 key left (P:k:*, P:r:*,
        P:v1:b:*; a layout-1 write, even one made after P:layout was set, leaves P:k and
        P:r keys): a run would convert and remove nothing, safe while the service runs."""
        if self.redis.get(f"{self.prefix}:layout") != LAYOUT:
            return False
        for pattern in (f"{self.prefix}:[kr]:*", f"{self.prefix}:v1:b:*"):
            if next(iter(self.redis.scan_iter(match=pattern, count=1000)), None) is not None:
                return False
        return True

    def running(self, max_age: float) -> list[str]:
        """Return the evidence that a worker or beat is running now ([]: none)."""
        found = []
        for key, what in ((pump_key(self.prefix), "a pump run"),
                          (beat_key(self.prefix), "a beat tick")):
            age, fields = age_of(self.redis, key)
            if age is not None and age <= max_age:
                found.append(f"{what} {age:.0f}s ago ({key}, {fields.get('node', '?')})")
        # Every pump run of either layout leaves a claim-run key for 60 s.
        claim_run = next(iter(self.redis.scan_iter(match=f"{self.prefix}:claimrun:*",
                                                   count=1000)), None)
        if claim_run is not None:
            found.append(f"a pump claimed within the last minute ({claim_run})")
        return found

    # --- the run ----------------------------------------------------------------------

    def run(self) -> Report:
        layout = cast(str | None, self.redis.get(f"{self.prefix}:layout"))
        if layout not in (None, LAYOUT):
            raise MigrationRefused(f"{self.prefix}:layout is {layout!r}; this version knows "
                                   f"layouts 1 and {LAYOUT} only")
        report = Report(self.prefix, self.dry_run, layout, kept_old=self.keep_old)
        todo, report.already, report.orphans = self._bookings()
        done = 0
        while todo:
            size = CHUNK if self.crash_after is None else max(1, self.crash_after - done)
            chunk, todo = todo[:size], todo[size:]
            for (clinic, booking_id), (outcome, one) in zip(
                    chunk, self._convert_chunk(chunk), strict=True):
                base = f"{clinic}/{booking_id}"
                if outcome == "done":
                    report.already += 1
                    continue
                if one.problem is not None:
                    report.skipped.append((base, one.problem))
                    continue
                report.converted.append(base)
                report.reminders.update(one.statuses)
                report.dead_letters += one.dead_letters
                report.warnings += [f"{base}: {w}" for w in one.warnings]
                done += 1
            if self.crash_after is not None and done >= self.crash_after:
                os._exit(75)  # the test hook: a crash, no clean-up of any kind
        if self.dry_run or report.skipped:
            return report
        self.redis.set(f"{self.prefix}:layout", LAYOUT, nx=True)
        report.layout_set = self.redis.get(f"{self.prefix}:layout") == LAYOUT
        if report.layout_set and not self.keep_old:
            report.removed = self._remove_old(report.orphans)
        return report

    def _bookings(self) -> tuple[list[tuple[str, str]], int, list[str]]:
        """Return the layout-1 bookings to convert, how many were converted before, and the
        reminder-key sets with no booking hash."""
        p = self.prefix
        bases = {k[len(f"{p}:k:"):] for k in self.redis.scan_iter(match=f"{p}:k:*", count=1000)}
        hashes = {k[len(f"{p}:b:"):] for k in self.redis.scan_iter(match=f"{p}:b:*", count=1000)}
        pipe = self.redis.pipeline(transaction=False)
        ordered = sorted(bases | hashes)
        for base in ordered:
            pipe.exists(f"{p}:b:{base}")
            pipe.hexists(f"{p}:b:{base}", "doc")
        replies = pipe.execute()
        todo: list[tuple[str, str]] = []
        already, orphans = 0, []
        for base, exists, has_doc in zip(ordered, replies[0::2], replies[1::2], strict=True):
            if "/" not in base:
                continue
            clinic, booking_id = base.split("/", 1)
            if has_doc:
                todo.append((clinic, booking_id))
            elif base in bases and exists:
                already += 1
            elif base in bases:
                orphans.append(base)
        return todo, already, orphans

    def _convert_chunk(self, chunk: list[tuple[str, str]]) -> list[tuple[str, Converted]]:
        """Convert bookings: read in two round trips, write in one pipeline of scripts (each
        booking's own atomic step); those that changed meanwhile or met a text-id collision
        are done again, one by one. Return (outcome, conversion) per booking."""
        prepared = self._prepare_many(chunk)
        if self.dry_run:
            return [("done" if one.converted_before else "prepared", one) for one in prepared]
        writes = [n for n, one in enumerate(prepared)
                  if one.problem is None and not one.converted_before]
        pipe = self.redis.pipeline(transaction=False)
        for n in writes:
            self._write(prepared[n], pipe)
        outcomes = ["done" if one.converted_before else "prepared" for one in prepared]
        for n, outcome in zip(writes, pipe.execute(), strict=True):
            outcomes[n] = str(outcome)
        out = []
        for n, one in enumerate(prepared):
            if outcomes[n] == "ok":
                self.store._texts.update(one.texts)
            elif outcomes[n] not in ("prepared", "done"):
                self._settle(outcomes[n])
                outcomes[n], one = self._convert_one(*chunk[n])
            out.append((outcomes[n], one))
        return out

    def _write(self, one: Converted, client: Any) -> Any:
        clinic, booking_id = one.clinic, one.booking_id
        return self._convert(
            keys=[self.store.booking_key(clinic, booking_id),
                  f"{self.prefix}:v1:b:{clinic}/{booking_id}",
                  self.store.doc_key(clinic, booking_id), self.store.texts_key],
            args=one.args, client=client)

    def _settle(self, outcome: str) -> None:
        if outcome.startswith("collision:"):  # another text has that id: a longer one
            taken = outcome.split(":", 1)[1]
            self.store._taken.add(taken)
            self.store._ids = {t: i for t, i in self.store._ids.items() if i != taken}

    def _convert_one(self, clinic: str, booking_id: str) -> tuple[str, Converted]:
        one = Converted(clinic, booking_id)
        for _ in range(_TRIES):
            (one,) = self._prepare_many([(clinic, booking_id)])
            if one.converted_before:
                return "done", one
            if one.problem is not None or self.dry_run:
                return "prepared", one
            outcome = str(self._write(one, self.redis))
            if outcome == "ok":
                self.store._texts.update(one.texts)
            if outcome in ("ok", "done"):
                return outcome, one
            self._settle(outcome)
        one.problem = "it kept changing while being converted (is a worker running?)"
        return "prepared", one

    def _prepare_many(self, bookings: list[tuple[str, str]]) -> list[Converted]:
        """Read layout-1 bookings (two round trips) and build their layout-2 forms."""
        p = self.prefix
        pipe = self.redis.pipeline(transaction=False)
        for clinic, booking_id in bookings:
            pipe.hgetall(f"{p}:b:{clinic}/{booking_id}")
            pipe.smembers(f"{p}:k:{clinic}/{booking_id}")
        first = pipe.execute()
        olds = cast(list[dict[str, str]], first[0::2])
        keys = [sorted(cast(set[str], k)) for k in first[1::2]]
        pipe = self.redis.pipeline(transaction=False)
        for (clinic, booking_id), ks in zip(bookings, keys, strict=True):
            for key in ks:
                pipe.hgetall(f"{p}:r:{clinic}/{booking_id}/{key}")
                pipe.zscore(f"{p}:dead", f"{clinic}/{booking_id}/{key}")
        replies = iter(pipe.execute())
        out = []
        for (clinic, booking_id), old, ks in zip(bookings, olds, keys, strict=True):
            records, dead = {}, {}
            for key in ks:
                records[key] = cast(dict[str, str], next(replies))
                dead[key] = next(replies)
            out.append(self._prepare(clinic, booking_id, old, ks, records, dead))
        return out

    def _prepare(self, clinic: str, booking_id: str, old: dict[str, str],
                 keys_sorted: list[str], records: dict[str, dict[str, str]],
                 dead: dict[str, Any]) -> Converted:
        """Build one layout-1 booking's layout-2 form from what was read."""
        one = Converted(clinic, booking_id)
        p = self.prefix
        bkey = f"{p}:b:{clinic}/{booking_id}"
        doc = old.get("doc")
        if not doc:  # converted meanwhile (another run)
            one.converted_before = True
            return one
        try:
            booking = Booking.model_validate_json(doc)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'document'}: {e['msg']}"
                               for e in exc.errors()[:5])
            one.problem = f"its document does not validate as a booking now ({fields})"
            return one
        if old.get("status") not in _BOOKING_STATUSES:
            one.problem = f"unknown booking status {old.get('status')!r}"
            return one
        texts: dict[str, str] = {}

        def text_id(text: str) -> str:
            return self.store._intern(text, texts)

        fields_out: dict[str, str] = {k: old[k] for k in _BOOKING_FIELDS if old.get(k)}
        if old.get("released_for"):
            fields_out["released_for"] = medications_digest(old["released_for"])
        fields_out["contacts"] = booking_contacts(booking, self.store.contact_secret)
        protocol = self.catalog.protocols.get(booking.treatment)
        planned: list[PlannedReminder] = []
        check: list[Any] = [[bkey, [x for kv in old.items() for x in kv]]]
        for key in keys_sorted:
            rec = records[key]
            ref = f"{clinic}/{booking_id}/{key}"
            if not rec:
                one.warnings.append(f"reminder {key}: no record (expired); left out")
                continue
            check.append([f"{p}:r:{ref}", [x for kv in rec.items() for x in kv]])
            status = rec.get("status", "")
            if status not in STATUS_CODE:
                one.problem = f"reminder {key}: unknown status {status!r}"
                return one
            logical = {k: rec[k] for k in _LOGICAL if rec.get(k)}
            logical.setdefault("template", rec.get("step", ""))
            claimed = bool(rec.get("claim"))
            if rec.get("reason") and not claimed:
                logical["reason"] = rec["reason"]  # the planner's words: stored once, in P:t
            try:
                main, _ = encode_reminder(key, logical, text_id=text_id)
            except (ValueError, KeyError) as exc:
                one.problem = f"reminder {key}: {exc}"
                return one
            if rec.get("reason") and claimed:  # words written at send time stay inline
                parts = _split(main, len(REMINDER_SLOTS))
                parts[8] = _inline(rec["reason"])
                main = _join(parts)
            try:
                sent_at = _stored_instant(rec.get("sent_at", ""))
            except ValueError:
                one.problem = f"reminder {key}: sent_at {rec.get('sent_at')!r} is not an instant"
                return one
            attempt = _join([rec.get("claim", ""), "" if rec.get("attempts", "0") == "0"
                             else rec.get("attempts", ""), rec.get("tok", ""), sent_at,
                             rec.get("sent_version", ""), rec.get("last_error", "")])
            if any("|" in rec.get(k, "") for k in ATTEMPT_SLOTS[:-1]):
                one.problem = f"reminder {key}: an attempt field holds '|'"
                return one
            fields_out[key] = main
            if attempt:
                fields_out[key + "+"] = attempt
            one.statuses[status] += 1
            if status == Status.FAILED and dead[key] is not None:
                one.dead_letters += 1
            if rec.get("planned_epoch") and rec.get("step") and rec.get("channel"):
                planned.append(PlannedReminder(
                    key=key, step=rec["step"], channel=rec["channel"],  # type: ignore[arg-type]
                    template=rec.get("template", ""), occurrence=1,
                    due_at=datetime.fromtimestamp(float(rec["planned_epoch"]), UTC),
                    # As the plan had it: skipped, or gone from it (a cancelled booking's
                    # reminders are still planned ones).
                    status=(Status.SKIPPED if status == Status.SKIPPED
                            or rec.get("reason") == _OBSOLETE else Status.SCHEDULED),
                    reason=""))
        if protocol is None:
            one.warnings.append(f"no protocol {booking.treatment!r} in the config: converted "
                                "without its notice steps (a later move or cancel of it "
                                "sends no change notice until it is booked again)")
        else:
            if protocol.notice_steps():
                fields_out["ns"] = text_id(protocol.notice_steps())
            rule = pause_rule(protocol, booking)
            if rule and late_pause(planned, rule, booking):
                fields_out["late_pause"] = "1"
        keep = old.get("keep_until") or "0"
        one.texts = texts
        one.args = [
            p, clinic, booking_id, keep,
            json.dumps(check, ensure_ascii=False),
            doc,
            json.dumps([x for kv in fields_out.items() for x in kv], ensure_ascii=False),
            json.dumps(texts, ensure_ascii=False) if texts else "{}",
        ]
        return one

    def _remove_old(self, orphans: list[str]) -> int:
        """Delete the layout-1 keys (after P:layout is set); return how many."""
        p = self.prefix
        removed = 0
        for base in orphans:  # their refs point at nothing any more
            refs = [f"{base}/{k}" for k in cast(set[str], self.redis.smembers(f"{p}:k:{base}"))]
            if refs:
                for zset in ("due", "lease", "dead"):
                    self.redis.zrem(f"{p}:{zset}", *refs)
        for pattern in (f"{p}:r:*", f"{p}:k:*", f"{p}:v1:b:*"):
            batch: list[str] = []
            for key in self.redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(self.redis.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.redis.unlink(*batch))
        return removed


def migrate(client: redis.Redis, prefix: str, catalog: Catalog, *, dry_run: bool = False,
            keep_old: bool = False, force: bool = False, max_age: float = 30.0,
            crash_after: int | None = None,
            say: Callable[[str], None] | None = None) -> Report:
    """Run the migration (see the module docstring); raise MigrationRefused if a worker
    seems to be running (unless `force`: `say` is told instead). A store at layout 2 with
    no layout-1 key left is reported as such at once, running service or not: nothing to
    convert, nothing to stop it for."""
    migration = Migration(client, prefix, catalog, dry_run=dry_run, keep_old=keep_old,
                          crash_after=crash_after)
    if migration.up_to_date():  # a deploy running it every time, the service up: a no-op
        return Report(prefix, dry_run, LAYOUT, kept_old=keep_old, nothing_to_do=True)
    evidence = migration.running(max_age)
    if evidence and not force and not dry_run:
        raise MigrationRefused(
            "a worker or beat seems to be running: " + "; ".join(evidence) + ". Stop beat, "
            "the workers and the API (of the old version too) first, or pass --force")
    if evidence and say is not None:
        say("warning: a worker or beat seems to be running: " + "; ".join(evidence))
    return migration.run()
