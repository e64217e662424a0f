"""Log lines of every process: one line per event, text or JSON, nothing of a patient.

`REMINDERS_LOG_FORMAT=text` (the default) keeps Celery's own line,
`[<time>: <LEVEL>/<process>] <message>`; `json` writes one JSON object per line:

  {"ts": "2026-12-04T09:00:01.123Z", "level": "INFO", "logger": "worker.dispatch",
   "process": "ForkPoolWorker-1", "message": "send glow/A-1042/day-before:sms: sent ...",
   "clinic": "glow", "booking_id": "A-1042", "reminder": "day-before:sms"}

with `exc` (the traceback, one string) when there is one. Every line logged while a
reminder is being attempted (worker/dispatch.py `attempt`, bound by `about_reminder`)
carries its clinic, booking id and reminder key, whichever module logs it; the text
lines of the send path name the reminder's ref in the message itself.

Who configures what: the Celery worker and beat through Celery's `setup_logging` signal
(connected in worker/celery_app.py: Celery then leaves the root logger to us, its banner
and warnings included: warnings are captured into the `py.warnings` logger, the startup
banners become one log line each, the shutdown notices lines of the format); the API
(uvicorn) in `create_app`, which also routes uvicorn's own loggers through the same
handler; the CLI's `run` supervisor likewise.

Privacy. Patient phone numbers, email addresses and message bodies are logged at DEBUG
at most; the code's INFO lines name reminders by ref only. As a safety net for lines the
code does not own (a library's exception text, a URL in an error), `Scrub` rewrites every
record above DEBUG before it is written: email addresses become `[email]` (accented and
other non-ASCII ones too), international phone numbers `[phone]` (with spaces, dots,
hyphens or brackets; URL-encoded forms too) and a URL's credentials `****`. Apprise URLs are
shown only through `redact_url` (Apprise's own privacy form, cut after the host).

Secrets in request paths, at every level. An unsubscribe link's token (worker/optout.py)
lets whoever holds it unsubscribe that patient: `scrub_secrets` cuts it from any line,
DEBUG included (`/v1/unsubscribe/…`). The API's access lines (uvicorn's, one a request)
go through `access_path` first: the path as routed with the token cut, and a query
string's values shown only for the parameters of `GET /v1/bookings` (ACCESS_QUERY_SHOWN),
any other as `name=…` (an SMS provider's webhook set to GET puts the patient's number and
text there). The method, the status and the line's time stay:

  [2026-12-04 09:00:01,123: INFO/MainProcess] 10.0.0.5:50412 - "POST /v1/unsubscribe/… HTTP/1.1" 200
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

CELERY_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
_reminder: ContextVar[str | None] = ContextVar("reminders_log_reminder", default=None)
F = TypeVar("F", bound=Callable[..., Any])

# An address: a local part of RFC 5322 atext (letters in any script: \w is Unicode; digits;
# ! # $ % & ' * + - / = ? ^ _ ` { | } ~; dots), URL-encoded too (%C3%A9, %40), and domain
# labels of letters in any script, digits and hyphens; a top-level domain of letters (any
# script) or an IDN's punycode (xn--...). Over-masking is harmless. A match starts a run of
# such characters (after a space, a quote, "<", "=", "?" ...), never on URL credentials
# already masked (`mailtos://****@host`), and not on a query parameter's name or a URL's
# host or path before its query, so those stay readable (`?to=[email]&cc=[email]`,
# `smtp.glow.example?to=[email]`): a run right after "?", "&", ";", "@", "/" or at the
# line's start that reaches "=" or "?". (An address with "=" or "?" at the very start of a
# line shows its first characters up to that sign.) Quoted local parts ("ana luis"@...)
# are refused by the booking's validation (email_validator's default).
# (\u0300-\u036f: combining accents, as in a decomposed "José".)
_EMAIL = re.compile(r"(?<![\w\u0300-\u036f.!#$%&*+/^`{|}~-])(?![/*]*(?:@|%40))"
                    r"(?!(?:(?<=[?&;@/])|(?<![\s\S]))[\w.%/-]*[?=])"
                    r"[\w!#$%&*+/^`{|}~-][\w\u0300-\u036f.!#$%&'*+/=?^`{|}~-]*"
                    r"(?:@|%40)(?:[\w\u0300-\u036f%-]+\.)+(?:[^\W\d_]{2,}|xn--[\w-]+)")
# An international number: "+" (or %2B) then digits, with spaces (also no-break and
# URL-encoded), dots, hyphens or brackets between: +34 600 111 222, +1 (415) 555-0100.
_PHONE = re.compile(r"(?:\+|%2B)\d(?:[\d \u00a0\u202f().-]|%20){5,24}\d")
_URL_USER = re.compile(r"\b([a-z][a-z0-9+.-]*://)(?![:*]*@)[^\s/@]+@")  # not if masked
# An unsubscribe token after its route's segment, in a path or a URL (any case: a path
# in another case is answered 404, but the token in it is still the patient's).
_UNSUB_TOKEN = re.compile(r"(/unsubscribe/)[^\s/?#\"'<>]+", re.I)
# Query parameters whose values an access line shows (GET /v1/bookings's; nothing of a patient).
ACCESS_QUERY_SHOWN = frozenset({"status", "from", "to", "limit", "cursor"})
_QUERY_NAME = re.compile(r"[A-Za-z][\w.-]{0,40}")
ACCESS_LOGGER = "uvicorn.access"


def scrub(text: str) -> str:
    """Return `text` without email addresses, phone numbers, URL credentials or the
    secrets `scrub_secrets` removes.

    (Each pattern needs a character a line without one never holds: "@" or "%40" for an
    address or credentials, "+" or "%2B" for a number; most lines, a send's outcome among
    them, skip the expressions.)"""
    text = scrub_secrets(text)
    if "@" in text or "%40" in text:
        text = _URL_USER.sub(r"\1****@", text)
        text = _EMAIL.sub("[email]", text)
    if "+" in text or "%2B" in text:
        text = _PHONE.sub("[phone]", text)
    return text


def scrub_secrets(text: str) -> str:
    """Return `text` without the secrets a line may quote at any level: unsubscribe tokens."""
    if "/unsubscribe/" in text.lower():
        text = _UNSUB_TOKEN.sub("\\1…", text)
    return text


def access_path(full_path: str) -> str:
    """Return a request's path and query as an access line shows them (see the docstring):
    an unsubscribe token cut, query values shown for ACCESS_QUERY_SHOWN only."""
    path, sep, query = full_path.partition("?")
    cut = path.lower().find("/unsubscribe/")
    if cut >= 0:
        path = path[:cut + len("/unsubscribe/")] + "…"
    if not sep:
        return path
    shown = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        if name in ACCESS_QUERY_SHOWN:
            shown.append(part)
        else:  # a name without a value may be anything (a word of a text): "…" too
            shown.append(f"{name}=…" if equals and _QUERY_NAME.fullmatch(name) else "…")
    return f"{path}?{'&'.join(shown)}"


def redact_url(url: str) -> str:
    """Return an Apprise URL fit for a log line: Apprise's privacy form (secrets masked),
    cut after the host, so that no recipient (an address, a number) shows either."""
    shown = url
    try:
        import apprise

        loaded = apprise.Apprise.instantiate(url)
        if loaded is not None:
            shown = str(loaded.url(privacy=True))  # type: ignore[no-untyped-call]
    except Exception:  # an unloadable URL is shown by the generic rule below
        pass
    scheme, sep, rest = shown.partition("://")
    if not sep:
        return "[url]"
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in host:
        user, _, host = host.rpartition("@")
        host = f"{user.split(':')[0][:1]}…:****@{host}" if user else host
    return scrub(f"{scheme}://{host}/…")


class Scrub(logging.Filter):
    """On a handler: rewrite an access line's path through `access_path`, every record
    through `scrub_secrets` and every record above DEBUG through `scrub` (see the
    docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == ACCESS_LOGGER and isinstance(args, tuple) and len(args) == 5:
            # uvicorn's (client, method, path with query, HTTP version, status).
            record.args = (*args[:2], access_path(str(args[2])), *args[3:])
        clean_text = scrub if record.levelno > logging.DEBUG else scrub_secrets
        message = record.getMessage()
        clean = clean_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = clean_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = clean_text(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        ref = getattr(record, "reminder_ref", None) or _reminder.get()
        if ref:
            clinic, _, rest = ref.partition("/")
            booking_id, _, key = rest.partition("/")
            out.update(clinic=clinic, booking_id=booking_id, reminder=key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


@contextlib.contextmanager
def reminder_bound(ref: str) -> Iterator[None]:
    """Within: every log line of this thread (or task) is about the reminder `ref`."""
    token = _reminder.set(ref)
    try:
        yield
    finally:
        _reminder.reset(token)


def about_reminder(func: F) -> F:
    """Decorate a function whose second positional argument is a reminder ref."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reminder_bound(str(args[1])):
            return func(*args, **kwargs)

    return cast(F, wrapper)


def handler(fmt: str, stream: Any = None) -> logging.Handler:
    """Return a stream handler (stderr) writing lines in `fmt` ("text" or "json"), scrubbed."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(CELERY_FORMAT))
    out.addFilter(Scrub())
    return out


def configure(fmt: str, level: int | str, *, stream: Any = None,
              loggers: tuple[str, ...] = ()) -> None:
    """Make the root logger write through one handler in `fmt`; route `loggers` (e.g.
    uvicorn's, which have handlers of their own) to it too."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt, stream))
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in loggers:
        lib = logging.getLogger(name)
        lib.handlers = []
        lib.propagate = True


def setup_celery(fmt: str, default_level: str) -> None:
    """Take over Celery's logging in this process (worker or beat); see the docstring.

    Called when worker/celery_app.py is imported, before Celery starts the worker or beat.
    """
    from celery.signals import celeryd_init, setup_logging

    def on_setup_logging(loglevel: int | str | None = None, **_: object) -> None:
        configure(fmt, loglevel or default_level)

    def on_worker_init(**_: object) -> None:
        # Before Celery's own setup: its privilege check warns earlier than that.
        configure(fmt, default_level)

    setup_logging.connect(on_setup_logging, weak=False)
    celeryd_init.connect(on_worker_init, weak=False)
    _banners_as_lines(fmt, default_level)


def _banners_as_lines(fmt: str, default_level: str) -> None:
    """Celery's startup banners (printed, many lines) become one log line each, and its
    shutdown notices lines of the format."""
    from celery.apps import worker as celery_worker
    from celery.apps.beat import Beat
    from celery.apps.worker import Worker
    from celery.signals import beat_init

    log = logging.getLogger("celery.banner")
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def one_line(text: str) -> str:
        return " | ".join(s.strip() for s in ansi.sub("", text).splitlines() if s.strip())

    def emit_banner(self: Any) -> None:
        log.info("celery worker starting: %s",
                 one_line(self.startup_info(artlines=False) + (self.extra_info() or "")))

    original_run: Callable[[Any], None] = Beat.run

    def run(self: Any) -> None:
        self.quiet = True  # no printed banner: beat_init logs one line instead
        configure(fmt, default_level)  # until Celery's setup: its early warnings too
        original_run(self)

    def on_beat_init(sender: Any = None, **_: object) -> None:
        scheduler = getattr(sender, "scheduler", None)
        log.info("celery beat starting: schedule %s, max interval %s s",
                 getattr(sender, "schedule_filename", None),
                 getattr(scheduler, "max_interval", None))

    def safe_say(msg: str, f: Any = sys.__stderr__) -> None:
        # Celery's shutdown notices, said from signal handlers with a bare write (no lock).
        record = logging.LogRecord("celery.apps.worker", logging.WARNING, __file__, 0,
                                   msg.strip(), None, None)
        formatter = JsonFormatter() if fmt == "json" else logging.Formatter(CELERY_FORMAT)
        os.write(f.fileno(), (formatter.format(record) + "\n").encode())

    Worker.emit_banner = emit_banner
    Beat.run = run
    celery_worker.safe_say = safe_say
    beat_init.connect(on_beat_init, weak=False)
