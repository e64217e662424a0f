"""The `reminders` console script.

Exit codes: 0 ok; 1 a booking was refused or not found; 2 bad usage or unreadable
input; 3 invalid configuration (config/ or templates/). `health`: 0 healthy, 1 not.
`book` stopped by Ctrl-C: 130, by SIGTERM: 143, having said how many bookings it stored.
A Redis refusing writes (OOM, MISCONF, READONLY, NOREPLICAS, MASTERDOWN) is 3, as one
unreachable, and any other Redis error (one line, without its message but at
REMINDERS_LOG_LEVEL=DEBUG).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from .batch import (
    AUTO_AFTER,
    CHUNK,
    MAX_AUTO_JOBS,
    REFUSALS_SHOWN,
    Checked,
    CheckerDied,
    Document,
    JsonArrayOut,
    Progress,
    ReadAhead,
    SeenBookings,
    Spool,
    UsageError,
    check_chunks,
    check_document,
    chunk_refusals,
    given_before,
    print_refusal,
    progress_on,
    quiet_gc,
    raise_stop,
    read_documents,
    refusal_heading,
)
from .catalog import Catalog
from .errors import BookingRejected, ConfigError, NotFound
from .logs import scrub
from .models import YEARS
from .nudge import due_soon
from .settings import Settings, get_settings, settings_problem
from .status import Status
from .timeline import from_plan, render_table

if TYPE_CHECKING:
    from .models import Booking
    from .planner import Plan
    from .store import Store

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # `book` stopped by Ctrl-C (128 + SIGINT), saying what was stored
EXIT_TERMINATED = 143  # `book` stopped by SIGTERM (128 + SIGTERM), the same


class Terminated(KeyboardInterrupt):
    """SIGTERM while `book` stores: handled as a Ctrl-C (said, stopped between batches)."""


# Booking files (reading, checking, storing in chunks): worker/batch.py.
TABLES_UP_TO = 20  # `book` prints each timeline for at most this many bookings
# Bookings per `Store.upsert_many` call: it reads them all at once, then overlaps preparing
# each apply chunk in Python with Redis applying the one before.
STORE_BATCH = 4000
# The first store batch: its read is not made while a batch before is applied (Redis and
# the other core idle meanwhile), so it is small; each next one twice the one before.
FIRST_STORE_BATCH = 500


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Dry run: validate bookings and print the timeline that would be scheduled."""
    with quiet_gc():
        return plan_files(args, settings)


def plan_files(args: argparse.Namespace, settings: Settings) -> int:
    catalog = Catalog.load(settings)
    source = read_documents(args.file)
    now = args.now or datetime.now(UTC)
    status, out = EXIT_OK, []
    # A booking given twice is refused at its second, as `book` refuses it (SeenBookings).
    first: dict[tuple[str, str], int] = {}
    for doc in source.documents:
        checked = check_document(doc, catalog, args.clinic, now)
        if checked.unreadable is not None:
            raise UsageError(f"{args.file}: {checked.unreadable}")
        if checked.booking is not None:
            where = checked.number if checked.line is None else checked.line
            seen = first.setdefault((checked.booking.clinic, checked.booking.booking_id), where)
            if seen != where:
                kind = "booking" if checked.line is None else "line"
                checked = Checked(checked.number, checked.line, checked.label, refused=(
                    BookingRejected([given_before(kind, seen, checked.booking.clinic)])))
        if checked.booking is None or checked.plan is None:
            print_refusal(checked, source.single)
            status = EXIT_REFUSED
            continue
        timeline = from_plan(checked.booking, checked.plan)
        if args.json:
            out.append(timeline)
        else:
            print(render_table(timeline, checked.booking.patient.timezone))
            print()
    if args.json and source.single:  # its timeline, or (refused) nothing, as `book --json`
        if out:
            print(json.dumps(out[0], indent=2, ensure_ascii=False))
    elif args.json:  # the timelines of those accepted; each refusal on stderr, exit 1
        print(json.dumps(out, indent=2, ensure_ascii=False))
    return status


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate config/ and templates/; report each SMS template's length and segments."""
    from .checking import (  # Jinja and Babel: only this command
        SAMPLE_FIRST_NAMES,
        check,
        unsubscribe_link_warnings,
    )

    catalog = Catalog.load(settings)
    if args.clinic is not None and args.clinic not in catalog.clinics:
        raise UsageError(f"unknown clinic {args.clinic!r}")
    clinic_ids = [args.clinic] if args.clinic else sorted(catalog.clinics)
    report = check(catalog, settings.clinics_dir, clinic_ids=clinic_ids,
                   protocols_dir=settings.protocols_dir)
    report.warnings += unsubscribe_link_warnings(
        settings, [catalog.clinics[c] for c in clinic_ids])
    if args.redis:  # the only part that reads Redis
        from .checking import pending_unconfigured
        from .durability import findings, read_settings, summary

        store = open_store(settings)
        report.unconfigured = pending_unconfigured(
            store, catalog, settings.clinics_dir, settings.protocols_dir,
            [args.clinic] if args.clinic else None)
        minutes = _retry_minutes(settings)
        report.errors += [u.error(settings.max_attempts, minutes) for u in report.unconfigured]
        # Warnings, not errors: a Redis run so on purpose is ops' choice (worker/durability.py).
        redis_settings = read_settings(store.redis)
        report.redis_settings = findings(redis_settings)
        report.redis_summary = summary(redis_settings)
        report.warnings += [f"Redis {f.problem}" for f in report.redis_settings]
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
        for clinic_id in clinic_ids:  # where the calendar invites say the visit is
            clinic = catalog.clinics[clinic_id]
            print(f"clinic {clinic_id}: {clinic.name}, {clinic.address or '(no address)'}, "
                  f"{clinic.timezone}, {clinic.locale}")
        for warning in report.warnings:
            print(f"WARNING: {warning}")
        if report.unconfigured is not None and not report.unconfigured:
            print("Redis: every reminder still to be sent is of a configured clinic and "
                  "protocol")
        if report.redis_settings == []:
            print(f"Redis: {report.redis_summary}")
        outcome = f"{len(report.errors)} error(s)" if report.errors else "ok"
        print(
            f"{outcome}: {len(catalog.protocols)} protocols, {len(clinic_ids)} clinic(s), "
            f"locales {', '.join(sorted(catalog.locales))}"
        )
    return EXIT_CONFIG if report.errors else EXIT_OK


def _retry_minutes(settings: Settings) -> int:
    """The longest a failing reminder is retried before it is given up: the nominal
    backoffs of its max_attempts (worker/dispatch.py `compute_backoff`, jitter at most)."""
    seconds = sum(min(settings.backoff_cap_seconds,
                      settings.backoff_base_seconds * 2 ** max(0, attempt - 1))
                  for attempt in range(1, settings.max_attempts))
    return max(1, int(round(seconds / 60)))


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


def _jobs(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes (1-64)")
    return int(value)


def _clinic_id(value: str) -> str:
    """--clinic: an empty one (`--clinic "$CLINIC"`, the variable unset) is refused, not read
    as no clinic: `purge --all` of one clinic would act on every clinic."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: name a clinic, or leave --clinic out")
    return value


def open_store(settings: Settings, catalog: Catalog | None = None) -> Store:
    """Return the schedule store on the configured (or embedded) Redis.

    With `catalog`, writes tell each clinic what its config asks for (worker/webhooks.py).
    """
    from .connections import client  # redis: only for the commands that use it
    from .store import Store
    from .webhooks import hooks_for

    return Store(
        client(settings), settings.key_prefix, retention_days=settings.retention_days,
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
    """Check every booking first; store them, a chunk at a time, only if all are acceptable."""
    with quiet_gc(), sigterm_stops():
        try:
            try:
                return book_files(args, settings)
            except PydanticSerializationError as exc:  # a stop inside a booking's dump
                raise_stop(exc)
                raise
        except KeyboardInterrupt as exc:  # what was stored is said (`book_files`, `store_all`)
            return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM stops `book` as Ctrl-C does (`Terminated`): while checking, the checking
    processes are stopped and nothing is stored (it killed only this process: they lived on
    for ever, holding its stdout and stderr); while storing, see StopBetweenBatches."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def book_files(args: argparse.Namespace, settings: Settings) -> int:
    try:
        catalog = Catalog.load(settings)
        source = read_documents(args.file)  # waits for the first bookings (a slow pipe)
    except KeyboardInterrupt:
        print("interrupted before any booking was checked: nothing was stored",
              file=sys.stderr)
        raise
    now = datetime.now(UTC)
    started = time.monotonic()
    spool = Spool()
    refused: list[Checked] = []
    seen = SeenBookings()  # a booking given twice in the file is refused (at its second)
    read = 0
    with progress_on(sys.stderr) as progress:
        size = source.reader.size()
        progress.start("checking", size, "B" if size else "bookings")
        consumed = 0
        try:
            for chunk in check_chunks(source.documents, catalog, args.clinic, now,
                                      jobs=args.jobs):
                # Refused, unreadable or given before, in input order.
                for outcome in chunk_refusals(chunk, seen):
                    if outcome.unreadable is not None:
                        raise UsageError(f"{args.file}: {outcome.unreadable}; "
                                         "nothing was stored")
                    refused.append(outcome.checked())
                if not refused:
                    spool.add_chunk(chunk)
                read += chunk.size
                done = source.reader.consumed if size else read
                progress.update(done - consumed, read)
                consumed = done
        except (KeyboardInterrupt, CheckerDied) as exc:
            progress.close()
            spool.close()
            if isinstance(exc, CheckerDied):
                raise UsageError(f"{exc}: nothing was stored (book the file again; --jobs 1 "
                                 "checks it in this process)") from None
            print(f"interrupted while checking (after {read:,} bookings): nothing was stored",
                  file=sys.stderr)
            raise
        if refused:
            progress.close()
            spool.close()
            return report_refusals(refused, read, source.single)
        try:
            checked_at = time.monotonic()
            counts = store_all(args, settings, catalog, spool, now, source.single, progress)
        finally:
            spool.close()
    ended = time.monotonic()
    seconds = ended - started
    rate = f" in {seconds:.2f} s" + (
        f" ({read / seconds:,.0f} bookings/s; checking {checked_at - started:.2f} s, "
        f"storing {ended - checked_at:.2f} s)" if read > TABLES_UP_TO else "")
    print(f"booked {read:,} booking{'s' if read != 1 else ''}: {counts['new']:,} new, "
          f"{counts['changed']:,} changed, {counts['unchanged']:,} unchanged{rate}",
          file=sys.stderr)
    return EXIT_OK


def report_refusals(refused: list[Checked], read: int, single: bool) -> int:
    """Print each refusal (up to REFUSALS_SHOWN) and the summary; nothing was stored."""
    for checked in refused[:REFUSALS_SHOWN]:
        print_refusal(checked, single)
    if len(refused) > REFUSALS_SHOWN:
        print(f"... and {len(refused) - REFUSALS_SHOWN:,} more refused (not shown)",
              file=sys.stderr)
    if read > 1:
        where = ", ".join(refusal_heading(c, False).split(" (")[0] for c in refused[:10])
        more = ", ..." if len(refused) > 10 else ""
        print(f"refused {len(refused):,} of {read:,} bookings ({where}{more}): "
              "nothing was stored", file=sys.stderr)
    else:
        print("nothing was stored", file=sys.stderr)
    return EXIT_REFUSED


def store_all(
    args: argparse.Namespace, settings: Settings, catalog: Catalog, spool: Spool,
    now: datetime, single: bool, progress: Progress,
) -> dict[str, int]:
    """Store the accepted bookings CHUNK at a time; print their timelines; count them."""
    store = open_store(settings, catalog)
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    tables = not args.json and spool.count <= TABLES_UP_TO
    soon = now + timedelta(seconds=settings.pump_interval_seconds)
    nudge = False  # something stored is due before the next tick
    stored = 0
    progress.start("storing", spool.count)
    out = JsonArrayOut(sys.stdout, single) if args.json else None
    items: list[tuple[Booking, Plan]] = []
    storing = False  # inside `upsert_many`: some of `items` may be stored, not all
    printing = True  # False once stdout's reader has left
    try:
        # Each batch is decoded and read while Redis applies the batch before (`ReadAhead`).
        ahead = ReadAhead(spool.chunks(STORE_BATCH, first=FIRST_STORE_BATCH), catalog,
                          store, timelines=out is not None or tables)
        with StopBetweenBatches() as ctrl_c, quick_handover():
            while True:
                if ctrl_c.requested:
                    raise Terminated if ctrl_c.requested == signal.SIGTERM else KeyboardInterrupt
                taken = ahead.take()
                if taken is None:
                    break
                chunk, items, first = taken
                before: list[str | None] = [None] * len(items)
                storing = True
                timelines = store.upsert_many(items, now, previous=before, idle=ahead.start,
                                              timelines=out is not None or tables,
                                              docs=[doc for doc, _ in chunk], first=first,
                                              records=[record for _, record in chunk])
                storing = False
                stored += len(items)
                for (booking, planned), old, timeline in zip(items, before, timelines,
                                                             strict=True):
                    kind = ("new" if old is None
                            else "unchanged" if str(timeline["version"]) == old else "changed")
                    counts[kind] += 1
                    # Not for a booking unchanged: nothing of it is new to send (its
                    # at-booking message, planned again at `now`, went or is due already),
                    # and booking a file again writes nothing, to the broker either.
                    if nudge or kind == "unchanged":
                        pass
                    elif "reminders" in timeline:  # what was stored, notices included
                        nudge = due_soon([timeline], now, settings.pump_interval_seconds)
                    else:  # not built (a big file, not printed): the plan says, and a
                        # change may have stored a notice due at once that no plan has
                        nudge = kind == "changed" or planned.status == Status.SCHEDULED and any(
                            r.status == Status.SCHEDULED and r.due_at <= soon
                            for r in planned.reminders)
                    try:
                        if out is not None:
                            out.write(timeline)
                        elif tables:
                            print(render_table(timeline, booking.patient.timezone))
                            print()
                    except BrokenPipeError:
                        # The reader left (`| head`): the file was accepted whole, so the
                        # rest is stored all the same, unprinted; the summary says it all.
                        stdout_gone()
                        out, tables, printing = None, False, False
                progress.update(len(items), stored)
        # Still stoppable as above (a stop here is said too): the last timelines written
        # (to a slow reader, perhaps), the pump nudged.
        if out is not None:
            try:
                out.close()
            except BrokenPipeError:
                stdout_gone()
        if nudge:
            nudge_pump(settings)
    except BaseException:
        progress.close()
        # Cut inside `upsert_many` (a second Ctrl-C, Redis gone): each booking is
        # written whole or not at all, but some of the ones it was given may be.
        what = (f"{stored:,} to {stored + len(items):,}" if storing and items
                else f"{stored:,}")
        print(f"stopped after storing {what} of {spool.count:,} bookings (booking "
              "them again is safe: an unchanged booking stays as it is)", file=sys.stderr)
        raise
    if printing and not args.json and not tables:
        print(f"{spool.count:,} timelines not printed (more than {TABLES_UP_TO}): "
              "`reminders show BOOKING_ID` prints one, --json prints all", file=sys.stderr)
    return counts


# While bookings are stored: how long (s) the thread decoding holds the GIL before the
# thread with an applied chunk's reply takes it (Python's default is 5 ms).
STORE_SWITCH_INTERVAL = 0.0005


@contextmanager
def quick_handover() -> Iterator[None]:
    """While bookings are stored, the GIL passes to a waiting thread within half a
    millisecond instead of five: a thread decodes and reads the next batch while the apply
    thread waits for Redis (`ReadAhead`), and each chunk's reply, which lets the next chunk
    go to Redis, would otherwise wait up to 5 ms (Redis idle) behind that work."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(STORE_SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


class StopBetweenBatches:
    """While bookings are stored: a first Ctrl-C (SIGINT) lets the `upsert_many` call under
    way finish (up to STORE_BATCH bookings, a second or two), so the stop is between calls
    and what is stored is known; a second stops at once. SIGTERM (`timeout`, a job
    cancelled, `docker stop`) likewise: without it the process died at once, saying
    nothing, with some batches stored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0  # the signal that asked to stop (0: none)
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopBetweenBatches:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = signum
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        try:
            print(f"\n{name}: stopping once the bookings being stored are stored ({name} "
                  "again: at once)", file=sys.stderr)
        except RuntimeError:  # a write to stderr under way (reentrant): the stop still says
            pass

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def stdout_gone() -> None:
    """The reader of stdout left (`| head`): what is still to be printed goes nowhere, and
    Python's flush of stdout at exit does not fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def nudge_if_due(settings: Settings, timelines: list[dict[str, Any]], now: datetime,
                 url: str | None = None) -> None:
    """After a write: if the timelines it stored hold a reminder due before the pump's next
    tick (a confirmation, a notice, a released hold's), have the pump run now, as the API
    does (worker/nudge.py `due_soon`). `url`: the broker's, default the settings'."""
    if due_soon(timelines, now, settings.pump_interval_seconds):
        nudge_pump(settings, url)


def nudge_pump(settings: Settings, url: str | None = None) -> None:
    """Publish a pump nudge now (worker/nudge.py: the API's message, to the same broker) and
    wait for it, bounded: with the broker down or hung the command gives up after two tries
    of PUBLISH_TIMEOUT_SECONDS, says so in one line and exits as it would have (what was
    stored stays stored; the pump's next tick sends it)."""
    from .nudge import PumpNudge

    try:
        PumpNudge(settings, url).publish_now()
    except Exception as exc:  # noqa: BLE001 - any failure: the tick sends it all the same
        print(f"note: could not nudge the pump ({type(exc).__name__}): what was just stored "
              f"and is due now goes at the pump's next tick (within "
              f"{settings.pump_interval_seconds:g} s)", file=sys.stderr)


def _on_booking(
    args: argparse.Namespace, settings: Settings, act: Callable[[Store, str], dict[str, Any]],
    writes: bool = False,
) -> int:
    """Run `act(store, clinic)` on the named booking and print the timeline it returns;
    `writes`: it stores it (nudge the pump if something of it is due now)."""
    loaded: Catalog | None = None
    if not writes and args.clinic:
        store = open_store(settings)
        unconfigured, loaded = _unconfigured_clinic(args, settings, store)
        if unconfigured is not None:
            timeline = act(store, unconfigured)
            timezone = store.booking_doc(unconfigured, args.booking_id)["patient"]["timezone"]
            print_timeline(args, timeline, timezone)
            return EXIT_OK
    catalog = loaded or Catalog.load(settings)
    clinic = clinic_of(args, catalog)
    store = open_store(settings, catalog)
    timeline = act(store, clinic)
    timezone = store.booking_doc(clinic, args.booking_id)["patient"]["timezone"]
    print_timeline(args, timeline, timezone)
    if writes:
        nudge_if_due(settings, [timeline], datetime.now(UTC))  # a notice is due at once
    return EXIT_OK


def _unconfigured_clinic(args: argparse.Namespace, settings: Settings, store: Store
                         ) -> tuple[str | None, Catalog | None]:
    """For a read: --clinic when config/ lacks it (removed) or does not load (a bad edit the
    running services survive) but Redis holds the booking named of it; None when config/
    has it (taken as always), with the catalog read. A clinic neither configured nor
    holding that booking is refused as unknown (a typo must not read as "no such
    booking"), or, config/ broken, with its configuration error."""
    try:
        catalog = Catalog.load(settings)
        if args.clinic in catalog.clinics:
            return None, catalog
        broken: ConfigError | None = None
    except ConfigError as exc:
        broken = exc
    try:
        store.booking_doc(args.clinic, args.booking_id)
    except NotFound:
        if broken is not None:
            raise broken from None
        raise UsageError(f"--clinic: unknown clinic {args.clinic!r} (not configured, and no "
                         f"booking {args.booking_id!r} of it)") from None
    return str(args.clinic), None


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
        writes=True,
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
    checked = check_document(Document(1, None, doc), catalog, None, now)
    if checked.booking is None or checked.plan is None:
        print_refusal(checked, True)
        return EXIT_REFUSED
    booking, planned = checked.booking, checked.plan
    # Fenced by the version checked above (as the API's release): a cancel or a correction
    # landing since is never undone by writing back the document read before it.
    from .api.conditional import PreconditionFailed, upsert  # only this command needs it

    try:
        timeline, _ = upsert(store, booking, planned, now,
                             frozenset({int(current["version"])}), release=True)
    except PreconditionFailed:
        print(f"{clinic}/{args.booking_id} changed while it was being released (cancelled "
              "or corrected): nothing was released; show it and release it again if still "
              "held", file=sys.stderr)
        return EXIT_REFUSED
    print_timeline(args, timeline, booking.patient.timezone)
    nudge_if_due(settings, [timeline], now)
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    """List reminders that failed for good, with the reason."""
    dead = _dead_letters(args, settings, open_store(settings))
    if args.json:
        print(json.dumps(dead, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not dead:
        print("no dead letters")
    for d in dead:
        print(
            f"{d['ref']}  {d['channel']}{' (by sms)' if d.get('via') == 'sms' else ''}  "
            f"attempts={d['attempts']}  failed_at={d['failed_at']}  "
            f"{d['reason']}"
        )
    return EXIT_OK


def _dead_letters(args: argparse.Namespace, settings: Settings, store: Store
                  ) -> list[dict[str, Any]]:
    """The dead letters of --clinic (all clinics without it). A clinic that is neither
    configured nor has any is refused, naming it (a typo must not read as "none left");
    one removed from config/ that left dead letters behind is still listed and handled."""
    dead = store.dead_letters(args.clinic)
    if args.clinic and not dead and args.clinic not in Catalog.load(settings).clinics:
        raise UsageError(f"--clinic: unknown clinic {args.clinic!r} (not configured, and "
                         "no dead letters of it)")
    return dead


def _on_dead_letters(
    args: argparse.Namespace,
    settings: Settings,
    verb: str,
    act: Callable[[Store, list[str]], list[str]],
) -> int:
    """Apply `act` to the dead letters named (REF or BOOKING_ID) or --all; print the result."""
    store = open_store(settings)
    clinic = args.clinic
    dead = _dead_letters(args, settings, store)
    if any("/" not in r for r in args.refs) and not (args.clinic and dead):
        # A booking id is one clinic's (two clinics may use the same id): --clinic, or the
        # only clinic configured, as `show` and `cancel` take it. A REF names its clinic.
        # A --clinic with dead letters is taken as it is (one removed from config/ too).
        clinic = clinic_of(args, Catalog.load(settings))
    if args.refs:
        wanted = set(args.refs)
        refs = [d["ref"] for d in dead if d["ref"] in wanted
                or d["clinic"] == clinic and d["booking_id"] in wanted]
        unknown = (wanted - {d["ref"] for d in dead}
                   - {d["booking_id"] for d in dead if d["clinic"] == clinic})
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


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    """Clinic events (webhooks, alerts) given up after webhook_max_attempts: list them
    (`dead`) or send them again now (`replay`), after the clinic's endpoint is fixed."""
    from .connections import client
    from .webhooks import EVENT_REF, Events

    chosen = getattr(args, "clinic", None)
    events = Events(client(settings), settings.key_prefix,
                    retention_days=settings.retention_days)
    as_json = getattr(args, "json", False)
    if args.action == "dead":
        # Reads Redis only: config/ is read just to tell a typo from a clinic with none
        # (one removed from config/ that left given-up events is listed, as dead letters).
        dead = events.dead_events(chosen)
        if chosen is not None and not dead and chosen not in Catalog.load(settings).clinics:
            raise UsageError(f"--clinic: unknown clinic {chosen!r} (not configured, and no "
                             "given-up events of it)")
        if as_json:
            print(json.dumps(dead, indent=2, ensure_ascii=False))
        elif not dead:
            print("no given-up clinic events")
        for d in [] if as_json else dead:
            kind = "" if d["kind"] == "webhook" else f" ({d['kind']})"
            print(f"{d['ref']}  {d['clinic']}  {d['type']}{kind}  {d['booking_id'] or '-'}  "
                  f"attempts={d['attempts']}  given_up_at={d['given_up_at']}  "
                  f"{d['reason'] or ''}".rstrip())
        return EXIT_OK
    catalog = Catalog.load(settings)
    if chosen is not None and chosen not in catalog.clinics:
        raise UsageError(f"--clinic: unknown clinic {chosen!r}")
    names: list[str] = args.ids
    clinic = chosen
    if any(not n.startswith(EVENT_REF) for n in names):
        # A booking id is one clinic's (two clinics may use the same id): --clinic, or the
        # only clinic configured, as `replay` of dead letters takes it. "ev:ID" names one.
        clinic = clinic_of(args, catalog)
    dead = events.dead_events(chosen)
    if names:
        wanted = set(names)
        chosen_ids = [d["id"] for d in dead if d["ref"] in wanted
                      or d["clinic"] == clinic and d["booking_id"] in wanted]
        unknown = (wanted - {d["ref"] for d in dead}
                   - {d["booking_id"] for d in dead if d["clinic"] == clinic})
        if unknown:
            print(f"not given up (or expired): {', '.join(sorted(unknown))}; "
                  "`reminders events dead` lists them", file=sys.stderr)
            return EXIT_REFUSED
    elif getattr(args, "all", False):
        chosen_ids = [d["id"] for d in dead]
    else:
        raise UsageError("name the events to replay (ev:ID, or a BOOKING_ID with --clinic), "
                         "or use --all")
    done = set(events.replay(chosen_ids))
    replayed = [d for d in dead if d["id"] in done]
    if as_json:
        print(json.dumps({"replayed": [d["ref"] for d in replayed]}))
    else:
        print(f"replayed {len(replayed)} clinic event(s)" + "".join(
            f"\n  {d['ref']}  {d['clinic']}  {d['type']}  {d['booking_id'] or '-'}"
            for d in replayed))
    return EXIT_OK


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
    from .connections import client
    from .keys import ApiKeys

    keys = ApiKeys(client(settings), settings.key_prefix)
    if args.action != "issue" and args.clinic and keys.list(args.clinic):
        # Its keys, as Redis holds them: a clinic removed from config/ (whose keys go on
        # authenticating until revoked), and while config/ does not load (a leaked key
        # must be revocable during a bad edit). Without keys, it is checked as any.
        clinic = str(args.clinic)
    else:
        clinic = clinic_of(args, Catalog.load(settings))
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


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """Liveness from the heartbeats in Redis (worker/health.py): exit 0 healthy, 1 not."""
    from .connections import PROBE, client
    from .health import evaluate

    try:
        probe = client(settings, PROBE, decode=False)
    except ConfigError as exc:
        verdict_json = {"healthy": False, "status": f"configuration error: {exc}"}
        print(json.dumps(verdict_json) if args.json else f"unhealthy: {verdict_json['status']}")
        return EXIT_REFUSED
    max_age = args.max_age if args.max_age is not None else settings.heartbeat_max_age
    verdict = evaluate(probe, settings.key_prefix, args.role, max_age)
    if args.json:
        print(json.dumps({"role": args.role, **verdict.as_json()}))
    else:
        print(f"{args.role}: {'healthy' if verdict.healthy else 'unhealthy'}: {verdict.reason}")
        for finding in verdict.details.get("redis_settings", []):  # never changes the exit
            print(f"warning: Redis {finding['problem']}")
    return EXIT_OK if verdict.healthy else EXIT_REFUSED


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Convert the store's layout 1 to layout 2 (worker/migrate.py); exit 1 naming what it
    could not convert, or when a worker seems to be running (without --force)."""
    from .connections import client
    from .migrate import MigrationRefused, migrate

    catalog = Catalog.load(settings)
    try:
        report = migrate(
            client(settings), settings.key_prefix, catalog, dry_run=args.dry_run,
            keep_old=args.keep_old, force=args.force, max_age=settings.heartbeat_max_age,
            crash_after=args.crash_after, say=lambda line: print(line, file=sys.stderr))
    except MigrationRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_REFUSED


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
    "book": (
        cmd_book,
        "store bookings (create or update): all are checked first, and none is stored if one "
        "is refused; prints their timelines (up to 20; --json: all) and a summary",
    ),
    "show": (cmd_show, "print a booking's timeline"),
    "cancel": (cmd_cancel, "cancel a booking: nothing pending will be sent"),
    "release": (cmd_release, "release a held booking after the clinic's review"),
    "dead-letters": (cmd_dead_letters, "list reminders that failed for good"),
    "replay": (cmd_replay, "send dead-lettered reminders again"),
    "purge": (cmd_purge, "remove dead letters without sending them"),
    "events": (
        cmd_events,
        "clinic events (webhooks, alerts) given up after REMINDERS_WEBHOOK_MAX_ATTEMPTS: "
        "`events dead` lists them, `events replay ev:ID|BOOKING_ID|--all` sends them again",
    ),
    "stats": (cmd_stats, "how many bookings and reminders are kept, and where they are"),
    "keys": (cmd_keys, "issue, list or revoke a clinic's API keys (for the HTTP API)"),
    "health": (
        cmd_health,
        "liveness for a Docker healthcheck: the pump's heartbeat (--role worker) or beat's "
        "last tick (--role beat) is fresh; --role api: Redis takes writes too; exit 0 "
        "healthy, 1 not",
    ),
    "migrate": (
        cmd_migrate,
        "convert the store's key layout 1 to layout 2 (stop beat, workers and API first); "
        "--dry-run reports what it would convert",
    ),
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
        if name == "book":
            p.add_argument(
                "--jobs",
                type=_jobs,
                default=None,
                metavar="N",
                help="check bookings in N processes (1: here; default: here up to "
                f"{AUTO_AFTER * CHUNK:,} bookings, one process per core for more, at most "
                f"{MAX_AUTO_JOBS})",
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
                a.add_argument("--clinic", default=argparse.SUPPRESS, type=_clinic_id,
                               help="clinic id")
                a.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print the machine-readable form")
        if name == "events":
            actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            for action, text in (
                    ("dead", "list the given-up clinic events: ref, clinic, type, booking id, "
                     "attempts, when and the last reason (no contact data)"),
                    ("replay", "send given-up clinic events again, now")):
                a = actions.add_parser(action, help=text, description=text)
                if action == "replay":
                    a.add_argument("ids", nargs="*", metavar="ID",
                                   help="an event's ref as `events dead` lists it (ev:ID), or "
                                   "a booking id (with --clinic when several clinics are "
                                   "configured)")
                    a.add_argument("--all", action="store_true", default=argparse.SUPPRESS,
                                   help="replay every given-up event (of --clinic if given)")
                # SUPPRESS: given before or after the action, neither hides the other.
                a.add_argument("--clinic", default=argparse.SUPPRESS, type=_clinic_id,
                               help="clinic id")
                a.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print the machine-readable form")
        if name == "health":
            p.add_argument("--role", choices=("worker", "beat", "api"), default="worker",
                           help="whose evidence to check (default: worker, the pump's "
                           "heartbeat; api: the same, as /healthz, and that Redis takes "
                           "writes, as /readyz)")
            p.add_argument("--max-age", type=float, default=None, metavar="SECONDS",
                           help="oldest heartbeat that counts as alive (default: "
                           "REMINDERS_HEALTH_MAX_AGE_SECONDS, else max(30, 10 pump intervals))")
        if name == "migrate":
            p.add_argument("--dry-run", action="store_true",
                           help="report what would be converted; write nothing")
            p.add_argument("--force", action="store_true",
                           help="run even though a pump or beat heartbeat is fresh")
            p.add_argument("--keep-old", action="store_true",
                           help="keep the layout-1 keys (P:k:*, P:r:*, and the old booking "
                           "hashes as P:v1:b:*) after the conversion")
            # A test hook: exit abruptly after converting N bookings (a crash half-way).
            p.add_argument("--crash-after", type=int, default=None, help=argparse.SUPPRESS)
        if name == "check":
            p.add_argument("--sources", action="store_true",
                           help="also list each protocol step's clinical claims and sources")
            p.add_argument("--redis", action="store_true",
                           help="also read Redis (as the other commands find it): an error "
                           "for each clinic or protocol that reminders still to be sent "
                           "name and config/ does not have (check alone reads no Redis)")
        if name in ("replay", "purge"):
            p.add_argument(
                "refs",
                nargs="*",
                metavar="REF",
                help="a dead letter's ref (clinic/booking/reminder) or a booking id",
            )
            p.add_argument("--all", action="store_true", help=f"{name} every dead letter")
        # Only where it selects something: stats, health, migrate and run act on every
        # clinic, and took --clinic only to ignore it (stats --clinic glow printed them all).
        if name in ("plan", "book"):
            p.add_argument("--clinic", type=_clinic_id,
                           help="clinic id (default: the booking's own `clinic` field)")
        elif name in ("show", "cancel", "release"):
            p.add_argument("--clinic", type=_clinic_id,
                           help="clinic id (may be left out while only one clinic is "
                           "configured)")
        elif name in ("dead-letters", "replay", "purge"):
            p.add_argument("--clinic", type=_clinic_id,
                           help="only this clinic's dead letters (default: every clinic's); "
                           "the clinic of a BOOKING_ID, which may be left out while only "
                           "one clinic is configured" if name != "dead-letters" else
                           "only this clinic's dead letters (default: every clinic's)")
        elif name in ("check", "keys", "events"):
            p.add_argument("--clinic", type=_clinic_id, help="clinic id (check: every "
                           "configured clinic if left out)" if name == "check" else "clinic id")
        if name != "run":
            p.add_argument("--json", action="store_true",
                           help="print the machine-readable form")
    return parser


class ReaderMayLeave:
    """sys.stdout while a command runs: once the reader of the pipe has left (`| head`,
    `| grep -q`), what is still to be printed goes nowhere and the command carries on to
    its own exit code (a broken configuration stays 3, a refused booking 1). Caught in
    `main` instead, the broken pipe ended every command with 0."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except BrokenPipeError:
            stdout_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            stdout_gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    if stdout is None:
        return run_command(argv)
    sys.stdout = ReaderMayLeave(stdout)
    try:
        code = run_command(argv)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
    if argv is None and sys.argv[1:2] == ["book"]:  # the `reminders` script, not a caller
        exit_at_once(code)
    return code


def exit_at_once(code: int) -> None:
    """End the process now with `code`, everything written flushed: without the
    interpreter's teardown, which after `book` frees the millions of objects a batch left
    (its caches, the last store batch) one by one and collects them all once more: about
    0.25 s of CPU at 10,000 bookings, for nothing. Returns (the usual exit follows) if a
    stream cannot be flushed: its error is then reported as without this."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    import logging

    logging.shutdown()  # the handlers' buffers too (a log file)
    os._exit(code)


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:  # named as set, not a traceback
        print(f"configuration error: {settings_problem(exc)}", file=sys.stderr)
        return EXIT_REFUSED if args.command == "health" else EXIT_CONFIG  # health: unhealthy
    try:
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
    except BrokenPipeError:  # written past ReaderMayLeave: the reader left, not an error
        stdout_gone()
        return EXIT_OK
    except Exception as exc:
        import redis  # already loaded by any command that talks to Redis (`plan` does not)

        if isinstance(exc, redis.ResponseError):
            from .health import REFUSAL_CAUSE, refused_write  # only on this failure

            why = refused_write(exc)
            if why is not None:
                # Never the message: a pipeline's names the command and its arguments.
                print(f"Redis refuses writes ({why}): {REFUSAL_CAUSE[why]}; try again once "
                      "it takes writes", file=sys.stderr)
                return EXIT_CONFIG
        if isinstance(exc, redis.ConnectionError):
            print(f"cannot reach Redis: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if not isinstance(exc, redis.RedisError):
            raise
        if settings.log_level == "DEBUG":  # the message may quote contact data: DEBUG only
            import traceback

            traceback.print_exc()
        print(redis_failure(exc, args.command), file=sys.stderr)
        return EXIT_CONFIG


# What each command does with Redis, for the line saying a Redis error stopped it.
DOING = {
    "book": "storing bookings", "show": "reading the booking",
    "cancel": "cancelling the booking", "release": "releasing the booking",
    "dead-letters": "reading dead letters", "replay": "replaying dead letters",
    "purge": "purging dead letters", "events": "handling clinic events",
    "stats": "counting what is kept", "keys": "handling API keys",
    "health": "reading the heartbeats", "migrate": "migrating the stored layout",
    "check": "reading what Redis holds",
}
_PIPELINED = re.compile(r"Command # \d+ \(([A-Za-z][A-Za-z._-]{0,30})[ )]")
_CODE = re.compile(r"[A-Z][A-Z_-]{1,30}")
_IN_SCRIPT = re.compile(r" script: [0-9a-f]{40}, on @user_script:\d+\.?$")


def redis_failure(exc: Exception, command: str) -> str:
    """One line for a Redis error other than unreachable or refusing writes: the error's
    class, Redis's error code and the Redis command (a failed pipelined one), scrubbed.
    Never the message: redis-py's quotes a pipelined command's arguments (an address, a
    number) and a script's error may quote what it was given."""
    text = str(exc)
    doing = DOING.get(command, f"running `{command}`")
    what = type(exc).__name__
    found = _PIPELINED.match(text)
    if found:
        text = text.partition(" caused error: ")[2]
    code = text.split(" ", 1)[0]
    if _CODE.fullmatch(code):
        what += f" {code}"
    at = f" at {found.group(1).upper()}" if found else ""
    if _IN_SCRIPT.search(text):  # Redis 7 ends an error raised inside a script so
        at += " in one of its Lua scripts"
    from .health import acl_denied, error_detail  # only on this failure

    if acl_denied(exc):  # what to grant, named safely (never the user or the message)
        return scrub(f"Redis error while {doing}: {error_detail(exc)}{at}: Redis's ACL "
                     "denies it to the user of REMINDERS_REDIS_URL; grant it")
    return scrub(f"Redis error while {doing}: {what}{at} (the message is shown at "
                 "REMINDERS_LOG_LEVEL=DEBUG only: it may quote contact details)")


if __name__ == "__main__":
    sys.exit(main())
