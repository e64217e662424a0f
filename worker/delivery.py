"""Where a reminder is sent: Apprise for real channels, the outbox for the embedded default.

`deliver()` returns a short detail on success or raises DeliveryError, whose flags say
whether retrying can help (`permanent`) and whether the message may have reached the
provider anyway (`unknown`). One Apprise object per message, Apprise's own retries off
(its default of one attempt), socket timeouts bounded by the settings, and the plugin run
in the calling thread (no Apprise deadline, so no hidden shared thread pool in which a
busy worker's sends would queue and "time out" before they start).

A failure is classified from what this one call observed, never from global state:
Apprise's result (its status and the lines it captured for this call, per context) and the
HTTP statuses urllib3 received for this send (handed over by a filter installed once, via
a ContextVar). Logger levels are set once, at import. Nothing from Apprise or urllib3
reaches the application's handlers (their lines carry recipients and URLs), and nothing
here logs a contact or a message body above DEBUG.
"""

from __future__ import annotations

import email.policy
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import apprise

from .errors import DeliveryError
from .models import Channel
from .rendering import RenderedMessage

log = logging.getLogger(__name__)

# HTTP statuses worth retrying; every other 4xx means the request itself is wrong.
TRANSIENT_HTTP = frozenset({408, 425, 429})
TRANSIENT_PROVIDER_CODES = frozenset({20429})
_PROVIDER_ERROR = re.compile(r"error=(\d{3,6})\.")
_WIRE_STATUS = re.compile(r'HTTP/\d(?:\.\d)?" (\d{3})')
# smtplib's errors print as "(550, b'5.1.1 ...')"; Apprise logs a partly refused
# recipient list as "SMTP recipient x was refused: 550 b'...'".
_SMTP_CODE = re.compile(r"\((\d{3}), b?['\"]|was refused: (\d{3})\b")
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
_KEPT_DEBUG = ("Socket Exception", "Notification Exception")
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


def _confine_library_logs() -> None:
    """Set, once, the loggers of Apprise and urllib3 as the classification needs them."""
    # Apprise logs recipients (and at DEBUG, bodies). Its lines are read only through the
    # result of notify(), which captures them per call; none propagate to our handlers.
    # DEBUG, because the socket error of a failed send is logged at DEBUG.
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
    for name in ("urllib3.connection", "urllib3.response", "urllib3.poolmanager",
                 "urllib3.util.retry"):
        logging.getLogger(name).addFilter(_KeepInTheSend(lambda: logging.NOTSET))


_confine_library_logs()


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
    if "invalid" in lowered or "no valid" in lowered:
        return DeliveryError("the provider refused the address or message", permanent=True)
    return DeliveryError("the provider reported a failure")


def send_apprise(url: str, message: RenderedMessage, timeout: float) -> str:
    """Send one message through a fresh Apprise object; classify any failure.

    Safe to call from many threads at once: nothing here changes shared state.
    """
    # No service deadline: the plugin runs in this thread, bounded by its socket timeouts.
    notifier = apprise.Apprise(asset=apprise.AppriseAsset(service_timeout=0))
    try:
        loaded = notifier.add(with_timeouts(url, timeout))
    except Exception as exc:  # a malformed URL can raise inside a plugin's parser
        raise DeliveryError(
            f"Apprise cannot load the channel URL ({type(exc).__name__})", permanent=True
        ) from None
    if not loaded:
        raise DeliveryError("Apprise cannot load the channel URL", permanent=True)
    # The HTML body if there is one and the service takes HTML, else None (the text).
    html = message.html if message.html is not None and "html" in _formats(notifier) else None
    answers: list[int] = []
    token = _http_answers.set(answers)
    try:
        result = notifier.notify(
            body=html if html is not None else message.text,
            title=message.subject or "",
            body_format=apprise.NotifyFormat.TEXT if html is None else apprise.NotifyFormat.HTML,
            log_level=logging.DEBUG,  # the socket error of a failed send is a DEBUG line
        )
    finally:
        _http_answers.reset(token)
    with result:  # releases the captured lines
        if result:
            return "sent through Apprise"
        # Warnings and errors, and the socket or plugin error; not the DEBUG lines that
        # echo the payload or the provider's response body.
        lines = [
            entry.message
            for entry in result.logs()
            if entry.level != "DEBUG" or entry.message.startswith(_KEPT_DEBUG)
        ]
        status = result.status.name
    raise classify(status, lines, answers)


def _formats(notifier: apprise.Apprise) -> set[str]:
    """Return the body formats ("html", "text", ...) the loaded service accepts."""
    formats: set[str] = set()
    for service in notifier:
        fmt = getattr(service, "notify_format", None)
        for f in fmt if isinstance(fmt, (tuple, list, set)) else [fmt]:
            if f is not None:
                formats.add(str(getattr(f, "value", f)))
    return formats


def warm_up() -> None:
    """Load Apprise's plugins now, so the first message of a process is not slower."""
    apprise.Apprise().add("json://127.0.0.1")


def write_outbox(folder: Path, envelope: Envelope, message: RenderedMessage, now: datetime) -> Path:
    """Write one message to the outbox as a readable file; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y%m%dT%H%M%S%f}-{_SAFE_NAME.sub('-', envelope.ref)}"
    if envelope.channel == "email":
        mail = EmailMessage(policy=_READABLE)  # headers on one line each: easy to read
        mail["To"] = envelope.to
        mail["Subject"] = message.subject or ""
        mail["X-Reminder"] = envelope.ref
        mail["Date"] = now.strftime("%a, %d %b %Y %H:%M:%S +0000")
        mail.set_content(message.text)
        if message.html is not None:
            mail.add_alternative(message.html, subtype="html")
        path, data = folder / f"{stem}.eml", mail.as_bytes()
    else:
        text = (
            f"To: {envelope.to}\nChannel: sms\nReminder: {envelope.ref}\n"
            f"Date: {now.isoformat()}\n\n{message.text}\n"
        )
        path, data = folder / f"{stem}.sms.txt", text.encode("utf-8")
    tmp = path.with_suffix(path.suffix + ".tmp")
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
) -> str:
    """Send `message`: through Apprise if the clinic has a URL for the channel, else the outbox."""
    if url is None:
        try:
            return f"written to the outbox as {write_outbox(outbox, envelope, message, now).name}"
        except OSError as exc:
            raise DeliveryError(
                f"cannot write to the outbox ({exc.strerror})", permanent=False
            ) from None
    return send_apprise(url, message, timeout)
