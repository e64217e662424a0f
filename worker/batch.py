"""Booking files for `reminders plan` and `reminders book`: read, checked, stored in chunks.

Input: a JSON object, a JSON array, or JSON lines (one booking per line), from a file or
stdin. JSON lines stream: one line is held at a time, at most `MAX_BOOKING_BYTES` (a longer
line is refused without ever being held whole). A JSON array, or one object over several
lines, is read whole, at most `MAX_WHOLE_INPUT_BYTES`. Each document is parsed with
worker/jsonsafe.py (too big, too deep, duplicate keys, NaN, invalid UTF-8: that booking
is refused naming the field); a line that is not JSON at all is a usage error naming it.

Check: each booking is validated (worker/models.py) and planned (worker/planner.py) as
seen at one `now`; a refusal names the line (JSON lines) or position, and every bad field.

Book, all or nothing (the contract of `reminders book`): every booking is checked before
any is stored; if one is refused, none is. A booking (clinic, booking id) given twice in
one input is refused at its second line, naming the first (`SeenBookings`). Checking keeps
each accepted booking compactly (its normalised document as JSON text, the very text
stored, and its plan as plain values:
about 1 KB, against about 10 KB as objects), in memory for the first `SPOOL_AFTER` and in
a temporary file beyond, so a large file never sits in memory; storing then takes `CHUNK`
bookings at a time through `Store.upsert_many` (a few thousand per call: it reads them at
once, then prepares each apply chunk while Redis applies the one before), each batch
decoded and read while Redis applies the batch before (`ReadAhead`), and handed over with each
plan's record too (`records`: a new booking's reminders are written from it, not taken
apart again from the decoded objects). The check of an
input of more than AUTO_AFTER chunks runs in one process per core (at most MAX_AUTO_JOBS),
all of it from its first booking (its first AUTO_AFTER chunks and one more are read, not
checked, to tell): Redis has nothing to do until storing starts, so on 2 cores checking
takes about half the time; `jobs` sets the number (1: here).

Progress: on a terminal (stderr), a bar with the rate and the time left, shown once a run
lasts over a second; nothing at all when stderr is not a terminal. At the end, a summary
on stderr: stored (new, changed), unchanged, or refused with each refusal's line and fields.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
from pydantic_core import PydanticSerializationError

from .catalog import Catalog
from .errors import BookingRejected
from .jsonsafe import JSONRefused, load_json, printable
from .models import (
    MAX_BOOKING_BYTES,
    MAX_BOOKING_DEPTH,
    Booking,
    json_refusal,
    parse_booking,
    trusted_booking,
)
from .planner import Plan, PlanRecord, plan, plan_from_record, plan_record

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .store import FirstRead, Store

MAX_WHOLE_INPUT_BYTES = 64 * 1024 * 1024
CHUNK = 500  # bookings per check task and per store batch
SPOOL_AFTER = 2000  # accepted bookings kept in memory before the rest go to a temporary file
REFUSALS_SHOWN = 1000  # refusals printed in full; more are counted
# `reminders book` by default: an input of at most AUTO_AFTER chunks is checked here; a
# larger one, all of it, in up to MAX_AUTO_JOBS processes (`auto_jobs`).
AUTO_AFTER = 4
MAX_AUTO_JOBS = 4


class UsageError(Exception):
    """The command line or its input cannot be used."""


class CheckerDied(Exception):
    """A process checking bookings ended abruptly (killed, out of memory): the pool is
    broken, and the bookings it held were not checked."""


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One booking document of the input: JSON text still to parse, a value, or refused."""

    number: int  # 1-based position in the input
    line: int | None  # the line it is on, for JSON lines input
    value: Any = None
    raw: bytes | None = None  # one line of JSON lines, parsed where it is checked
    refused: BookingRejected | None = None
    # The input was read no further than this booking (a hostile element of a JSON array):
    # whatever followed it is unknown, so it is never taken for a lone booking.
    cut_short: bool = False


def open_input(source: str) -> BinaryIO:
    """Return FILE, or stdin for "-", as a binary stream; raise UsageError if unreadable."""
    if source == "-":
        if sys.stdin is None:  # started with fd 0 closed (`<&-`, some cron or service setups)
            raise UsageError("cannot read -: stdin is closed")
        return sys.stdin.buffer
    try:
        return open(source, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from None


class LineReader:
    """Lines of a binary stream, each held only up to a limit, read in large chunks."""

    CHUNK = 1 << 16

    def __init__(self, stream: BinaryIO, source: str) -> None:
        self.stream, self.source = stream, source
        self.buf, self.pos, self.eof = b"", 0, False
        self.line_number = 0  # of the last line returned
        self.consumed = 0  # bytes of the input consumed so far

    def size(self) -> int | None:
        """The input's size in bytes if it is a regular file (stdin redirected from one too)."""
        try:
            stat = os.fstat(self.stream.fileno())
        except (OSError, AttributeError, ValueError):
            return None
        import stat as st

        return stat.st_size if st.S_ISREG(stat.st_mode) else None

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.stream.read(self.CHUNK)
        except OSError as exc:
            raise UsageError(f"cannot read {self.source}: {exc.strerror}") from None
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def first_byte(self) -> bytes:
        """The first byte that is not blank (nor a byte-order mark), without consuming it."""
        start = 0
        while True:
            found = _NONBLANK.search(self.buf, self.pos + start)
            if found:
                return found.group()
            start = len(self.buf) - self.pos
            if not self._more():
                return b""

    def line(self, limit: int) -> tuple[int, bytes | None] | None:
        """Return (line number, line), the line None if longer than `limit`; None at the end."""
        overlong = False
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                end += 1
                line = None if overlong or end - self.pos > limit else self.buf[self.pos : end]
                self.consumed += end - self.pos
                self.pos = end
                break
            if len(self.buf) - self.pos > limit:  # drop what is already too long
                overlong = True
                self.consumed += len(self.buf) - self.pos
                self.buf, self.pos = b"", 0
            if not self._more():
                if self.pos >= len(self.buf) and not overlong:
                    return None
                line = None if overlong or len(self.buf) - self.pos > limit else (
                    self.buf[self.pos :])
                self.consumed += len(self.buf) - self.pos
                self.buf, self.pos = b"", 0
                break
        self.line_number += 1
        return self.line_number, line

    def rest(self, limit: int) -> bytes | None:
        """The rest of the input, or None if it is longer than `limit`."""
        while len(self.buf) - self.pos <= limit and self._more():
            pass
        if len(self.buf) - self.pos > limit:
            return None
        data = self.buf[self.pos :]
        self.consumed += len(data)
        self.buf, self.pos = b"", 0
        return data


_NONBLANK = re.compile(rb"[^ \t\r\n\xef\xbb\xbf]")


def _not_json(exc: JSONRefused, line: int) -> str:
    column = f", column {exc.column}" if exc.column else ""
    return f"line {line}: not JSON ({exc.reason or exc.problem}{column})"


def _syntax(source: str, exc: JSONRefused, line: int) -> UsageError:
    return UsageError(f"{source}: {_not_json(exc, line)}")


def _load(data: bytes) -> Any:
    # Without the line's end: a syntax error's column is then on the line it names.
    return load_json(data.rstrip(b"\r\n"), max_bytes=MAX_BOOKING_BYTES,
                     max_depth=MAX_BOOKING_DEPTH)


def iter_documents(reader: LineReader) -> Iterator[Document]:
    """Yield the booking documents of a JSON object, a JSON array or JSON lines, in order.

    JSON lines are yielded unparsed (`raw`), except the first (to tell JSON lines from one
    object over several lines); `check_document` parses them. Raise UsageError for input
    that is not JSON at all (naming the line) or holds no booking.
    """
    source = reader.source
    first = reader.first_byte()
    if not first:
        raise UsageError(f"{source}: no booking in the input")
    if first == b"[":
        yield from _whole_array(reader)
        return
    number = 0
    while True:
        item = reader.line(MAX_BOOKING_BYTES)
        if item is None:
            return
        line_number, line = item
        if line is not None and not line.strip():
            continue
        number += 1
        if line is None:
            problem = f"is a line of more than {MAX_BOOKING_BYTES:,} bytes"
            yield Document(number, line_number, refused=BookingRejected([("booking", problem)]))
        elif number > 1:
            yield Document(number, line_number, raw=line)
        else:
            try:
                yield Document(number, line_number, _load(line))
            except JSONRefused as exc:
                if exc.kind != "syntax":
                    yield Document(number, line_number, refused=json_refusal(exc))
                    continue
                single = _one_document(item, reader)  # perhaps one object over many lines
                if single is None:
                    raise _syntax(source, exc, line_number) from None
                yield single
                return


def _one_document(first: tuple[int, bytes | None], reader: LineReader) -> Document | None:
    """Read on from a first line that is not JSON by itself: is the input one JSON object?

    Return it as one document, or None (the first line is then simply not JSON).
    """
    parts, size = [first[1] or b""], len(first[1] or b"")
    while size <= MAX_BOOKING_BYTES:
        item = reader.line(MAX_BOOKING_BYTES)
        if item is None:
            break
        if item[1] is None:
            return None
        parts.append(item[1])
        size += len(item[1])
    else:
        return None
    try:
        return Document(1, None, _load(b"".join(parts)))
    except JSONRefused as exc:
        if exc.kind == "syntax":
            return None
        return Document(1, None, refused=json_refusal(exc))


def _whole_array(reader: LineReader) -> Iterator[Document]:
    """The documents of an input that is one JSON array."""
    source = reader.source
    data = reader.rest(MAX_WHOLE_INPUT_BYTES)
    if data is None:
        raise UsageError(
            f"{source}: a JSON array of more than {MAX_WHOLE_INPUT_BYTES // 2**20} MiB: "
            "give a large input as JSON lines (one booking per line)"
        )
    try:
        docs = load_json(data, max_bytes=MAX_WHOLE_INPUT_BYTES, max_depth=MAX_BOOKING_DEPTH + 1)
    except JSONRefused as exc:
        if exc.kind == "syntax" or not exc.path or not isinstance(exc.path[0], int):
            raise UsageError(f"{source}: {exc.problem}") from None
        # The array cannot be read past this: only the booking at fault is reported.
        problem = exc.problem
        if exc.kind == "depth":
            problem = f"is nested more than {MAX_BOOKING_DEPTH} levels deep"
        inner = JSONRefused(problem, exc.path[1:], kind=exc.kind)
        yield Document(exc.path[0] + 1, None, refused=json_refusal(inner), cut_short=True)
        return
    if not isinstance(docs, list) or not docs:
        raise UsageError(f"{source}: no booking in the input")
    for number, value in enumerate(docs, 1):
        yield Document(number, None, value)


@dataclass
class Input:
    """The documents of FILE or stdin, read as they are consumed."""

    documents: Iterator[Document]
    single: bool  # only one booking: reported as "booking", printed as an object
    reader: LineReader


def read_documents(source: str) -> Input:
    """Open FILE or stdin ("-"); read the first two documents to know if there is only one."""
    stream = open_input(source)
    reader = LineReader(stream, source)

    def documents() -> Iterator[Document]:
        try:
            yield from iter_documents(reader)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    docs = documents()
    ahead = list(itertools.islice(docs, 2))
    # One booking (an array's hostile one stops its reading: "booking 4", not "booking").
    single = len(ahead) == 1 and not ahead[0].cut_short
    return Input(itertools.chain(ahead, docs), single, reader)


# --- checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """A document checked: its booking and plan, or why it is refused."""

    number: int
    line: int | None
    label: str | None  # the booking id it gives (printable, short), if any
    refused: BookingRejected | None = None
    booking: Booking | None = None
    plan: Plan | None = None
    unreadable: str | None = None  # a line that is not JSON: the whole input is unusable


def _label(value: Any) -> str | None:
    given = value.get("booking_id") if isinstance(value, dict) else None
    return printable(given, 64) if isinstance(given, str) and given else None


def check_document(doc: Document, catalog: Catalog, clinic: str | None, now: datetime) -> Checked:
    """Parse (JSON lines), validate and plan one document."""
    checked = _check_one(doc, catalog, clinic, now)
    if isinstance(checked, Checked):
        return checked
    value, booking, planned = checked
    return Checked(doc.number, doc.line, _label(value), booking=booking, plan=planned)


def _check_one(
    doc: Document, catalog: Catalog, clinic: str | None, now: datetime
) -> Checked | tuple[Any, Booking, Plan]:
    """`check_document`, an accepted document given as (its value, booking, plan): a batch
    needs no label (nor a Checked) for those."""
    value = doc.value
    if doc.refused is None and doc.raw is not None:
        try:
            value = _load(doc.raw)
        except JSONRefused as exc:
            if exc.kind == "syntax":
                return Checked(doc.number, doc.line, None,
                               unreadable=_not_json(exc, doc.line or 0))
            return Checked(doc.number, doc.line, None, refused=json_refusal(exc))
    if doc.refused is not None:
        return Checked(doc.number, doc.line, _label(value), refused=doc.refused)
    try:
        booking = parse_booking(value, catalog, clinic=clinic)
        planned = plan(
            booking, catalog.protocols[booking.treatment], catalog.clinics[booking.clinic], now
        )
    except BookingRejected as exc:
        return Checked(doc.number, doc.line, _label(value), refused=exc)
    return value, booking, planned


def refusal_heading(checked: Checked, single: bool) -> str:
    """`booking 2 (A-2)`, or `line 7 (A-7)` in JSON lines, or `booking` for a lone one."""
    label = checked.label
    if single:
        return f"booking 1 ({label})" if label else "booking"
    where = f"line {checked.line}" if checked.line is not None else f"booking {checked.number}"
    return f"{where} ({label})" if label else where


def print_refusal(checked: Checked, single: bool) -> None:
    if checked.refused is None:
        return
    print(f"{refusal_heading(checked, single)} refused:", file=sys.stderr)
    for field, message in checked.refused.errors:
        print(f"  {field}: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Outcome:
    """A checked document as plain values: cheap to pickle (to and from a worker, to spool)."""

    number: int
    line: int | None
    label: str | None
    errors: list[tuple[str, str]] | None = None  # refused
    unreadable: str | None = None
    doc: str | None = None  # accepted: the booking's `model_dump_json()`
    plan: PlanRecord | None = None  # and its plan

    def checked(self) -> Checked:
        """Enough of the Checked it came from to report it (no booking or plan objects)."""
        refused = BookingRejected(self.errors) if self.errors is not None else None
        return Checked(self.number, self.line, self.label, refused=refused,
                       unreadable=self.unreadable)


# An accepted booking: its document (`model_dump_json()`: the text the store writes, and
# about 25 times cheaper to pickle and unpickle than its dict) and its plan.
Accepted = tuple[str, PlanRecord]
# A store batch (`ReadAhead`): its accepted items, their bookings and plans, its first read.
Batch = tuple[list[Accepted], list[tuple[Booking, Plan]], "FirstRead | None"]


def outcome_of(checked: Checked) -> Outcome:
    if checked.booking is None or checked.plan is None:
        errors = checked.refused.errors if checked.refused is not None else None
        return Outcome(checked.number, checked.line, checked.label, errors=errors,
                       unreadable=checked.unreadable)
    return Outcome(checked.number, checked.line, checked.label,
                   doc=dump_json(checked.booking), plan=plan_record(checked.plan))


# An accepted booking's (clinic, booking id, number, line): what `SeenBookings` compares.
BookingKey = tuple[str, str, int, int | None]


@dataclass
class CheckedChunk:
    """A chunk of documents checked: how many (`size`), the refused or unreadable ones as
    Outcomes in input order (`refused`), and the `count` accepted ones compactly: as a list
    of Accepted (`items`), or as its pickle (`blob`), as a worker process hands it back: the
    spool keeps or writes those bytes as they are, unread until they are stored. `keys`
    names the accepted ones, in input order, for the check across chunks (`SeenBookings`)."""

    size: int
    refused: list[Outcome]
    count: int
    items: list[Accepted] | None = None
    blob: bytes | None = None
    keys: list[BookingKey] | None = None

    def accepted(self) -> list[Accepted]:
        if self.items is not None:
            return self.items
        return pickle.loads(self.blob) if self.blob is not None else []


_STOPS = {signal.SIGINT, signal.SIGTERM}


def dump_json(booking: Booking) -> str:
    """`booking.model_dump_json()`, a Ctrl-C or SIGTERM landing inside it raised as itself:
    pydantic wraps whatever a serializer function raises (KeyboardInterrupt too) in
    PydanticSerializationError, and a stop while checking was a traceback, exit 1. Unlike
    `model_dump`, `model_dump_json` keeps only the message of what was raised, not the
    exception: so in the main thread the two signals are held while it runs (two system
    calls, about a microsecond), and their handlers run once it has returned."""
    if threading.current_thread() is not threading.main_thread():
        return booking.model_dump_json()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        return booking.model_dump_json()
    except PydanticSerializationError as exc:
        raise_stop(exc)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def raise_stop(exc: BaseException) -> None:
    """Raise the KeyboardInterrupt (Ctrl-C, or SIGTERM as `Terminated`) `exc` wraps, if any."""
    if isinstance(exc.__cause__, KeyboardInterrupt):
        raise exc.__cause__ from None


def _check_chunk(
    docs: list[Document], catalog: Catalog, clinic: str | None, now: datetime
) -> CheckedChunk:
    """Check a chunk of documents. In the main thread of the command, Ctrl-C and SIGTERM
    are held while it runs (a chunk: a tenth of a second or so) and stop the command as it
    returns, as `dump_json` holds them around each booking's dump (once a chunk, not two
    system calls a booking); a checking process (`_init_worker`) gets neither as a Python
    exception, and holds nothing."""
    if _WORKER is not None or threading.current_thread() is not threading.main_thread():
        return _check_docs(docs, catalog, clinic, now)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        return _check_docs(docs, catalog, clinic, now)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _check_docs(
    docs: list[Document], catalog: Catalog, clinic: str | None, now: datetime
) -> CheckedChunk:
    refused: list[Outcome] = []
    items: list[Accepted] = []
    keys: list[BookingKey] = []
    for doc in docs:
        checked = _check_one(doc, catalog, clinic, now)
        if isinstance(checked, Checked):
            refused.append(outcome_of(checked))
            continue
        _, booking, planned = checked
        # No stop can land inside the dump (see `_check_chunk`): `dump_json` unneeded.
        items.append((booking.model_dump_json(), plan_record(planned)))
        keys.append((booking.clinic, booking.booking_id, doc.number, doc.line))
    return CheckedChunk(len(docs), refused, len(items), items, keys=keys)


# In a worker process: what every chunk is checked against (set once by the initializer).
_WORKER: tuple[Catalog, str | None, datetime] | None = None


def _init_worker(catalog: Catalog, clinic: str | None, now: datetime, parent: int) -> None:
    global _WORKER
    _WORKER = (catalog, clinic, now)
    # Ctrl-C at a terminal reaches the whole process group: the main process stops the
    # batch and says so; a checking process does not die of it (with a traceback) first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM as by default (the pool ends a broken pool's processes with it), not the
    # main process's handler inherited (worker/cli.py `sigterm_stops`).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # held at the fork
    _end_with(parent)  # after the signals: the pool may end a process still starting
    gc.freeze()  # a worker lives for one batch: collect less often, as quiet_gc does
    gc.set_threshold(*QUIET_GC)


def _end_with(parent: int) -> None:
    """End this checking process when `parent` (the command) ends, however it ends: killed
    (SIGKILL, the OOM killer), the pool's processes waited on its call queue for ever,
    holding the command's stdout and stderr (a caller reading them hung). Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


def _check_in_worker(docs: list[Document]) -> CheckedChunk:
    assert _WORKER is not None
    chunk = _check_chunk(docs, *_WORKER)
    # Pickled here, once: the main process keeps these bytes until it stores them.
    blob = pickle.dumps(chunk.items, protocol=pickle.HIGHEST_PROTOCOL) if chunk.count else None
    return CheckedChunk(chunk.size, chunk.refused, chunk.count, blob=blob, keys=chunk.keys)


def auto_jobs() -> int:
    """Processes that check a large input by default: one per core this process may run on,
    at most MAX_AUTO_JOBS (Redis waits idle while checking runs: storing starts after it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_JOBS))


def check_chunks(
    docs: Iterable[Document], catalog: Catalog, clinic: str | None, now: datetime, *,
    jobs: int | None = 1,
) -> Iterator[CheckedChunk]:
    """Check the documents CHUNK at a time, in order: here, or in `jobs` worker processes.

    `jobs` None: here for an input of at most AUTO_AFTER chunks; a larger one, all of it
    from its first booking, in `auto_jobs()` processes (a machine with one core: here)."""
    docs = iter(docs)
    chunks = iter(lambda: list(itertools.islice(docs, CHUNK)), [])
    if jobs is None:
        jobs = auto_jobs()
        if jobs > 1:
            # Read (not check) the first AUTO_AFTER chunks and one more: an input that has
            # more goes to the processes from its first booking (checked here first, its
            # first AUTO_AFTER chunks kept the other cores idle: 0.15-0.25 s at 20,000).
            # Held meanwhile: as many documents as the processes' queue holds below.
            first = list(itertools.islice(chunks, AUTO_AFTER + 1))
            if len(first) <= AUTO_AFTER:
                for chunk in first:
                    yield _check_chunk(chunk, catalog, clinic, now)
                return
            chunks = itertools.chain(first, chunks)
    if jobs <= 1:
        for chunk in chunks:
            yield _check_chunk(chunk, catalog, clinic, now)
        return
    import ctypes  # noqa: F401  (for `_end_with`: imported before the fork, not in each)
    from concurrent.futures import ProcessPoolExecutor  # multiprocessing: only when asked
    from concurrent.futures.process import BrokenProcessPool

    # The processes are forked (at the first submit) with SIGTERM held: the command's
    # handler (worker/cli.py `sigterm_stops`) must not run in them; `_init_worker` sets it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with ProcessPoolExecutor(jobs, initializer=_init_worker,
                                 initargs=(catalog, clinic, now, os.getpid())) as pool:
            pending: deque[Future[CheckedChunk]] = deque()
            for chunk in chunks:
                pending.append(pool.submit(_check_in_worker, chunk))
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                if len(pending) > 2 * jobs:  # a few chunks ahead, not the whole input
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BrokenProcessPool:
        raise CheckerDied("a process checking the bookings ended abruptly (killed, or out "
                          "of memory?)") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class SeenBookings:
    """The bookings a file gives, across its chunks (checked here or in worker processes):
    a (clinic, booking id) given twice is refused at its second line, naming the first,
    as the HTTP batch route refuses one given twice in a batch. Without it the later line
    would silently overwrite the earlier, and with the two in different store batches the
    first would be live (its at-booking message sent) until the second is stored.

    Only accepted bookings take part (a refused line's clinic and id may be wrong). Kept:
    per clinic, each booking id with where it was first given: about 120 bytes a booking
    (measured: 116 MiB in the main process for a file of a million), and well under a
    microsecond a booking."""

    def __init__(self) -> None:
        self.first: dict[str, dict[str, int]] = {}

    def refusals(self, chunk: CheckedChunk) -> list[Outcome]:
        """Record the chunk's accepted bookings; return a refusal for each given before."""
        refusals: list[Outcome] = []
        for clinic, booking_id, number, line in chunk.keys or ():
            ids = self.first.get(clinic)
            if ids is None:
                ids = self.first[clinic] = {}
            where = number if line is None else line
            first = ids.setdefault(booking_id, where)
            if first != where:
                kind = "booking" if line is None else "line"
                refusals.append(Outcome(number, line, printable(booking_id, 64),
                                        errors=[given_before(kind, first, clinic)]))
        return refusals


def given_before(kind: str, first: int, clinic: str) -> tuple[str, str]:
    """The refusal of a booking given again in one input (`book` and `plan` alike)."""
    return ("booking_id", f"appears earlier in this input ({kind} {first}, clinic "
                          f"{clinic!r}): give each booking once")


def chunk_refusals(chunk: CheckedChunk, seen: SeenBookings) -> list[Outcome]:
    """The chunk's refused or unreadable documents and its bookings given before (`seen`),
    in input order."""
    again = seen.refusals(chunk)
    if not again:
        return chunk.refused
    return sorted(chunk.refused + again, key=lambda outcome: outcome.number)


# --- keeping accepted bookings until they are stored ------------------------------------


class Spool:
    """Accepted bookings, compact: the first SPOOL_AFTER in memory, the rest in a temp file.

    A chunk is added whole (`add_chunk`): its items, or the pickle a worker process made of
    them, which is kept or written as it is (not read back until it is stored)."""

    def __init__(self) -> None:
        self.memory: list[list[Accepted] | bytes] = []
        self.file: Any = None
        self.count = 0

    def add_chunk(self, chunk: CheckedChunk) -> None:
        if not chunk.count:
            return
        part = chunk.items if chunk.items is not None else chunk.blob
        assert part is not None
        in_memory = self.count < SPOOL_AFTER
        self.count += chunk.count
        if in_memory:
            self.memory.append(part)
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="reminders-book-")
        if isinstance(part, bytes):
            self.file.write(part)  # a whole pickle: `pickle.load` reads it back
        else:
            pickle.dump(part, self.file, protocol=pickle.HIGHEST_PROTOCOL)

    def chunks(self, size: int | None = None, first: int | None = None
               ) -> Iterator[list[Accepted]]:
        """The accepted bookings in input order, `size` (CHUNK) at a time (the last one
        shorter); with `first`, the first batch holds that many and each next one twice
        the one before, up to `size`."""
        size = size or CHUNK
        now = min(first or size, size)
        chunk: list[Accepted] = []
        for part in self._parts():
            chunk += part
            while len(chunk) >= now:
                yield chunk[:now]
                chunk = chunk[now:]
                now = min(2 * now, size)
        if chunk:
            yield chunk

    def _parts(self) -> Iterator[list[Accepted]]:
        for part in self.memory:
            yield pickle.loads(part) if isinstance(part, bytes) else part
        if self.file is not None:
            self.file.seek(0)
            while True:
                try:
                    yield pickle.load(self.file)
                except EOFError:
                    break

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def decode(item: Accepted, catalog: Catalog) -> tuple[Booking, Plan]:
    """The booking and plan an accepted item holds (checked by this program: not again).
    Its document's text is the item's first part: `Store.upsert_many(docs=...)`. The plan
    is decoded lazily: its reminders are made from its record when first read, which
    storing a new booking from that record (`Store.upsert_many(records=...)`) never does."""
    doc, record = item
    booking = trusted_booking(orjson.loads(doc))
    clinic = catalog.clinics[booking.clinic]
    return booking, plan_from_record(record, clinic.send_window, clinic.sms, lazy=True)


class ReadAhead:
    """The spool's store batches (`Spool.chunks`), each with its bookings and plans decoded
    (`decode`), and each after the first with the first pass of its store read ahead
    (`Store.read_first`: each booking as stored, the SMS cap's reads): made in a thread,
    started once the batch before's first apply chunk is at Redis (`start`), while
    `reminders book` stores that one. Its
    decoding and its reads (about 0.14 s of CPU for 4,000 bookings, half of it reading,
    with Redis idle while they ran between two batches) go while Redis applies the batch
    before, in the time the main thread waits for it.

    Read before the batch before is written: a booking is in one batch only (`SeenBookings`:
    one given twice in a file is refused), so what a batch's writes change of what the next
    one read is only the SMS cap's read of a patient's other bookings: the bookings whose
    patient has a phone of the batch before, or whose cap read one of its bookings, have
    theirs read again as their batch's store begins, after the batch before is written
    (`Store.read_first`'s `after`): what is stored is what reading each batch in its turn
    stores. Each batch's writes all go after the batch before is written. What another
    process writes meanwhile fails the apply's check as always, but an email unsubscribe:
    `upsert_many` reads those again as it begins.

    A read ahead that fails (Redis gone, say) is dropped: `upsert_many` reads that batch
    itself, as it reads the first, and fails or not as it would have without it."""

    def __init__(self, chunks: Iterator[list[Accepted]], catalog: Catalog, store: Store,
                 timelines: bool) -> None:
        self.chunks, self.catalog, self.store, self.timelines = chunks, catalog, store, timelines
        self.next: Future[Batch | None] | None = None
        self._after: list[tuple[Booking, Plan]] | None = None  # the batch `start` reads after

    def _decoded(self) -> tuple[list[Accepted], list[tuple[Booking, Plan]]] | None:
        raw = next(self.chunks, None)
        if raw is None:
            return None
        catalog = self.catalog
        return raw, [decode(item, catalog) for item in raw]

    def _run(self, future: Future[Batch | None], after: list[tuple[Booking, Plan]]) -> None:
        try:
            decoded = self._decoded()
        except BaseException as exc:  # noqa: BLE001 - handed to `take`, which raises it
            future.set_exception(exc)
            return
        if decoded is None:
            future.set_result(None)
            return
        raw, items = decoded
        first: FirstRead | None
        try:
            first = self.store.read_first(items, timelines=self.timelines, after=after)
        except Exception:  # noqa: BLE001 - dropped: `upsert_many` reads it again itself
            first = None
        future.set_result((raw, items, first))

    def take(self) -> Batch | None:
        """The next batch: its accepted items, their bookings and plans, and its first
        read (None: the first batch, or a read ahead that failed); None once the spool has
        no more. The one after it is made in a thread (a daemon: one left reading when the
        command stops does not hold it) once `start` is called, or at the next `take`."""
        if self.next is None:
            decoded = self._decoded()
            taken: Batch | None = None if decoded is None else (*decoded, None)
        else:
            self.start()
            taken, self.next = self.next.result(), None
        if taken is not None:
            from concurrent.futures import Future

            self.next = Future()
            self._after = taken[1]
        return taken

    def start(self) -> None:
        """Begin reading the batch after the one last taken, if not begun: `reminders
        book` calls it once the taken batch's first apply chunk is at Redis (`upsert_many`'s
        `idle`), so that the thread decoding does not hold the GIL while the main thread
        reads again and prepares that first chunk, with Redis idle."""
        after, self._after = self._after, None
        if after is not None and self.next is not None:
            threading.Thread(target=self._run, args=(self.next, after), name="store-read",
                             daemon=True).start()


# --- output, progress, garbage collection ---------------------------------------------


class JsonArrayOut:
    """Timelines printed as `json.dumps(timelines, indent=2)` would, one at a time.

    A single booking's timeline is printed as an object (as `book` always has).
    """

    def __init__(self, stream: Any, single: bool) -> None:
        self.stream, self.single, self.count = stream, single, 0

    def write(self, timeline: dict[str, Any]) -> None:
        text = json.dumps(timeline, indent=2, ensure_ascii=False)
        if self.single:
            self.stream.write(text + "\n")
        else:
            self.stream.write(("[\n" if self.count == 0 else ",\n")
                              + "\n".join("  " + line for line in text.split("\n")))
        self.count += 1

    def close(self) -> None:
        if not self.single:
            self.stream.write("\n]\n" if self.count else "[]\n")
        self.stream.flush()


# Young collections every million allocations; older ones (which walk what survived the
# young ones) never within a batch of any realistic size.
QUIET_GC = (1_000_000, 1000, 1000)


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect garbage far less often while a batch runs: it makes millions of objects,
    nearly none cyclic (a few hundred unreachable after 20,000 bookings booked).

    The objects alive at the start (modules, the catalog) are set aside, and a young
    collection runs every million allocations instead of 700 (QUIET_GC). Each collection
    walks every object alive since the last (the bookings being stored, thousands at a
    time, most of all), and garbage that is not cyclic is freed as it is made whatever the
    thresholds: with the default ones, collections took about half the time of a large
    batch; with 50,000 young allocations, about a tenth of the main process's time.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*QUIET_GC)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


class Progress:
    """A bar on stderr when it is a terminal, shown once a phase lasts over a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase, self.phase_started = "", time.monotonic()

    def start(self, phase: str, total: int | None, unit: str = "bookings") -> None:
        """A new bar; `total` in bookings, or in bytes (unit "B") of a file being read."""
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm  # only on a terminal

        self.phase = phase
        self.phase_started = time.monotonic()
        self.bar = tqdm(
            total=total, desc=phase, unit=unit,
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]" if total
            else "{desc} [{elapsed}]",
            delay=1.0, mininterval=0.25, file=sys.stderr, dynamic_ncols=True, leave=False,
        )

    def update(self, n: int, bookings: int) -> None:
        """Advance by `n` (bookings, or bytes); `bookings` done so far, for the rate."""
        if self.bar is None:
            return
        rate = bookings / max(time.monotonic() - self.phase_started, 1e-6)
        self.bar.set_description_str(
            f"{self.phase} {bookings:,} bookings, {rate:,.0f} bookings/s", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def progress_on(stream: Any) -> Iterator[Progress]:
    progress = Progress(bool(getattr(stream, "isatty", lambda: False)()))
    try:
        yield progress
    finally:
        progress.close()
