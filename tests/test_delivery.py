"""Delivery: failure classification, the outbox, and real plugins at the network edge."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
import responses
from aiosmtpd.controller import Controller
from celery.exceptions import SoftTimeLimitExceeded

from tests.sinks import HttpSink, SmtpSink
from worker.clinics import Clinic
from worker.delivery import (
    Envelope,
    classify,
    deliver,
    send_apprise,
    with_timeouts,
    write_outbox,
)
from worker.embedded import free_port
from worker.errors import ConfigError, DeliveryError
from worker.rendering import RenderedMessage

NOW = datetime(2026, 11, 28, 17, 0, 1, tzinfo=UTC)
SID, TOKEN, FROM = "AC" + "0123456789abcdef" * 2, "f" * 32, "+15017122661"
SMS = RenderedMessage("sms", None, "Ana, deja la tretinoina esta noche. Glow Skin Clinic", None)
MAIL = RenderedMessage(
    "email",
    "Tu cita de microneedling del sábado 5 de diciembre de 2026 - Glow Skin Clinic",
    "Hola Ana,\nnos vemos pronto.",
    "<p>Hola <b>Ana</b>,</p><p>nos vemos pronto.</p>",
)


def clinic(**channels: str) -> Clinic:
    return Clinic(
        id="glow",
        name="Glow Skin Clinic",
        phone="+34910000000",
        timezone="Europe/Madrid",
        channels=channels,
    )


# Lines as Apprise 2.2.0 captures them for one call (its warnings and the socket error).
REFUSED = (
    "Socket Exception: HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded "
    'with url: /sms (Caused by NewConnectionError("HTTPConnection(host=\'127.0.0.1\', '
    'port=9): Failed to establish a new connection: [Errno 111] Connection refused"))'
)
NO_DNS = (
    "Socket Exception: HTTPConnectionPool(host='sms.invalid', port=80): Max retries exceeded "
    "with url: /sms (Caused by NameResolutionError(\"HTTPConnection(host='sms.invalid', "
    "port=80): Failed to resolve 'sms.invalid' ([Errno -2] Name or service not known)\"))"
)
READ_TIMEOUT = (
    "Socket Exception: HTTPConnectionPool(host='127.0.0.1', port=9): Read timed out. "
    "(read timeout=5.0)"
)
ABORTED = (
    "Socket Exception: ('Connection aborted.', "
    "RemoteDisconnected('Remote end closed connection without response'))"
)
JSON_CONN = "A Connection error occurred sending JSON notification to 127.0.0.1."
SMTP_CONN = 'Connection error while submitting email to "127.0.0.1"'
SMTP_FAILED = 'Sending email to "x@example.com" failed.'


@pytest.mark.parametrize(
    ("status", "lines", "answers", "kind", "reason"),
    [
        ("TIMEOUT", [], [], "unknown", "stopped waiting"),
        ("FAILURE", ["Failed to send JSON POST notification: Bad Request, error=400."], [400],
         "permanent", "HTTP 400"),
        ("FAILURE", ["Failed to send Twilio notification: error=404."], [], "permanent",
         "HTTP 404"),
        ("FAILURE", ["error=408."], [408], "transient", "HTTP 408"),
        ("FAILURE", ["error=429."], [429], "transient", "HTTP 429"),
        ("FAILURE", ["error=500."], [], "transient", "HTTP 500"),
        ("FAILURE", ["error=503."], [503], "transient", "HTTP 503"),
        # Twilio logs its own error code; the HTTP status urllib3 received decides first.
        ("FAILURE", ["Failed to send Twilio notification to +3460: error=21211."], [],
         "permanent", "error 21211"),
        ("FAILURE", ["Failed to send Twilio notification to +3460: error=20429."], [],
         "transient", "error 20429"),
        ("FAILURE", ["Failed to send Twilio notification to +3460: error=20500."], [],
         "transient", "error 20500"),
        ("FAILURE", ["Failed to send Twilio notification to +3460: error=20500."], [503],
         "transient", "HTTP 503"),
        ("FAILURE", ["Failed to send Twilio notification to +3460: error=21211."], [400],
         "permanent", "HTTP 400"),
        ("FAILURE", [SMTP_FAILED, "Socket Exception: {'a@b.c': (550, b'5.1.1 No such user')}"],
         [], "permanent", "SMTP 550"),
        ("FAILURE", [SMTP_FAILED, "Socket Exception: (451, b'4.3.0 try later')"], [],
         "transient", "SMTP 451"),
        ("FAILURE", ["SMTP recipient a@b.c was refused: 550 b'5.1.1 No such user'"], [],
         "permanent", "SMTP 550"),
        ("FAILURE", [SMTP_CONN, "Socket Exception: (535, b'5.7.8 Authentication failed')"], [],
         "permanent", "SMTP 535"),
        ("FAILURE", [SMTP_CONN, "Socket Exception: [Errno 111] Connection refused"], [],
         "transient", "could not connect"),
        ("FAILURE", [SMTP_CONN, "Socket Exception: timed out"], [], "transient",
         "could not connect"),
        ("FAILURE", [SMTP_FAILED, "Socket Exception: Connection unexpectedly closed"], [],
         "unknown", "may have been delivered"),
        ("FAILURE", [SMTP_FAILED, "Socket Exception: timed out"], [], "unknown",
         "may have been delivered"),
        ("FAILURE", [JSON_CONN, REFUSED], [], "transient", "could not connect"),
        ("FAILURE", [JSON_CONN, NO_DNS], [], "transient", "could not connect"),
        ("FAILURE", [JSON_CONN, READ_TIMEOUT], [], "unknown", "may have been delivered"),
        ("FAILURE", [JSON_CONN, ABORTED], [], "unknown", "may have been delivered"),
        # An OS error number is no SMTP reply code.
        ("FAILURE", [JSON_CONN, "Socket Exception: ('Connection aborted.', "
                     "ConnectionResetError(104, 'Connection reset by peer'))"], [], "unknown",
         "may have been delivered"),
        ("FAILURE", [SMTP_FAILED, "Socket Exception: [Errno 104] Connection reset by peer"],
         [], "unknown", "may have been delivered"),
        ("FAILURE", [JSON_CONN], [], "unknown", "may have been delivered"),
        ("FAILURE", ["Notification service 'JSON' raised an exception.",
                     "Notification Exception: SoftTimeLimitExceeded()"], [], "unknown",
         "ran out of time"),
        ("FAILURE", ["Notification service 'Twilio' raised an exception.",
                     "Notification Exception: 'NoneType' object is not subscriptable"], [],
         "unknown", "plugin failed"),
        ("FAILURE", ["There are no valid Twilio targets to notify."], [], "permanent",
         "refused"),
        ("FAILURE", ["something odd"], [], "transient", "reported a failure"),
    ],
)
def test_classify(status, lines, answers, kind, reason):
    error = classify(status, lines, answers)
    assert (error.permanent, error.unknown) == {
        "permanent": (True, False), "transient": (False, False), "unknown": (False, True)
    }[kind]
    assert reason in error.reason


def test_an_unknown_outcome_is_never_permanent():
    assert DeliveryError("x").permanent is False and DeliveryError("x").unknown is False
    with pytest.raises(ValueError, match="unknown outcome"):
        DeliveryError("x", permanent=True, unknown=True)


def test_timeouts_are_added_unless_the_url_sets_them():
    assert with_timeouts("json://h/p?:to=+34600", 5) == "json://h/p?:to=+34600&cto=5&rto=5"
    assert with_timeouts("mailto://h?to=a@b.c&rto=9", 5) == "mailto://h?to=a@b.c&rto=9&cto=5"
    assert with_timeouts("twilio://s:t@f/+3460", 2.5) == "twilio://s:t@f/+3460?cto=2.5&rto=2.5"
    assert with_timeouts("x://h?cto=1&rto=1", 5) == "x://h?cto=1&rto=1"


def test_channel_url_takes_secrets_from_the_environment_only():
    c = clinic(sms="twilio://${TW_SID}:${TW_TOKEN}@${TW_FROM}/{to}")
    env = {"TW_SID": SID, "TW_TOKEN": TOKEN, "TW_FROM": FROM}
    assert c.channel_url("sms", "+34600111222", env) == (
        f"twilio://{SID}:{TOKEN}@%2B15017122661/+34600111222"
    )  # secrets fully quoted
    assert c.missing_secrets({}) == ["TW_FROM", "TW_SID", "TW_TOKEN"]
    with pytest.raises(ConfigError, match="TW_SID is not set"):
        c.channel_url("sms", "+34600111222", {})


@responses.activate
def test_twilio_plugin_posts_exactly_this_form():
    """The real Apprise Twilio plugin; only its HTTPS call is intercepted."""
    api = f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
    responses.add(responses.POST, api, json={"sid": "SM1"}, status=201)
    url = clinic(sms="twilio://${TW_SID}:${TW_TOKEN}@${TW_FROM}/{to}").channel_url(
        "sms", "+34600111222", {"TW_SID": SID, "TW_TOKEN": TOKEN, "TW_FROM": FROM}
    )
    envelope = Envelope(
        ref="glow/A-1042/stop-retinoids:sms", clinic="glow", channel="sms", to="+34600111222"
    )
    assert deliver(url, envelope, SMS, outbox=None, timeout=5, now=NOW) == "sent through Apprise"
    (call,) = responses.calls
    assert call.request.url == api
    assert call.request.headers["Authorization"].startswith("Basic ")
    assert parse_qs(call.request.body) == {
        "Body": [SMS.text],
        "From": [FROM],
        "To": ["+34600111222"],
    }


@pytest.mark.parametrize(
    ("status", "body", "permanent", "reason"),
    [
        (
            400,
            {"code": 21211, "message": "Invalid 'To' Phone Number"},
            True,
            "provider error 21211",
        ),
        (401, {"code": 20003, "message": "Authenticate"}, True, "provider error 20003"),
        (429, {"code": 20429, "message": "Too Many Requests"}, False, "provider error 20429"),
        (500, {"code": 20500, "message": "Internal Server Error"}, False, "provider error 20500"),
        (503, None, False, "HTTP 503"),
        (400, None, True, "HTTP 400"),
    ],
)
@responses.activate
def test_twilio_errors_are_classified(status, body, permanent, reason):
    """Twilio's real error bodies (its error code replaces the HTTP status in Apprise's log)."""
    api = f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
    if body is None:
        responses.add(responses.POST, api, body="unavailable", status=status)
    else:
        responses.add(responses.POST, api, json=body, status=status)
    url = f"twilio://{SID}:{TOKEN}@%2B15017122661/%2B34600111222"
    with pytest.raises(DeliveryError) as info:
        deliver(
            url,
            Envelope("r/b/k", "glow", "sms", "+34600111222"),
            SMS,
            outbox=None,
            timeout=5,
            now=NOW,
        )
    assert info.value.permanent is permanent and info.value.unknown is False
    assert reason in info.value.reason
    (call,) = responses.calls  # Apprise's own retries are off
    assert call.request.url == f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
    assert parse_qs(call.request.body) == {"Body": [SMS.text], "From": [FROM],
                                           "To": ["+34600111222"]}


def test_email_through_a_real_smtp_server_has_subject_html_and_text():
    sink = SmtpSink().start()
    try:
        url = clinic(
            email=f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example&to={{to}}&mode=insecure"
        ).channel_url("email", "ana@example.com")
        deliver(
            url,
            Envelope("glow/A-1042/prep:email", "glow", "email", "ana@example.com"),
            MAIL,
            outbox=None,
            timeout=5,
            now=NOW,
        )
    finally:
        sink.stop()
    (got,) = sink.snapshot()
    assert got.to == "ana@example.com"
    assert got.subject == MAIL.subject
    assert got.html.replace("\r\n", "\n").strip() == MAIL.html
    assert "Hola Ana" in got.text and "nos vemos pronto" in got.text
    assert got.raw.get_content_type() == "multipart/alternative"


def test_smtp_refusal_is_permanent_and_names_the_code():
    sink = SmtpSink(refuse_code="550 5.1.1 No such user").start()
    try:
        with pytest.raises(DeliveryError) as info:
            deliver(
                f"mailto://127.0.0.1:{sink.port}?from=h@g.example&to=x@example.com&mode=insecure",
                Envelope("r/b/k", "glow", "email", "x@example.com"),
                MAIL,
                outbox=None,
                timeout=5,
                now=NOW,
            )
    finally:
        sink.stop()
    assert info.value.permanent and "SMTP 550" in info.value.reason
    assert sink.snapshot() == []


def test_smtp_server_down_is_transient():
    port = SmtpSink().port  # reserved, never started
    with pytest.raises(DeliveryError) as info:
        deliver(
            f"mailto://127.0.0.1:{port}?from=h@g.example&to=x@example.com&mode=insecure",
            Envelope("r/b/k", "glow", "email", "x@example.com"),
            MAIL,
            outbox=None,
            timeout=2,
            now=NOW,
        )
    assert info.value.permanent is False
    assert info.value.unknown is False  # refused: nothing was handed over
    assert "could not connect" in info.value.reason


@pytest.mark.parametrize(("status", "permanent"), [(400, True), (503, False)])
def test_sms_gateway_over_http(status, permanent):
    sink = HttpSink().start()
    try:
        url = f"json://127.0.0.1:{sink.port}/sms?:to=%2B34600111222"
        env = Envelope("r/b/k", "glow", "sms", "+34600111222")
        assert deliver(url, env, SMS, outbox=None, timeout=5, now=NOW) == "sent through Apprise"
        sink.status = status
        with pytest.raises(DeliveryError) as info:
            deliver(url, env, SMS, outbox=None, timeout=5, now=NOW)
    finally:
        sink.stop()
    assert info.value.permanent is permanent
    (ok,) = sink.snapshot()
    assert ok.raw["message"] == SMS.text and ok.raw["to"] == "+34600111222"


def test_an_sms_gateway_answer_whose_body_never_ends_is_sent_by_its_status():
    # The gateway accepts the SMS (200) and then its body trickles on (a proxy holding the
    # connection, a streaming answer), each byte inside the read timeout: the send read it
    # until the attempt's time limit, far past send_timeout_seconds. A worker then records
    # the send as of unknown outcome (or its watchdog ends the process) and sends the SMS
    # again once its ledger expires: twice. As a clinic's webhook (56b1565), the status
    # decides; the body is read for at most the read timeout.
    sink = HttpSink().start()
    sink.trickle_seconds = 20.0
    try:
        url = f"json://127.0.0.1:{sink.port}/sms?:to=%2B34600111222"
        env = Envelope("r/b/k", "glow", "sms", "+34600111222")
        began = time.monotonic()
        assert deliver(url, env, SMS, outbox=None, timeout=1, now=NOW) == "sent through Apprise"
        took = time.monotonic() - began
    finally:
        sink.stop()
    assert took < 5, took
    (ok,) = sink.snapshot()
    assert ok.raw["message"] == SMS.text and ok.raw["to"] == "+34600111222"


class Gateway:
    """A real HTTP SMS gateway on 127.0.0.1 for Apprise's json:// posts.

    Answers `status`, or with `status = None` reads the request and never answers
    (until stopped): the request was handed over, the outcome is unknown to the sender.
    """

    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = gateway.status
                with gateway._lock:
                    gateway.received.append(body)
                if status is None:
                    gateway._release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def url(self, to: str = "%2B34600111222") -> str:
        return f"json://127.0.0.1:{self.port}/sms?:to={to}"

    def __enter__(self) -> Gateway:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def failure(url: str, message: RenderedMessage = SMS, timeout: float = 5) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        send_apprise(url, message, timeout)
    return info.value


@pytest.mark.parametrize(
    ("status", "permanent"), [(400, True), (404, True), (429, False), (503, False)]
)
def test_an_http_answer_is_classified_by_its_status(status, permanent):
    with Gateway(status) as gateway:
        error = failure(gateway.url())
    assert (error.permanent, error.unknown) == (permanent, False)
    assert error.reason == f"HTTP {status} from the provider"
    assert [r["to"] for r in gateway.received] == ["+34600111222"]


def test_no_answer_after_the_request_was_sent_is_unknown():
    with Gateway(status=None) as gateway:
        started = time.monotonic()
        error = failure(gateway.url(), timeout=1)
        elapsed = time.monotonic() - started
    assert (error.permanent, error.unknown) == (False, True)
    assert "may have been delivered" in error.reason
    assert [r["message"] for r in gateway.received] == [SMS.text]  # it did arrive
    assert elapsed < 5  # bounded by the read timeout, not by the server


def test_a_soft_time_limit_during_a_send_is_unknown():
    """Celery's soft time limit is a signal raising in the sending thread, as here."""

    def time_is_up(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, time_is_up)
    try:
        with Gateway(status=None) as gateway:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            error = failure(gateway.url(), timeout=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert (error.permanent, error.unknown) == (False, True)
    assert error.reason.startswith("the send ran out of time")
    assert [r["message"] for r in gateway.received] == [SMS.text]


def test_connection_refused_is_transient_and_not_unknown():
    error = failure(f"json://127.0.0.1:{free_port()}/sms?:to=%2B34600111222")
    assert (error.permanent, error.unknown) == (False, False)
    assert error.reason == "could not connect to the provider"


def test_connect_timeout_is_transient_and_not_unknown():
    # A listening socket whose accept queue is full: the kernel drops further SYNs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            error = failure(f"json://127.0.0.1:{port}/sms?:to=%2B34600111222", timeout=0.5)
        finally:
            for filler in fillers:
                filler.close()
    assert (error.permanent, error.unknown) == (False, False)
    assert error.reason == "could not connect to the provider"


class MailServer:
    """A real aiosmtpd server that answers DATA with `reply`, or (reply None) reads the
    message and closes the connection without answering."""

    def __init__(self, reply: str | None) -> None:
        self.reply = reply
        self.port = free_port()
        self.messages: list[bytes] = []
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope.original_content or envelope.content)
        if self.reply is None:
            server.transport.abort()  # after the whole message was handed over
            return "250 never sent"
        return self.reply

    def url(self) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=h@g.example&to=x@example.com&mode=insecure"

    def __enter__(self) -> MailServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


@pytest.mark.parametrize(
    ("reply", "kind", "reason"),
    [
        ("451 4.3.0 Try again later", "transient", "SMTP 451 from the mail server"),
        ("550 5.7.1 Message refused", "permanent", "SMTP 550 from the mail server"),
        (None, "unknown", "may have been delivered"),
    ],
)
def test_an_smtp_answer_to_data_is_classified(reply, kind, reason):
    with MailServer(reply) as server:
        error = failure(server.url(), MAIL)
    assert (error.permanent, error.unknown) == {
        "permanent": (True, False), "transient": (False, False), "unknown": (False, True)
    }[kind]
    assert reason in error.reason
    (message,) = server.messages  # in each case the message was handed over
    assert b"x@example.com" in message


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


SENDERS, ROUNDS = 8, 4


def test_concurrent_sends_are_each_classified_by_their_own_answer():
    """Half the threads meet a gateway answering 400, half one answering 200 or 503."""
    watched = ("apprise", "urllib3", "urllib3.connectionpool")
    levels = {name: logging.getLogger(name).level for name in watched}
    root, recorder = logging.getLogger(), Recorder()
    root_level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)  # anything that propagates would be recorded

    def send(refusing: Gateway, other: Gateway, i: int, start: threading.Barrier) -> object:
        gateway = refusing if i % 2 == 0 else other
        start.wait()
        try:
            return send_apprise(gateway.url(f"%2B3460011122{i}"), SMS, 5)
        except DeliveryError as exc:
            return exc

    try:
        with Gateway(400) as refusing, Gateway() as other, ThreadPoolExecutor(SENDERS) as pool:
            for round_ in range(ROUNDS):
                other.status = 503 if round_ % 2 else 200
                start = threading.Barrier(SENDERS)
                outcomes = list(pool.map(send, [refusing] * SENDERS, [other] * SENDERS,
                                         range(SENDERS), [start] * SENDERS))
                for i, outcome in enumerate(outcomes):
                    if i % 2 == 0:
                        assert isinstance(outcome, DeliveryError), (round_, i, outcome)
                        assert (outcome.reason, outcome.permanent) == (
                            "HTTP 400 from the provider", True), (round_, i)
                    elif other.status == 200:
                        assert outcome == "sent through Apprise", (round_, i, outcome)
                    else:
                        assert isinstance(outcome, DeliveryError), (round_, i, outcome)
                        assert (outcome.reason, outcome.permanent, outcome.unknown) == (
                            "HTTP 503 from the provider", False, False), (round_, i)
            assert len(refusing.received) == len(other.received) == SENDERS // 2 * ROUNDS
    finally:
        root.removeHandler(recorder)
        root.setLevel(root_level)
    assert {name: logging.getLogger(name).level for name in watched} == levels
    leaked = [r for r in recorder.records if r.name.split(".")[0] in ("apprise", "urllib3")]
    assert leaked == []
    assert not any("+3460011122" in r.getMessage() or SMS.text in r.getMessage()
                   for r in recorder.records)


def test_url_apprise_cannot_load_is_permanent():
    with pytest.raises(DeliveryError) as info:
        deliver(
            "nosuchscheme://x/{to}",
            Envelope("r/b/k", "glow", "sms", "+3460"),
            SMS,
            outbox=None,
            timeout=5,
            now=NOW,
        )
    assert info.value.permanent and "cannot load" in info.value.reason


def test_outbox_writes_one_readable_file_per_message_and_never_overwrites(tmp_path, caplog):
    caplog.set_level("INFO")
    env = Envelope("glow/A-1042/prep:email", "glow", "email", "ana@example.com")
    first = write_outbox(tmp_path, env, MAIL, NOW)
    second = write_outbox(tmp_path, env, MAIL, NOW.replace(microsecond=2))
    assert first != second and len(list(tmp_path.iterdir())) == 2
    assert f"Subject: {MAIL.subject}\n".encode() in first.read_bytes()  # not folded
    mail = email.message_from_bytes(first.read_bytes(), policy=email.policy.default)
    assert mail["To"] == "ana@example.com" and mail["Subject"] == MAIL.subject
    assert mail.get_body(("html",)).get_content().strip() == MAIL.html
    assert mail.get_body(("plain",)).get_content().strip() == MAIL.text
    sms = write_outbox(
        tmp_path, Envelope("glow/A-1042/day-before:sms", "glow", "sms", "+34600111222"), SMS, NOW
    )
    assert sms.name.endswith(".sms.txt") and sms.read_text().endswith(SMS.text + "\n")
    # One log line per message, and never the contact or the body above DEBUG.
    lines = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert len(lines) == 3
    assert not any("ana@example.com" in x or "+34600111222" in x or "Hola" in x for x in lines)


def test_outbox_shows_no_half_written_message_to_a_listing(tmp_path, monkeypatch):
    """A reader listing the outbox while a message is being written sees only hidden files."""
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def listing_then_fsync(fd: int) -> None:  # the write is parked here, data not yet renamed
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_fsync(fd)

    monkeypatch.setattr("worker.delivery.os.fsync", listing_then_fsync)
    sms = write_outbox(
        tmp_path, Envelope("glow/A-1042/day-before:sms", "glow", "sms", "+34600111222"), SMS, NOW
    )
    (mid_write,) = seen
    assert len(mid_write) == 1 and mid_write[0].startswith(".") and mid_write[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == [sms.name]
