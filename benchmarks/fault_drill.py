"""The fault drill: the send path under kills and outages loses nothing.

    python -m benchmarks.fault_drill [--bookings 750] [--quick] [--workdir DIR] [--json PATH]

One run, on 127.0.0.1 only:

- a real redis-server (AOF on, appendfsync everysec, its own data folder), two Celery
  workers (`python -m worker.celery_main worker --concurrency 2`, the command line
  `reminders run` uses) and beat, each in its own
  process group; a real SMTP server and a real HTTP SMS gateway (benchmarks/sinks.py);
- a clinic `drill` whose channels point at them (send window all day) and a protocol
  `drill` of four messages per booking, two emails and two SMS, 1-7 s after the start
  (after it, so that no reminder expires while an outage delays it);
- bookings through `reminders book -` (JSON lines on stdin), with starts spread so that
  every message falls due within the first minute;
- while it drains: a worker SIGKILLed (its whole process group) every few seconds and
  started again; now and then one pool process of a worker SIGKILLed alone (as the OOM
  killer picks one), its main process left to fork a replacement; a worker stopped warm
  now and then (SIGTERM to its main process, as `docker stop` sends it) while a new one
  starts beside it, as a rolling deploy does; Redis SIGKILLed once and started again on
  the same port and data folder; the SMTP server down for a while, dropping every open
  session as it goes down (as a restart or a relay failover does: the workers' kept
  sessions are cut, not only new connections refused), and later, the server up, every
  open session dropped once more while emails flow (a server closing kept sessions); the
  SMS gateway failing for a while, as a provider's outage looks: it answers 503 to every
  post and takes nothing (the worker must treat that as transient and retry with back-off);
- and, competing with the sends, the clinic's and the patients' changes through the real
  interfaces (benchmarks/drill_changes.py), each at its booking's start plus 0.5-6.8 s, as
  its messages fall due or are in flight: bookings cancelled (`DELETE /v1/bookings/<id>` on
  the clinic API the drill runs), moved `--move-by` seconds later (the booking again
  through `reminders book -`), and patients texting STOP (`POST /v1/inbound/sms/<clinic>`,
  the SMS provider's webhook). Each change records when its successful request went out
  and when it returned (committed).

Then it waits until every message has arrived (or a time limit), and until nothing is
due or leased, and prints what the sinks received against what was booked. A message is
named by (channel, recipient, subject or SMS text): every booking has its own email
address and phone number and every step its own template, so the same name arriving
twice is one reminder sent twice (the drill maps each name to its reminder's ref). A
duplicate is explained only when both of these hold, and the report gives both per
duplicate:

- time: each earlier copy was accepted just before a kill (within --explain-window
  seconds before a worker's or a pool process's SIGKILL, or from that long before a Redis
  kill until Redis was back; or up to AFTER_KILL_SLACK after it): the kill landed inside or
  just after the provider call, before the outcome was recorded. A warm stop explains
  none: it hands back what has not begun and lets what has finish, within its grace; nor
  does an outage (the SMTP server refusing connections, the gateway answering 5xx):
  nothing was accepted; nor does a drop of the open SMTP sessions: a kept session found
  closed is noticed before any of the message is handed over and the message goes over a
  fresh session (worker/delivery.py), and a session cut mid-message delivered nothing
  (the sink records a message only as it answers DATA, and a cut lands between steps of
  its event loop, never between the record and the answer);
- the store, read after the drain (StoreEvidence): for each resend, an attempt whose
  outcome may have gone unrecorded. The `attempts` slot of the reminder's `<key>+` field
  counts attempts begun (the begin adds one as it takes the send ledger; a finish that
  defers, skips or hands back gives it back, and its log line says so), and every finish
  writes one line, with the attempt's token, to the attempt log P:a:<ref>. An attempt
  begun with no line is a lost attempt (its process died after the begin: the provider
  may have had the message, and once its ledger expired the reminder went again); a line
  "unknown" (a timeout after the hand-over) not followed by "sent" under the same token is
  an unknown outcome, retried once its ledger expired. And the attempt recorded as sent
  must have begun (its line's "at") after the earlier copies arrived: it sent the last.
  A duplicate whose every attempt the store recorded (a retry that took nothing, then
  the delivery), or whose recorded delivery began before an earlier copy arrived, is a
  real double send.

The summary counts the duplicates explained by a lost attempt and by an unknown outcome.

The changes are judged after the drain (drill_changes.judge) on the sinks' records, the
changed bookings' timelines (the API's GET) and the store's attempt records: a cancelled
booking's reminders and an opted-out number's SMS are `cancelled`/`skipped` on the
timeline with the change's reason and never arrived, or `sent` and arrived once (any
copy accepted after the change returned needs a `sent` attempt line begun before it: a
send already past its last check; a copy of one recorded cancelled or skipped needs an
attempt the store shows never finished or of unknown outcome and its hand-over at the
sink, SMTP MAIL or the SMS post, begun before the change returned); a moved booking's
reminders each arrived once, those accepted after the move no earlier than the new start
plus their step's offset unless their delivery began before the move (a `sent` line, or
a hand-over before it by an attempt never finished). The drill's protocol has no pause
step nor invite and no SMS before the visit: a change sends no notice
(worker/notices.py), and any extra message is unexpected. A message a change rightly
stopped is not expected; the rest are.

Anything else fails the drill: a lost message, a broken change promise, a change never
applied, a notice nobody documented, a
dead letter (`reminders dead-letters --json`), an unexplained duplicate, a message nobody
booked, a worker that did not end its warm stop within its grace, or a worker whose main
process lived on without replacing a killed pool process. Exit 0 only if none of those
happened.

Every process is stopped (SIGTERM, then SIGKILL, to its process group) however the run
ends.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from benchmarks.drill_changes import Change, ChangeOutcome, Changer, judge, plan_changes
from benchmarks.procs import Processes, child_pids, group_pids, service_command, wait_for
from benchmarks.sinks import Cut, HttpSink, Received, SmtpSink

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLINIC = "drill"
PROTOCOL = "drill"
KEY_PREFIX = "reminders"
START_TIMEOUT = 60.0
CLI_TIMEOUT = 120.0
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 10.0
# A worker's kill explains a copy accepted up to this long after it: the sink may record
# a message whose sender was already dead by the time the line was written (the message
# sits whole in the socket while the harness, which runs the sinks, reaps the killed group
# and starts its replacement). 0.25 s was once enough; with more sends in flight per kill,
# a run saw copies at 0.26-0.27 s whose attempts no surviving process ever logged (the
# killed worker's; its replacement logged only the later send, after the ledger expired).
AFTER_KILL_SLACK = 0.5
# A worker stopped warm must end within its grace and this margin (Celery's own shutdown,
# the pool's exit) or the drill fails.
STOP_MARGIN = 10.0
DETAIL_LIMIT = 30  # lost or duplicated reminders shown with their timeline and attempt log
RETRY_SAMPLE = 50  # bookings whose timelines are read to count retried reminders

# Every step is after the start: a step meant for before the visit expires once the visit
# has begun (worker/planner.py `expiry`), and a 30 s outage must not turn into skips.
DRILL_PROTOCOL = """
name = "Fault drill protocol"
description = "Four messages within seconds after the start (fault drill only)."
[[steps]]
id = "aftercare"
offset = "1s"
channels = ["email"]
template = "microneedling-aftercare"
[[steps]]
id = "spf"
offset = "3s"
channels = ["sms"]
template = "spf-morning"
[[steps]]
id = "redness"
offset = "5s"
channels = ["sms"]
template = "microneedling-redness"
[[steps]]
id = "check"
offset = "7s"
channels = ["email"]
template = "week-check"
# What the shipped templates state: values and sources as in config/protocols/microneedling.toml.
[advice]
spf = 30
sun_sensitive = true
redness_hours = [24, 48]
redness_max_days = 7
gentle_care = true
no_actives_hours = 48
makeup_free_days = 3
warning_signs = true
fever_celsius = 38
"""
MESSAGES_PER_BOOKING = 4
STEP_OFFSETS = {"aftercare": 1.0, "spf": 3.0, "redness": 5.0, "check": 7.0}  # as above


@dataclass(frozen=True)
class DrillParams:
    """What one drill does; `make faults` uses the defaults."""

    bookings: int = 750  # x4 messages each
    lead: float = 5.0  # seconds from booking to the first start
    spread: float = 40.0  # starts spread evenly over this many seconds after `lead`
    workers: int = 2
    concurrency: int = 2
    kill_first: float = 5.0  # first worker SIGKILL, seconds after the bookings went in
    kill_every: float = 5.0  # then one every this many seconds...
    worker_kills: int = 12  # ...this many in all, alternating between workers
    stop_first: float = 7.5  # first warm stop (SIGTERM), seconds after the bookings...
    stop_every: float = 15.0  # ...then one every this many seconds...
    worker_stops: int = 3  # ...this many in all, alternating workers (w2 first)
    stop_grace: float = 20.0  # REMINDERS_SHUTDOWN_GRACE_SECONDS
    # Redis SIGKILLed once, this long after the bookings: not within a few seconds after a
    # warm stop, whose worker must end within its grace (Celery hands unacknowledged
    # messages back to the broker as it stops; with Redis down it waits for it).
    redis_kill_at: float = 32.0
    smtp_down_at: float = 10.0  # the SMTP server goes down this long after the bookings...
    smtp_down_for: float = 30.0  # ...for this long
    smtp_down_cuts: int = 1  # 1: the outage also drops every open SMTP session as it starts
    smtp_cut_at: float = 47.5  # open SMTP sessions dropped, the server up (negative: never)
    gateway_fail_at: float = 42.0  # the SMS gateway answers 5xx this long after the bookings...
    gateway_fail_for: float = 15.0  # ...for this long, taking nothing
    gateway_status: int = 503  # what it answers meanwhile (500-599)
    pool_first: float = 12.5  # first pool process SIGKILL, seconds after the bookings...
    pool_every: float = 15.0  # ...then one every this many seconds...
    pool_kills: int = 3  # ...this many in all, alternating workers (w2 first)
    lease_seconds: int = 20  # REMINDERS_LEASE_SECONDS
    send_timeout: float = 4.0  # REMINDERS_SEND_TIMEOUT_SECONDS
    backoff_base: float = 1.0  # REMINDERS_BACKOFF_BASE_SECONDS
    backoff_cap: float = 4.0  # REMINDERS_BACKOFF_CAP_SECONDS
    max_attempts: int = 100  # REMINDERS_MAX_ATTEMPTS: an outage must never dead-letter
    explain_window: float = 2.0  # seconds before a kill that explain a duplicate
    timeout: float = 300.0  # give up waiting for deliveries this long after the bookings
    cancels: int = 75  # bookings cancelled while they drain (DELETE /v1/bookings/<id>)...
    moves: int = 40  # ...moved `move_by` later (`reminders book -`)...
    optouts: int = 10  # ...whose phone texts STOP (the inbound SMS webhook)
    move_by: float = 60.0  # seconds a move adds to the booking's start

    def service_env(self) -> dict[str, str]:
        return {
            "REMINDERS_LEASE_SECONDS": str(self.lease_seconds),
            "REMINDERS_SEND_TIMEOUT_SECONDS": f"{self.send_timeout:g}",
            "REMINDERS_BACKOFF_BASE_SECONDS": f"{self.backoff_base:g}",
            "REMINDERS_BACKOFF_CAP_SECONDS": f"{self.backoff_cap:g}",
            "REMINDERS_MAX_ATTEMPTS": str(self.max_attempts),
            "REMINDERS_SHUTDOWN_GRACE_SECONDS": f"{self.stop_grace:g}",
        }


HELP = {
    "bookings": "bookings, 4 messages each",
    "lead": "seconds from booking to the first start",
    "spread": "starts spread evenly over this many seconds",
    "workers": "Celery workers",
    "concurrency": "pool processes per worker",
    "kill_first": "first worker SIGKILL, seconds after booking",
    "kill_every": "seconds between worker SIGKILLs",
    "worker_kills": "worker SIGKILLs in all, alternating workers",
    "stop_first": "first warm worker stop (SIGTERM), seconds after booking",
    "stop_every": "seconds between warm worker stops",
    "worker_stops": "warm worker stops in all, alternating workers",
    "stop_grace": "REMINDERS_SHUTDOWN_GRACE_SECONDS",
    "redis_kill_at": "Redis SIGKILL, seconds after booking (negative: none)",
    "smtp_down_at": "SMTP server down, seconds after booking",
    "smtp_down_for": "seconds the SMTP server stays down (0: no outage)",
    "smtp_down_cuts": "1: the SMTP outage also drops every open session as it starts; 0: "
                      "it only refuses new connections",
    "smtp_cut_at": "every open SMTP session dropped by the server, which stays up, seconds "
                   "after booking (negative: never)",
    "gateway_fail_at": "SMS gateway starts answering 5xx, seconds after booking",
    "gateway_fail_for": "seconds the SMS gateway answers 5xx, taking nothing (0: never)",
    "gateway_status": "the status the failing SMS gateway answers (500-599)",
    "pool_first": "first pool process SIGKILL, seconds after booking",
    "pool_every": "seconds between pool process SIGKILLs",
    "pool_kills": "pool process SIGKILLs in all (one pool child each), alternating workers",
    "lease_seconds": "REMINDERS_LEASE_SECONDS",
    "send_timeout": "REMINDERS_SEND_TIMEOUT_SECONDS",
    "backoff_base": "REMINDERS_BACKOFF_BASE_SECONDS",
    "backoff_cap": "REMINDERS_BACKOFF_CAP_SECONDS",
    "max_attempts": "REMINDERS_MAX_ATTEMPTS",
    "explain_window": "seconds before a kill that explain a duplicate",
    "timeout": "give up waiting for deliveries this long after booking",
    "cancels": "bookings cancelled through the API while they drain",
    "moves": "bookings moved later through `reminders book -` while they drain",
    "optouts": "bookings whose phone texts STOP (inbound SMS webhook) while they drain",
    "move_by": "seconds a move adds to the booking's start",
}
# lead: `reminders book` must finish before the first start (a past appointment is refused),
# with room for a loaded test machine. The SMTP outage begins once emails flow (the first
# due at T+13 s), so that it has kept sessions to drop; the cut while up falls in the
# backlog's drain.
QUICK = {"bookings": 60, "lead": 12.0, "spread": 10.0, "kill_first": 11.0, "kill_every": 6.0,
         "worker_kills": 2, "stop_first": 14.0, "worker_stops": 1, "stop_grace": 8.0,
         "redis_kill_at": 19.5, "smtp_down_at": 15.0, "smtp_down_for": 10.0,
         "smtp_cut_at": 27.0,
         "gateway_fail_at": 18.0, "gateway_fail_for": 8.0, "pool_first": 22.0, "pool_kills": 1,
         "lease_seconds": 12, "timeout": 150.0,
         "cancels": 3, "moves": 3, "optouts": 2, "move_by": 20.0}


@dataclass
class Fault:
    """One fault the drill caused; `until` is when it was over (the service was whole)."""

    kind: str  # "worker kill", "pool kill", "worker stop", "redis kill", "smtp down",
    # "smtp cut" (open sessions dropped), "sms gateway 5xx"
    at: float  # epoch seconds
    until: float
    detail: str

    def explains(self, accepted_at: float, window: float) -> bool:
        """Whether a copy accepted at `accepted_at` may have lost its outcome to this fault."""
        if self.kind in ("worker kill", "pool kill"):
            # A pool process SIGKILLed alone loses its send's outcome as a whole worker does.
            return self.at - window <= accepted_at <= self.at + AFTER_KILL_SLACK
        if self.kind == "redis kill":
            # A send under way when Redis died could finish at the provider while Redis
            # was down; its outcome could not be recorded until Redis was back.
            return self.at - window <= accepted_at <= self.until + AFTER_KILL_SLACK
        return False


# Attempt log lines whose finish gave the begin's count back (worker/store.py _FINISH: an
# owning attempt's defer, skip or hand-back, `a[A_TRIES] - 1`; "put back" is an overtaken
# skip, defer or failure handed back as `abandon`). A skip the SMS cap made of a retry
# ("tried") keeps its count: counted here as given back, it hides no lost attempt (it can
# only make the evidence look thinner, never invent a lost attempt).
GAVE_BACK_OUTCOMES = ("deferred", "skipped", "abandoned")
GAVE_BACK_RESULTS = ("ok", "put back: the booking changed since the begin")
ATTEMPT_LOG_MAX = 50  # worker/store.py ATTEMPT_LOG_MAX: the log keeps the last this many


@dataclass
class StoreEvidence:
    """What the store kept of one reminder's attempts, read after the drain.

    `begun` counts the attempts that took the send ledger (worker/store.py _BEGIN_SEND adds
    one to the `<key>+` field's `attempts` slot as it sets the ledger's token); each
    finished attempt wrote one line, with its token, to the attempt log P:a:<ref> (two for
    a send cut by a shutdown that the provider accepted after all: an "unknown" then a
    "sent" line with the same token, still one attempt). An attempt that was begun and
    never finished is a send whose worker died (SIGKILL, or a Redis outage it could not
    outlast) with its outcome unrecorded: it may have reached the provider, and its reminder
    was sent again once its ledger expired. An attempt that finished "unknown" (a timeout
    after the hand-over, a shutdown cutting the send) and was never then recorded as sent
    may also have reached the provider, and was retried after its ledger expired.
    """

    attempt_field: str | None  # the `<key>+` field: claim|attempts|tok|sent_at|...
    lines: list[dict[str, Any]]  # the attempt log, oldest first
    error: str = ""  # why it could not be read

    @staticmethod
    def _gave_back(line: dict[str, Any]) -> bool:
        return (line.get("outcome") in GAVE_BACK_OUTCOMES
                and line.get("result") in GAVE_BACK_RESULTS)

    @property
    def begun(self) -> int:
        """Attempts that took the ledger: the counter plus those whose finish gave it back.
        The counter's slot is "<n>" or "<n>+<earlier>" (worker/store.py: a move or a replay
        starts the budget's n afresh and keeps the attempts made before it as earlier):
        every attempt made is their sum, as the log numbers them."""
        slots = (self.attempt_field or "").split("|")
        counted = 0
        for part in (slots[1] if len(slots) > 1 else "").split("+"):
            counted += int(part) if part.isdigit() else 0
        return counted + sum(1 for line in self.lines if self._gave_back(line))

    @property
    def finished(self) -> int:
        """Attempts with a line in the log (distinct tokens)."""
        return len({line.get("tok") for line in self.lines})

    @property
    def trimmed(self) -> bool:
        """The log may have dropped its oldest lines: the counts cannot be compared."""
        return len(self.lines) >= ATTEMPT_LOG_MAX

    @property
    def lost(self) -> int:
        """Attempts begun whose outcome was never recorded."""
        if self.error or self.trimmed:
            return 0
        return max(0, self.begun - self.finished)

    @property
    def unknown(self) -> int:
        """Attempts recorded as of unknown outcome and never then as sent."""
        doubted = {line.get("tok") for line in self.lines if line.get("outcome") == "unknown"}
        sent = {line.get("tok") for line in self.lines if line.get("outcome") == "sent"}
        return len(doubted - sent)

    @property
    def sent(self) -> int:
        """Attempts recorded as delivered."""
        return len({line.get("tok") for line in self.lines if line.get("outcome") == "sent"})

    @property
    def sent_started(self) -> list[float]:
        """When each attempt recorded as delivered began (its line's "at", epoch seconds)."""
        out = []
        for line in self.lines:
            if line.get("outcome") == "sent":
                try:
                    out.append(datetime.fromisoformat(str(line.get("at"))).timestamp())
                except ValueError:
                    continue
        return out

    def covers(self, copies: list[float]) -> bool:
        """Whether the copies but the last each have an attempt that may have gone unrecorded,
        and the attempt recorded as delivered began after they were accepted (an earlier
        copy is not its: it sent the last). A delivery recorded before an earlier copy
        arrived, then sent again, is a double send past the ledger's "sent"."""
        if self.error or self.lost + self.unknown < len(copies) - 1:
            return False
        started = self.sent_started
        return bool(started) and min(started) > max(copies[:-1])

    def summary(self) -> str:
        """The evidence in words: counts, then each attempt log line (no bodies, no
        addresses: the line's attempt number, claim, outcome and result only)."""
        if self.error:
            return f"store unreadable: {self.error}"
        words = [f"{self.begun} begun, {self.finished} finished ({self.sent} sent), "
                 f"{self.lost} never finished, {self.unknown} unknown outcome"]
        if self.trimmed:
            words.append(f"log trimmed to {ATTEMPT_LOG_MAX} lines: lost attempts not counted")
        slots = (self.attempt_field or "").split("|")
        words.append(f"claims {slots[0] or 0}")
        log = ", ".join(f"#{line.get('attempt', '?')} claim {line.get('claim', '?')} "
                        f"{line.get('outcome')}/{line.get('result')} "
                        f"tok ..{str(line.get('tok', ''))[-6:]}" for line in self.lines)
        return "; ".join(words) + f"; log: [{log}]"


@dataclass
class Duplicate:
    ref: str
    key: tuple[str, str, str]
    copies: list[float]  # acceptance times, oldest first
    explanations: list[str]  # one per copy but the last: why it was sent again, or ""
    timeline: dict[str, Any] | None = None  # the reminder, from `reminders show --json`
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    store: StoreEvidence | None = None  # the store's record of its attempts (None: unread)

    @property
    def by_time(self) -> bool:
        """Every copy but the last was accepted just before a kill (Fault.explains)."""
        return all(self.explanations)

    @property
    def by_store(self) -> bool:
        """The store shows, for every copy but the last, an attempt whose outcome was never
        recorded or was recorded as unknown (StoreEvidence)."""
        return self.store is not None and self.store.covers(self.copies)

    @property
    def explained(self) -> bool:
        return self.by_time and self.by_store

    @property
    def cause(self) -> str:
        """What the store shows sent it again: "lost attempt", "unknown outcome", both, or ""."""
        if not self.by_store or self.store is None:
            return ""
        if self.store.unknown == 0:
            return "lost attempt"
        if self.store.lost == 0:
            return "unknown outcome"
        return "lost attempt and unknown outcome"


@dataclass
class DrillReport:
    params: DrillParams
    started_at: float  # when the bookings went in
    expected: int = 0
    delivered: int = 0  # distinct reminders that arrived
    received: int = 0  # messages the sinks accepted, copies included
    duplicates: list[Duplicate] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)  # ref, key, timeline, attempts
    unexpected: list[dict[str, Any]] = field(default_factory=list)  # received, never booked
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)  # processes that died unasked
    failed_stops: list[str] = field(default_factory=list)  # warm stops not ended in grace
    # Pool processes killed whose worker's main process, still alive, forked no replacement.
    unreplaced_pools: list[str] = field(default_factory=list)
    # Each drop of the open SMTP sessions: at, sessions, mid_message (between MAIL and the
    # answer to DATA), in_data (of those, after the 354: an unknown outcome for the sender),
    # outage (at an outage's start, or with the server up).
    smtp_cuts: list[dict[str, Any]] = field(default_factory=list)
    gateway_refused: int = 0  # SMS posts the failing gateway answered 5xx (nothing taken)
    booking_seconds: float = 0.0
    first_due_at: float = 0.0
    last_due_at: float = 0.0
    last_delivery_at: float | None = None
    last_fault_over_at: float = 0.0
    retried: int = 0  # reminders whose timeline shows more than one attempt
    changes: list[Change] = field(default_factory=list)  # cancels, moves, opt-outs applied
    change_outcome: ChangeOutcome = field(default_factory=ChangeOutcome)
    notices: list[str] = field(default_factory=list)  # reminders the changes added (none due)
    seconds: float = 0.0
    workdir: str = ""

    @property
    def worker_kills(self) -> int:
        return sum(f.kind == "worker kill" for f in self.faults)

    @property
    def worker_stops(self) -> int:
        return sum(f.kind == "worker stop" for f in self.faults)

    @property
    def pool_kills(self) -> int:
        return sum(f.kind == "pool kill" for f in self.faults)

    @property
    def redis_kills(self) -> int:
        return sum(f.kind == "redis kill" for f in self.faults)

    @property
    def smtp_down_seconds(self) -> float:
        return sum(f.until - f.at for f in self.faults if f.kind == "smtp down")

    @property
    def smtp_sessions_cut(self) -> int:
        return sum(c["sessions"] for c in self.smtp_cuts)

    @property
    def gateway_fail_seconds(self) -> float:
        return sum(f.until - f.at for f in self.faults if f.kind == "sms gateway 5xx")

    @property
    def unexplained(self) -> list[Duplicate]:
        return [d for d in self.duplicates if not d.explained]

    @property
    def duplicate_sends(self) -> int:
        return sum(len(d.copies) - 1 for d in self.duplicates)

    @property
    def drain_seconds(self) -> float | None:
        """Seconds from the end of the last fault to the last first delivery (0 if before)."""
        if self.last_delivery_at is None:
            return None
        return max(0.0, self.last_delivery_at - self.last_fault_over_at)

    @property
    def ok(self) -> bool:
        return (not self.lost and not self.dead_letters and not self.unexplained
                and not self.unexpected and not self.failed_stops and not self.unreplaced_pools
                and not self.change_outcome.violations and not self.change_outcome.failed
                and not self.notices
                and self.delivered == self.expected > 0)


# --- the service, as ops would run it ---------------------------------------------------


class Service:
    """Redis, the workers and beat for one drill, each the leader of its process group."""

    def __init__(self, workdir: Path, env: dict[str, str], params: DrillParams,
                 procs: Processes, report: DrillReport) -> None:
        from worker.embedded import free_port

        self.workdir, self.env, self.params = workdir, env, params
        self.procs, self.report = procs, report
        self.redis_port = free_port()
        self.api_port = free_port()
        self.api_proc: subprocess.Popen[bytes] | None = None
        self.api_key = ""  # the drill clinic's API key, issued once Redis is up
        self.redis_dir = workdir / "redis"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.slots: dict[str, subprocess.Popen[bytes]] = {}  # "w1" -> its current process
        self.logs: dict[int, Path] = {}  # pid -> log
        self.incarnations: Counter[str] = Counter()
        self.beat_proc: subprocess.Popen[bytes] | None = None
        self.killed: set[int] = set()  # pids we killed (their exit is no surprise)
        # Workers stopped warm, still ending: pid -> (process, slot, when SIGTERM was sent).
        self.stopping: dict[int, tuple[subprocess.Popen[bytes], str, float]] = {}
        # Pool kills whose replacement was not seen yet: main pid -> (pool pids before the
        # kill, the kill's fault).
        self.replacing: dict[int, tuple[set[int], Fault]] = {}
        self.pool_kills = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # Redis -----------------------------------------------------------------------

    def start_redis(self) -> None:
        from worker.embedded import redis_server_binary

        self.redis_dir.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--dir", str(self.redis_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no",
                "--logfile", "redis.log"]
        self.redis_proc = self.procs.spawn(argv, env=self.env, cwd=self.redis_dir,
                                           log=self.workdir / "redis-stdout.log")
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)

        def answers() -> bool:
            if self.redis_proc is not None and self.redis_proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.redis_dir / 'redis.log'}")
            try:
                return bool(client.ping())
            except redis.RedisError:  # not listening yet, or still loading the AOF
                return False

        try:
            wait_for(answers, START_TIMEOUT, "redis-server start")
        finally:
            client.close()

    def kill_redis(self) -> Fault:
        """SIGKILL redis-server, then start it again on the same port and data folder."""
        assert self.redis_proc is not None
        at = self.kill_group(self.redis_proc)
        self.start_redis()
        return Fault("redis kill", at, time.time(), f"port {self.redis_port}, AOF restart")

    # Celery ----------------------------------------------------------------------

    def start_worker(self, slot: str) -> subprocess.Popen[bytes]:
        n = self.incarnations[slot]
        self.incarnations[slot] += 1
        log = self.workdir / f"{slot}.{n}.log"
        # The command line `reminders run` uses (its queues, its options), with the drill's
        # pool size and a name per incarnation (a later --concurrency wins).
        proc = self.procs.spawn(
            [*service_command("worker", self.env), f"--concurrency={self.params.concurrency}",
             "--pool=prefork", "-n", f"{slot}-{n}@%h", "--without-heartbeat"],
            env=self.env, cwd=self.workdir, log=log)
        self.slots[slot] = proc
        self.logs[proc.pid] = log
        return proc

    def is_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return proc.poll() is None and b" ready." in self.logs[proc.pid].read_bytes()

    def start_beat(self) -> None:
        log = self.workdir / "beat.log"
        self.beat_proc = self.procs.spawn(
            [str(BIN / "celery"), "-A", "worker.celery_app", "beat", "--loglevel=INFO",
             "-s", str(self.workdir / "beat-schedule")], env=self.env, cwd=self.workdir, log=log)
        self.logs[self.beat_proc.pid] = log

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(self) -> None:
        """Start the clinic API (the drill's cancels and the patients' STOPs go through it)."""
        import urllib.request

        from benchmarks.procs import settings_under
        from worker.service import api_command

        log = self.workdir / "api.log"
        self.api_proc = self.procs.spawn(api_command(settings_under(self.env), self.api_port),
                                         env=self.env, cwd=self.workdir, log=log)
        self.logs[self.api_proc.pid] = log

        def answers() -> bool:
            if self.api_proc is not None and self.api_proc.poll() is not None:
                raise RuntimeError(f"the API exited at start; see {log}")
            try:
                with urllib.request.urlopen(self.api_url + "/readyz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(answers, START_TIMEOUT, "API start")

    def start(self) -> None:
        """Start Redis, the API, the workers, beat; return once a pump tick has run on a
        worker."""
        self.start_redis()
        self.start_api()
        for i in range(self.params.workers):
            self.start_worker(f"w{i + 1}")
        for proc in self.slots.values():
            wait_for(lambda p=proc: self.is_ready(p) or p.poll() is not None, START_TIMEOUT,
                     "worker start")
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited at start; see {self.logs[proc.pid]}")
        self.start_beat()
        wait_for(lambda: any(b"Task reminders.pump[" in self.logs[p.pid].read_bytes()
                             for p in self.slots.values()), START_TIMEOUT, "first pump tick")

    def kill_worker(self, slot: str) -> Fault:
        """SIGKILL a worker's process group (main process and pool) and start a new one."""
        proc = self.slots[slot]
        ready = self.is_ready(proc)
        at = self.kill_group(proc)
        new = self.start_worker(slot)
        return Fault("worker kill", at, at,
                     f"{slot} pid {proc.pid}, {'ready' if ready else 'starting'}; "
                     f"restarted as pid {new.pid}")

    def pool_of(self, slot: str) -> list[int]:
        """The pool processes of `slot`'s worker: the children of its main process."""
        return child_pids(self.slots[slot].pid)

    def kill_pool_process(self, slot: str) -> Fault:
        """SIGKILL one pool process of `slot`'s worker (as the OOM killer would), its main
        process left alive to fork a replacement (seen by `supervise`)."""
        proc = self.slots[slot]
        pool = self.pool_of(slot)
        victim = pool[self.pool_kills % len(pool)]
        self.pool_kills += 1
        at = time.time()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fault = Fault("pool kill", at, at, f"{slot} pool pid {victim} of main pid {proc.pid} "
                                           f"(pool {' '.join(map(str, pool))})")
        self.replacing[proc.pid] = (set(pool), fault)
        return fault

    def _replaced_pools(self) -> None:
        """Note the pool kills whose worker forked a replacement; a worker whose main
        process lives on without one past START_TIMEOUT is a failure (`unreplaced_pools`)."""
        for main, (before, fault) in list(self.replacing.items()):
            proc = next((p for p in self.slots.values() if p.pid == main), None)
            if proc is None or proc.poll() is not None or main in self.killed:
                fault.detail += "; its worker ended before a replacement was seen"
                del self.replacing[main]
                continue
            new = sorted(set(child_pids(main)) - before)
            if new:
                fault.until = time.time()
                fault.detail += f"; replaced by pid {new[0]} after {fault.until - fault.at:.1f}s"
                del self.replacing[main]
                say(f"T+{time.time() - self.report.started_at:5.1f}s pool process replaced: "
                    f"{fault.detail}")
            elif time.time() > fault.at + START_TIMEOUT:
                self.report.unreplaced_pools.append(
                    f"{fault.detail}: no replacement {START_TIMEOUT:g}s later; "
                    f"see {self.logs[main]}")
                del self.replacing[main]

    def stop_worker(self, slot: str) -> None:
        """SIGTERM a worker's main process (as `docker stop` does: a warm shutdown, within
        its grace) and start a new one in its slot at once, as a rolling deploy does. Its
        fault is noted once it has ended (`supervise`)."""
        proc = self.slots[slot]
        self.killed.add(proc.pid)
        self.stopping[proc.pid] = (proc, slot, time.time())
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.start_worker(slot)

    def _ended_stops(self) -> list[Fault]:
        """The warm stops that ended since the last look; a worker still running past its
        grace and a margin is noted as an unexpected exit and SIGKILLed."""
        ended = []
        for pid, (proc, slot, at) in list(self.stopping.items()):
            code = proc.poll()
            overdue = time.time() > at + self.params.stop_grace + STOP_MARGIN
            if code is None and not overdue:
                continue
            if code is None:
                self.report.failed_stops.append(
                    f"{slot} pid {pid} still running {time.time() - at:.0f}s after SIGTERM "
                    f"(grace {self.params.stop_grace:g}s); SIGKILLed; see {self.logs[pid]}")
                self.kill_group(proc)
                code = proc.returncode
            else:
                if proc in self.procs.running:
                    self.procs.running.remove(proc)
                left = group_pids(pid)
                if left:  # its pool processes must end with it
                    self.report.failed_stops.append(
                        f"{slot} pid {pid} ended its warm stop leaving {len(left)} "
                        f"process(es) of its group; see {self.logs[pid]}")
                    self.kill_group(proc)
            del self.stopping[pid]
            ended.append(Fault("worker stop", at, time.time(),
                               f"{slot} pid {pid}, exit {code} after "
                               f"{time.time() - at:.1f}s"))
        return ended

    def kill_group(self, proc: subprocess.Popen[bytes]) -> float:
        """SIGKILL every process of `proc`'s group; return when the signal was sent."""
        self.killed.add(proc.pid)
        at = time.time()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.monotonic() + 10
        while group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc in self.procs.running:
            self.procs.running.remove(proc)
        return at

    def stop(self) -> None:
        """Stop beat, then the workers, then Redis (so none of them sees Redis go first)."""
        for proc in [self.beat_proc, *self.slots.values(), self.api_proc, self.redis_proc]:
            if proc is not None and proc in self.procs.running:
                self.procs.stop(proc)

    def supervise(self) -> list[Fault]:
        """Restart a worker or beat that exited without being killed; note it. Return the
        warm stops that ended since the last call."""
        ended = self._ended_stops()
        self._replaced_pools()
        for slot, proc in list(self.slots.items()):
            if proc.poll() is not None and proc.pid not in self.killed:
                self.report.unexpected_exits.append(
                    f"{slot} pid {proc.pid} exited ({proc.returncode}) at "
                    f"T+{time.time() - self.report.started_at:.1f}s; see {self.logs[proc.pid]}")
                self.procs.running.remove(proc)
                self.start_worker(slot)
        if self.api_proc is not None and self.api_proc.poll() is not None:
            self.report.unexpected_exits.append(
                f"API pid {self.api_proc.pid} exited ({self.api_proc.returncode}); restarted")
            self.procs.running.remove(self.api_proc)
            self.start_api()
        if self.beat_proc is not None and self.beat_proc.poll() is not None:
            self.report.unexpected_exits.append(
                f"beat pid {self.beat_proc.pid} exited ({self.beat_proc.returncode}); restarted")
            self.procs.running.remove(self.beat_proc)
            self.start_beat()
        return ended

    # The CLI ---------------------------------------------------------------------

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "reminders"), *args], env=self.env, input=stdin,
                              capture_output=True, text=True, cwd=self.workdir,
                              timeout=CLI_TIMEOUT)

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args)
        if result.returncode != 0:
            raise RuntimeError(f"reminders {' '.join(args)}: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def quiet(self) -> bool:
        """Nothing due or leased: no send can happen any more (False while Redis is away)."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            return (client.zcard(f"{KEY_PREFIX}:due") == 0
                    and client.zcard(f"{KEY_PREFIX}:lease") == 0)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def status_of(self, ref: str) -> str:
        """Return a reminder's stored status and reason, for a report ("?" if unreadable)."""
        clinic, booking_id, key = ref.split("/", 2)
        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2)
        try:
            # The booking hash's `<key>` field: status letter first (worker/store.py layout 2).
            value = client.hget(f"{KEY_PREFIX}:b:{clinic}/{booking_id}", key)
        except redis.RedisError:
            return "?"
        finally:
            client.close()
        if value is None:
            return "absent"
        from worker.store import STATUS_OF

        code = str(value).split("|", 1)[0]
        return STATUS_OF.get(code, f"code {code}")

    def store_evidence(self, ref: str) -> StoreEvidence:
        """Read what the store kept of a reminder's attempts: its `<key>+` field in the
        booking hash and its attempt log, in one transaction (see StoreEvidence)."""
        clinic, booking_id, key = ref.split("/", 2)
        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)
        try:
            pipe = client.pipeline(transaction=True)
            pipe.hget(f"{KEY_PREFIX}:b:{clinic}/{booking_id}", f"{key}+")
            pipe.lrange(f"{KEY_PREFIX}:a:{ref}", 0, -1)
            field_value, raw = pipe.execute()
            return StoreEvidence(field_value, [json.loads(x) for x in raw])
        except (redis.RedisError, ValueError) as exc:
            return StoreEvidence(None, [], error=f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    def api_timeline(self, booking_id: str) -> dict[str, Any] | None:
        """A booking's timeline through the API (`GET /v1/bookings/<id>`; None: unreadable)."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.api_url}/v1/bookings/{booking_id}",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return dict(json.loads(resp.read()))
            except urllib.error.HTTPError as exc:
                # The key's rate limit (429) or Redis away (503): as a client should, wait.
                if exc.code not in (429, 503) or time.monotonic() > deadline:
                    return None
                time.sleep(min(5.0, float(exc.headers.get("Retry-After") or 1)))
            except (OSError, ValueError):
                return None

    def attempt_log(self, ref: str) -> list[dict[str, Any]]:
        """Return a reminder's attempt log (evidence for a report; empty if unreadable)."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2)
        try:
            return [json.loads(x) for x in client.lrange(f"{KEY_PREFIX}:a:{ref}", 0, -1)]
        except (redis.RedisError, ValueError):
            return []
        finally:
            client.close()


# --- what was booked, what arrived ------------------------------------------------------


def write_config(folder: Path, smtp_port: int, sms_port: int) -> Path:
    (folder / "protocols").mkdir(parents=True)
    (folder / "clinics").mkdir()
    (folder / "protocols" / f"{PROTOCOL}.toml").write_text(DRILL_PROTOCOL, encoding="utf-8")
    (folder / "clinics" / f"{CLINIC}.toml").write_text(f"""
name = "Drill Skin Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp_port}?from=clinic@example.com&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sms_port}/sms?:to={{to}}"
[inbound]
allow_unsigned = true
""", encoding="utf-8")
    return folder


def booking_docs(params: DrillParams, now: datetime) -> list[dict[str, Any]]:
    """The drill's bookings: each its own email and phone, starts spread over `spread`."""
    n = params.bookings
    docs = []
    for i in range(n):
        starts = now + timedelta(seconds=params.lead + params.spread * i / max(1, n - 1))
        docs.append({
            "clinic": CLINIC, "booking_id": f"D-{i:05d}", "treatment": PROTOCOL,
            "starts_at": starts.isoformat(timespec="milliseconds"),
            "patient": {"name": "Ana López", "email": f"d-{i:05d}@example.com",
                        "phone": f"+346001{i:05d}", "timezone": "UTC", "locale": "en",
                        "channels": ["sms", "email"]},
        })
    return docs


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


def message_key(m: Received) -> tuple[str, str, str]:
    """Name a received message: (channel, recipient, subject or SMS text)."""
    return (m.channel, m.to, _norm(m.subject if m.channel == "email" else m.text))


def expected_messages(config: Path, docs: list[dict[str, Any]],
                      timelines: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Render every booked reminder as the sinks will see it; return its name -> ref."""
    from worker.catalog import Catalog
    from worker.models import parse_booking
    from worker.rendering import Renderer
    from worker.settings import Settings

    catalog = Catalog.load(Settings(config_dir=config, templates_dir=ROOT / "templates",
                                    _env_file=None))
    renderer = Renderer(catalog.templates_dir)
    protocol, clinic = catalog.protocols[PROTOCOL], catalog.clinics[CLINIC]
    templates = {s.id: s.template for s in protocol.steps}
    names: dict[tuple[str, str, str], str] = {}
    for doc, timeline in zip(docs, timelines, strict=True):
        booking = parse_booking(doc, catalog)
        dates: dict[str, datetime] = {}
        for r in timeline["reminders"]:
            when = _dt(r["due_at"])
            dates[r["step"]] = min(when, dates.get(r["step"], when))
        for r in timeline["reminders"]:
            # The timeline is read after each booking is stored: a confirmation may be on
            # its way already. Anything not meant to be sent is a broken drill set-up.
            if r["status"] in ("skipped", "cancelled", "failed"):
                raise RuntimeError(f"{doc['booking_id']} {r['id']}: planned {r['status']} "
                                   f"({r['reason']})")
            msg = renderer.render(template=templates[r["step"]], channel=r["channel"],
                                  booking=booking, clinic=clinic, protocol=protocol, occurrence=1,
                                  due_at=_dt(r["due_at"]), plan_dates=dates)
            to = booking.patient.email if r["channel"] == "email" else booking.patient.phone
            key = (r["channel"], str(to), _norm(msg.subject if r["channel"] == "email"
                                                else msg.text))
            ref = f"{CLINIC}/{doc['booking_id']}/{r['id']}"
            if key in names:
                raise RuntimeError(f"{ref} and {names[key]} would look the same at the sink")
            names[key] = ref
    return names


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)


def handed_by_name(smtp: SmtpSink, sms: HttpSink) -> dict[tuple[str, str, str], list[float]]:
    """When each copy's hand-over began (SMTP MAIL, the SMS post), in acceptance order."""
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for m in sorted(smtp.snapshot() + sms.snapshot(), key=lambda m: m.at):
        out[message_key(m)].append(m.handed_at)
    return out


def received_by_name(smtp: SmtpSink, sms: HttpSink) -> dict[tuple[str, str, str], list[float]]:
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for m in sorted(smtp.snapshot() + sms.snapshot(), key=lambda m: m.at):
        out[message_key(m)].append(m.at)
    return out


# --- the run ----------------------------------------------------------------------------


def fault_plan(params: DrillParams, t0: float) -> list[tuple[float, str]]:
    """Return (when, what) for every fault, in order: kills, the Redis kill, the outages."""
    plan = [(t0 + params.kill_first + k * params.kill_every, f"kill w{k % params.workers + 1}")
            for k in range(params.worker_kills)]
    # w2 first: at the default times each pool kill hits the worker whose main process has
    # the longest to live (7.5 s) before its next kill, time for Celery to replace the pool
    # process (it may take up to its 5 s maintain_pool timer to notice the death).
    plan += [(t0 + params.pool_first + k * params.pool_every,
              f"pool w{(k + 1) % params.workers + 1}") for k in range(params.pool_kills)]
    plan += [(t0 + params.stop_first + k * params.stop_every,
              f"stop w{(k + 1) % params.workers + 1}") for k in range(params.worker_stops)]
    if params.redis_kill_at >= 0:
        plan.append((t0 + params.redis_kill_at, "kill redis"))
    if params.smtp_down_for > 0:
        plan.append((t0 + params.smtp_down_at, "smtp down"))
        plan.append((t0 + params.smtp_down_at + params.smtp_down_for, "smtp up"))
    if params.smtp_cut_at >= 0:
        plan.append((t0 + params.smtp_cut_at, "smtp cut"))
    if params.gateway_fail_for > 0:
        plan.append((t0 + params.gateway_fail_at, "gateway fail"))
        plan.append((t0 + params.gateway_fail_at + params.gateway_fail_for, "gateway ok"))
    return sorted(plan)


def say(text: str) -> None:
    print(f"[drill] {text}", file=sys.stderr, flush=True)


def run_drill(params: DrillParams, workdir: Path) -> DrillReport:
    """Run the drill in `workdir` (logs stay there); return what happened."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    smtp, sms = SmtpSink(), HttpSink()
    report = DrillReport(params=params, started_at=time.time(), workdir=str(workdir))
    service: Service | None = None
    try:
        smtp.start()
        sms.start()
        config = write_config(workdir / "config", smtp.port, sms.port)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REMINDERS_", "CELERY_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        service = Service(workdir, env, params, procs, report)
        env.update({
            "REMINDERS_REDIS_URL": service.redis_url,
            "REMINDERS_CONFIG_DIR": str(config),
            "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"),
            "REMINDERS_DATA_DIR": str(workdir / "data"),
            "REMINDERS_KEY_PREFIX": KEY_PREFIX,
            **params.service_env(),
        })
        say(f"starting redis, {params.workers} workers, beat in {workdir}")
        service.start()
        _drive(params, service, config, smtp, sms, report)
    finally:
        if service is not None:
            service.stop()
        procs.stop_all()
        smtp.stop()
        sms.stop()
        report.seconds = time.monotonic() - started
    return report


def _drive(params: DrillParams, service: Service, config: Path, smtp: SmtpSink, sms: HttpSink,
           report: DrillReport) -> None:
    service.api_key = key = service.cli_json("keys", "issue", "--json", "--clinic",
                                             CLINIC)["key"]
    now = datetime.now(UTC)
    docs = booking_docs(params, now)
    starts = [_dt(d["starts_at"]).timestamp() for d in docs]
    report.changes = plan_changes(starts, params.cancels, params.moves, params.optouts)
    changer = Changer(report.changes, service.api_url, key, CLINIC,
                      {d["booking_id"]: d for d in docs}, params.move_by,
                      lambda lines: service.cli("book", "--json", "-", stdin=lines),
                      lambda text: say(f"T+{time.time() - t0:5.1f}s {text}"))
    report.started_at = t0 = time.time()
    say(f"booking {len(docs)} x {MESSAGES_PER_BOOKING} through `reminders book -`")
    result = service.cli("book", "--json", "-", stdin="\n".join(json.dumps(d) for d in docs))
    if result.returncode != 0:
        raise RuntimeError(f"reminders book failed: {result.stderr.strip()[-2000:]}")
    report.booking_seconds = time.time() - t0
    out = json.loads(result.stdout)
    timelines = out if isinstance(out, list) else [out]
    names = expected_messages(config, docs, timelines)
    report.expected = len(names)
    dues = [_dt(r["due_at"]).timestamp() for t in timelines for r in t["reminders"]]
    report.first_due_at, report.last_due_at = min(dues), max(dues)
    say(f"{report.expected} reminders due between T+{report.first_due_at - t0:.1f}s and "
        f"T+{report.last_due_at - t0:.1f}s (booking took {report.booking_seconds:.1f}s)")

    # The reminders a cancel or an opt-out may rightly stop: not waited for, judged at the end.
    stoppable = {ref for ref in names.values()
                 if any(c.booking_id == ref.split("/")[1] and (
                     c.kind == "cancel" or c.kind == "opt-out" and ref.endswith(":sms"))
                     for c in report.changes)}
    waited = {k for k, ref in names.items() if ref not in stoppable}
    changer.start()
    say(f"changes while it drains: {params.cancels} cancels (API), {params.moves} moves "
        f"(+{params.move_by:g}s, `reminders book -`), {params.optouts} STOPs (inbound SMS)")
    try:
        _drain(params, service, smtp, sms, report, names, waited, changer, t0)
    finally:
        changer.stop()
    _account(service, names, smtp, sms, report, config, docs)


def _drain(params: DrillParams, service: Service, smtp: SmtpSink, sms: HttpSink,
           report: DrillReport, names: dict[tuple[str, str, str], str],
           waited: set[tuple[str, str, str]], changer: Changer, t0: float) -> None:
    """Cause the faults on schedule until every waited-for message arrived."""
    plan = [(when, what, when) for when, what in fault_plan(params, t0)]  # + first planned
    smtp_down_since: float | None = None
    gateway_fail_since: float | None = None
    refused_before = 0
    deadline = t0 + params.timeout
    next_progress = t0 + PROGRESS_SECONDS
    delivered = 0
    while time.time() < deadline:
        while plan and plan[0][0] <= time.time():
            _, what, planned = plan.pop(0)
            if what.startswith(("kill w", "stop w", "pool w")):
                slot = what.split()[1]
                proc = service.slots[slot]
                if ((not service.is_ready(proc) and proc.poll() is None
                        or what.startswith("pool w") and not service.pool_of(slot))
                        and time.time() < planned + START_TIMEOUT):
                    # Kill a worker at work: a restarted one still starting is killed once up.
                    bisect.insort(plan, (time.time() + 0.2, what, planned))
                    break
                if what.startswith("stop w"):
                    service.stop_worker(slot)
                    say(f"T+{time.time() - t0:5.1f}s worker stop: SIGTERM to {slot} pid "
                        f"{proc.pid}; restarted as pid {service.slots[slot].pid}")
                    continue
                if what.startswith("pool w"):
                    if not service.pool_of(slot):
                        say(f"T+{time.time() - t0:5.1f}s pool kill skipped: {slot} pid "
                            f"{proc.pid} has no pool process {START_TIMEOUT:g}s on")
                        continue
                    fault = service.kill_pool_process(slot)
                else:
                    fault = service.kill_worker(slot)
            elif what == "kill redis":
                fault = service.kill_redis()
            elif what == "smtp down":
                cut = smtp.down(cut=bool(params.smtp_down_cuts))
                smtp_down_since = time.time()
                # The outage lasts its full length even when this step ran late.
                plan = sorted((smtp_down_since + params.smtp_down_for, w, p)
                              if w == "smtp up" else (t, w, p) for t, w, p in plan)
                say(f"T+{smtp_down_since - t0:5.1f}s smtp down: port {smtp.port} refuses "
                    f"connections for {params.smtp_down_for:g}s")
                if cut is None:
                    continue
                fault = _smtp_cut(report, smtp_down_since, cut, smtp.port, outage=True)
            elif what == "smtp cut":
                at = time.time()
                fault = _smtp_cut(report, at, smtp.cut_sessions(), smtp.port, outage=False)
            elif what == "gateway fail":
                sms.fail(params.gateway_status)
                gateway_fail_since, refused_before = time.time(), sms.refused
                plan = sorted((gateway_fail_since + params.gateway_fail_for, w, p)
                              if w == "gateway ok" else (t, w, p) for t, w, p in plan)
                say(f"T+{gateway_fail_since - t0:5.1f}s sms gateway fails: port {sms.port} "
                    f"answers {params.gateway_status} for {params.gateway_fail_for:g}s, "
                    "taking nothing")
                continue
            elif what == "gateway ok":
                sms.recover()
                assert gateway_fail_since is not None
                fault = Fault("sms gateway 5xx", gateway_fail_since, time.time(),
                              f"port {sms.port} answered {params.gateway_status} to "
                              f"{sms.refused - refused_before} posts, taking none")
            else:
                smtp.up()
                assert smtp_down_since is not None
                fault = Fault("smtp down", smtp_down_since, time.time(),
                              f"port {smtp.port} refused connections")
            report.faults.append(fault)
            event = {"smtp down": "smtp up", "sms gateway 5xx": "sms gateway ok"}.get(
                fault.kind, fault.kind)
            say(f"T+{time.time() - t0:5.1f}s {event}: {fault.detail}")
        for fault in service.supervise():
            report.faults.append(fault)
            say(f"T+{time.time() - t0:5.1f}s worker stopped: {fault.detail}")
        received = received_by_name(smtp, sms)
        delivered = sum(1 for k in waited if k in received)
        if (delivered == len(waited) and not plan and not service.stopping
                and not service.replacing and not changer.busy):
            break
        if time.time() >= next_progress:
            say(f"T+{time.time() - t0:5.1f}s {delivered}/{len(waited)} delivered; "
                f"{sum(c.done for c in report.changes)}/{len(report.changes)} changes")
            next_progress += PROGRESS_SECONDS
        time.sleep(POLL_SECONDS)
    report.last_fault_over_at = max((f.until for f in report.faults), default=t0)
    say(f"{delivered}/{len(waited)} delivered at T+{time.time() - t0:.1f}s; waiting until "
        "nothing is due or leased")
    # A reminder whose outcome a kill lost is still leased: wait for it to be sent again.
    try:
        wait_for(service.quiet, max(10.0, 3.0 * params.lease_seconds), "nothing due or leased")
    except TimeoutError as exc:
        say(str(exc))
    time.sleep(2.0)  # for a stray send to land


def _went_elsewhere(reminder: dict[str, Any]) -> bool:
    """Whether a timeline's reminder is a step's copy skipped because the step went out on
    its other channel (`worker.store.sent_elsewhere`'s reason): no message of its own."""
    return (reminder.get("status") == "skipped"
            and str(reminder.get("reason") or "").startswith("not sent: already sent by "))


def _judge_changes(service: Service, names: dict[tuple[str, str, str], str],
                   received: dict[tuple[str, str, str], list[float]],
                   handed: dict[tuple[str, str, str], list[float]], report: DrillReport,
                   config: Path, docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Judge the cancels, moves and opt-outs (benchmarks/drill_changes.py) on the sinks'
    records, the changed bookings' timelines (the API's GET) and the store's attempt
    records. A moved message rendered for its new date is counted as its reminder's copy
    (`received` is merged in place). Return the messages that must have arrived: all but
    those a cancel or an opt-out rightly stopped."""
    by_id = {d["booking_id"]: d for d in docs}
    key_of = {ref: k for k, ref in names.items()}
    refs: dict[str, list[str]] = defaultdict(list)
    for ref in names.values():
        refs[ref.split("/")[1]].append(ref)
    after: dict[str, dict[str, Any]] = {}
    for c in report.changes:
        timeline = service.api_timeline(c.booking_id)
        if timeline is not None:
            after[c.booking_id] = timeline
    for c in report.changes:
        if c.kind != "move" or not c.done or c.booking_id not in after:
            continue
        moved = dict(by_id[c.booking_id])
        moved["starts_at"] = datetime.fromtimestamp(c.new_start, UTC).isoformat(
            timespec="milliseconds")
        try:
            alt = expected_messages(config, [moved], [after[c.booking_id]])
        except (RuntimeError, KeyError, ValueError):
            continue  # a reminder not sent: judged below
        for key, ref in alt.items():
            primary = key_of.get(ref)
            if primary is not None and key != primary and key in received:
                pairs = sorted(zip(received.get(primary, []) + received.pop(key),
                                   handed.get(primary, []) + handed.pop(key, []), strict=True))
                received[primary] = [at for at, _ in pairs]
                handed[primary] = [h for _, h in pairs]
    reminders = {f"{CLINIC}/{b}/{r['id']}": r for b, t in after.items() for r in t["reminders"]}
    for ref, rem in reminders.items():
        # A notice or a message again: none documented for this protocol. Not a step's copy
        # on its other channel that its timeline shows skipped because the step went out
        # already (its SMS, once the cap sent it by email: `worker.store.sent_elsewhere`):
        # no message, and the copy that went is judged as any.
        if ref not in key_of and not _went_elsewhere(rem):
            report.notices.append(f"{ref}: {rem.get('status')} ({rem.get('reason')})")
    copies = {ref: received.get(key_of[ref], []) for c in report.changes
              for ref in refs[c.booking_id]}
    handed_of = {ref: handed.get(key_of[ref], []) for ref in copies}
    report.change_outcome = judge(report.changes, refs, copies, reminders,
                                  service.store_evidence, STEP_OFFSETS, report.started_at,
                                  handed_of)
    for c in report.changes:
        if c.booking_id not in after:
            report.change_outcome.violations.append(f"{c.booking_id}: timeline unreadable")
    stopped = {ref for c in report.changes if c.kind in ("cancel", "opt-out")
               for ref in refs[c.booking_id] if c.kind == "cancel" or ref.endswith(":sms")}
    return {k: ref for k, ref in names.items()
            if ref not in stopped or ref in report.change_outcome.sent_refs}


def _smtp_cut(report: DrillReport, at: float, cut: Cut, port: int, outage: bool) -> Fault:
    """Record a drop of the SMTP server's open sessions."""
    report.smtp_cuts.append({"at": at, "sessions": cut.sessions, "mid_message": cut.mid_message,
                             "in_data": cut.in_data, "outage": outage})
    return Fault("smtp cut", at, at,
                 f"port {port} dropped {cut.sessions} open sessions ({cut.mid_message} "
                 f"mid-message, {cut.in_data} of them after the 354) "
                 f"{'as the outage began' if outage else 'while up'}")


def _account(service: Service, names: dict[tuple[str, str, str], str], smtp: SmtpSink,
             sms: HttpSink, report: DrillReport, config: Path,
             docs: list[dict[str, Any]]) -> None:
    """Compare what arrived with what was booked; explain every duplicate; judge the
    changes."""
    received = received_by_name(smtp, sms)
    report.gateway_refused = sms.refused
    report.received = sum(len(v) for v in received.values())
    counted = _judge_changes(service, names, received, handed_by_name(smtp, sms), report,
                             config, docs)
    report.expected = len(counted)
    report.delivered = sum(1 for k in counted if k in received)
    firsts = [received[k][0] for k in counted if k in received]
    report.last_delivery_at = max(firsts, default=None)
    timelines: dict[str, dict[str, Any]] = {}

    def timeline_of(ref: str) -> dict[str, Any] | None:
        booking_id = ref.split("/")[1]
        if booking_id not in timelines:
            try:
                timelines[booking_id] = service.cli_json("show", "--json", "--clinic", CLINIC,
                                                         booking_id)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                return None
        rid = ref.split("/", 2)[2]
        return next((r for r in timelines[booking_id]["reminders"] if r["id"] == rid), None)

    report.duplicates, report.unexpected = find_duplicates(
        received, names, report.faults, report.params.explain_window, report.started_at)
    # Every duplicate's attempts as the store kept them: the evidence that an earlier copy's
    # outcome went unrecorded (or was in doubt), so that sending it again was the design.
    for dup in report.duplicates:
        dup.store = service.store_evidence(dup.ref)
    for dup in report.duplicates[:DETAIL_LIMIT]:  # `reminders show` takes about a second
        dup.timeline, dup.attempt_log = timeline_of(dup.ref), service.attempt_log(dup.ref)
    for key, ref in counted.items():
        if key not in received:
            detailed = len(report.lost) < DETAIL_LIMIT  # `reminders show` takes a second
            report.lost.append({"ref": ref, "key": list(key),
                                "status": service.status_of(ref),
                                "timeline": timeline_of(ref) if detailed else None,
                                "attempt_log": service.attempt_log(ref) if detailed else []})
    try:
        report.dead_letters = service.cli_json("dead-letters", "--json")
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        report.dead_letters = [{"error": f"could not read dead letters: {exc}"}]
    # How hard the faults hit: reminders that needed more than one attempt (sampled).
    sample = sorted({ref.split("/")[1] for ref in names.values()})[:RETRY_SAMPLE]
    for booking_id in sample:
        try:
            t = service.cli_json("show", "--json", "--clinic", CLINIC, booking_id)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            continue
        report.retried += sum(1 for r in t["reminders"] if r["attempts"] > 1)


def find_duplicates(received: dict[tuple[str, str, str], list[float]],
                    names: dict[tuple[str, str, str], str], faults: list[Fault], window: float,
                    t0: float) -> tuple[list[Duplicate], list[dict[str, Any]]]:
    """Return the reminders that arrived more than once, each copy explained or not, and
    the messages that match no booked reminder.

    Every copy but the last was followed by another send: its outcome was lost. That is
    explained only by a kill just after it reached the provider (see Fault.explains): the
    time rule, filled in here. The store's side of the evidence (`Duplicate.store`, read
    after the drain) must show the lost outcome as well (Duplicate.explained).
    """
    kills = [f for f in faults if f.kind in ("worker kill", "pool kill", "redis kill")]
    duplicates, unexpected = [], []
    for key, copies in received.items():
        ref = names.get(key)
        if ref is None:
            unexpected.append({"key": list(key), "copies": len(copies)})
            continue
        if len(copies) == 1:
            continue
        copies = sorted(copies)
        explanations = []
        for at in copies[:-1]:
            fault = next((f for f in kills if f.explains(at, window)), None)
            explanations.append("" if fault is None else _explain(at, fault, t0))
        duplicates.append(Duplicate(ref=ref, key=key, copies=copies,
                                    explanations=explanations))
    return duplicates, unexpected


def _explain(at: float, fault: Fault, t0: float) -> str:
    if at <= fault.at:
        when = f"{fault.at - at:.2f}s before the {fault.kind} at T+{fault.at - t0:.1f}s"
    else:
        when = f"{at - fault.at:.2f}s after the {fault.kind} at T+{fault.at - t0:.1f}s"
    return f"copy accepted at T+{at - t0:.2f}s, {when} ({fault.detail})"


# --- the report ---------------------------------------------------------------------------


def table_rows(report: DrillReport) -> list[tuple[str, str]]:
    drain = report.drain_seconds
    unexplained = len(report.unexplained)
    co = report.change_outcome
    causes = Counter(d.cause for d in report.duplicates if d.explained)
    return [
        ("expected reminders", f"{report.expected:,}"),
        ("delivered (unique)", f"{report.delivered:,}"),
        ("duplicates (extra copies)",
         f"{report.duplicate_sends} ({len(report.duplicates)} "
         f"reminder{'' if len(report.duplicates) == 1 else 's'}, {unexplained} unexplained)"),
        ("  explained by a lost attempt / unknown outcome",
         f"{causes['lost attempt']} / {causes['unknown outcome']}"
         + (f" (+{causes['lost attempt and unknown outcome']} both)"
            if causes["lost attempt and unknown outcome"] else "")),
        ("lost (expected - delivered)", f"{report.expected - report.delivered:,}"),
        ("dead-lettered", f"{len(report.dead_letters):,}"),
        ("unexpected messages", f"{len(report.unexpected):,}"),
        ("time to drain after the last fault",
         "—" if drain is None else f"{drain:.1f} s"),
        ("worker kills (SIGKILL, process group)", f"{report.worker_kills}"),
        ("pool process kills (SIGKILL, one)", f"{report.pool_kills}"),
        ("worker stops (SIGTERM, warm)", f"{report.worker_stops}"),
        ("Redis kills (SIGKILL, AOF restart)", f"{report.redis_kills}"),
        ("SMTP down", f"{report.smtp_down_seconds:.0f} s"),
        ("SMTP open sessions dropped (server side)",
         f"{report.smtp_sessions_cut} in {len(report.smtp_cuts)} "
         f"cut{'' if len(report.smtp_cuts) == 1 else 's'} "
         f"({sum(c['mid_message'] for c in report.smtp_cuts)} mid-message, "
         f"{sum(c['in_data'] for c in report.smtp_cuts)} after the 354)"),
        (f"SMS gateway answering {report.params.gateway_status}",
         f"{report.gateway_fail_seconds:.0f} s ({report.gateway_refused:,} posts refused)"),
        ("changes: cancelled / moved / opted out",
         f"{co.cancelled} / {co.moved} / {co.opted_out}"
         + (f" ({len(co.failed)} not applied)" if co.failed else "")),
        ("  messages suppressed (cancelled or skipped)", f"{co.suppressed}"),
        ("  sent before the change / moved, at the new time",
         f"{co.sent_before} / {co.moved_on_time}"),
        ("  in flight at the change (store evidence)", f"{len(co.exceptions)}"),
        ("  broken promises (after a change, early, lost)", f"{len(co.violations)}"),
    ]


def render_report(report: DrillReport) -> str:
    p = report.params
    t0 = report.started_at
    rows = table_rows(report)
    width = max(len(k) for k, _ in rows)
    lines = [f"Fault drill: {p.bookings} bookings x {MESSAGES_PER_BOOKING} messages, due "
             f"T+{report.first_due_at - t0:.0f}s to T+{report.last_due_at - t0:.0f}s "
             f"(booking took {report.booking_seconds:.1f}s).", ""]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    for d in report.duplicates:
        state = f"explained: {d.cause}" if d.explained else "UNEXPLAINED"
        t = d.timeline or {}
        lines.append(f"duplicate {d.ref} ({d.key[0]} to {d.key[1]}): {len(d.copies)} copies, "
                     f"{state}; timeline: status {t.get('status')}, attempts {t.get('attempts')}")
        for at, why in zip(d.copies, d.explanations, strict=False):
            lines.append(f"  - {why or f'copy accepted at T+{at - t0:.2f}s: no kill near it'}")
        began = ", ".join(f"T+{at - t0:.2f}s" for at in (d.store.sent_started if d.store
                                                          else []))
        lines.append(f"  - time rule: {'holds' if d.by_time else 'FAILS'}; store: "
                     f"{'shows' if d.by_store else 'DOES NOT SHOW'} an unrecorded or "
                     f"in-doubt attempt for each resend, the recorded delivery begun after "
                     f"the earlier copies (began {began or 'never'}; "
                     f"{d.store.summary() if d.store else 'not read'})")
        lines.append(f"  - last copy accepted at T+{d.copies[-1] - t0:.2f}s; attempt log: "
                     + ", ".join(f"{e.get('attempt')}:{e.get('outcome')}" for e in d.attempt_log))
    for status, count in Counter(lost["status"] for lost in report.lost).most_common():
        lines.append(f"LOST x{count}, stored status {status}")
    for lost in report.lost[:DETAIL_LIMIT]:
        lines.append(f"LOST {lost['ref']}: {json.dumps(lost['timeline'])}; attempt log "
                     f"{json.dumps(lost['attempt_log'])}")
    if len(report.lost) > DETAIL_LIMIT:
        lines.append(f"... and {len(report.lost) - DETAIL_LIMIT} more lost")
    for dead in report.dead_letters[:20]:
        lines.append(f"DEAD LETTER {json.dumps(dead)}")
    for extra in report.unexpected[:20]:
        lines.append(f"UNEXPECTED {json.dumps(extra, ensure_ascii=False)}")
    for note in report.change_outcome.exceptions:
        lines.append(f"in flight at the change: {note}")
    for note in report.change_outcome.violations:
        lines.append(f"CHANGE VIOLATED: {note}")
    for note in report.change_outcome.failed:
        lines.append(f"CHANGE NOT APPLIED: {note}")
    for note in report.notices:
        lines.append(f"UNDOCUMENTED NOTICE: {note}")
    for note in report.unexpected_exits:
        lines.append(f"note: process exited unasked, restarted: {note}")
    for note in report.failed_stops:
        lines.append(f"WARM STOP FAILED: {note}")
    for note in report.unreplaced_pools:
        lines.append(f"POOL PROCESS NOT REPLACED: {note}")
    lines += [
        "faults: " + "; ".join(f"T+{f.at - t0:.1f}s {f.kind}"
                               for f in sorted(report.faults, key=lambda f: f.at)),
        f"last delivery (first copies) at T+{(report.last_delivery_at or t0) - t0:.1f}s; last "
        f"fault over at T+{report.last_fault_over_at - t0:.1f}s; {report.received:,} messages "
        f"accepted by the sinks; {report.retried} reminders of the first "
        f"{min(p.bookings, RETRY_SAMPLE)} bookings took more than one attempt.",
        f"Settings: lease {p.lease_seconds} s, send timeout {p.send_timeout:g} s, backoff "
        f"{p.backoff_base:g}-{p.backoff_cap:g} s, max attempts {p.max_attempts}; "
        f"{p.workers} workers x --concurrency {p.concurrency}, beat; Redis AOF everysec. "
        f"A duplicate is explained by a kill (worker, pool process or Redis) within "
        f"{p.explain_window:g} s after its copy and by the store: an attempt of it begun "
        f"and never finished, or finished as of unknown outcome, for each resend, and its "
        f"recorded delivery begun after the earlier copies arrived.",
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"run time {report.seconds:.0f} s; logs in {report.workdir}.",
        "RESULT: " + ("PASS" if report.ok else "FAIL"),
    ]
    return "\n".join(lines)


def report_json(report: DrillReport) -> dict[str, Any]:
    return {
        "params": asdict(report.params), "ok": report.ok,
        "table": dict(table_rows(report)),
        "expected": report.expected, "delivered": report.delivered,
        "duplicates": [asdict(d) | {"explained": d.explained, "by_time": d.by_time,
                                    "by_store": d.by_store, "cause": d.cause,
                                    "store_counts": _store_counts(d.store)}
                       for d in report.duplicates],
        "lost": report.lost, "dead_letters": report.dead_letters,
        "unexpected": report.unexpected, "faults": [asdict(f) for f in report.faults],
        "unexpected_exits": report.unexpected_exits, "failed_stops": report.failed_stops,
        "unreplaced_pools": report.unreplaced_pools, "gateway_refused": report.gateway_refused,
        "smtp_cuts": report.smtp_cuts,
        "changes": [asdict(c) for c in report.changes],
        "change_outcome": asdict(report.change_outcome) | {
            "sent_refs": sorted(report.change_outcome.sent_refs)},
        "notices": report.notices,
        "drain_seconds": report.drain_seconds,
        "seconds": round(report.seconds, 1),
    }


def _store_counts(evidence: StoreEvidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return {"begun": evidence.begun, "finished": evidence.finished, "sent": evidence.sent,
            "lost": evidence.lost, "unknown": evidence.unknown, "trimmed": evidence.trimmed,
            "error": evidence.error}


def parse_args(argv: list[str]) -> tuple[DrillParams, argparse.Namespace]:
    defaults = DrillParams()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fault_drill",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"a small run ({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    for name in DrillParams.__dataclass_fields__:
        value = getattr(defaults, name)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                        help=f"{HELP[name]} (default {value:g})")
    ap.add_argument("--workdir", type=Path, help="folder for logs and data (kept)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder even on success")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    args = ap.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values |= {k: v for k, v in vars(args).items()
               if k in DrillParams.__dataclass_fields__ and v is not None}
    params = replace(defaults, **values)
    if params.bookings < 1 or params.workers < 1 or params.concurrency < 1:
        ap.error("--bookings, --workers and --concurrency must be at least 1")
    if params.lease_seconds <= 2 * params.send_timeout + 1:
        ap.error("--lease-seconds must exceed 2 x --send-timeout + 1 (the service refuses it)")
    if not 500 <= params.gateway_status < 600:
        ap.error("--gateway-status must be a 5xx (a provider's outage, not a refusal for good)")
    return params, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    params, args = parse_args(argv)
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            print(f"--workdir {args.workdir} is not empty", file=sys.stderr)
            return 2
        workdir, keep = args.workdir.resolve(), True
    else:
        workdir, keep = Path(tempfile.mkdtemp(prefix="reminders-drill-")), args.keep

    def on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run_drill(params, workdir)
    except KeyboardInterrupt:
        print(f"[drill] interrupted; every process stopped; logs in {workdir}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(render_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(report), indent=2, ensure_ascii=False)
                                   + "\n", encoding="utf-8")
    if report.ok and not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        print(f"[drill] removed {workdir} (--keep or --workdir keeps the logs)", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
