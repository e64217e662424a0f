"""Where a reminder is sent: Apprise for real channels, the outbox for the embedded default.

`deliver()` returns a short detail on success or raises DeliveryError, whose flags say
whether retrying can help (`permanent`) and whether the message may have reached the
provider anyway (`unknown`). Each message gets its own plugin object, loaded from its URL
as `Apprise.add` loads it (`load_services`, without the masked copies of the URL Apprise
renders for its DEBUG lines; the URL's parse kept once per clinic URL and filled with the
message's recipient and header values where that is the plugin's own parse, `_parsed`),
and is sent through the sending thread's Apprise object, which holds that one service
during the send. Its HTTP requests go through the thread's `requests` session, prepared
from a template per clinic URL (`_prepared_quickly`). Apprise's own retries off (its
default of one attempt), socket timeouts bounded by the settings, and the plugin run in
the calling thread (no Apprise deadline, so no hidden shared thread pool in which a busy
worker's sends would queue and "time out" before they start).

Email goes through Apprise's own email plugin with one change to its SMTP session
(`_KeptSMTPController`, put in place of Apprise's `AppriseSMTPController` where the plugin
looks it up): Apprise builds a TLS context for every message, even for plain `mailto://`
(`ssl.create_default_context()` reads the system's CA bundle: about 20 of its 23 ms per
message here); ours builds one per process and hands it to the same calls. And a session
that delivered is kept (per server and login, at most SMTP_IDLE_SECONDS idle and
SMTP_MESSAGES_PER_SESSION messages) for the next message instead of QUIT, saving the
connection, greeting, EHLO, STARTTLS and AUTH of each message. A kept session the server
has closed meanwhile is noticed before any of the message is handed over (MAIL, RCPT or
the DATA command finds the connection gone, or a 421, before the server's 354 asked for
the message): the message then goes over a fresh session at once, so reuse never turns
a message into one of unknown outcome. A session that saw any error is closed.
During one send a session's answers are read for SMTP_SEND_TIMEOUTS send timeouts at most
in all (`_DeadlineReader`: a server trickling its lines, each within the socket timeout,
no longer holds the send until the watchdog ends the process), and an idle session is
closed with its QUIT written, not its answer awaited (`_KeptSessions`).

The messages it builds are serialized by `email_mime` (the same text as the stdlib's
`as_string`, without compiling a regular expression per multipart or re-folding the
headers every message repeats).

A failure is classified from what this one call observed, never from global state:
Apprise's result status, the lines Apprise logged for this call (kept per context by
`apprise_lines`, which skips before any record is made the DEBUG lines classification
never reads) and the HTTP statuses urllib3 received for this send (handed over by a filter
installed once, via a ContextVar). Logger levels are set once, at import. Nothing from
Apprise or urllib3 reaches the application's handlers (their lines carry recipients and
URLs), and nothing here logs a contact or a message body above DEBUG.
"""

from __future__ import annotations

import contextlib
import email.policy
import functools
import io
import logging
import mimetypes
import os
import re
import smtplib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import apprise
import requests
import requests.api
import requests.utils
import urllib3.exceptions
from apprise import dispatch as apprise_dispatch
from apprise.apprise import N_MGR
from apprise.attachment.memory import AttachMemory
from apprise.exception import AppriseImproperlyConfigured
from apprise.logger import logger as apprise_logger
from apprise.plugins.email import base as apprise_email
from apprise.plugins.email.smtp import (
    SMTP_EXCEPTIONS,
    SMTP_SECURE_MODES,
    AppriseSMTPController,
    SMTPSecureMode,
)
from apprise.utils import sanitize as apprise_sanitize
from apprise.utils.parse import GET_SCHEMA_RE, is_email, parse_emails, parse_urls
from email_validator import EmailNotValidError, validate_email

from . import apprise_lines, email_mime
from .apprise_plugins import has_plugin, load_plugins, schema_of
from .errors import DeliveryError
from .invites import Attachment
from .models import Channel
from .rendering import RenderedMessage

log = logging.getLogger(__name__)

# HTTP statuses worth retrying; every other 4xx means the request itself is wrong.
TRANSIENT_HTTP = frozenset({408, 425, 429})
TRANSIENT_PROVIDER_CODES = frozenset({20429})
_PROVIDER_ERROR = re.compile(r"error=(\d{3,6})\.")
_WIRE_STATUS = re.compile(r'HTTP/\d(?:\.\d)?" (\d{3})')
# smtplib's errors print as "(550, b'5.1.1 ...')" (a reply code, then the server's bytes);
# Apprise logs a partly refused recipient list as "SMTP recipient x was refused: 550 b'...'".
# An OS error prints alike but without the b: "(104, 'Connection reset by peer')".
_SMTP_CODE = re.compile(r"\(([2-5]\d\d), b['\"]|was refused: ([2-5]\d\d)\b")
# The request left the machine but no answer came back: a read timeout, a connection
# reset or closed after the request was sent, an answer cut short (requests/urllib3).
_HANDED_OVER = re.compile(r"Read timed out|Connection aborted|Connection broken|RemoteDisconnected")
# Nothing was handed over: no connection, no address, no TLS session.
_NOT_CONNECTED = re.compile(
    r"NewConnectionError|Failed to establish a new connection|NameResolutionError"
    r"|Failed to resolve|ConnectTimeoutError|connect timeout|SSLError|ProxyError"
    r"|Max retries exceeded"
)
# Apprise's email plugin: the SMTP session (connect, STARTTLS, login) could not be opened.
_SMTP_NOT_CONNECTED = "Connection error while submitting email"
# ... or it was open and one message failed inside MAIL/RCPT/DATA; without a reply code,
# the session was lost there. Apprise does not say at which command, and after DATA the
# server may have queued the message: an unknown outcome.
_SMTP_SESSION_LOST = re.compile(r'Sending email to ".*" failed')
# The plugin raised instead of returning (Apprise catches it): whatever it was doing, the
# message may have left. A Celery soft time limit arrives this way, as an exception.
_PLUGIN_CRASHED = re.compile(r"Notification service '.*' raised an exception")
_OUT_OF_TIME = "SoftTimeLimitExceeded"
# The email could not be written: a header holds a line break (a clinic's From name, a
# header value), refused by email_mime's check against header injection (CVE-2024-6923's,
# same words as the patched stdlib's) or by the stdlib's own check for a header embedded in
# a value. Raised while the message is built, before any of it is handed to the server;
# the same data is refused again. The line quotes the header: matched, never repeated.
_HEADER_REFUSED = re.compile(
    r"^Notification Exception: (?:folded header (?:contains newline|does not end with)"
    r"|header value appears to contain an embedded header)", re.MULTILINE)
# Apprise's email plugin found no recipient it can read in the URL (it dropped them as it
# loaded the URL, before this send's lines): the same URL fails again.
_NO_RECIPIENT = "There are no Email recipients to notify"
_READABLE = email.policy.default.clone(max_line_length=998, utf8=True)  # a file, not SMTP
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

# The HTTP statuses urllib3 received for the send running in this context, or None
# outside a send. Apprise runs the plugin in the caller's context, so this is per send.
_http_answers: ContextVar[list[int] | None] = ContextVar("delivery_http_answers", default=None)


class _KeepInTheSend(logging.Filter):
    """During a send, hand urllib3's records to that send and drop them; else pass them.

    Installed once on each urllib3 logger: records of a send carry URLs (phone numbers in
    paths and queries) and must not reach any handler. `outside` returns the level below
    which a record is dropped when no send is running (the level the logger had before
    this module lowered it), so the rest of the process sees urllib3 as before.
    """

    def __init__(self, outside: Callable[[], int]) -> None:
        super().__init__()
        self._outside = outside

    def filter(self, record: logging.LogRecord) -> bool:
        answers = _http_answers.get()
        if answers is None:
            return record.levelno >= self._outside()
        match = _WIRE_STATUS.search(record.getMessage())
        if match:  # urllib3.connectionpool's line for an answer: '... "POST /p HTTP/1.1" 400 2'
            answers.append(int(match[1]))
        return False


def _answers_of(debug: Callable[..., None]) -> Callable[..., None]:
    """urllib3.connectionpool's `debug`: during a send, only the HTTP status is taken from
    the line, as `_KeepInTheSend` would take it from its record, without making the record
    the filter would then drop (two a request); outside a send, `debug` itself."""

    pool = logging.getLogger("urllib3.connectionpool")

    def pool_debug(msg: object, *args: Any, **kwargs: Any) -> None:
        answers = _http_answers.get()
        if answers is None or not pool.isEnabledFor(logging.DEBUG):
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # the caller, not this
            debug(msg, *args, **kwargs)
            return
        match = _WIRE_STATUS.search(apprise_lines.message_text(msg, args) or "")
        if match:
            answers.append(int(match[1]))

    return pool_debug


def _confine_library_logs() -> None:
    """Set, once, the loggers of Apprise and urllib3 as the classification needs them."""
    # Apprise logs recipients (and at DEBUG, bodies). Its lines of a send are read only
    # through apprise_lines, per send; none propagate to our handlers. DEBUG, because the
    # socket error of a failed send is logged at DEBUG.
    apprise_log = logging.getLogger("apprise")
    apprise_log.propagate = False
    apprise_log.addHandler(logging.NullHandler())
    apprise_log.setLevel(logging.DEBUG)
    # urllib3.connectionpool logs the HTTP status of each answer at DEBUG only.
    pool = logging.getLogger("urllib3.connectionpool")
    parent = logging.getLogger("urllib3")
    found = pool.level
    pool.setLevel(logging.DEBUG)
    pool.addFilter(_KeepInTheSend(lambda: found or parent.getEffectiveLevel()))
    pool.debug = _answers_of(pool.debug)  # type: ignore[method-assign]
    for name in ("urllib3.connection", "urllib3.response", "urllib3.poolmanager",
                 "urllib3.util.retry"):
        logging.getLogger(name).addFilter(_KeepInTheSend(lambda: logging.NOTSET))


_confine_library_logs()


@contextlib.contextmanager
def urllib3_lines_kept_out() -> Iterator[None]:
    """Within: urllib3's lines of this context reach no handler, as during a send. For the
    clinic webhooks' requests: urllib3 logs a request's whole URL at WARNING (an answer
    whose headers it cannot parse: "Failed to parse headers (url=...)"), and a receiver's
    URL often carries its token in the path or the query. The outcome is read from the
    answer's status or the exception, never from these lines."""
    token = _http_answers.set([])
    try:
        yield
    finally:
        _http_answers.reset(token)


# --- email: Apprise's SMTP session with one TLS context per process, kept for reuse --------

SMTP_IDLE_SECONDS = 10.0  # a kept session unused this long is closed, not reused
SMTP_MESSAGES_PER_SESSION = 100  # then a new session: servers cap messages per connection
SMTP_KEPT_PER_SERVER = 32  # idle sessions kept per server and login
QUIT_WRITE_SECONDS = 1.0  # an idle session's QUIT is written within this; no answer awaited
SMTP_SEND_TIMEOUTS = 2  # a send reads its session's answers for this many send timeouts at most
# When the send under way in this context must have its answers (time.monotonic()), if any
# (`send_apprise`; read by `_DeadlineReader`).
_smtp_deadline: ContextVar[float | None] = ContextVar("delivery_smtp_deadline", default=None)

_tls_lock = threading.Lock()
_tls_contexts: dict[bool, ssl.SSLContext] = {}


def tls_context(verify: bool) -> ssl.SSLContext:
    """Return this process's TLS context for SMTP, made once (verify: check certificates)."""
    with _tls_lock:
        context = _tls_contexts.get(verify)
        if context is None:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            _tls_contexts[verify] = context
        return context


class _DeadlineReader(io.RawIOBase):
    """A session's socket as its answers are read: each read within the socket timeout,
    and during a send never past the send's end (`_smtp_deadline`). A server whose every
    line comes within the timeout (a tarpit; one wedged in a loop, greeting on and on) held
    the send as long as it went on, until the watchdog ended the worker process before the
    attempt's ledger expired, and every other clinic's sends under way and claims waiting
    in that process went with it (back only after their lease)."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._sock, self._timeout = sock, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        end = _smtp_deadline.get()
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("the server's answers took longer than a send may")
            self._sock.settimeout(left if self._timeout is None else min(self._timeout, left))
        return self._sock.recv_into(buffer)


class _NotesHandOver:
    """Notes when a message's hand-over began: the server answered the DATA command with
    354 and the message goes out. Before that 354 the server has none of it: a session
    closed at the DATA command (no answer, or 421) took nothing. Mixed into smtplib's
    sessions (its `data` and `getreply` are theirs); their answers are read through a
    `_DeadlineReader`."""

    data_started = False
    _asked_data = False
    file: Any
    sock: Any
    timeout: Any

    def data(self, msg: Any) -> tuple[int, bytes]:
        self._asked_data = True
        try:
            return super().data(msg)  # type: ignore[misc, no-any-return]
        finally:
            self._asked_data = False

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:  # (made again after STARTTLS)
            timeout = self.timeout if isinstance(self.timeout, int | float) else None
            self.file = io.BufferedReader(_DeadlineReader(self.sock, timeout))
        reply: tuple[int, bytes] = super().getreply()  # type: ignore[misc]
        if self._asked_data and reply[0] == 354:
            self.data_started = True
        return reply


class _Session(_NotesHandOver, smtplib.SMTP):
    """An SMTP session that notes when a message's hand-over began."""


class _SessionSSL(_NotesHandOver, smtplib.SMTP_SSL):
    """An SMTP session over TLS from its start that notes when a message's hand-over began."""


SessionKey = tuple[str, int, str, str, str, bool]


class _KeptSessions:
    """Idle SMTP sessions by server and login; each is used by one thread at a time.

    Those idle too long are closed by whichever thread finds them so (another clinic's
    send, the senders' reporting thread's `sweep`) with `_close_idle`: their QUIT is
    written, its answer not waited for, so a server gone silent (hung, or its idle
    connections dropped without a word by a firewall or a NAT) holds no other clinic's
    send, nor the reports to the pump, for its socket timeout per session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[SessionKey, list[tuple[_Session | _SessionSSL, float, int]]] = {}

    def take(self, key: SessionKey) -> tuple[_Session | _SessionSSL, int] | None:
        """Return the most recently used idle session of `key` and its message count."""
        with self._lock:
            stale = self._stale_locked()
            kept = self._idle.get(key)
            newest = kept.pop() if kept else None
        for session in stale:
            _close_idle(session)
        return (newest[0], newest[2]) if newest else None

    def give(self, key: SessionKey, session: _Session | _SessionSSL, sent: int) -> None:
        with self._lock:
            stale = self._stale_locked()
            kept = self._idle.setdefault(key, [])
            if len(kept) < SMTP_KEPT_PER_SERVER:
                kept.append((session, time.monotonic(), sent))
            else:
                stale.append(session)
        for old in stale:
            _close_idle(old)

    def sweep(self) -> None:
        """Close the sessions idle too long (called now and then by the senders)."""
        with self._lock:
            stale = self._stale_locked()
        for session in stale:
            _close_idle(session)

    def _stale_locked(self) -> list[_Session | _SessionSSL]:
        now = time.monotonic()
        stale = []
        for key, kept in list(self._idle.items()):
            stale += [item[0] for item in kept if now - item[1] >= SMTP_IDLE_SECONDS]
            fresh = [item for item in kept if now - item[1] < SMTP_IDLE_SECONDS]
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        return stale

    def close(self) -> None:
        """QUIT every idle session (a worker process stopping)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for kept in idle.values():
            for session, _, _ in kept:
                _close_idle(session)

    def forget(self) -> None:
        """Drop every session without a word: after a fork they belong to the parent."""
        self._lock = threading.Lock()
        self._idle = {}


def _session_gone(exc: BaseException) -> bool:
    """Return whether an error says the session itself is gone (not a refusal in it)."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code == 421  # "service closing transmission channel"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code == 421 for code, _ in exc.recipients.values())
    return isinstance(exc, (smtplib.SMTPServerDisconnected, OSError))


def _quit(session: _Session | _SessionSSL) -> None:
    with contextlib.suppress(*SMTP_EXCEPTIONS):
        session.quit()
    with contextlib.suppress(OSError):
        session.close()


def _close_idle(session: _Session | _SessionSSL) -> None:
    """Close an idle kept session: its QUIT written (within QUIT_WRITE_SECONDS), its
    answer not waited for (`_KeptSessions`)."""
    with contextlib.suppress(OSError, *SMTP_EXCEPTIONS):
        if session.sock is not None:
            session.sock.settimeout(QUIT_WRITE_SECONDS)
        session.putcmd("quit")
    with contextlib.suppress(OSError):
        session.close()


smtp_sessions = _KeptSessions()
os.register_at_fork(after_in_child=smtp_sessions.forget)


class _KeptSMTPController(AppriseSMTPController):
    """Apprise's SMTP session manager with a cached TLS context and sessions kept for reuse.

    Connects, secures and logs in exactly as Apprise does (same calls, same errors, same
    log lines, which delivery's classification reads); only the context is made once and
    a healthy session goes back to `smtp_sessions` instead of QUIT.
    """

    _session: _Session | _SessionSSL | None = None

    def __enter__(self) -> _KeptSMTPController:
        if self.secure_mode not in SMTP_SECURE_MODES:
            raise AppriseImproperlyConfigured(  # type: ignore[no-untyped-call]  # untyped
                f"Invalid SMTP secure mode: {self.secure_mode!r}")
        self._key: SessionKey = (self.host, int(self.port), self.secure_mode, self.user or "",
                                 self.password or "", bool(self.verify_certificate))
        self._healthy = True
        kept = smtp_sessions.take(self._key)
        if kept is not None:
            self._session, self._sent = kept
            self._reused = True
        else:
            self._connect()
        return self

    def _connect(self) -> None:
        """Open, secure and log in a new session (Apprise's steps, our TLS context)."""
        self._session = None
        self._sent = 0
        self._reused = False
        context = tls_context(bool(self.verify_certificate))
        session: _Session | _SessionSSL | None = None
        try:
            apprise_logger.debug("Connecting to remote SMTP server...")
            if self.secure_mode == SMTPSecureMode.SSL:
                apprise_logger.debug("Securing connection with SSL...")
                session = _SessionSSL(self.host, self.port, None,
                                      timeout=self.socket_connect_timeout, context=context)
            else:
                session = _Session(self.host, self.port, None,
                                   timeout=self.socket_connect_timeout)
            if self.secure_mode == SMTPSecureMode.STARTTLS:
                apprise_logger.debug("Securing connection with STARTTLS...")
                session.starttls(context=context)
            if self.user and self.password:
                apprise_logger.debug("Applying user credentials...")
                session.login(self.user, self.password)
        except SMTP_EXCEPTIONS:
            if session is not None:
                _quit(session)
            raise
        self._session = session

    def sendmail(self, from_addr: str, to_addrs: list[str], message: str) -> bool:
        """Send one prepared message; return whether it succeeded (as Apprise's does)."""
        session = self._session
        assert session is not None, "sendmail outside the session's `with`"
        session.data_started = False
        try:
            refused = session.sendmail(from_addr, to_addrs, message)
        except SMTP_EXCEPTIONS as exc:
            if self._reused and not session.data_started and _session_gone(exc):
                # A kept session the server closed meanwhile: nothing of this message was
                # handed over. Once more over a fresh session (its errors are the real ones).
                _quit(session)
                self._connect()
                return self.sendmail(from_addr, to_addrs, message)
            apprise_logger.debug("Socket Exception: %s", str(exc))
            self._healthy = False
            return False
        if refused:
            for addr, (code, resp) in refused.items():
                apprise_logger.warning("SMTP recipient %s was refused: %s %s", addr, code, resp)
            self._healthy = False
            return False
        self._sent += 1
        return True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if exc_type is None and self._healthy and self._sent < SMTP_MESSAGES_PER_SESSION:
            with contextlib.suppress(OSError):  # its own timeout again, not this send's rest
                session.sock.settimeout(session.timeout)
            smtp_sessions.give(self._key, session, self._sent)
        else:
            _quit(session)


def _keep_smtp_sessions() -> None:
    """Put our SMTP session manager where Apprise's email plugin looks its own up."""
    if getattr(apprise_email, "AppriseSMTPController", None) is AppriseSMTPController:
        setattr(apprise_email, "AppriseSMTPController", _KeptSMTPController)  # noqa: B010
    else:  # a newer Apprise arranged it differently: its own sessions, one per message
        log.warning("Apprise's email plugin has no AppriseSMTPController to replace: "
                    "emails use a new TLS context and connection each")


_keep_smtp_sessions()
if not email_mime.install(apprise_email):  # a newer Apprise builds its messages otherwise
    log.warning("Apprise's email plugin has no MIMEMultipart/MIMEText/convert_between to "
                "replace: emails are serialized by the stdlib's generator, and an HTML "
                "email's plain part is Apprise's conversion of the HTML")


# --- HTTP: Apprise's requests through the sending thread's session -------------------------

HTTP_IDLE_SECONDS = 2.0  # a thread's HTTP connections unused this long are closed, not reused

# The send running in this context, if any: Apprise's plugins call `requests.post(...)` or
# `requests.request(...)`, each a new Session (a new connection pool, the environment's
# proxies read again, every variable of it lower-cased twice: about a third of an SMS's
# CPU). During a send those calls go through the sending thread's session instead.
_in_send: ContextVar[bool] = ContextVar("delivery_in_send", default=False)
_http_sessions = threading.local()


@functools.lru_cache(maxsize=256)
def _environ_proxies(origin: str, no_proxy: str | None) -> dict[str, str]:
    """The environment's proxies for one origin ("https://host:port"), read once per process."""
    return dict(requests.utils.get_environ_proxies(origin + "/", no_proxy=no_proxy))


class _SendSession(requests.Session):
    """A thread's session for Apprise's HTTP sends: requests' own behaviour, except that
    the environment's proxy settings are read once per origin and process (a worker's
    environment does not change), and that a connection is reused only while it has been
    idle less than HTTP_IDLE_SECONDS (servers close idle keep-alive connections after a
    few seconds; one closed just as a request goes out would make that send's outcome
    unknown)."""

    used_at = 0.0

    def __init__(self) -> None:
        super().__init__()
        # `_prepared_quickly`'s: a template and the Authorization its login adds, if any.
        self.templates: dict[Any, tuple[requests.PreparedRequest, str | bytes | None]] = {}

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(str(url))
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        found = _environ_proxies(f"{parts.scheme}://{parts.netloc}", no_proxy)
        proxies = dict(proxies or {})
        for key, value in found.items():
            proxies.setdefault(key, value)
        if verify is True or verify is None:
            verify = _CA_BUNDLE or verify
        self.trust_env = False  # the environment was read above: not again
        try:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        finally:
            self.trust_env = True


_CA_BUNDLE = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")


def _thread_session() -> _SendSession:
    session: _SendSession | None = getattr(_http_sessions, "session", None)
    if session is None:
        session = _http_sessions.session = _SendSession()
    now = time.monotonic()
    if now - session.used_at >= HTTP_IDLE_SECONDS:
        session.close()  # its kept connections may be stale: new ones for this send
    session.used_at = now
    return session


_plain_request = requests.api.request


def _request(method: str, url: Any, **kwargs: Any) -> requests.Response:
    """`requests.request`: through the sending thread's session during a send.

    Its cookie jar is emptied first: `requests.request` makes a new session, so no cookie
    a provider set in an earlier answer goes out with a later request. A request of the
    shapes Apprise's plugins send is prepared from the thread's template for its method,
    URL, headers, query and login (`_prepared_quickly`), and sent as `Session.request`
    sends it.
    """
    if not _in_send.get():
        return _plain_request(method, url, **kwargs)
    session = _thread_session()
    session.cookies.clear()
    if kwargs.pop("stream", False):
        return session.request(method=method, url=url, stream=True, **kwargs)
    prepared = _prepared_quickly(session, method, url, kwargs)
    if prepared is None:
        response = session.request(method=method, url=url, stream=True, **kwargs)
    else:
        # `Session.request`'s own steps after its `prepare_request`.
        settings = session.merge_environment_settings(
            prepared.url, kwargs.get("proxies") or {}, True, kwargs.get("verify"),
            kwargs.get("cert"))
        response = session.send(prepared, timeout=kwargs.get("timeout"),
                                allow_redirects=kwargs.get("allow_redirects", True),
                                **settings)
    _read_body(response, _read_seconds(kwargs.get("timeout")))
    return response


# `requests.request`'s arguments a request prepared from a template may have: the others
# (files given, cookies, hooks) go through `Session.request` whole.
_QUICK_ARGUMENTS = frozenset({"data", "json", "headers", "params", "auth", "timeout", "verify",
                              "files",  # None or empty only (form:// without attachments)
                              "cert", "allow_redirects", "proxies"})
_QUICK_DATA = (str, bytes, dict, type(None))  # a body not streamed from a file or generator
QUICK_TEMPLATES = 64  # a thread's templates kept (a clinic URL's, mostly one each)


def _prepared_quickly(session: _SendSession, method: str, url: Any,
                      kwargs: dict[str, Any]) -> requests.PreparedRequest | None:
    """The request `session.request` would prepare for these arguments, or None where it
    is not one of the shapes below (then `session.request` prepares it itself).

    `Session.prepare_request` works out the same URL (the query, IDNA, quoting), headers,
    login (a user:password pair, the URL's own, or ~/.netrc's, as `requests` reads it) and
    hooks for every message of one clinic URL; it took about a third of `requests`' CPU
    an SMS. Here they are prepared once per thread for each (method, URL, headers,
    query, login) and kept as a template (QUICK_TEMPLATES of them), without the
    Content-Length its empty body and the Authorization its login added; each request is
    a copy of its template with its own body prepared on it (`prepare_body`: the data or
    JSON, its Content-Length, or none for an empty one (sent chunked), its Content-Type
    unless a header gives one), then the login's Authorization: the headers in the order
    `prepare_request` puts them (the body's before the login's). A body read
    from a file or generator, a login given as an object (`requests.auth.AuthBase`: it
    may read the body or add hooks), a query or header value that is not a plain string,
    files (but None or empty, as Apprise's form:// passes them) or cookies: prepared by
    `Session.request` as before. ~/.netrc is read once per
    template (as the environment's proxies are once per process: `_environ_proxies`)."""
    if (not _QUICK_ARGUMENTS.issuperset(kwargs) or type(url) is not str
            or type(kwargs.get("data")) not in _QUICK_DATA or kwargs.get("files")):
        return None
    auth = kwargs.get("auth")
    if auth is not None and not (type(auth) is tuple and len(auth) == 2
                                 and all(type(part) in (str, bytes) for part in auth)):
        return None
    headers, params = kwargs.get("headers"), kwargs.get("params")
    header_items = _plain_items(headers)
    param_items = _plain_items(params)
    if header_items is None or param_items is None:
        return None
    key = (method, url, header_items, param_items, auth)
    templates = session.templates
    kept = templates.get(key)
    if kept is None:
        if len(templates) >= QUICK_TEMPLATES:
            templates.clear()
        kept = templates[key] = _template(session, method, url, headers, params, auth)
    template, authorization = kept
    prepared = template.copy()
    prepared.hooks = {event: list(hooks) for event, hooks in template.hooks.items()}
    data = kwargs.get("data")
    prepared.prepare_body(data or {}, None, kwargs.get("json"))
    if authorization is not None:  # `prepare_auth`, after the body as in `prepare`
        prepared.headers["Authorization"] = authorization
    return prepared


def _template(session: _SendSession, method: str, url: str, headers: Any, params: Any,
              auth: Any) -> tuple[requests.PreparedRequest, str | bytes | None]:
    """`Session.prepare_request`'s request for these, without a body, and without the
    Content-Length (of its empty body) and Authorization (of its login) that the headers
    given and the session's do not have: those go after the body's own headers (the
    Authorization returned to be added then)."""
    template = session.prepare_request(requests.Request(
        method=method.upper(), url=url, headers=headers, data={}, params=params or {},
        auth=auth))
    given = requests.sessions.merge_setting(headers, session.headers,
                                            dict_class=requests.structures.CaseInsensitiveDict)
    if "Content-Length" not in given:
        template.headers.pop("Content-Length", None)
    authorization = None
    if "Authorization" not in given:
        authorization = template.headers.pop("Authorization", None)
    return template, authorization


def _plain_items(mapping: Any) -> tuple[tuple[str, str | bytes], ...] | None:
    """A dict's items if each key is a str and each value a str or bytes (a key for
    `_prepared_quickly`'s templates); () for None; None for anything else."""
    if mapping is None:
        return ()
    if type(mapping) is not dict:
        return None
    items = tuple(mapping.items())
    for name, value in items:
        if type(name) is not str or type(value) not in (str, bytes):
            return None
    return items


def _read_seconds(timeout: Any) -> float | None:
    """The read timeout of a `requests` timeout (seconds, or (connect, read)), if any."""
    if isinstance(timeout, tuple):
        timeout = timeout[1] if len(timeout) > 1 else None
    return float(timeout) if isinstance(timeout, int | float) else None


def _read_body(response: requests.Response, seconds: float | None) -> None:
    """Read `response`'s body as `requests` does unless streamed, for at most `seconds` in
    all: the status decides a send, and an answer whose body trickles on (each byte inside
    the read timeout: a proxy holding the connection) held the send past its timeout until
    the attempt's time limit, recorded as of unknown outcome and sent again. What came by
    then is the body; the connection is closed, not reused."""
    if seconds is None:
        response.content  # noqa: B018 (reads it, as `requests` does)
        return
    end = time.monotonic() + seconds
    chunks: list[bytes] = []
    try:
        while True:
            chunk = response.raw.read1(65_536, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            if time.monotonic() >= end:
                log.info("an HTTP answer's body still coming after %.0f s: not read further",
                         seconds)
                response.close()
                break
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from None
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from None
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from None
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None
    response._content = b"".join(chunks)
    response._content_consumed = True


def _route_apprise_http() -> None:
    """Put `_request` where `requests.post` & co. and `requests.request` look it up."""
    requests.api.request = _request
    requests.request = _request


_route_apprise_http()


# Types whose instances hold no attributes of their own (no __dict__): what `isinstance` says
# of one of them against a protocol depends on the type alone.
_NO_OWN_ATTRIBUTES = frozenset({type(None), str, bytes, bool, int, float, list, tuple})


class _TypeCachedProtocol:
    """`isinstance(x, proto)` for a runtime-checkable protocol of methods only (requests'
    `SupportsItems`, `SupportsRead`), the same answers, kept per type where the type alone
    decides: a type that has the methods (typing's class check) is always an instance; a
    type without them is not, unless an instance has them as its own attributes, which
    the types of _NO_OWN_ATTRIBUTES cannot. Anything else is asked of `proto` as before.

    typing's check walks the protocol's members on every call (about 5-12 us in Python
    3.11): `requests` makes eight of them preparing each request, about a tenth of its
    own part of an SMS."""

    def __init__(self, proto: Any) -> None:
        self._proto = proto
        self._known: dict[type, bool] = {}

    def __instancecheck__(self, instance: Any) -> bool:
        kind = type(instance)
        known = self._known.get(kind)
        if known is not None:
            return known
        answer = isinstance(instance, self._proto)
        if instance.__class__ is not kind:  # a proxy posing as another class: ask each time
            return answer
        try:
            by_type = issubclass(kind, self._proto)
        except TypeError:  # a protocol with data members: typing answers per instance only
            return answer
        if by_type:
            self._known[kind] = True
        elif kind in _NO_OWN_ATTRIBUTES:
            self._known[kind] = answer
        return answer

    def __repr__(self) -> str:
        return f"<type-cached {self._proto!r}>"


def _cache_requests_protocol_checks() -> None:
    """Put `_TypeCachedProtocol` where `requests` checks its typing protocols."""
    import requests.models

    for module, name in ((requests.utils, "_SupportsItems"), (requests.models, "_SupportsRead")):
        proto = getattr(module, name, None)
        if proto is not None and not isinstance(proto, _TypeCachedProtocol):
            setattr(module, name, _TypeCachedProtocol(proto))


_cache_requests_protocol_checks()
os.register_at_fork(after_in_child=lambda: setattr(_http_sessions, "session", None))


@dataclass(frozen=True)
class Envelope:
    """Who a message is for and which reminder it carries (for names and audit)."""

    ref: str
    clinic: str
    channel: Channel
    to: str


def with_timeouts(url: str, seconds: float) -> str:
    """Return `url` with Apprise's socket timeouts (cto/rto) appended unless it sets them.

    Appended as text: re-encoding the query could turn a "+" of a phone number into a space.
    """
    query = urlsplit(url).query
    present = {part.split("=", 1)[0] for part in query.split("&") if part}
    extra = "&".join(f"{k}={seconds:g}" for k in ("cto", "rto") if k not in present)
    if not extra:
        return url
    return url + ("&" if query else "?") + extra


def classify(
    status: str, lines: Sequence[str], http_statuses: Sequence[int] = ()
) -> DeliveryError:
    """Return the DeliveryError for a failed send.

    `status` is Apprise's result status ("FAILURE", "TIMEOUT"), `lines` the messages
    Apprise captured for this call, `http_statuses` the statuses of the HTTP answers
    this send received. A definite answer decides (HTTP status, provider error code,
    SMTP reply code); without one, whether the request was handed over does.
    """
    if status == "TIMEOUT":
        return DeliveryError(
            "Apprise stopped waiting for the provider; the message may have been delivered",
            unknown=True,
        )
    text = "\n".join(lines)
    if _HEADER_REFUSED.search(text):  # first: the quoted header may hold any other words
        return DeliveryError(
            "a header of the email holds a line break (the clinic's configuration or the "
            "patient's data); refused before sending, nothing was sent", permanent=True)
    codes = [int(c) for c in _PROVIDER_ERROR.findall(text)]
    http = [c for c in http_statuses if not 200 <= c < 300] or [c for c in codes if c < 1000]
    if http:
        code = http[-1]
        permanent = 400 <= code < 500 and code not in TRANSIENT_HTTP
        return DeliveryError(f"HTTP {code} from the provider", permanent=permanent)
    if codes:
        # A provider's own error code (Twilio: 21211 bad number, 20003 auth, 20429 rate
        # limit, 205xx its server errors): a definite answer, permanent unless it says wait.
        code = codes[-1]
        permanent = code not in TRANSIENT_PROVIDER_CODES and not 20500 <= code < 20600
        return DeliveryError(f"provider error {code}", permanent=permanent)
    smtp = [int(a or b) for a, b in _SMTP_CODE.findall(text)]
    if smtp:
        code = smtp[-1]
        # SMTP 5yz is a permanent rejection (550 no such mailbox); 4yz asks to retry later.
        return DeliveryError(f"SMTP {code} from the mail server", permanent=code >= 500)
    if _HANDED_OVER.search(text):
        return DeliveryError(
            "no answer from the provider after the request was sent; "
            "the message may have been delivered",
            unknown=True,
        )
    if _NOT_CONNECTED.search(text) or _SMTP_NOT_CONNECTED in text:
        return DeliveryError("could not connect to the provider")
    if _SMTP_SESSION_LOST.search(text):
        return DeliveryError(
            "the mail server connection was lost while sending; "
            "the message may have been delivered",
            unknown=True,
        )
    if _PLUGIN_CRASHED.search(text):
        what = "the send ran out of time" if _OUT_OF_TIME in text else "the channel plugin failed"
        return DeliveryError(f"{what}; the message may have been delivered", unknown=True)
    lowered = text.lower()
    if "connection" in lowered or "timed out" in lowered or "timeout" in lowered:
        # A connection failure this module does not recognise: it may have been after the
        # hand-over, and a late retry is cheaper than a duplicate message.
        return DeliveryError(
            "connection failure with the provider; the message may have been delivered",
            unknown=True,
        )
    if _NO_RECIPIENT in text:
        return DeliveryError("the email plugin reads no recipient in the channel URL's "
                             "address; nothing was sent", permanent=True)
    if "invalid" in lowered or "no valid" in lowered:
        return DeliveryError("the provider refused the address or message", permanent=True)
    return DeliveryError("the provider reported a failure")


def with_headers(url: str, headers: Mapping[str, str]) -> str:
    """Return `url` with extra message headers in Apprise's `+Name=value` form (its email
    plugin puts each on the message; quoted, so "<https://...>" survives the URL)."""
    if not headers:
        return url
    query = urlsplit(url).query
    extra = "&".join(f"+{quote(name, safe='-')}={quote(value, safe='')}"
                     for name, value in headers.items())
    return url + ("&" if query else "?") + extra


# One asset for every message of this process: service_timeout=0, no service deadline (the
# plugin runs in the calling thread, bounded by its socket timeouts). Read-only once made.
_ASSET = apprise.AppriseAsset(service_timeout=0)
_notifiers = threading.local()  # each thread's Apprise object, emptied after each message


def _notifier() -> apprise.Apprise:
    """Return this thread's Apprise object (empty: it holds a message's service only
    during that send). Made once per thread: `Apprise()` sets up its locale each time."""
    notifier: apprise.Apprise | None = getattr(_notifiers, "notifier", None)
    if notifier is None:
        notifier = _notifiers.notifier = apprise.Apprise(asset=_ASSET)
    return notifier


def load_services(url: str) -> list[Any] | None:
    """Return Apprise's plugin objects for `url` (as `Apprise.add(url)` makes them), or None
    if one of them cannot be loaded.

    `Apprise.instantiate` does exactly this (split the URLs, the plugin's own `parse_url`,
    the plugin's constructor, its enabled checks) and, for its DEBUG lines, also renders
    the URL twice with secrets masked: about a third of loading a URL, for every message.
    Here those lines are left out; a URL of a scheme no plugin claims by name (a provider's
    native URL) still goes through `Apprise.instantiate`.
    """
    services = []
    for one in parse_urls(url):  # type: ignore[no-untyped-call]  # Apprise: untyped
        service = _load_service(one)
        if service is None:
            return None
        services.append(service)
    return services or None


def _load_service(url: str) -> Any:
    fixed = url.replace("/#", "/%23")  # as url_to_dict does
    found = GET_SCHEMA_RE.match(fixed)
    schema = found["schema"].lower() if found else ""
    # Loads the schema's plugin module if it is not loaded yet (worker/apprise_plugins.py).
    if not has_plugin(schema):
        return apprise.Apprise.instantiate(url, asset=_ASSET)
    results = _parsed(N_MGR[schema], fixed)
    if not results or not N_MGR[results["schema"]].enabled:
        return None
    results["tag"] = set()
    results["asset"] = _ASSET
    try:
        service = N_MGR[results["schema"]](**results)
    except Exception:  # Apprise's instantiate: the arguments cannot be used
        return None
    return service if service.enabled else None


# --- the parsed URL of a channel, made once per clinic URL and reused -----------------------

# A channel URL differs from message to message only in a few query values: the recipient
# (`to={to}`, `:to={to}`), an email's List-Unsubscribe link. Parsing it is most of loading
# its plugin (`_load_service`). So the URL is parsed once with each such value replaced by
# a marker, and for each message the parsed result is copied with each marker replaced by
# that message's value; the plugin's constructor still runs for every message, as before.
# Only where this is the same result as parsing the message's own URL:
#  - the value is the whole value of a query parameter (after the URL's first "?") whose
#    name the plugin's `parse_url` keeps without reading its value (`_OPAQUE`): it unquotes
#    it (`apprise.utils.parse.parse_qsd`: `unquote`, then `strip`), perhaps unquotes it once
#    more (the custom plugins' payload, headers and parameters; the email plugin's headers),
#    and stores it; it never splits, lowercases or tests it, except for being empty;
#  - the value, so unquoted, is not empty and holds no "%" (unquoting it again changes
#    nothing); the query holds no ";" (which `parse_qsd` also splits on);
#  - in what the plugin's `parse_url` made of the URL with the markers, each marker is found
#    only as a whole string, never inside another, never in a key (checked once per URL:
#    else that URL is parsed for every message, as before).
# Any other URL (a recipient in the path or host: twilio://.../{to}) is parsed for every
# message, as before.
_OPAQUE: dict[tuple[str, str], re.Pattern[str]] = {
    ("apprise.plugins.custom_json", "NotifyJSON"): re.compile(r"[:+-][A-Za-z0-9_-]+"),
    ("apprise.plugins.custom_form", "NotifyForm"): re.compile(r"[:+-][A-Za-z0-9_-]+"),
    ("apprise.plugins.custom_xml", "NotifyXML"): re.compile(r"[:+-][A-Za-z0-9_-]+"),
    ("apprise.plugins.email.base", "NotifyEmail"):
        re.compile(r"to|cc|bcc|reply|\+[A-Za-z0-9_-]+"),
}
# Markers: letters and digits, as a plain value is; mixed case, so that a plugin lowering a
# value would show; a token of this process's own, so that no URL holds one already.
_MARK = f"Mk{os.urandom(6).hex()}Q"
_MARKED = re.compile(re.escape(_MARK) + r"\d+Z")
PARSED_KEPT = 256  # parsed channel URLs kept (per process; emptied when full)
_parsed_urls: dict[str, dict[str, Any] | None] = {}  # None: parsed for every message


def _parsed(plugin: Any, url: str) -> dict[str, Any] | None:
    """`plugin.parse_url(url)`, from the URL's parsed form kept with markers where it can
    be (see above): the same dictionary, made anew for each call."""
    opaque = _OPAQUE.get((plugin.__module__, plugin.__qualname__))
    base, question, query = url.partition("?")
    if opaque is None or not question or ";" in query or _MARK in url:
        return plugin.parse_url(url)  # type: ignore[no-any-return]
    pairs = query.split("&")
    values: dict[str, str] = {}
    for i, pair in enumerate(pairs):
        name, equals, raw = pair.partition("=")
        if not equals or not opaque.fullmatch(name):
            continue
        value = unquote(raw).strip()
        if value and "%" not in value:
            marker = f"{_MARK}{i}Z"
            values[marker] = value
            pairs[i] = f"{name}={marker}"
    if not values:
        return plugin.parse_url(url)  # type: ignore[no-any-return]
    key = f"{plugin.__module__}.{plugin.__qualname__} {base}?{'&'.join(pairs)}"
    try:
        kept = _parsed_urls[key]
    except KeyError:
        kept = plugin.parse_url(key.split(" ", 1)[1])
        if kept is not None and not _markers_whole(kept):
            kept = None
        if len(_parsed_urls) >= PARSED_KEPT:
            _parsed_urls.clear()
        _parsed_urls[key] = kept
        if kept is None:
            return plugin.parse_url(url)  # type: ignore[no-any-return]
    if kept is None:
        return plugin.parse_url(url)  # type: ignore[no-any-return]
    filled: dict[str, Any] = _filled(kept, values)
    return filled


_SCALARS = (type(None), bool, int, float)


def _markers_whole(found: Any) -> bool:
    """Whether every marker in `found` (a parsed URL) is a whole string of it, never in a
    key, and it holds only what `_filled` copies or may share: dicts, lists, tuples and sets
    (exactly those types), strings and scalars."""
    kind = type(found)
    if isinstance(found, str):
        return _MARK not in found or (kind is str and _MARKED.fullmatch(found) is not None)
    if kind is dict:
        return all((not isinstance(k, str) or _MARK not in k) and _markers_whole(k)
                   and _markers_whole(v) for k, v in found.items())
    if kind in (list, tuple, set, frozenset):
        return all(_markers_whole(v) for v in found)
    return kind in _SCALARS


def _filled(kept: Any, values: Mapping[str, str]) -> Any:
    """A copy of `kept` (every container new) with each marker string replaced by its value."""
    kind = type(kept)
    if kind is str:
        return values.get(kept, kept)
    if kind is dict:
        return {k: _filled(v, values) for k, v in kept.items()}
    if kind is list:
        return [_filled(v, values) for v in kept]
    if kind is tuple:
        return tuple(_filled(v, values) for v in kept)
    if kind is set or kind is frozenset:
        return kind(_filled(v, values) for v in kept)
    return kept


def send_apprise(url: str, message: RenderedMessage, timeout: float,
                 headers: Mapping[str, str] | None = None, *, to: str | None = None) -> str:
    """Send one message through Apprise (this thread's Apprise object, the URL's plugin
    made for this message); classify any failure.

    `to`: the recipient's address as booked (the URL's `{to}`): an email goes to it
    exactly (`_exact_recipient`).

    Safe to call from many threads at once: nothing here changes shared state.
    """
    try:
        services = load_services(with_headers(with_timeouts(url, timeout), headers or {}))
    except Exception as exc:  # a malformed URL can raise inside a plugin's parser
        raise DeliveryError(
            f"Apprise cannot load the channel URL ({type(exc).__name__})", permanent=True
        ) from None
    if not services:
        raise DeliveryError("Apprise cannot load the channel URL", permanent=True)
    if to is not None:
        _exact_recipient(services, to)
    notifier = _notifier()
    notifier.clear()
    notifier.add(services)
    # An SMTP session's answers are read for SMTP_SEND_TIMEOUTS timeouts at most in all
    # (`_DeadlineReader`): the send ends well within its ledger (lease_seconds > 2 x
    # send_timeout_seconds + 1, settings.py), not by the watchdog ending the process.
    deadline = _smtp_deadline.set(time.monotonic() + SMTP_SEND_TIMEOUTS * timeout)
    try:
        return _notify(notifier, message)
    finally:
        _smtp_deadline.reset(deadline)
        notifier.clear()


def _exact_recipient(services: Sequence[Any], to: str) -> None:
    """Have the email plugin send to `to` itself where it reads the address otherwise.

    Apprise's email plugin reads the recipients of its URL with its own patterns
    (apprise/utils/parse.py: EMAIL_DETECTION_RE finds them, GET_EMAIL_RE reads each),
    which read some valid addresses as others: an apostrophe in the first word ends a
    display name ("o'brien@example.com" is "brien@example.com" named "o", someone else's
    mailbox), a domain is cut at its first character they do not take ("ana@example.рф"
    is "ana@example"); others they drop ("ana'@example.com", "a+b+c@example.com", an
    international domain), and the send failed as a provider's failure, retried. What the
    plugin made of the URL's `to` is put back to the address as booked (the plugin writes
    its recipients as given), its domain in ASCII (IDNA, the same mailbox); an address
    with a non-ASCII mailbox name (it needs SMTPUTF8, which Apprise's SMTP session does
    not ask for) fails for good.
    """
    emails = [s for s in services if isinstance(s, apprise_email.NotifyEmail)]
    if not emails:
        return
    # Before taking the plugin's reading: one it reads whole ("ñ+a@example.com") cannot
    # be written either (smtplib raised in the plugin: an outcome unknown, retried).
    address = to if to.isascii() else _ascii_address(to)
    if address is None:
        raise DeliveryError("the email address cannot be written for the mail server "
                            "(Apprise takes ASCII mailbox names only); nothing was sent",
                            permanent=True)
    readings = [_apprise_reading(found) for found in
                parse_emails(to)]  # type: ignore[no-untyped-call]  # Apprise: untyped
    if readings == [(False, address)]:
        return
    exact = (False, address)
    for service in emails:
        targets = [exact if target in readings else target for target in service.targets]
        if exact not in targets:  # the plugin dropped it
            targets.append(exact)
        service.targets = list(dict.fromkeys(targets))


def _apprise_reading(address: str) -> tuple[str | bool, str] | None:
    """The (name, address) Apprise's email plugin makes of `address`, None if it drops it."""
    found = is_email(address)  # type: ignore[no-untyped-call]  # Apprise: untyped
    return (found["name"] or False, found["full_email"]) if found else None


def _ascii_address(address: str) -> str | None:
    """`address` with its domain in ASCII (IDNA); None if its mailbox name is not ASCII."""
    try:
        ascii_form = validate_email(address, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return None
    return ascii_form


_apprise_service_metadata = apprise_dispatch.service_metadata


def _service_metadata(service: Any) -> tuple[str, str, str | None, tuple[str, ...], int]:
    """Apprise's `service_metadata` (the service's name, URL, URL id, tags and weight,
    for the result of a call), except that during a send of this module the URL is only
    its schema ("json://") and the URL id None.

    For every result Apprise renders the service's whole URL in its privacy form (each
    parameter quoted again) and hashes it for the id: about a third of Apprise's own
    part of a send (0.04-0.08 ms), for two fields of the result that delivery never
    reads (it reads the result's status; the classification, the lines logged). The
    name, tags and weight are Apprise's as ever; outside a send, all of it is."""
    seen: Any = service if not _in_send.get() else _NoUrl(service)
    return _apprise_service_metadata(seen)


class _NoUrl:
    """A service as `service_metadata` sees it during a send: its own name, tags and
    length; its URL only its schema, no URL id."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:  # service_name, tags, ...
        return getattr(self._service, name)

    def __len__(self) -> int:
        return len(self._service)

    def url(self, privacy: bool = False, *args: Any, **kwargs: Any) -> str:
        return f"{getattr(self._service, 'schema', None) or 'unknown'}://"

    def url_id(self, *args: Any, **kwargs: Any) -> None:
        return None


def _leave_urls_out_of_results() -> None:
    """Put `_service_metadata` where Apprise's dispatch looks it up."""
    if getattr(apprise_dispatch, "service_metadata", None) is _apprise_service_metadata:
        apprise_dispatch.service_metadata = _service_metadata


_leave_urls_out_of_results()


_apprise_sanitize_payload = apprise_sanitize.sanitize_payload


class _PayloadForDebug:
    """What Apprise's `sanitize_payload` would return for a payload, worked out only when
    a line shows it (`str`, `repr`, `format`): the same text then.

    Apprise's plugins call `sanitize_payload(payload)` only as the argument of a DEBUG line
    ("JSON Payload: %s"), and call it whenever their logger takes DEBUG, which it does
    during every send (its DEBUG lines classify a failure, `apprise_lines`). That line is
    never formatted during a send (`apprise_lines` skips it before any record is made),
    yet walking the payload was about 3 % of an SMS's CPU in Apprise (cProfile,
    `benchmarks.apprise_probe`). Outside a send the line reads as it always did."""

    __slots__ = ("_payload", "_kwargs", "_shown")

    def __init__(self, payload: Any, **kwargs: Any) -> None:
        self._payload, self._kwargs = payload, kwargs

    def _sanitized(self) -> Any:
        try:
            return self._shown
        except AttributeError:  # the first line to show it (each handler formats it)
            self._shown: Any = _apprise_sanitize_payload(self._payload, **self._kwargs)
            return self._shown

    def __str__(self) -> str:
        return str(self._sanitized())

    def __repr__(self) -> str:
        return repr(self._sanitized())

    def __format__(self, spec: str) -> str:
        return format(self._sanitized(), spec)


def _sanitize_when_shown() -> None:
    """Put `_PayloadForDebug` where Apprise's plugins look `sanitize_payload` up: its module
    (for the plugins imported later, worker/apprise_plugins.py) and the plugins imported
    already."""
    if apprise_sanitize.sanitize_payload is _apprise_sanitize_payload:
        apprise_sanitize.sanitize_payload = _PayloadForDebug  # type: ignore[assignment]
    prefix = N_MGR.module_name_prefix + "."
    for name, module in list(sys.modules.items()):
        if (name.startswith(prefix) and module is not None
                and getattr(module, "sanitize_payload", None) is _apprise_sanitize_payload):
            module.sanitize_payload = _PayloadForDebug  # type: ignore[attr-defined]


_sanitize_when_shown()


def _notify(notifier: apprise.Apprise, message: RenderedMessage) -> str:
    # The HTML body if there is one and the service takes HTML, else None (the text).
    html = message.html if message.html is not None and "html" in _formats(notifier) else None
    attach = _apprise_attachments(message.attachments) if message.attachments else None
    answers: list[int] = []
    token, sending = _http_answers.set(answers), _in_send.set(True)
    # An HTML email's plain part is the step's own text, not Apprise's conversion of the HTML.
    plain = email_mime.plain_text.set(message.text if html is not None else None)
    try:
        with apprise_lines.capturing() as lines:  # what Apprise logs for this send
            result = notifier.notify(
                body=html if html is not None else message.text,
                title=message.subject or "",
                body_format=(apprise.NotifyFormat.TEXT if html is None
                             else apprise.NotifyFormat.HTML),
                attach=attach,
                log_level=apprise_lines.NO_CAPTURE,  # kept by `capturing`, more cheaply
            )
    finally:
        email_mime.plain_text.reset(plain)
        _in_send.reset(sending)
        _http_answers.reset(token)
    with result:
        if result:
            return "sent through Apprise"
        status = result.status.name
    # Warnings and errors, and the socket or plugin error; not the DEBUG lines that echo
    # the payload or the provider's response body.
    raise classify(status, apprise_lines.classified_lines(lines), answers)


# Apprise refuses an attachment whose MIME type is not in the stdlib's `mimetypes.types_map`,
# which `mimetypes.init()` fills on first use: the stdlib's built-in table, then the
# system's files (/etc/mime.types, Debian's media-types). Set up here, at import, before any
# sender thread: `init()` marks itself done before it has read the files, so a thread making
# an invite while another's first `init()` still read them saw the built-in table, which has
# no text/calendar, and the send failed ("An invalid mime-type"). And told text/calendar
# itself: an image without media-types (python:3.11-slim) has no such file, and every
# invite was refused. (tests/test_invite_mime_types.py)
# Of the system's files nothing here needs anything (the only attachment is the invite,
# whose type is told here): the table is the built-in one (`init()` with `knownfiles`
# empty; `init(files=[])` would still read them the first time), which spared each pool
# process the system file's 1,500 types (about 0.35 MB, benchmarks/rss_probe.py). Set up
# already (by a library imported before this module): kept as it is.
def _set_up_mime_types() -> None:
    if not mimetypes.inited:
        system_files = mimetypes.knownfiles
        mimetypes.knownfiles = []
        try:
            mimetypes.init()
        finally:
            mimetypes.knownfiles = system_files
    mimetypes.add_type("text/calendar", ".ics")


_set_up_mime_types()


def _apprise_attachments(attachments: Sequence[Attachment]) -> apprise.AppriseAttachment:
    """Return the attachments as Apprise's in-memory attachments.

    Apprise accepts a bare MIME type only ("text/calendar") and its email plugin writes it
    as the part's Content-Type; ours carries parameters ("text/calendar; method=REQUEST;
    charset=UTF-8", which calendar programs read), so it is set after the check.
    """
    out = apprise.AppriseAttachment()
    for a in attachments:
        bare = a.mimetype.split(";", 1)[0].strip()
        memory = AttachMemory(  # type: ignore[no-untyped-call]  # Apprise: untyped
            content=a.data, name=a.name, mimetype=bare)
        if getattr(memory, "_mimetype", None) == bare:
            memory._mimetype = a.mimetype
        out.add(memory)
    return out


def _formats(notifier: apprise.Apprise) -> set[str]:
    """Return the body formats ("html", "text", ...) the loaded service accepts."""
    formats: set[str] = set()
    for service in notifier:
        fmt = getattr(service, "notify_format", None)
        for f in fmt if isinstance(fmt, (tuple, list, set)) else [fmt]:
            if f is not None:
                formats.add(str(getattr(f, "value", f)))
    return formats


def warm_up(urls: Iterable[str] = ()) -> None:
    """Load the Apprise plugins of `urls` (the channel URLs, `{to}` and `${SECRET}` unfilled)
    now, so the first message of a process is not slower; only those (another one loads at
    its first message: worker/apprise_plugins.py)."""
    load_plugins(schema_of(url) for url in urls)


def write_outbox(folder: Path, envelope: Envelope, message: RenderedMessage, now: datetime,
                 headers: Mapping[str, str] | None = None) -> Path:
    """Write one message to the outbox as a readable file; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y%m%dT%H%M%S%f}-{_SAFE_NAME.sub('-', envelope.ref)}"
    if envelope.channel == "email":
        mail = EmailMessage(policy=_READABLE)  # headers on one line each: easy to read
        mail["To"] = envelope.to
        mail["Subject"] = message.subject or ""
        mail["X-Reminder"] = envelope.ref
        mail["Date"] = now.strftime("%a, %d %b %Y %H:%M:%S +0000")
        for name, value in (headers or {}).items():
            mail[name] = value
        mail.set_content(message.text)
        if message.html is not None:
            mail.add_alternative(message.html, subtype="html")
        for a in message.attachments:
            kind, _, params = a.mimetype.partition(";")
            maintype, subtype = kind.strip().split("/", 1)
            extra = dict(p.strip().split("=", 1) for p in params.split(";") if "=" in p)
            extra.pop("charset", None)
            mail.add_attachment(a.data, maintype=maintype, subtype=subtype, filename=a.name,
                                params=extra)
        path, data = folder / f"{stem}.eml", mail.as_bytes()
    else:
        text = (
            f"To: {envelope.to}\nChannel: sms\nReminder: {envelope.ref}\n"
            f"Date: {now.isoformat()}\n\n{message.text}\n"
        )
        path, data = folder / f"{stem}.sms.txt", text.encode("utf-8")
    # Written under a hidden name, then renamed: whoever lists the outbox sees whole
    # messages only (a listing mid-write once counted a half-written SMS as a message).
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "xb") as fh:  # never overwrite: two writes would be two files
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    log.info("outbox: %s message for %s written to %s", envelope.channel, envelope.ref, path.name)
    return path


def deliver(
    url: str | None,
    envelope: Envelope,
    message: RenderedMessage,
    *,
    outbox: Path,
    timeout: float,
    now: datetime,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Send `message`: through Apprise if the clinic has a URL for the channel, else the outbox.

    `headers`: extra email headers (List-Unsubscribe); other channels take none.
    """
    if envelope.channel != "email":
        headers = None
    if url is None:
        try:
            path = write_outbox(outbox, envelope, message, now, headers)
            return f"written to the outbox as {path.name}"
        except OSError as exc:
            raise DeliveryError(
                f"cannot write to the outbox ({exc.strerror})", permanent=False
            ) from None
    # `to`: an email's address (on the SMS channel {to} is a number, perhaps part of an
    # email-to-SMS gateway's address: the URL's own).
    return send_apprise(url, message, timeout, headers if _is_email_url(url) else None,
                        to=envelope.to if envelope.channel == "email" else None)


def _is_email_url(url: str) -> bool:
    """Whether Apprise sends `url` with its email plugin (where `+Name=value` is a header;
    on another service it would be something else, an HTTP header of a webhook)."""
    return url.split("://", 1)[0].lower() in ("mailto", "mailtos")
