"""Apprise's HTTP sends go through the sending thread's session: a kept connection is
reused while fresh, the environment's proxies still apply, and nothing changes outside a
send. Real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from worker import delivery
from worker.delivery import send_apprise
from worker.rendering import RenderedMessage

SMS = RenderedMessage(channel="sms", subject=None, text="Hello", html=None)


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []  # (client port, request line)
        self.cookies: list[str | None] = []  # the Cookie header of each request
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as providers' gateways do

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.lines.append((self.client_address[1], self.requestline))
                    server.cookies.append(self.headers.get("Cookie"))
                self.send_response(200)
                self.send_header("Set-Cookie", "lb=node-7; Path=/")  # as load balancers do
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: object) -> None:
                pass

        server = self
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_thread_reuses_its_connection_while_fresh(recorder: Recorder,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "HTTP_IDLE_SECONDS", 0.5)
    url = f"json://127.0.0.1:{recorder.port}/sms?:to=%2B34600111222"
    for _ in range(3):
        assert send_apprise(url, SMS, 5) == "sent through Apprise"
    time.sleep(0.7)  # idle longer than HTTP_IDLE_SECONDS: not reused
    assert send_apprise(url, SMS, 5) == "sent through Apprise"
    ports = [port for port, _ in recorder.lines]
    assert len(ports) == 4
    assert ports[0] == ports[1] == ports[2] != ports[3]


def test_a_kept_session_sends_no_cookie_of_an_earlier_send(recorder: Recorder) -> None:
    """As with Apprise's own `requests.post` (a new session, an empty cookie jar, each
    request): what a provider set in one answer is not sent back with the next message."""
    url = f"json://127.0.0.1:{recorder.port}/sms?:to=%2B34600111222"
    for _ in range(3):
        assert send_apprise(url, SMS, 5) == "sent through Apprise"
    assert len({port for port, _ in recorder.lines}) == 1  # one kept session throughout
    assert recorder.cookies == [None, None, None]


def test_each_thread_has_its_own_connection(recorder: Recorder) -> None:
    url = f"json://127.0.0.1:{recorder.port}/sms?:to=%2B34600111222"
    done: list[str] = []
    threads = [threading.Thread(target=lambda: done.append(send_apprise(url, SMS, 5)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert done == ["sent through Apprise"] * 2
    assert len({port for port, _ in recorder.lines}) == 2


def test_the_environments_proxy_still_applies(recorder: Recorder,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{recorder.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    delivery._environ_proxies.cache_clear()
    try:
        url = "json://gateway.example.invalid/sms?:to=%2B34600111222"
        assert send_apprise(url, SMS, 5) == "sent through Apprise"
    finally:
        delivery._environ_proxies.cache_clear()
    # A proxy gets the absolute URL in the request line.
    assert [line for _, line in recorder.lines] == [
        "POST http://gateway.example.invalid/sms HTTP/1.1"]


def test_outside_a_send_requests_is_untouched(recorder: Recorder) -> None:
    for _ in range(2):
        assert requests.post(f"http://127.0.0.1:{recorder.port}/x", data=b"1",
                             timeout=5).status_code == 200
    ports = [port for port, _ in recorder.lines]
    assert len(ports) == 2 and ports[0] != ports[1]  # a new session, a new connection each


def test_a_send_leaves_the_services_url_out_of_apprises_result(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apprise renders a service's whole URL (and hashes it) for each result; delivery
    reads only the result's status, so during a send the result gets the schema alone.
    Outside a send Apprise's metadata is as ever."""
    from apprise import dispatch
    from apprise.plugins.custom_json import NotifyJSON

    rendered: list[bool] = []
    own_url = NotifyJSON.url

    def counted(self: NotifyJSON, *args: object, **kwargs: object) -> str:
        rendered.append(True)
        return own_url(self, *args, **kwargs)

    monkeypatch.setattr(NotifyJSON, "url", counted)
    url = f"json://127.0.0.1:{recorder.port}/sms?:to=%2B34600111222"
    assert send_apprise(url, SMS, 5) == "sent through Apprise"
    assert rendered == [] and len(recorder.lines) == 1

    (service,) = delivery.load_services(url)
    name, shown, url_id, _, weight = dispatch.service_metadata(service)
    assert shown.startswith(f"json://127.0.0.1:{recorder.port}/sms") and url_id
    assert rendered == [True] and weight == 1 and name == service.service_name
