"""The fault drill's competing changes: cancels, moves and opt-outs while the drill drains.

The clinic changes bookings while their messages are being sent, through the real
interfaces: a cancel is `DELETE /v1/bookings/<id>` on the API the drill runs, a move is the
booking sent again through `reminders book -` with a later `starts_at`, an opt-out is a
patient's STOP through the SMS provider's inbound webhook (`POST /v1/inbound/sms/<clinic>`).
Each change is recorded with when its successful request went out (`began`) and when it
returned (`committed`: the change was in the store by then).

Then `judge` holds each changed booking's reminders to what the README promises:

- a cancelled booking's reminders, an opted-out number's SMS: `cancelled` or `skipped` on
  the timeline, with a reason, and never accepted by a sink; or `sent` (once, duplicates as
  the drill's rule explains them), and if a copy arrived after the change committed, the
  store shows the delivery's attempt began before it did (an attempt log `sent` line whose
  "at" is before `committed`: the send was past its last check, "already on its way"). A
  copy of a reminder recorded cancelled or skipped needs the store's evidence that its
  attempt's outcome went unrecorded (begun and never finished: its worker was killed; or
  of unknown outcome) and its hand-over at the sink (the SMTP MAIL command, the SMS post)
  begun before the change returned: a killed attempt leaves no begin time in the store,
  but it began before its hand-over did;
- a moved booking's reminders: each sent exactly once; one accepted after the move
  committed arrived no earlier than its new due time (the new start plus its step's
  offset; the pump claims a reminder once it is due, no documented tolerance, so only
  MOVE_SLACK for the milliseconds of `starts_at`), unless its delivery's attempt began
  before the move, or it was handed over before the move returned by an attempt the store
  shows never finished (on its way at the old time, its outcome lost to a kill: sent again
  at the new time, a duplicate the drill's rule must explain); those sent before stay sent. The
  drill's protocol has no pause step and no invite and every SMS is after the visit, so
  the product sends no notice and no message again for a move or a cancel
  (worker/notices.py): any extra message is unexpected.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

MOVE_SLACK = 0.05  # seconds: starts_at is given to the millisecond
REQUEST_TIMEOUT = 10.0
RETRY_FOR = 30.0  # a change refused (Redis down: 503) is tried again this long
# When each change lands, relative to its booking's start: spread over the steps (1-7 s
# after the start) so that some land before a step is due, some while it is in flight.
CHANGE_OFFSETS = (0.5, 2.0, 3.2, 4.4, 5.6, 6.8, 2.6, 4.0)


class Evidence(Protocol):
    """What `judge` reads of the store's attempt records (fault_drill.StoreEvidence)."""

    @property
    def lost(self) -> int: ...

    @property
    def unknown(self) -> int: ...

    @property
    def sent_started(self) -> list[float]: ...

    error: str


@dataclass
class Change:
    kind: str  # "cancel", "move", "opt-out"
    booking_id: str
    at: float  # planned, epoch seconds
    began: float = 0.0  # the successful request went out
    committed: float = 0.0  # ...and returned
    outcome: str = ""  # what the interface answered ("cancelled", "moved", "opted out")
    error: str = ""  # why it never committed
    tries: int = 0
    new_start: float = 0.0  # a move's new starts_at, epoch seconds

    @property
    def done(self) -> bool:
        return self.committed > 0 and not self.error


def plan_changes(starts: list[float], cancels: int, moves: int, optouts: int) -> list[Change]:
    """Pick the changed bookings, evenly spread over the bookings (none changed twice), each
    changed at its start plus one of CHANGE_OFFSETS. `starts[i]` is booking i's start."""
    n = len(starts)
    taken: set[int] = set()
    changes: list[Change] = []
    for kind, count, shift in (("cancel", cancels, 0.5), ("move", moves, 0.25),
                               ("opt-out", optouts, 0.75)):
        for k in range(min(count, n)):
            if len(taken) >= n:
                break  # more changes than bookings: each booking changed once
            i = min(n - 1, int((k + shift) * n / max(1, count)))
            while i in taken:
                i = (i + 1) % n
            taken.add(i)
            offset = CHANGE_OFFSETS[(len(changes)) % len(CHANGE_OFFSETS)]
            changes.append(Change(kind, f"D-{i:05d}", starts[i] + offset))
    return sorted(changes, key=lambda c: c.at)


class Changer:
    """Apply the planned changes at their instants, in a thread beside the drill's loop."""

    def __init__(self, changes: list[Change], api: str, key: str, clinic: str,
                 docs: dict[str, dict[str, Any]], move_by: float,
                 book: Callable[[str], subprocess.CompletedProcess[str]],
                 log: Callable[[str], None] | None = None) -> None:
        self.changes, self.api, self.key, self.clinic = changes, api, key, clinic
        self.docs, self.move_by, self.book, self.log = docs, move_by, book, log
        self.thread = threading.Thread(target=self._run, name="drill-changes", daemon=True)
        self.stopping = threading.Event()
        self.sids = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * REQUEST_TIMEOUT)

    @property
    def busy(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        pending = list(self.changes)
        while pending and not self.stopping.is_set():
            now = time.time()
            due = [c for c in pending if c.at <= now]
            if not due:
                self.stopping.wait(min(0.1, max(0.0, pending[0].at - now)))
                continue
            pending = [c for c in pending if c.at > now]
            moves = [c for c in due if c.kind == "move"]
            if moves:
                self._retry(moves, self._move)
            for c in due:
                if c.kind == "cancel":
                    self._retry([c], self._cancel)
                elif c.kind == "opt-out":
                    self._retry([c], self._stop)

    def _retry(self, group: list[Change], apply: Callable[[list[Change]], None]) -> None:
        deadline = time.time() + RETRY_FOR
        while not self.stopping.is_set():
            began = time.time()
            for c in group:
                c.tries += 1
            try:
                apply(group)
            except (OSError, RuntimeError, ValueError) as exc:
                if self.log is not None and group[0].tries == 1:
                    self.log(f"{group[0].kind} {' '.join(c.booking_id for c in group)} "
                             f"refused, tried again: {type(exc).__name__}: {exc}"[:400])
                if time.time() < deadline:
                    time.sleep(0.5)
                    continue
                for c in group:
                    c.error = f"{type(exc).__name__}: {exc}"[:300]
                return
            done = time.time()
            for c in group:
                c.began, c.committed = began, done
            return

    def _request(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.api + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:200]!r}") from None

    def _cancel(self, group: list[Change]) -> None:
        (c,) = group
        _, body = self._request("DELETE", f"/v1/bookings/{c.booking_id}", None,
                                {"Authorization": f"Bearer {self.key}"})
        status = json.loads(body).get("status")
        if status != "cancelled":
            raise ValueError(f"DELETE answered a booking {status}, not cancelled")
        c.outcome = "cancelled"

    def _stop(self, group: list[Change]) -> None:
        (c,) = group
        self.sids += 1
        phone = self.docs[c.booking_id]["patient"]["phone"]
        form = urllib.parse.urlencode({"MessageSid": f"SMdrill{self.sids:08d}{c.booking_id}",
                                       "From": phone, "To": "+34910000000", "Body": "STOP"})
        _, body = self._request("POST", f"/v1/inbound/sms/{self.clinic}", form.encode(),
                                {"Content-Type": "application/x-www-form-urlencoded"})
        c.outcome = "opted out: " + body.decode(errors="replace")[:120]

    def _move(self, group: list[Change]) -> None:
        lines = []
        for c in group:
            doc = dict(self.docs[c.booking_id])
            new = datetime.fromisoformat(doc["starts_at"]) + timedelta(seconds=self.move_by)
            doc["starts_at"] = new.isoformat(timespec="milliseconds")
            c.new_start = new.timestamp()
            lines.append(json.dumps(doc))
        result = self.book("\n".join(lines))
        if result.returncode != 0:
            raise RuntimeError(f"reminders book: exit {result.returncode}: "
                               f"{result.stderr.strip()[-300:]}")
        out = json.loads(result.stdout)
        timelines = {t["booking_id"]: t for t in (out if isinstance(out, list) else [out])}
        for c in group:
            t = timelines.get(c.booking_id) or {}
            c.outcome = "moved; " + ", ".join(
                f"{r['id']} {r['status']} due {r['due_at']}" for r in t.get("reminders", []))


@dataclass
class ChangeOutcome:
    cancelled: int = 0  # bookings
    moved: int = 0
    opted_out: int = 0
    failed: list[str] = field(default_factory=list)  # changes that never committed
    suppressed: int = 0  # reminders cancelled or skipped by a change, nothing received
    sent_before: int = 0  # reminders of changed bookings accepted before the change began
    moved_on_time: int = 0  # moved reminders sent at their new time
    exceptions: list[str] = field(default_factory=list)  # in flight at the change: evidence
    violations: list[str] = field(default_factory=list)  # the product broke a promise
    sent_refs: set[str] = field(default_factory=set)  # affected reminders recorded as sent

    def summary(self) -> str:
        return (f"{self.cancelled} cancelled, {self.moved} moved, {self.opted_out} opted out; "
                f"{self.suppressed} messages suppressed, {self.moved_on_time} moved ones at "
                f"the new time, {len(self.exceptions)} in flight at the change (store "
                f"evidence), {len(self.violations)} violations")


def _t(at: float, t0: float) -> str:
    return f"T+{at - t0:.2f}s"


def judge(changes: list[Change], refs: dict[str, list[str]],
          copies_of: dict[str, list[float]], reminders: dict[str, dict[str, Any]],
          evidence: Callable[[str], Evidence], offsets: dict[str, float],
          t0: float, handed_of: dict[str, list[float]] | None = None) -> ChangeOutcome:
    """Hold every changed booking's reminders to the promise (see the module docstring).

    refs: booking id -> its reminders' refs; copies_of: ref -> acceptance times at the sinks;
    reminders: ref -> the reminder as the timeline shows it after the drain (status, reason);
    evidence: ref -> the store's attempt records; offsets: step -> seconds after the start;
    handed_of: ref -> when each copy's hand-over began at the sink (SMTP MAIL, the SMS post),
    in acceptance order: an attempt whose worker was killed wrote no line with its begin
    time, but it had begun before its message's hand-over did.
    """
    out = ChangeOutcome()
    for c in changes:
        if not c.done:
            out.failed.append(f"{c.kind} {c.booking_id}: {c.error or 'never applied'}")
            continue
        out.cancelled += c.kind == "cancel"
        out.moved += c.kind == "move"
        out.opted_out += c.kind == "opt-out"
        for ref in refs.get(c.booking_id, []):
            if c.kind == "opt-out" and not ref.endswith(":sms"):
                continue  # an SMS opt-out leaves the emails alone: they are expected as ever
            _judge_one(c, ref, sorted(copies_of.get(ref, [])), reminders.get(ref) or {},
                       evidence, offsets, t0, out, (handed_of or {}).get(ref, []))
    return out


def _judge_one(c: Change, ref: str, copies: list[float], rem: dict[str, Any],
               evidence: Callable[[str], Evidence], offsets: dict[str, float], t0: float,
               out: ChangeOutcome, handed: list[float]) -> None:
    status, reason = rem.get("status"), rem.get("reason") or ""
    what = f"{ref} ({c.kind} committed {_t(c.committed, t0)})"
    if copies and copies[0] < c.began:
        out.sent_before += 1
    if c.kind == "move":
        if status != "sent" or not copies:
            out.violations.append(f"{what}: moved, not delivered (status {status}, "
                                  f"{len(copies)} copies)")
            return
        out.sent_refs.add(ref)
        first = copies[0]
        if first <= c.committed:
            return  # sent at the old time, before the move: stays sent
        due = c.new_start + offsets[ref.split("/", 2)[2].split(":")[0]]
        if first >= due - MOVE_SLACK:
            out.moved_on_time += 1
            return
        ev = evidence(ref)
        began = [s for s in ev.sent_started if s < c.committed]
        if began and not ev.error:
            out.exceptions.append(f"{what}: accepted {_t(first, t0)}, before its new due "
                                  f"{_t(due, t0)}: its delivery began {_t(min(began), t0)}, "
                                  "before the move: on its way at the old time")
            return
        if _lost_in_flight(ev, handed[:1], c):
            out.exceptions.append(f"{what}: accepted {_t(first, t0)}, before its new due "
                                  f"{_t(due, t0)}, handed over from {_t(handed[0], t0)}, "
                                  f"before the move returned, by an attempt the store shows "
                                  f"never finished ({ev.lost}) or of unknown outcome "
                                  f"({ev.unknown}): on its way at the old time, its outcome "
                                  "lost, sent again at the new time")
            return
        out.violations.append(f"{what}: accepted {_t(first, t0)}, {due - first:.2f}s before "
                              f"its new due {_t(due, t0)}, its delivery begun "
                              f"{', '.join(_t(s, t0) for s in ev.sent_started) or 'never'}")
        return
    word = "opted_out" if c.kind == "opt-out" else "cancel"
    if status == "sent":
        out.sent_refs.add(ref)
        if not copies:
            out.violations.append(f"{what}: recorded sent, never accepted by a sink")
            return
        if copies[-1] <= c.committed:
            return  # sent before the change returned
        ev = evidence(ref)
        began = [s for s in ev.sent_started if s < c.committed]
        if began and not ev.error:
            out.exceptions.append(f"{what}: accepted {_t(copies[-1], t0)}, after the change; "
                                  f"its delivery began {_t(max(began), t0)}, "
                                  f"{c.committed - max(began):.2f}s before it returned "
                                  f"(past its last check)")
            return
        out.violations.append(f"{what}: accepted {_t(copies[-1], t0)}, after the change, its "
                              f"delivery begun "
                              f"{', '.join(_t(s, t0) for s in ev.sent_started) or 'never'}")
        return
    if status not in ("cancelled", "skipped") or word not in reason.lower().replace(" ", "_"):
        out.violations.append(f"{what}: status {status} reason {reason!r}, not {word}")
        return
    if not copies:
        out.suppressed += 1
        return
    # Accepted, yet recorded cancelled or skipped: only a send whose outcome went
    # unrecorded (its worker killed after the hand-over) before the change may do that.
    ev = evidence(ref)
    if _lost_in_flight(ev, handed, c, len(copies)):
        out.exceptions.append(f"{what}: {len(copies)} cop{'y' if len(copies) == 1 else 'ies'} "
                              f"accepted by {_t(copies[-1], t0)}, handed over from "
                              f"{_t(min(handed), t0)}, before the change returned, then "
                              f"recorded {status}: the store shows {ev.lost} attempt(s) "
                              f"never finished, {ev.unknown} of unknown outcome")
        return
    out.violations.append(f"{what}: recorded {status} ({reason}) yet accepted at "
                          f"{', '.join(_t(a, t0) for a in copies)}; store: {ev.lost} never "
                          f"finished, {ev.unknown} unknown")


def _lost_in_flight(ev: Evidence, handed: list[float], c: Change, copies: int = 1) -> bool:
    """Whether copies whose outcome the store lost were on their way before the change: an
    attempt never finished or of unknown outcome for each, and each copy's hand-over at the
    sink began before the change returned (its attempt, begun before its hand-over, began
    before the change did)."""
    return (not ev.error and ev.lost + ev.unknown >= copies and len(handed) >= copies
            and all(0 < h < c.committed for h in handed))
