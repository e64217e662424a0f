"""Where a reminder is sent: Apprise for real channels, the outbox for the embedded default.

`deliver()` returns a short detail on success or raises DeliveryError whose `permanent`
flag says whether retrying can help. One Apprise object per message, Apprise's own
retries off (its default of one attempt), socket timeouts bounded by the settings.
Nothing here logs a contact or a message body above DEBUG.
"""

from __future__ import annotations

import email.policy
import logging
import os
import re
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
# Apprise logs recipients (and at DEBUG, bodies). Keep all of it out of our logs: its
# lines are only read, in memory, to classify a failure.
_apprise_log = logging.getLogger("apprise")
_apprise_log.propagate = False
_apprise_log.addHandler(logging.NullHandler())
_urllib3_log = logging.getLogger("urllib3.connectionpool")

# HTTP statuses worth retrying; every other 4xx means the request itself is wrong.
TRANSIENT_HTTP = frozenset({408, 425, 429})
TRANSIENT_PROVIDER_CODES = frozenset({20429})
_PROVIDER_ERROR = re.compile(r"error=(\d{3,6})\.")
_WIRE_STATUS = re.compile(r'HTTP/\d(?:\.\d)?" (\d{3})')
_SMTP_CODE = re.compile(r"\((\d{3}), b?['\"]")
_READABLE = email.policy.default.clone(max_line_length=998, utf8=True)  # a file, not SMTP
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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


def classify(status: str, messages: list[str]) -> DeliveryError:
    """Return the DeliveryError for a failed Apprise result (its status and log lines)."""
    if status == "TIMEOUT":
        return DeliveryError("timed out", permanent=False)
    text = "\n".join(messages)
    # urllib3's own debug line carries the real HTTP status of requests-based plugins.
    wire = _WIRE_STATUS.findall(text)
    codes = [int(c) for c in _PROVIDER_ERROR.findall(text)]
    http = [int(c) for c in wire if not 200 <= int(c) < 300] or [c for c in codes if c < 1000]
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
    smtp = _SMTP_CODE.findall(text)
    if smtp:
        code = int(smtp[-1])
        # SMTP 5yz is a permanent rejection (550 no such mailbox); 4yz asks to retry later.
        return DeliveryError(f"SMTP {code} from the mail server", permanent=code >= 500)
    lowered = text.lower()
    if "connection" in lowered or "timed out" in lowered or "timeout" in lowered:
        return DeliveryError("could not connect to the provider", permanent=False)
    if "invalid" in lowered or "no valid" in lowered:
        return DeliveryError("the provider refused the address or message", permanent=True)
    return DeliveryError("the provider reported a failure", permanent=False)


def send_apprise(url: str, message: RenderedMessage, timeout: float) -> str:
    """Send one message through a fresh Apprise object; classify any failure."""
    notifier = apprise.Apprise()
    try:
        loaded = notifier.add(with_timeouts(url, timeout))
    except Exception as exc:  # a malformed URL can raise inside a plugin's parser
        raise DeliveryError(
            f"Apprise cannot load the channel URL ({type(exc).__name__})", permanent=True
        ) from None
    if not loaded:
        raise DeliveryError("Apprise cannot load the channel URL", permanent=True)
    html_ok = message.html is not None and "html" in _formats(notifier)
    body = message.html if html_ok else message.text
    collected = _Collect()
    loggers = (_apprise_log, _urllib3_log)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collected)
        lg.setLevel(logging.DEBUG)
    try:
        result = notifier.notify(
            body=body,
            title=message.subject or "",
            body_format=apprise.NotifyFormat.HTML if html_ok else apprise.NotifyFormat.TEXT,
            timeout=timeout * 2 + 1,  # a backstop: the socket timeouts should fire first
            log_level=logging.DEBUG,
        )
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.removeHandler(collected)
            lg.setLevel(lvl)
    if result:
        return "sent through Apprise"
    messages = [entry.message for entry in result.logs()] + collected.messages
    raise classify(result.status.name, messages)


class _Collect(logging.Handler):
    """Keep Apprise's log lines of one call in memory."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


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
