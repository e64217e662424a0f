"""The lines Apprise logs during one send, kept cheaply for delivery's failure classification.

Delivery classifies a failed send from what Apprise logged for it: its warnings and errors,
and two kinds of DEBUG line, the socket error ("Socket Exception: ...") and the exception of
a plugin that raised ("Notification Exception: ..."). Asking Apprise itself for them
(`notify(log_level=logging.DEBUG)`) costs every message, failed or not, a record for each of
Apprise's DEBUG lines (four or five a message: the payload, the addresses, the timing), each
formatted, wrapped in a NotifyLogEntry and encoded as JSON by Apprise's capture, about a
tenth of a send's CPU; and the lines are read only when the send failed.

Here instead, for the sends run inside `capturing()` (a ContextVar: concurrent sends in
other threads keep their own lines):
- the "apprise" logger's `debug`, `info`, `warning`, `error` and `critical` put the text of
  the line straight into the send's list, with its level name, without making a LogRecord
  (nothing else listens to Apprise during a send: its lines never propagate, and its own
  captures are asked for nothing, `NO_CAPTURE`); a DEBUG line whose text cannot start with
  KEPT_DEBUG is not even formatted. Lines Apprise marks as not for results
  (`apprise_capture` / `apprise_store` false) are left out, as its capture leaves them out.
  Outside a send these methods are Apprise's logger's own.
- a handler installed once on that logger does the same for the lines logged with `log()`.
The lines kept are the ones classification read from Apprise's DEBUG capture before, in
the order they were logged (tests/test_apprise_lines.py compares both on real failures).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from apprise.logger import logger as apprise_logger

# The DEBUG lines the classification reads; every other DEBUG line of a send is skipped.
KEPT_DEBUG = ("Socket Exception", "Notification Exception")
# A capture level above every level Apprise logs at: its own captures keep nothing.
NO_CAPTURE = logging.CRITICAL + 1

# (level name, message) of the records of the send running in this context, or None.
_lines: ContextVar[list[tuple[str, str]] | None] = ContextVar("apprise_send_lines",
                                                              default=None)


@contextlib.contextmanager
def capturing() -> Iterator[list[tuple[str, str]]]:
    """Keep, in the list yielded, the lines Apprise logs in this context until the end."""
    lines: list[tuple[str, str]] = []
    token = _lines.set(lines)
    try:
        yield lines
    finally:
        _lines.reset(token)


def classified_lines(lines: list[tuple[str, str]]) -> list[str]:
    """The messages classification reads: all but the DEBUG lines not of a KEPT_DEBUG kind."""
    return [message for level, message in lines
            if level != "DEBUG" or message.startswith(KEPT_DEBUG)]


class _SendLines(logging.Handler):
    """Keep the records of a send in that send's list (no lock: the list is the send's)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)

    def handle(self, record: logging.LogRecord) -> bool:
        lines = _lines.get()
        if lines is None:
            return False
        if not getattr(record, "apprise_capture", True) or not getattr(
                record, "apprise_store", True):
            return False  # Apprise keeps these out of a call's results
        try:
            message = record.getMessage()
        except Exception:  # a malformed line: Apprise's capture drops it too
            return False
        lines.append((record.levelname, message))
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        self.handle(record)


def _may_be_kept(msg: object, args: tuple[Any, ...]) -> bool:
    """Whether a DEBUG line `msg % args` may start with one of KEPT_DEBUG."""
    if not isinstance(msg, str) or msg.startswith(KEPT_DEBUG):
        return True
    if not args or not any(kept.startswith(msg.split("%", 1)[0]) for kept in KEPT_DEBUG):
        return False  # its text begins with what precedes the first placeholder
    try:
        return (msg % args).startswith(KEPT_DEBUG)
    except Exception:  # malformed: let logging report it as it would have
        return True


def message_text(msg: object, args: tuple[Any, ...]) -> str | None:
    """The text `LogRecord.getMessage()` would give, or None where it would raise."""
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        args = args[0]  # type: ignore[assignment]  # as LogRecord does: "%(name)s" lines
    try:
        return str(msg) % args if args else str(msg)
    except Exception:
        return None


def _send_aware(level: int, method: Callable[..., None]) -> Callable[..., None]:
    """The apprise logger's `method` (its `debug`, `info`, ...): unchanged outside a send;
    in one, the line goes straight to the send's list, without a LogRecord (which would
    only reach the list: nothing else is listening to Apprise during a send), and a DEBUG
    line only if it may be kept."""
    name = logging.getLevelName(level)

    def log_line(msg: object, *args: Any, **kwargs: Any) -> None:
        lines = _lines.get()
        if lines is None:
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # the caller, not this
            method(msg, *args, **kwargs)
            return
        if not apprise_logger.isEnabledFor(level):
            return
        extra = kwargs.get("extra") or {}
        if not extra.get("apprise_capture", True) or not extra.get("apprise_store", True):
            return  # Apprise keeps these out of a call's results
        if level == logging.DEBUG and not _may_be_kept(msg, args):
            return
        text = message_text(msg, args)
        if text is not None:
            lines.append((name, text))

    return log_line


def _install() -> None:
    if not any(isinstance(h, _SendLines) for h in apprise_logger.handlers):
        apprise_logger.addHandler(_SendLines())  # for lines logged with `log()`
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                  logging.CRITICAL):
        attr = logging.getLevelName(level).lower()
        setattr(apprise_logger, attr, _send_aware(level, getattr(logging.Logger, attr).__get__(
            apprise_logger)))


_install()
