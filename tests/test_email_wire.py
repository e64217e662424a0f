"""What leaves the machine, checked at the far end (review of email_mime, apprise_lines and
the kept HTTP sessions): real aiosmtpd servers that keep the bytes they receive, real HTTP
gateways on 127.0.0.1.

- An email as received is the stdlib generator's text for the same message (Apprise's MIME
  tree), byte for byte but for its Date, Message-ID and boundaries; CRLF lines within 998
  octets; parsed with `policy.strict` it means what a message Python's stock generator
  writes with `policy.SMTP` means (headers, both alternatives, the .ics, the structure).
- A header with a line break from a clinic's configuration or a message header is refused
  before anything is handed over, and classified permanent (not "may have been delivered").
- Sends in several threads at once, to SMTP servers answering 250, 451, 550 or dropping the
  connection after DATA and to HTTP gateways answering 200, 400, 503 or nothing, are each
  classified from their own lines.
- A channel whose Apprise plugin the process did not load at its start sends at its first
  message; a scheme no plugin has fails for good, saying so.
- A thread's kept HTTP session carries no cookie nor credentials of one clinic's gateway to
  another's.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
from aiosmtpd.controller import Controller
from apprise.plugins.email import base as apprise_email

from tests.conftest import ROOT
from tests.sinks import HttpSink
from worker.clinics import with_sender
from worker.delivery import Envelope, deliver, send_apprise
from worker.email_mime import FastMIMEMultipart, FastMIMEText
from worker.embedded import free_port
from worker.errors import DeliveryError
from worker.invites import Attachment
from worker.rendering import RenderedMessage

NOW = datetime(2026, 11, 28, 17, 0, 1, tzinfo=UTC)
TO = "ana@example.com"
LONG_URL = "https://glow.example/aftercare/" + "a1b2c3d4" * 160 + "?t=" + "Zz09" * 40
ICS = Attachment("appointment.ics", "text/calendar; method=REQUEST; charset=UTF-8",
                 b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nSUMMARY:Cita ma\xc3\xb1ana"
                 b"\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
UNSUBSCRIBE = {"List-Unsubscribe": "<https://glow.example/u/" + "t0K3n" * 20 + ">",
               "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


class MailServer:
    """aiosmtpd keeping the bytes of each DATA; answers `reply` (None: drops the connection
    once the whole message was handed over, no answer)."""

    def __init__(self, reply: str | None = "250 Message accepted") -> None:
        self.reply = reply
        self.port = free_port()
        self.received: list[bytes] = []
        self.data_commands = 0
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.data_commands += 1
        self.received.append(envelope.original_content)
        if self.reply is None:
            server.transport.abort()
            return "250 never sent"
        return self.reply

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={quote(v, safe='@')}" for k, v in params.items())
        return (f"mailto://127.0.0.1:{self.port}?from=hola@glow.example&to={TO}&mode=insecure"
                + (f"&{query}" if query else ""))

    def __enter__(self) -> MailServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def send(url: str, message: RenderedMessage, headers: dict[str, str] | None = None,
         timeout: float = 5) -> str | DeliveryError:
    try:
        return deliver(url, Envelope("glow/A-1/prep:email", "glow", "email", TO), message,
                       outbox=None, timeout=timeout, now=NOW, headers=headers)
    except DeliveryError as exc:
        return exc


def normalized(raw: bytes) -> bytes:
    """The bytes with what differs between two sends of one message replaced: the clock
    (Date), the random Message-ID and the random boundaries (in order of appearance)."""
    raw = re.sub(rb"(?m)^(Date|Message-ID): .*$", rb"\1: -", raw)
    seen: dict[bytes, bytes] = {}
    return re.sub(rb"={15}\d+==(?:\.\d+)?",
                  lambda m: seen.setdefault(m[0], b"BOUNDARY%d" % len(seen)), raw)


def stock(subject: str, sender: str, name: str | None, html: str, text: str) -> bytes:
    """The same message from Python's stock generator, policy SMTP (folded at 78, CRLF);
    its plain part is the step's own text (not Apprise's conversion of the HTML)."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["Subject"] = subject
    msg["From"] = Address(display_name=name or "", addr_spec=sender)
    msg["To"] = TO
    for key, value in UNSUBSCRIBE.items():
        msg[key] = value
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    msg.add_attachment(ICS.data, maintype="text", subtype="calendar", filename=ICS.name,
                       params={"method": "REQUEST"})
    return msg.as_bytes()


def meaning(raw: bytes) -> dict[str, Any]:
    """What a reader takes from the message (strict parse: any defect raises)."""
    msg = message_from_bytes(raw, policy=policy.strict)
    assert msg.defects == [] and all(p.defects == [] for p in msg.walk())
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    (ics,) = list(msg.iter_attachments())
    return {
        "structure": [p.get_content_type() for p in msg.walk()],
        "subject": str(msg["Subject"]),
        "from": [(a.display_name, a.addr_spec) for a in msg["From"].addresses],
        "to": [a.addr_spec for a in msg["To"].addresses],
        "unsubscribe": (str(msg["List-Unsubscribe"]), str(msg["List-Unsubscribe-Post"])),
        "plain": plain.get_content().replace("\r\n", "\n").rstrip("\n") if plain else None,
        "html": html.get_content().replace("\r\n", "\n").rstrip("\n") if html else None,
        "ics": (ics.get_content_type(), ics.get_param("method"), ics.get_filename(),
                ics.get_payload(decode=True)),
    }


def valid_on_the_wire(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    lines = raw.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)  # CRLF only
    assert max(len(line) for line in lines) <= 998  # RFC 5322 2.1.1
    assert raw.isascii()  # no 8-bit data: the server did not announce SMTPUTF8/8BITMIME use


@pytest.mark.parametrize(("subject", "name"), [
    ("Preparing for your microneedling on 5 December 2026", None),
    ("Cómo prepararte para tu peeling químico del sábado, 5 de diciembre de 2026 — ñandú",
     "Clínica Glow Peñalara"),
    ("Tu cita ✨💆‍♀️ mañana, no olvides el protector solar 🌞", "Glow 💆 Skin"),
    ("您的预约提醒：明天下午两点的皮肤护理，请提前十分钟到达诊所", "光彩皮肤诊所"),
    ("After your chemical peel: " + "the weeks ahead, one day at a time; " * 6 + "Glow",
     "Glow Skin"),  # (subjects are rendered on one line, without trailing white space)
])
def test_an_email_received_is_the_stdlib_text_and_means_what_policy_smtp_writes(
        monkeypatch: pytest.MonkeyPatch, subject: str, name: str | None) -> None:
    html = (f"<p>Hola Ana,</p><p>Tu enlace: <a href=\"{LONG_URL}\">{LONG_URL}</a></p>"
            "<p>Nos vemos pronto. — Clínica Glow</p>")
    message = RenderedMessage("email", subject, f"Hola Ana,\n{LONG_URL}\n", html,
                              attachments=(ICS,))
    params = {"name": name} if name else {}
    with MailServer() as server:
        assert send(server.url(**params), message, UNSUBSCRIBE) == "sent through Apprise"
        # The same message built from the stdlib's classes (`as_string` by Python's Generator).
        monkeypatch.setattr(apprise_email, "MIMEMultipart", MIMEMultipart)
        monkeypatch.setattr(apprise_email, "MIMEText", MIMEText)
        assert send(server.url(**params), message, UNSUBSCRIBE) == "sent through Apprise"
        monkeypatch.undo()
        assert apprise_email.MIMEMultipart is FastMIMEMultipart
        assert apprise_email.MIMEText is FastMIMEText
    ours, stdlibs = server.received
    assert normalized(ours) == normalized(stdlibs)
    valid_on_the_wire(ours)
    expected = stock(subject, "hola@glow.example", name, html, message.text)
    valid_on_the_wire(expected)
    got, want = meaning(ours), meaning(expected)
    assert got == want
    assert got["subject"] == subject and LONG_URL in got["plain"] and LONG_URL in got["html"]
    assert got["plain"] == message.text.rstrip("\n")  # the step's own words, not converted


@pytest.mark.parametrize(("params", "headers"), [
    ({"name": "Glow Skin Clinic\r\nBcc: everyone@example.net"}, UNSUBSCRIBE),
    ({"name": "Glow\r\nX-Injected"}, UNSUBSCRIBE),
    ({"name": "Glow\n\nInjected body"}, UNSUBSCRIBE),
    ({"from": "hola@glow.example\r\nBcc: everyone@example.net"}, UNSUBSCRIBE),
    ({}, {"List-Unsubscribe": "<https://glow.example/u/x>\r\nBcc: everyone@example.net"}),
    ({}, {"List-Unsubscribe": "<https://glow.example/u/x>\nX-Injected"}),
    ({}, {"List-Unsubscribe": "<https://glow.example/u/x>\rX-Injected"}),
])
def test_a_header_with_a_line_break_is_refused_before_sending_and_permanent(
        params: dict[str, str], headers: dict[str, str]) -> None:
    message = RenderedMessage("email", "Tu cita", "Hola Ana", "<p>Hola Ana</p>",
                              attachments=(ICS,))
    with MailServer() as server:
        error = send(server.url(**params), message, headers)
        assert send(server.url(), message, UNSUBSCRIBE) == "sent through Apprise"  # still fine
    assert isinstance(error, DeliveryError)
    assert (error.permanent, error.unknown) == (True, False)
    assert "line break" in error.reason and "nothing was sent" in error.reason
    assert "everyone" not in error.reason and "Injected" not in error.reason
    assert server.data_commands == 1  # the good one only: the refused one never reached DATA
    assert b"everyone" not in server.received[0] and b"Injected" not in server.received[0]


# --- several sends at once, each classified by what its own send met -----------------------

class CutMidData:
    """An SMTP server that accepts the envelope, answers DATA with 354, reads the first
    bytes of the message and closes the connection: the message is cut mid-DATA."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 cut.example ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250 cut.example\r\n")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    conn.sendall(b"250 OK\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    lines.read(64)  # a little of the message, then the line goes dead
                    self.cut += 1
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                else:
                    conn.sendall(b"221 bye\r\n")
                    return

    def url(self) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=hola@glow.example&to={TO}&mode=insecure"

    def close(self) -> None:
        self.listener.close()


class Gateway(ThreadingHTTPServer):
    """An SMS gateway answering `status` (None: reads the request, never answers in time)."""

    daemon_threads = True

    def __init__(self, status: int | None, set_cookie: str | None = None) -> None:
        self.status = status
        self.seen: list[dict[str, str]] = []  # the headers of each request
        self.lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with gateway.lock:
                    gateway.seen.append(dict(self.headers))
                if gateway.status is None:
                    time.sleep(2)
                    return
                self.send_response(gateway.status)
                if set_cookie:
                    self.send_header("Set-Cookie", set_cookie)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.server_address[1]}/sms?:to=%2B34600111222"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def gateways() -> Iterator[dict[str, Gateway]]:
    made = {"sent": Gateway(200), "bad request": Gateway(400), "busy": Gateway(503),
            "silent": Gateway(None)}
    yield made
    for gateway in made.values():
        gateway.close()


EXPECTED = {
    "smtp 250": "sent through Apprise",
    "smtp 451": ("SMTP 451 from the mail server", False, False),
    "smtp 550": ("SMTP 550 from the mail server", True, False),
    "smtp dropped": ("the mail server connection was lost while sending; the message may "
                     "have been delivered", False, True),
    "smtp cut mid-DATA": ("the mail server connection was lost while sending; the message "
                          "may have been delivered", False, True),
    "sent": "sent through Apprise",
    "bad request": ("HTTP 400 from the provider", True, False),
    "busy": ("HTTP 503 from the provider", False, False),
    "silent": ("no answer from the provider after the request was sent; the message may "
               "have been delivered", False, True),
}


def test_sends_at_once_are_each_classified_by_their_own_outcome(
        gateways: dict[str, Gateway]) -> None:
    mail = RenderedMessage("email", "Tu cita mañana", "Hola Ana", "<p>Hola Ana</p>",
                           attachments=(ICS,))
    sms = RenderedMessage("sms", None, "Ana, tu cita es mañana. Glow", None)
    servers = {"smtp 250": MailServer(), "smtp 451": MailServer("451 4.3.0 Try again later"),
               "smtp 550": MailServer("550 5.7.1 Message refused"),
               "smtp dropped": MailServer(None)}
    cut = CutMidData()
    urls = {**{k: s.url() for k, s in servers.items()}, "smtp cut mid-DATA": cut.url(),
            **{k: g.url() for k, g in gateways.items()}}
    kinds = sorted(urls)
    rounds = 3
    for server in servers.values():
        server.__enter__()
    root, recorder = logging.getLogger(), Recorder()
    root_level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)  # anything that reaches the application's handlers
    try:
        with ThreadPoolExecutor(len(kinds)) as pool:
            for round_ in range(rounds):
                start = threading.Barrier(len(kinds))
                order = kinds[round_:] + kinds[:round_]  # a different thread each round

                def one(kind: str, start: threading.Barrier = start) -> tuple[str, object]:
                    start.wait(10)
                    got = (send(urls[kind], mail) if kind.startswith("smtp") else
                           send_apprise_caught(urls[kind], sms))
                    if isinstance(got, DeliveryError):
                        return kind, (got.reason, got.permanent, got.unknown)
                    return kind, got

                outcomes = dict(pool.map(one, order))
                assert outcomes == EXPECTED, round_
    finally:
        root.removeHandler(recorder)
        root.setLevel(root_level)
        cut.close()
        for server in servers.values():
            server.__exit__()
    # Nothing of Apprise or urllib3 (recipients, URLs, bodies) reached a handler, and no
    # record above DEBUG names the patient or carries the message.
    assert [r for r in recorder.records if r.name.split(".")[0] in ("apprise", "urllib3")] == []
    assert not [r for r in recorder.records if r.levelno > logging.DEBUG
                and r.name != "mail.log"  # (aiosmtpd: the test's servers, not the worker)
                and any(secret in r.getMessage()
                        for secret in (TO, "34600111222", "Hola Ana", "tu cita"))]
    assert cut.cut == rounds
    assert servers["smtp 250"].data_commands == rounds
    assert servers["smtp dropped"].data_commands == rounds
    assert len(gateways["silent"].seen) == rounds


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def send_apprise_caught(url: str, message: RenderedMessage) -> str | DeliveryError:
    try:
        return send_apprise(url, message, 1)
    except DeliveryError as exc:
        return exc


def test_no_cookie_nor_credentials_of_one_clinics_gateway_reach_anothers() -> None:
    """Both gateways on 127.0.0.1 (a cookie jar matches hosts, not ports): the one of clinic
    A takes its credentials and sets a session cookie; clinic B's, sent next from the same
    thread and kept session, sees neither, nor does A's cookie come back to A."""
    sms = RenderedMessage("sms", None, "Ana, tu cita es mañana. Glow", None)
    a = Gateway(200, set_cookie="session=clinic-a-secret; Path=/")
    b = Gateway(200)
    try:
        for _ in range(2):
            assert send_apprise(a.url("glow:s3cret-a@"), sms, 5) == "sent through Apprise"
            assert send_apprise(b.url(), sms, 5) == "sent through Apprise"
    finally:
        a.close()
        b.close()
    assert [h.get("Authorization", "").startswith("Basic ") for h in a.seen] == [True, True]
    assert [h.get("Cookie") for h in a.seen] == [None, None]
    assert [(h.get("Cookie"), h.get("Authorization")) for h in b.seen] == [(None, None)] * 2


def test_a_channel_whose_plugin_was_not_loaded_at_start_still_sends_or_fails_clearly() -> None:
    """A pool process warmed up with the email plugin only (the clinics it started with);
    then a clinic's SMS gateway (a new clinic, a changed configuration) sends at its first
    message, to a real gateway, and a scheme no plugin has fails for good, saying so."""
    sink = HttpSink().start()
    script = f"""
import json
from worker import delivery
from worker.apprise_plugins import plugins_loaded
from worker.errors import DeliveryError
from worker.rendering import RenderedMessage
delivery.warm_up(["mailto://127.0.0.1:2525?from=hola@glow.example&to={{to}}&mode=insecure"])
loaded = plugins_loaded()
sms = RenderedMessage("sms", None, "Ana, tu cita es mañana. Glow", None)
sent = delivery.send_apprise("json://127.0.0.1:{sink.port}/sms?:to=%2B34600111222", sms, 5)
try:
    delivery.send_apprise("nosuchscheme://127.0.0.1/x?to=%2B34600111222", sms, 5)
    unknown = None
except DeliveryError as exc:
    unknown = [exc.reason, exc.permanent, exc.unknown]
print(json.dumps([loaded, sent, unknown]))
"""
    try:
        result = subprocess.run([sys.executable, "-"], input=script, cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
    finally:
        sink.stop()
    assert result.returncode == 0, result.stderr
    loaded, sent, unknown = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == 1  # the email plugin only
    assert sent == "sent through Apprise"
    assert [(p.to, p.text) for p in sink.snapshot()] == [("+34600111222",
                                                          "Ana, tu cita es mañana. Glow")]
    assert unknown == ["Apprise cannot load the channel URL", True, False]


@pytest.mark.parametrize("subject", [
    "Cómo cuidar tu piel después del peeling químico, día a día: " * 13,  # 780 characters
    "Tu cita ✨💆‍♀️ mañana 🌞 " * 12,
    "After your chemical peel: the weeks ahead, one day at a time; " * 17,  # ASCII, 1,000+
])
def test_a_subject_too_long_for_one_smtp_line_is_folded_and_received_whole(subject: str):
    """Unfolded, each of these subjects is one header line over 998 characters, which the
    server refuses ("500 Line too long"): it is folded, and arrives as it was written."""
    subject = subject.strip()
    message = RenderedMessage("email", subject, "Hola Ana,\n", "<p>Hola Ana,</p>")
    with MailServer() as server:
        assert send(server.url(), message) == "sent through Apprise"
    (raw,) = server.received
    valid_on_the_wire(raw)
    assert meaning_of_subject(raw) == subject


def test_a_subject_that_fits_one_line_is_written_as_the_stdlib_writes_it():
    subject = "Cómo prepararte para tu peeling químico del sábado, 5 de diciembre de 2026"
    message = RenderedMessage("email", subject, "Hola Ana,\n", "<p>Hola Ana,</p>")
    with MailServer() as server:
        assert send(server.url(), message) == "sent through Apprise"
    (raw,) = server.received
    (line,) = [x for x in raw.split(b"\r\n") if x.startswith(b"Subject: ")]
    assert len(line) > 78  # one encoded word, unfolded, as Apprise's as_string() gives it
    assert meaning_of_subject(raw) == subject


def meaning_of_subject(raw: bytes) -> str:
    return str(message_from_bytes(raw, policy=policy.strict)["Subject"])



@pytest.mark.parametrize(("url", "shown"), [
    # The README's URL names the address only: the patient sees the clinic's name.
    ("mailto://127.0.0.1:{port}?from=hola@glow.example", ("Glow Skin Clinic",
                                                          "hola@glow.example")),
    # No from= at all: the login's address (not "Apprise", Apprise's own name for it).
    ("mailto://hola@localhost:{port}?", ("Glow Skin Clinic", "hola@localhost")),
    # A name the URL gives is the clinic's choice, kept.
    ("mailto://127.0.0.1:{port}?from=" + quote("Glow Madrid <hola@glow.example>"),
     ("Glow Madrid", "hola@glow.example")),
    ("mailto://127.0.0.1:{port}?from=hola@glow.example&name=Glow%20Madrid",
     ("Glow Madrid", "hola@glow.example")),
])
def test_a_patient_sees_the_clinics_name_as_the_sender(catalog, url: str,
                                                        shown: tuple[str, str]) -> None:
    """Apprise names a sender the URL gives no name "Apprise" (without from=) or writes its
    bare address: the send path's URL (`Clinic.delivery_url`) gives the clinic's name."""
    message = RenderedMessage(channel="email", subject="Tu cita", text="Hola, Ana:\n",
                              html="<p>Hola, Ana:</p>")
    with MailServer() as server:
        glow = catalog.clinics["glow"].model_copy(update={"channels": {
            "email": url.format(port=server.port).replace("?", "?to={to}&mode=insecure&", 1)
            .rstrip("&")}})
        assert send(glow.delivery_url("email", TO) or "", message) == "sent through Apprise"
    (address,) = message_from_bytes(server.received[0], policy=policy.default)["From"].addresses
    assert (address.display_name, address.addr_spec) == shown


@pytest.mark.parametrize(("url", "reply_to"), [
    # A sender address that is not the clinic's (a provider's no-reply): a patient's reply
    # ("the redness is worse") goes to the clinic's own address.
    ("mailto://127.0.0.1:{port}?from=no-reply@mail.glow.example", "hola@glow.example"),
    ("mailto://127.0.0.1:{port}?from=hola@glow.example", None),  # replies reach it already
    ("mailto://127.0.0.1:{port}?from=no-reply@mail.glow.example&reply=desk@glow.example",
     "desk@glow.example"),  # the URL's own choice, kept
])
def test_a_patients_reply_reaches_the_clinics_address(catalog, url: str,
                                                       reply_to: str | None) -> None:
    message = RenderedMessage(channel="email", subject="Tu cita", text="Hola, Ana:\n",
                              html="<p>Hola, Ana:</p>")
    with MailServer() as server:
        glow = catalog.clinics["glow"].model_copy(update={"channels": {
            "email": url.format(port=server.port) + "&to={to}&mode=insecure"}})
        assert glow.email == "hola@glow.example"
        assert send(glow.delivery_url("email", TO) or "", message) == "sent through Apprise"
    received = message_from_bytes(server.received[0], policy=policy.default)
    replies = received["Reply-To"]
    assert ([a.addr_spec for a in replies.addresses] if replies else None) == (
        [reply_to] if reply_to else None)


def test_a_clinic_name_with_a_line_break_is_one_line_as_the_from_name() -> None:
    # (a From header with a line break would be refused, every email dead-lettered)
    assert with_sender("mailto://smtp.example?from=hola@glow.example", "Glow\n Skin\tClinic") \
        == "mailto://smtp.example?from=hola@glow.example&name=Glow%20Skin%20Clinic"
    assert with_sender("json://sms.example/send", "Glow") == "json://sms.example/send"
