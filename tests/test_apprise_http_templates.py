"""A send's HTTP request prepared from the thread's template (`delivery._prepared_quickly`)
is the request `requests` itself makes, byte for byte on the wire: request line, headers
in order, body. A real HTTP server on 127.0.0.1 records each request as it arrives; every
shape is sent twice during a send (the template made, then used) and once through plain
`requests` outside a send, and the three must match."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from requests.auth import HTTPBasicAuth

from worker import delivery


class Wire(ThreadingHTTPServer):
    """Records each request's line, headers (in order) and body; answers 200, or a 307 to
    /moved for a path starting /redirect (as a gateway that moved does), a 301, 302, 303
    or 308 to /moved for /redirect-301 & co., and a 302 to this server under another host
    name (localhost) for /elsewhere."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]], bytes]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = self._chunked()
                else:
                    length = int(self.headers.get("Content-Length", 0))
                    body = self.rfile.read(length) if length else b""
                with server.lock:
                    server.seen.append((self.requestline, list(self.headers.items()), body))
                if self.path.startswith("/redirect-"):
                    self.send_response(int(self.path[len("/redirect-"):][:3]))
                    self.send_header("Location", "/moved")
                elif self.path.startswith("/redirect"):
                    self.send_response(307)
                    self.send_header("Location", "/moved")
                elif self.path.startswith("/elsewhere"):
                    self.send_response(302)
                    self.send_header(
                        "Location", f"http://localhost:{server.server_address[1]}/moved")
                else:
                    self.send_response(200)
                    self.send_header("Set-Cookie", "lb=node-7; Path=/")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def _chunked(self) -> bytes:
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk
                return body

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take(self) -> list[tuple[str, list[tuple[str, str]], bytes]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    server = Wire()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


APPRISE_HEADERS = {"User-Agent": "Apprise", "Content-Type": "application/json"}

# (method, path, keyword arguments) as Apprise's plugins and others call `requests`.
SHAPES: list[tuple[str, str, dict[str, Any]]] = [
    ("post", "/sms", {"data": '{"message": "Hi Ana", "to": "+34600111222"}',
                      "headers": APPRISE_HEADERS, "auth": ("user", "p@ss wörd"),
                      "verify": True, "timeout": (4.0, 4.0)}),
    # Apprise's form:// plugin: `files=None` when the message has no attachment.
    ("post", "/form-no-files", {"data": {"to": "+34600111222", "message": "Hola"},
                                "files": None, "headers": {"User-Agent": "Apprise"},
                                "auth": ("gw", "pw"), "timeout": 5}),
    ("post", "/form", {"data": {"To": "+34600111222", "Body": "Hola, ¿qué tal?"},
                       "headers": {"User-Agent": "Apprise", "Accept": "application/json"},
                       "params": {"a": "1 2", "b": "é&x"}, "timeout": 5}),
    ("get", "/get", {"params": {"to": "+34600111222", "text": "ok"}, "timeout": 5}),
    ("post", "/json", {"json": {"text": "Hi", "n": 1, "to": ["+34600111222"]},
                       "timeout": 5}),
    ("put", "/put?x=1", {"data": b"\x00\x01bytes", "headers": {"X-Token": b"abc"},
                         "timeout": 5}),
    ("post", "/empty", {"data": "", "headers": APPRISE_HEADERS, "timeout": 5}),
    ("delete", "/item/7", {"timeout": 5, "allow_redirects": False}),
    ("post", "/sms/é ü?q=ñ x", {"data": "x", "timeout": 5}),
    ("post", "/typed", {"data": "x", "headers": {"Content-Type": "text/plain"},
                        "json": {"ignored": True}, "timeout": 5}),
    ("patch", "/with/userinfo", {"data": "y", "timeout": 5, "userinfo": True}),
    ("post", "/redirect", {"data": '{"a": 1}', "headers": APPRISE_HEADERS, "timeout": 5}),
    # A form or JSON with a login (Twilio's, 46elks' shape; a JSON gateway's): requests puts
    # the body's Content-Type before the Authorization its login adds.
    ("post", "/2010-04-01/Accounts/AC1/Messages.json",
     {"data": {"To": "+34600111222", "From": "+34911000000", "Body": "Hola, Ana"},
      "headers": {"User-Agent": "Apprise", "Accept": "application/json"},
      "auth": ("AC1", "t0ken"), "timeout": 5}),
    ("post", "/json-login", {"json": {"to": "+34600111222", "text": "Hi"},
                             "auth": ("user", "pass"), "timeout": 5}),
    ("get", "/userinfo-body", {"data": "q", "timeout": 5, "userinfo": True}),
    # A form whose fields are all None: an empty body that requests sends chunked.
    ("post", "/form-nothing", {"data": {"ttl": None}, "timeout": 5}),
    # Redirects: a POST's method and body kept (307, 308) or turned into a GET without
    # them (301, 302, 303); to another host, the login's Authorization dropped.
    *[("post", f"/redirect-{code}", {"data": {"To": "+34600111222", "Body": "Hola"},
                                     "auth": ("AC1", "t0ken"), "timeout": 5})
      for code in (301, 302, 303, 308)],
    ("post", "/elsewhere", {"json": {"to": "+34600111222"}, "auth": ("u", "p"),
                            "headers": APPRISE_HEADERS, "timeout": 5}),
    ("post", "/elsewhere/userinfo", {"data": "x", "timeout": 5, "userinfo": True}),
    # Through a proxy (the request line names the gateway's URL whole).
    ("post", "/proxied", {"data": {"to": "+34600111222"}, "auth": ("u", "p"), "timeout": 5,
                          "proxied": True}),
    # Not prepared from a template (an auth object; a list as a query value; a header
    # set to None, which requests leaves out): as before.
    ("post", "/auth-object", {"data": "z", "auth": HTTPBasicAuth("u", "p"), "timeout": 5}),
    ("get", "/listed", {"params": {"to": ["+1", "+2"]}, "timeout": 5}),
    ("post", "/none-header", {"data": "z", "headers": {"User-Agent": "Apprise", "Accept": None},
                              "timeout": 5}),
]
NOT_TEMPLATED = ("/auth-object", "/listed", "/none-header")


def _url(wire: Wire, path: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = dict(kwargs)
    base = wire.base
    if kwargs.pop("userinfo", False):
        base = base.replace("http://", "http://gw%20user:s3cr%40t@")
    if kwargs.pop("proxied", False):
        kwargs["proxies"] = {"http": base}
        base = "http://sms-gateway.invalid"
    return base + path, kwargs


def _in_send(method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
    token = delivery._in_send.set(True)
    try:
        return requests.request(method, url, **kwargs)
    finally:
        delivery._in_send.reset(token)


@pytest.mark.parametrize(("method", "path", "kwargs"), SHAPES,
                         ids=[f"{m} {p}" for m, p, _ in SHAPES])
def test_a_templated_request_is_what_requests_sends(
        wire: Wire, method: str, path: str, kwargs: dict[str, Any]) -> None:
    url, kwargs = _url(wire, path, kwargs)
    wire.take()
    plain = requests.request(method, url, **kwargs)
    expected = wire.take()
    sent = [_in_send(method, url, kwargs) for _ in range(2)]
    got = wire.take()
    assert expected and got == expected * 2
    for response in sent:
        assert (response.status_code, response.content, response.url,
                [r.status_code for r in response.history]) == (
            plain.status_code, plain.content, plain.url,
            [r.status_code for r in plain.history])


def test_templated_shapes_are_kept_and_others_are_not(wire: Wire) -> None:
    """The shapes above that a template serves are kept one each per thread; the others
    are prepared by `Session.request` as before (so the test above compares both ways)."""
    delivery._http_sessions.session = None
    for method, path, kwargs in SHAPES:
        url, plain_kwargs = _url(wire, path, kwargs)
        _in_send(method, url, plain_kwargs)
    session = delivery._thread_session()
    kept = {(method, url) for method, url, *_ in session.templates}
    assert len(kept) == len(SHAPES) - len(NOT_TEMPLATED)
    assert not any(url.endswith(NOT_TEMPLATED) for _, url in kept)
    wire.take()


def test_templates_are_bounded(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "QUICK_TEMPLATES", 3)
    delivery._http_sessions.session = None
    for n in range(7):
        _in_send("post", f"{wire.base}/sms/{n}", {"data": "x", "timeout": 5})
    assert len(delivery._thread_session().templates) <= 3
    assert [line for line, _, _ in wire.take()] == [
        f"POST /sms/{n} HTTP/1.1" for n in range(7)]


def test_one_url_with_other_logins_headers_and_bodies(wire: Wire) -> None:
    """Requests to one URL that differ in login, headers or body each go as `requests`
    sends them, in any order, the templates made along the way notwithstanding."""
    url = f"{wire.base}/one"
    calls: list[dict[str, Any]] = [
        {"data": "first", "auth": ("ana", "1"), "headers": APPRISE_HEADERS},
        {"data": "second, longer", "auth": ("bea", "2"), "headers": APPRISE_HEADERS},
        {"data": "x", "headers": {"User-Agent": "Apprise", "X-Extra": "1"}},
        {"data": {"k": "v"}},
        {"data": "first", "auth": ("ana", "1"), "headers": APPRISE_HEADERS},
        {"json": {"a": 1}, "headers": APPRISE_HEADERS},
    ]
    wire.take()
    for kwargs in calls:
        requests.post(url, timeout=5, **kwargs)
    expected = wire.take()
    for kwargs in calls:
        _in_send("post", url, {"timeout": 5, **kwargs})
    assert wire.take() == expected
