"""A channel URL's parse kept once per clinic URL (worker/delivery.py `_parsed`) makes the
same plugin, and what providers receive is the same, as parsing each message's URL did.

- The parse Apprise's plugin makes of each message's own URL equals the kept parse filled
  with that message's values, for URL forms of json://, jsons://, form://, xml://,
  mailto://, mailtos:// and twilio:// and recipients with "+", an apostrophe, non-ASCII
  letters, "%" and spaces; the forms it can keep are parsed once, the others every time.
- A real aiosmtpd and a real HTTP gateway on 127.0.0.1 receive the same (the envelope, the
  message's bytes but for its Date, Message-ID and boundaries; the request's method, path,
  headers and body), and each send ends the same (the detail, or the failure's reason and
  flags: 4xx, 5xx, a read timeout, an SMTP 451 and 550), with every URL parsed per message
  (before) and with the parse kept (after). Twilio's API at its fixed host, likewise.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
import responses
from aiosmtpd.controller import Controller
from apprise.apprise import N_MGR

from tests.test_email_wire import ICS, normalized
from worker import delivery
from worker.apprise_plugins import has_plugin, schema_of
from worker.clinics import with_sender
from worker.delivery import Envelope, deliver, with_headers, with_timeouts
from worker.dispatch import unsubscribe_headers
from worker.embedded import free_port
from worker.errors import DeliveryError
from worker.rendering import RenderedMessage

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
SID, TOKEN = "AC" + "a" * 32, "b" * 32

TEMPLATES = [
    "json://127.0.0.1:8080/sms?:to={to}",
    "jsons://user:pa55@sms.example.com/v1/send?:to={to}&+X-Token=abc&-q=1&:from=Glow",
    "json://sms.example.com/p?:phone={to}&:to=fixed&method=PUT&format=text",
    "json://sms.example.com/p?:to={to}&:to2={to}&:To={to}",  # twice, and a name's case
    "form://sms.example.com/x?:to={to}&:from=%2B34910000000",
    "xml://sms.example.com/x?:to={to}",
    "mailto://127.0.0.1:2525?from=hola@glow.example&to={to}&mode=insecure",
    "mailtos://u:p@smtp.glow.example?to={to}&from=Glow%20<hola@glow.example>&cc=a@glow.example",
    "mailto://smtp.glow.example?to={to}&bcc=b@glow.example&reply=r@glow.example",
    "mailto://smtp.glow.example?TO={to}",  # a name Apprise lowers: not kept (`_OPAQUE`)
    "mailto://smtp.glow.example?to={to};bcc=b@glow.example",  # ";": parsed every time
    "mailto://u:p@smtp.glow.example/{to}?from=hola@glow.example",  # in the path
    f"twilio://{SID}:{TOKEN}@%2B15017122661/{{to}}",
]
PHONES = ["+447700900123", "+34600111222", "+1 (202) 555-0100", "0034600111222"]
EMAILS = ["ana@example.com", "ana+tag@example.com", "o'brien@example.com",
          "ñandú@example.es", "ana@exämple.de", "a%25b@example.com", " ana@example.com ",
          "a,b@example.com"]


def message_url(template: str, to: str, sender: bool, headers: dict[str, str]) -> str:
    """The URL `deliver` hands to Apprise, as the send path builds it."""
    url = template.replace("{to}", quote(to, safe="+@"))  # Clinic.channel_url
    if sender:
        url = with_sender(url, "Glow Clinic", "hola@glow.example")
    return with_headers(with_timeouts(url, 5), headers)


def urls_of(template: str) -> list[str]:
    email = schema_of(template) in ("mailto", "mailtos")
    return [message_url(template, to, email, unsubscribe_headers(f"https://r.example/u/t{i}")
                        if email else {})
            for i, to in enumerate(EMAILS if email else PHONES)]


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_kept_parse_filled_is_the_plugins_parse_of_each_url(
        template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = schema_of(template)
    assert has_plugin(schema)
    plugin = N_MGR[schema]
    own = plugin.parse_url
    calls: list[str] = []

    def counted(url: str) -> Any:
        calls.append(url)
        return own(url)

    delivery._parsed_urls.clear()
    urls = urls_of(template)
    expected = [own(url) for url in urls]
    monkeypatch.setattr(plugin, "parse_url", staticmethod(counted))
    assert delivery._parsed(plugin, urls[0]) == expected[0]
    calls.clear()
    got = [delivery._parsed(plugin, url) for url in urls]
    assert got == expected
    for one, url in zip(got, urls, strict=True):  # each a dictionary of its own
        assert one is not None and one is not delivery._parsed(plugin, url)
    kept = ("?" in template and "{to}" in template.split("?", 1)[1] and ";" not in template
            and "TO=" not in template)
    if kept:  # parsed again only for a recipient the kept parse cannot take ("%")
        assert len(calls) == sum("%25" in url for url in urls)
    else:
        assert len(calls) >= len(urls) - 1  # each URL parsed (the first seen before)


def test_a_kept_parse_is_not_changed_by_a_plugin_changing_its_arguments() -> None:
    delivery._parsed_urls.clear()
    has_plugin("json")
    plugin = N_MGR["json"]
    url = message_url(TEMPLATES[1], PHONES[0], False, {})
    first = delivery._parsed(plugin, url)
    assert first is not None
    first["payload"]["to"] = "someone else"
    first["qsd"].clear()
    assert delivery._parsed(plugin, url) == plugin.parse_url(url)


# --- what the providers receive, before and after ---------------------------------------------


class Gateway(ThreadingHTTPServer):
    """Records each request (method, path, headers, body); answers by path: /bad 400,
    /busy 503, /slow after 1.5 s, else 200."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.requests.append((self.command, self.path,
                                            list(self.headers.items()), body))
                path = self.path.split("?")[0]
                if path.endswith("/slow"):
                    time.sleep(1.5)
                status = {"bad": 400, "busy": 503}.get(path.rsplit("/", 1)[-1], 200)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = do_GET = handle_one  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Mail:
    """aiosmtpd keeping each message's envelope and bytes; refuses a recipient whose
    mailbox starts with "full" (550) or "later" (451)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, list[str], bytes]] = []
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          options: Any) -> str:
        if address.startswith("full"):
            return "550 5.1.1 mailbox unavailable"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              normalized(envelope.original_content)))
        return "250 Message accepted"


@pytest.fixture
def providers() -> Iterator[tuple[Gateway, Mail]]:
    gateway, mail = Gateway(), Mail()
    thread = threading.Thread(target=gateway.serve_forever, daemon=True)
    thread.start()
    mail._controller.start()
    yield gateway, mail
    mail._controller.stop()
    gateway.shutdown()
    gateway.server_close()


EMAIL = RenderedMessage(channel="email", subject="Tu cita de mañana: Glow",
                        text="Hola Ana,\n\nTu cita es mañana a las 14:30.\n",
                        html="<p>Hola Ana,</p><p>Tu cita es mañana a las 14:30.</p>",
                        attachments=(ICS,))
PLAIN = RenderedMessage(channel="email", subject="Reminder", text="See you tomorrow.\n",
                        html=None)
SMS = RenderedMessage(channel="sms", subject=None, html=None,
                      text="Hola Ana, tu cita es mañana a las 14:30. STOP al 600")


def sends(gateway: Gateway, mail: Mail) -> list[tuple[str, str, str, RenderedMessage]]:
    """(channel URL template, recipient, channel, message) of a varied set of sends."""
    http, smtp = f"127.0.0.1:{gateway.port}", f"127.0.0.1:{mail.port}"
    out: list[tuple[str, str, str, RenderedMessage]] = []
    for to in ("+447700900123", "+34600111222", "+34 600 111 223"):
        out += [(f"json://{http}/sms?:to={{to}}", to, "sms", SMS),
                (f"json://u:p%40ss@{http}/v1?:to={{to}}&+X-Token=abc&-q=1", to, "sms", SMS),
                (f"form://{http}/form?:to={{to}}&:from=Glow", to, "sms", SMS),
                (f"xml://{http}/xml?:to={{to}}", to, "sms", SMS),
                (f"json://{http}/put?:phone={{to}}&method=PUT", to, "sms", SMS)]
    for path in ("bad", "busy", "slow"):
        out.append((f"json://{http}/{path}?:to={{to}}", "+447700900124", "sms", SMS))
    base = f"mailto://{smtp}?from=hola@glow.example&to={{to}}&mode=insecure"
    for to in ("ana@example.com", "ana+tag@example.com", "o'brien@example.com",
               "ana@exämple.de", "ñandú@example.es", "full@example.com",
               "later@example.com"):
        out += [(base, to, "email", EMAIL), (base + "&reply=r@glow.example", to, "email", PLAIN),
                (f"mailto://{smtp}?from=Glow%20<no-reply@glow.example>&to={{to}}"
                 "&mode=insecure&cc=desk@glow.example", to, "email", EMAIL)]
    return out


def run(gateway: Gateway, mail: Mail) -> list[Any]:
    outcomes: list[Any] = []
    for i, (template, to, channel, message) in enumerate(sends(gateway, mail)):
        url = template.replace("{to}", quote(to, safe="+@"))
        if channel == "email":
            url = with_sender(url, "Glow Clinic", "hola@glow.example")
        try:
            outcomes.append(deliver(
                url, Envelope(f"glow/P-{i}/prep:{channel}", "glow", channel, to),  # type: ignore[arg-type]
                message, outbox=None, timeout=0.5, now=NOW,  # type: ignore[arg-type]
                headers=unsubscribe_headers(f"https://r.glow.example/u/t{i}")))
        except DeliveryError as exc:
            outcomes.append((exc.reason, exc.permanent, exc.unknown))
    return outcomes


def received(gateway: Gateway, mail: Mail, act: Callable[[], list[Any]]) -> Any:
    outcomes = act()
    with gateway.lock:
        requests = list(gateway.requests)
        gateway.requests.clear()
    messages = list(mail.received)
    mail.received.clear()
    return outcomes, requests, messages


def test_providers_receive_the_same_with_the_parse_kept(
        providers: tuple[Gateway, Mail], monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, mail = providers
    with monkeypatch.context() as before:
        before.setattr(delivery, "_OPAQUE", {})  # every URL parsed for each message
        delivery._parsed_urls.clear()
        old = received(gateway, mail, lambda: run(gateway, mail))
    delivery._parsed_urls.clear()
    new = received(gateway, mail, lambda: run(gateway, mail))
    kept = [key for key, parse in delivery._parsed_urls.items() if parse is not None]
    assert any("NotifyJSON" in k for k in kept) and any("NotifyForm" in k for k in kept)
    assert any("NotifyXML" in k for k in kept) and any("NotifyEmail" in k for k in kept)
    assert new[0] == old[0]  # each send's outcome
    assert new[1] == old[1]  # each request as the gateway read it
    assert new[2] == old[2]  # each email: envelope and bytes
    outcomes, requests, messages = new
    # The set is what it claims to be: sent, refused, failed, timed out.
    # 15 SMS; 3 emails to each of ana, ana+tag, o'brien and exämple (ñandú's mailbox name
    # cannot be written in ASCII: refused before sending).
    assert outcomes.count("sent through Apprise") == 15 + 4 * 3
    assert ("HTTP 400 from the provider", True, False) in outcomes
    assert ("HTTP 503 from the provider", False, False) in outcomes
    assert any(isinstance(o, tuple) and o[2] for o in outcomes)  # the read timeout: unknown
    assert ("SMTP 550 from the mail server", True, False) in outcomes
    assert ("SMTP 451 from the mail server", False, False) in outcomes
    assert {m for m, *_ in requests} == {"POST", "PUT"}
    bodies = [json.loads(b) for m, p, h, b in requests if p.startswith("/sms")]
    assert [b["to"] for b in bodies] == ["+447700900123", "+34600111222", "+34 600 111 223"]
    assert [rcpt for _, rcpt, _ in messages if "ana+tag@example.com" in rcpt]
    assert any(b"List-Unsubscribe: <https://r.glow.example/u/t" in raw for *_, raw in messages)
    assert any(b"text/calendar" in raw for *_, raw in messages)


@responses.activate
def test_twilio_receives_the_same_with_the_parse_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    api = f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"

    def answer(request: Any) -> tuple[int, dict[str, str], str]:  # refuses one number
        if "To=%2B447700900123" in str(request.body):
            return 400, {}, json.dumps({"code": 21211, "message": "not a number"})
        return 201, {}, json.dumps({"sid": "SM1"})

    responses.add_callback(responses.POST, api, callback=answer)

    def twice() -> list[Any]:
        out: list[Any] = []
        for to in ("+34600111222", "+447700900123"):
            url = f"twilio://{SID}:{TOKEN}@%2B15017122661/{quote(to, safe='+@')}"
            try:
                out.append(deliver(url, Envelope("glow/P-1/prep:sms", "glow", "sms", to),
                                   SMS, outbox=None, timeout=2, now=NOW))  # type: ignore[arg-type]
            except DeliveryError as exc:
                out.append((exc.reason, exc.permanent, exc.unknown))
        return out

    with monkeypatch.context() as before:
        before.setattr(delivery, "_OPAQUE", {})
        old = twice()
    new = twice()
    assert new == old == ["sent through Apprise", ("provider error 21211", True, False)]
    calls = [(c.request.method, c.request.url, sorted(
        (k, v) for k, v in c.request.headers.items()), c.request.body) for c in responses.calls]
    assert calls[2:] == calls[:2]
    assert "To=%2B34600111222" in str(calls[0][3])
