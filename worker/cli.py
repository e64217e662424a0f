"""The `reminders` console script.

Exit codes: 0 ok; 1 a booking was refused or not found; 2 bad usage or unreadable
input; 3 invalid configuration (config/ or templates/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO

from .catalog import Catalog
from .errors import BookingRejected, ConfigError, NotFound
from .jsonsafe import JSONRefused, load_json, printable
from .models import (
    MAX_BOOKING_BYTES,
    MAX_BOOKING_DEPTH,
    YEARS,
    Booking,
    json_refusal,
    parse_booking,
)
from .planner import Plan, plan
from .settings import Settings, get_settings
from .status import Status
from .timeline import from_plan, render_table

if TYPE_CHECKING:
    from .store import Store

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3


class UsageError(Exception):
    """The command line or its input file cannot be used."""


# JSON lines are read one line at a time; a JSON array (or one object over several lines)
# is read whole, up to this size: larger inputs must be JSON lines.
MAX_WHOLE_INPUT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Document:
    """One booking document of the input: parsed, or refused before it was JSON."""

    number: int  # 1-based position in the input
    line: int | None  # the line it is on, for JSON lines input
    value: Any = None
    refused: BookingRejected | None = None

    def label(self) -> str | None:
        """The booking id it gives, printable and short, if any."""
        given = self.value.get("booking_id") if isinstance(self.value, dict) else None
        return printable(given, 64) if isinstance(given, str) and given else None


def open_input(source: str) -> BinaryIO:
    """Return FILE, or stdin for "-", as a binary stream; raise UsageError if unreadable."""
    if source == "-":
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


def _syntax(source: str, exc: JSONRefused, line: int) -> UsageError:
    column = f", column {exc.column}" if exc.column else ""
    return UsageError(f"{source}: line {line}: not JSON ({exc.reason or exc.problem}{column})")


def iter_documents(reader: LineReader) -> Iterator[Document]:
    """Yield the booking documents of a JSON object, a JSON array or JSON lines, in order.

    JSON lines stream: one line at a time is held, each at most MAX_BOOKING_BYTES. A JSON
    array, or a single object spread over several lines, is read whole (at most
    MAX_WHOLE_INPUT_BYTES). Hostile JSON (too big or deep, duplicate keys, NaN, invalid
    UTF-8) refuses the document it is in, naming the field; input that is not JSON at all
    raises UsageError naming the line.
    """
    source = reader.source
    first = reader.first_byte()
    if not first:
        raise UsageError(f"{source}: no booking in the input")
    if first == b"[":
        yield from _whole_array(reader)
        return
    pending: list[tuple[int, bytes | None]] = []
    number = 0
    while True:
        item = pending.pop(0) if pending else reader.line(MAX_BOOKING_BYTES)
        if item is None:
            return
        line_number, line = item
        if line is not None and not line.strip():
            continue
        number += 1
        if line is None:
            problem = f"is a line of more than {MAX_BOOKING_BYTES:,} bytes"
            yield Document(number, line_number, refused=BookingRejected([("booking", problem)]))
            continue
        try:
            value = load_json(line, max_bytes=MAX_BOOKING_BYTES, max_depth=MAX_BOOKING_DEPTH)
        except JSONRefused as exc:
            if exc.kind != "syntax":
                yield Document(number, line_number, refused=json_refusal(exc))
                continue
            if number == 1:  # perhaps one object over several lines
                single, pending = _one_document(item, reader)
                if single is not None:
                    yield single
                    return
            raise _syntax(source, exc, line_number) from None
        yield Document(number, line_number, value)


def _one_document(
    first: tuple[int, bytes | None], reader: LineReader
) -> tuple[Document | None, list[tuple[int, bytes | None]]]:
    """Read on from a first line that is not JSON by itself: one object over many lines?

    Return (the document, []) if the whole input is one JSON value, else (None, the lines
    read so far, the first included) to be read as JSON lines.
    """
    pending, size = [first], len(first[1] or b"")
    while size <= MAX_BOOKING_BYTES:
        item = reader.line(MAX_BOOKING_BYTES)
        if item is None:
            break
        pending.append(item)
        if item[1] is None:
            return None, pending
        size += len(item[1])
    else:
        return None, pending
    text = b"".join(line or b"" for _, line in pending)
    try:
        value = load_json(text, max_bytes=MAX_BOOKING_BYTES, max_depth=MAX_BOOKING_DEPTH)
    except JSONRefused as exc:
        if exc.kind == "syntax":
            return None, pending
        return Document(1, None, refused=json_refusal(exc)), []
    return Document(1, None, value), []


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
        yield Document(exc.path[0] + 1, None, refused=json_refusal(inner))
        return
    if not isinstance(docs, list) or not docs:
        raise UsageError(f"{source}: no booking in the input")
    for number, value in enumerate(docs, 1):
        yield Document(number, None, value)


def read_documents(source: str) -> tuple[Iterator[Document], bool]:
    """Return the documents of FILE or stdin ("-"), and whether there is only one.

    The documents are read as they are consumed (JSON lines stream); the first two are
    read at once, to know whether the input holds a single booking (it is then reported
    as "booking", and printed as an object rather than an array with --json).
    """
    stream = open_input(source)

    def documents() -> Iterator[Document]:
        try:
            yield from iter_documents(LineReader(stream, source))
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    docs = documents()
    ahead = list(itertools.islice(docs, 2))
    return itertools.chain(ahead, docs), len(ahead) == 1


def check_document(
    doc: Document, catalog: Catalog, clinic: str | None, now: datetime
) -> tuple[Booking, Plan] | BookingRejected:
    """Validate and plan one document: (booking, plan), or why it is refused."""
    if doc.refused is not None:
        return doc.refused
    try:
        booking = parse_booking(doc.value, catalog, clinic=clinic)
        return booking, plan(
            booking, catalog.protocols[booking.treatment], catalog.clinics[booking.clinic], now
        )
    except BookingRejected as exc:
        return exc


def refusal_heading(doc: Document, single: bool) -> str:
    """`booking 2 (A-2)`, or `line 7 (A-7)` in JSON lines, or `booking` for a lone one."""
    label = doc.label()
    if single:
        return f"booking 1 ({label})" if label else "booking"
    where = f"line {doc.line}" if doc.line is not None else f"booking {doc.number}"
    return f"{where} ({label})" if label else where


def print_refusal(doc: Document, single: bool, exc: BookingRejected) -> None:
    print(f"{refusal_heading(doc, single)} refused:", file=sys.stderr)
    for field, message in exc.errors:
        print(f"  {field}: {message}", file=sys.stderr)


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Dry run: validate bookings and print the timeline that would be scheduled."""
    catalog = Catalog.load(settings)
    docs, single = read_documents(args.file)
    now = args.now or datetime.now(UTC)
    status, out = EXIT_OK, []
    for doc in docs:
        result = check_document(doc, catalog, args.clinic, now)
        if isinstance(result, BookingRejected):
            print_refusal(doc, single, result)
            status = EXIT_REFUSED
            continue
        booking, planned = result
        timeline = from_plan(booking, planned)
        if args.json:
            out.append(timeline)
        else:
            print(render_table(timeline, booking.patient.timezone))
            print()
    if args.json:
        print(json.dumps(out[0] if single and out else out, indent=2, ensure_ascii=False))
    return status


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate config/ and templates/; report each SMS template's length and segments."""
    from .checking import SAMPLE_FIRST_NAMES, check  # Jinja and Babel: only this command

    catalog = Catalog.load(settings)
    if args.clinic is not None and args.clinic not in catalog.clinics:
        raise UsageError(f"unknown clinic {args.clinic!r}")
    clinic_ids = [args.clinic] if args.clinic else sorted(catalog.clinics)
    report = check(catalog, settings.clinics_dir, clinic_ids=clinic_ids,
                   protocols_dir=settings.protocols_dir)
    for error in report.errors:
        print(f"configuration error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_json(sources=args.sources), indent=2, ensure_ascii=False))
    else:
        if report.sms:
            names = "; ".join(f"{lang}: {', '.join(n)}" for lang, n in SAMPLE_FIRST_NAMES.items())
            print(f"SMS templates: longest rendering with first names {names}; "
                  f"clinics: {', '.join(clinic_ids)}")
            print(report.table())
            print()
        if args.sources and report.sources:
            print("Clinical claims per protocol step, with their sources (config/protocols):")
            print(report.sources_text())
            print()
        for warning in report.warnings:
            print(f"WARNING: {warning}")
        outcome = f"{len(report.errors)} error(s)" if report.errors else "ok"
        print(
            f"{outcome}: {len(catalog.protocols)} protocols, {len(clinic_ids)} clinic(s), "
            f"locales {', '.join(sorted(catalog.locales))}"
        )
    return EXIT_CONFIG if report.errors else EXIT_OK


def parse_now(value: str) -> datetime:
    try:
        now = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 instant") from None
    if now.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a UTC offset, e.g. 2026-11-21T12:00:00Z")
    if not YEARS[0] <= now.year <= YEARS[1]:
        raise argparse.ArgumentTypeError(f"{value!r} is not in the years {YEARS[0]}-{YEARS[1]}")
    return now


def open_store(settings: Settings, catalog: Catalog | None = None) -> Store:
    """Return the schedule store on the configured (or embedded) Redis.

    With `catalog`, writes tell each clinic what its config asks for (worker/webhooks.py).
    """
    from .embedded import redis_url  # redis: only for the commands that use it
    from .store import Store, connect
    from .webhooks import hooks_for

    return Store(
        connect(redis_url(settings)), settings.key_prefix, retention_days=settings.retention_days,
        hooks=hooks_for(catalog.clinics) if catalog else None,
    )


def clinic_of(args: argparse.Namespace, catalog: Catalog) -> str:
    """Return --clinic, or the only configured clinic; raise UsageError otherwise."""
    if args.clinic:
        if args.clinic not in catalog.clinics:
            raise UsageError(f"--clinic: unknown clinic {args.clinic!r}")
        return str(args.clinic)  # a str from argparse (Namespace attributes are Any)
    if len(catalog.clinics) == 1:
        return next(iter(catalog.clinics))
    raise UsageError("--clinic is required: more than one clinic is configured")


def print_timeline(
    args: argparse.Namespace, timeline: dict[str, Any], timezone: str | None
) -> None:
    if args.json:
        print(json.dumps(timeline, indent=2, ensure_ascii=False))
    else:
        print(render_table(timeline, timezone))


def cmd_book(args: argparse.Namespace, settings: Settings) -> int:
    """Validate and plan every booking first; store them only if all are acceptable."""
    catalog = Catalog.load(settings)
    docs, single = read_documents(args.file)
    now = datetime.now(UTC)
    accepted, refused = [], False
    for doc in docs:
        result = check_document(doc, catalog, args.clinic, now)
        if isinstance(result, BookingRejected):
            print_refusal(doc, single, result)
            refused = True
        else:
            accepted.append(result)
    if refused:
        print("nothing was stored", file=sys.stderr)
        return EXIT_REFUSED
    store = open_store(settings, catalog)
    timelines = [store.upsert(booking, planned, now) for booking, planned in accepted]
    soon = now + timedelta(seconds=settings.pump_interval_seconds)
    if any(
        r.status == Status.SCHEDULED and r.due_at <= soon and p.status == Status.SCHEDULED
        for _, p in accepted
        for r in p.reminders
    ):
        nudge_pump_quietly()
    if args.json:
        print(json.dumps(timelines[0] if single else timelines, indent=2, ensure_ascii=False))
    else:
        for (booking, _), timeline in zip(accepted, timelines, strict=True):
            print(render_table(timeline, booking.patient.timezone))
            print()
    return EXIT_OK


def nudge_pump_quietly() -> None:
    """Have a pump run at once so an at-booking message goes out without waiting a tick."""
    try:
        from .celery_app import nudge_pump

        nudge_pump()
    except Exception as exc:  # beat runs the pump anyway within a second
        print(f"note: could not nudge the pump ({type(exc).__name__})", file=sys.stderr)


def _on_booking(
    args: argparse.Namespace, settings: Settings, act: Callable[[Store, str], dict[str, Any]]
) -> int:
    """Run `act(store, clinic)` on the named booking and print the timeline it returns."""
    catalog = Catalog.load(settings)
    clinic = clinic_of(args, catalog)
    store = open_store(settings, catalog)
    timeline = act(store, clinic)
    timezone = store.booking_doc(clinic, args.booking_id)["patient"]["timezone"]
    print_timeline(args, timeline, timezone)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print a booking's timeline: every reminder, its status and why."""
    return _on_booking(
        args, settings, lambda store, clinic: store.timeline(clinic, args.booking_id)
    )


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel a booking: nothing still pending will be sent."""
    return _on_booking(
        args,
        settings,
        lambda store, clinic: store.cancel(clinic, args.booking_id, datetime.now(UTC)),
    )


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    """Release a held booking after the clinic's review: its reminders are scheduled."""
    catalog = Catalog.load(settings)
    clinic = clinic_of(args, catalog)
    store = open_store(settings, catalog)
    current = store.timeline(clinic, args.booking_id)
    if current["status"] != Status.HELD:
        print(
            f"{clinic}/{args.booking_id} is not held (status {current['status']})", file=sys.stderr
        )
        return EXIT_REFUSED
    doc = store.booking_doc(clinic, args.booking_id)
    now = datetime.now(UTC)
    result = check_document(Document(1, None, doc), catalog, None, now)
    if isinstance(result, BookingRejected):
        print_refusal(Document(1, None, doc), True, result)
        return EXIT_REFUSED
    booking, planned = result
    timeline = store.upsert(booking, planned, now, release=True)
    print_timeline(args, timeline, booking.patient.timezone)
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    """List reminders that failed for good, with the reason."""
    dead = open_store(settings).dead_letters(args.clinic)
    if args.json:
        print(json.dumps(dead, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not dead:
        print("no dead letters")
    for d in dead:
        print(
            f"{d['ref']}  {d['channel']}  attempts={d['attempts']}  failed_at={d['failed_at']}  "
            f"{d['reason']}"
        )
    return EXIT_OK


def _on_dead_letters(
    args: argparse.Namespace,
    settings: Settings,
    verb: str,
    act: Callable[[Store, list[str]], list[str]],
) -> int:
    """Apply `act` to the dead letters named (REF or BOOKING_ID) or --all; print the result."""
    store = open_store(settings)
    dead = store.dead_letters(args.clinic)
    if args.refs:
        wanted = set(args.refs)
        refs = [d["ref"] for d in dead if d["ref"] in wanted or d["booking_id"] in wanted]
        unknown = wanted - {d["ref"] for d in dead} - {d["booking_id"] for d in dead}
        if unknown:
            print(f"not dead-lettered: {', '.join(sorted(unknown))}", file=sys.stderr)
            return EXIT_REFUSED
    elif args.all:
        refs = [d["ref"] for d in dead]
    else:
        raise UsageError(f"name the dead letters to {verb} (REF or BOOKING_ID), or use --all")
    done = act(store, refs)
    past = "replayed" if verb == "replay" else "purged"
    if args.json:
        print(json.dumps({past: done}))
    else:
        print(f"{past} {len(done)} dead letter(s)" + "".join(f"\n  {r}" for r in done))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Send dead-lettered reminders again, now (after the cause was fixed)."""
    return _on_dead_letters(
        args, settings, "replay", lambda store, refs: store.replay(refs, datetime.now(UTC))
    )


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Remove dead letters without sending them; they stay `failed` in the timeline."""
    return _on_dead_letters(
        args, settings, "purge", lambda store, refs: store.purge(refs, datetime.now(UTC))
    )


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Print how much the store keeps: bookings per clinic, reminders, dead letters."""
    stats = open_store(settings).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    print(f"retention: {stats['retention_days']:g} days after a booking's last reminder "
          "(dead letters kept until replayed or purged)")
    print(f"bookings kept: {stats['bookings_total']}")
    for clinic, count in stats["bookings"].items():
        print(f"  {clinic}: {count}")
    print(f"reminders kept: {stats['reminders_kept']} (due {stats['due']}, being sent "
          f"{stats['leased']}, dead letters {stats['dead_letters']})")
    print(f"attempt logs: {stats['attempt_logs']}, ledger entries: {stats['ledger_entries']}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Issue, list or revoke a clinic's API keys (only a hash of each is kept, in Redis)."""
    from .embedded import redis_url
    from .keys import ApiKeys
    from .store import connect

    clinic = clinic_of(args, Catalog.load(settings))
    keys = ApiKeys(connect(redis_url(settings)), settings.key_prefix)
    if args.action == "issue":
        issued = keys.issue(clinic)
        if args.json:
            print(json.dumps({"clinic": clinic, "key_id": issued.key_id, "key": issued.key}))
        else:  # the key alone on stdout: KEY=$(reminders keys issue --clinic X)
            print(f"new API key {issued.key_id} for clinic {clinic}; it is shown only this "
                  "once, keep it secret:", file=sys.stderr)
            print(issued.key)
        return EXIT_OK
    if args.action == "list":
        listed = keys.list(clinic)
        if args.json:
            print(json.dumps(listed, indent=2))
        elif not listed:
            print(f"clinic {clinic} has no API keys")
        for key in [] if args.json else listed:
            print(f"{key['key_id']}  created {key['created_at']}  "
                  f"last used {key['last_used_at'] or 'never'}")
        return EXIT_OK
    if not keys.revoke(clinic, args.key_id):
        print(f"clinic {clinic} has no API key {args.key_id}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"revoked API key {args.key_id} of clinic {clinic}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run everything: Redis (if embedded), the Celery worker and beat (the pump), the API."""
    from .service import run_all

    Catalog.load(settings)  # refuse to start on a broken config
    return run_all(settings)


Command = Callable[[argparse.Namespace, Settings], int]
COMMANDS: dict[str, tuple[Command, str]] = {
    "plan": (
        cmd_plan,
        "validate bookings and print the timeline that would be scheduled (no Redis)",
    ),
    "check": (cmd_check, "validate config/ and templates/; report each SMS template's segments"),
    "book": (cmd_book, "store bookings (create or update) and print their timelines"),
    "show": (cmd_show, "print a booking's timeline"),
    "cancel": (cmd_cancel, "cancel a booking: nothing pending will be sent"),
    "release": (cmd_release, "release a held booking after the clinic's review"),
    "dead-letters": (cmd_dead_letters, "list reminders that failed for good"),
    "replay": (cmd_replay, "send dead-lettered reminders again"),
    "purge": (cmd_purge, "remove dead letters without sending them"),
    "stats": (cmd_stats, "how many bookings and reminders are kept, and where they are"),
    "keys": (cmd_keys, "issue, list or revoke a clinic's API keys (for the HTTP API)"),
    "run": (
        cmd_run,
        "run Redis (embedded unless REMINDERS_REDIS_URL), worker, pump and the HTTP API; "
        "Ctrl-C stops all",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reminders", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("plan", "book"):
            p.add_argument("file", metavar="FILE|-", help="JSON object, JSON array or JSON lines")
        if name == "plan":
            p.add_argument(
                "--now",
                type=parse_now,
                metavar="ISO",
                help="plan as if it were this instant (default: the real clock)",
            )
        if name in ("show", "cancel", "release"):
            p.add_argument("booking_id")
        if name == "keys":
            actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            for action, text in (("issue", "print a new key for the clinic (shown once)"),
                                 ("list", "list the clinic's keys (ids and times, no secret)"),
                                 ("revoke", "revoke one of the clinic's keys at once")):
                a = actions.add_parser(action, help=text, description=text)
                if action == "revoke":
                    a.add_argument("key_id", metavar="KEY_ID", help="as `keys list` shows it")
                # SUPPRESS: given before or after the action, neither hides the other.
                a.add_argument("--clinic", default=argparse.SUPPRESS, help="clinic id")
                a.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print the machine-readable form")
        if name == "check":
            p.add_argument("--sources", action="store_true",
                           help="also list each protocol step's clinical claims and sources")
        if name in ("replay", "purge"):
            p.add_argument(
                "refs",
                nargs="*",
                metavar="REF",
                help="a dead letter's ref (clinic/booking/reminder) or a booking id",
            )
            p.add_argument("--all", action="store_true", help=f"{name} every dead letter")
        p.add_argument("--clinic", help="clinic id (default: the booking's own `clinic` field)")
        p.add_argument("--json", action="store_true", help="print the machine-readable form")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        return COMMANDS[args.command][0](args, settings)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NotFound as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:  # `reminders show ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        import redis  # already loaded by any command that talks to Redis (`plan` does not)

        if not isinstance(exc, redis.ConnectionError):
            raise
        print(f"cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
