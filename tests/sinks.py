"""Real servers that stand in for providers: an SMTP server and an HTTP SMS gateway.

Both listen on 127.0.0.1, record what they accept with the time it was accepted, and
can be told to be slow, to refuse, or (SMTP) to be down for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from worker.embedded import free_port


class _Gateway(ThreadingHTTPServer):
    """An HTTP server that takes many connections at once, as a provider's gateway does:
    with Python's default listen backlog (5), a sender with more threads than that sees
    connections dropped and reset, sends of unknown outcome that a real gateway would not
    cause."""

    request_queue_size = 128


@dataclass
class Received:
    at: float  # time.time() when accepted
    to: str
    subject: str | None
    text: str
    html: str | None = None
    raw: Any = None


@dataclass
class SmtpSink:
    """An aiosmtpd server; a message counts only once the client got our 250."""

    port: int = field(default_factory=free_port)
    delay: float = 0.0  # seconds to wait before answering DATA (a slow server)
    refuse_code: str | None = None  # e.g. "550 5.1.1 No such user": refuse every recipient
    messages: list[Received] = field(default_factory=list)
    data_started: int = 0  # DATA commands received (a message is being handed over)
    data_abandoned: int = 0  # ... of which the client went away before our answer
    refused: int = 0  # recipients refused with `refuse_code`

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    # aiosmtpd handler hooks
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.refuse_code:
            with self._lock:
                self.refused += 1
            return self.refuse_code
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self._lock:
            self.data_started += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:  # aiosmtpd cancels the handler when the client hangs up
            with self._lock:
                self.data_abandoned += 1
            raise
        if server.transport is None or server.transport.is_closing():
            with self._lock:
                self.data_abandoned += 1
            return "421 client went away"  # never acknowledged: not delivered
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        with self._lock:
            self.messages.append(Received(
                at=time.time(), to=",".join(envelope.rcpt_tos), subject=msg["Subject"],
                text=text.get_content() if text else "", html=html.get_content() if html else None,
                raw=msg))
        return "250 Message accepted"

    def start(self) -> SmtpSink:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)


class HttpSink:
    """A threaded HTTP server for Apprise's json:// SMS posts; answers `status`.

    `keep_alive`: HTTP/1.1, the connection kept for the client's next request (as
    providers' gateways do; the answer in one write, with its length: `trickle_seconds`
    is for the default, HTTP/1.0 one answer per connection). `drop_after_answer` then
    closes a connection silently after each answer (no "Connection: close"), as a gateway
    whose keep-alive ran out or a load balancer does.
    """

    def __init__(self, keep_alive: bool = False) -> None:
        self.port = free_port()
        self.status = 200
        # > 0: the answer's body (no length given) comes a byte at a time for this long.
        self.trickle_seconds = 0.0
        self.drop_after_answer = False
        self.closed = 0  # keep_alive: connections this side has closed (its FIN written)
        self.posts: list[Received] = []
        self.requests: list[tuple[float, str, int]] = []  # every POST: (time, to, status answered)
        self.peers: list[int] = []  # every POST: the client's port (one a connection)
        self._open: dict[int, Any] = {}  # keep_alive: each open connection, by client port
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            if keep_alive:
                protocol_version = "HTTP/1.1"
                disable_nagle_algorithm = True
                wbufsize = -1  # the answer flushed once, after do_POST
                timeout = 30  # an idle kept connection's thread ends in the end

                def setup(self) -> None:
                    super().setup()
                    with sink._lock:
                        sink._open[self.client_address[1]] = self.connection

                def finish(self) -> None:
                    # The connection's end written (FIN) before it is counted `closed`.
                    super().finish()
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_WR)
                    with sink._lock:
                        sink.closed += 1

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length)
                if len(data) < length or not data:  # the client went away mid-request
                    self.close_connection = True
                    return
                body = json.loads(data)
                status = sink.status
                with sink._lock:
                    sink.requests.append((time.time(), body.get("to", ""), status))
                    sink.peers.append(self.client_address[1])
                if 200 <= status < 300:
                    with sink._lock:
                        sink.posts.append(Received(at=time.time(), to=body.get("to", ""),
                                                   subject=None, text=body.get("message", ""),
                                                   raw=body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if keep_alive:
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    self.close_connection = sink.drop_after_answer
                    return
                self.end_headers()
                end = time.time() + sink.trickle_seconds
                try:
                    while time.time() < end:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                    self.wfile.write(b"{}")
                except OSError:  # the sender stopped reading
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Gateway(("127.0.0.1", self.port), Handler)
        # A kept connection's thread waits for the client's next request: not joined.
        self._server.daemon_threads = keep_alive
        self._server.block_on_close = not keep_alive
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HttpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def drop(self, peer: int) -> None:
        """Close the kept connection of the client at port `peer` now (keep_alive)."""
        with self._lock:
            conn = self._open.pop(peer)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.posts)

    def requests_snapshot(self) -> list[tuple[float, str, int]]:
        with self._lock:
            return list(self.requests)


@dataclass
class Hook:
    """One webhook request as the clinic's server saw it."""

    at: float
    body: bytes
    headers: dict[str, str]
    valid: bool  # the signature checked out with the receiver's secret

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A clinic's webhook endpoint: checks each signature, answers `status` (200 by default)."""

    def __init__(self, secret: str) -> None:
        from worker.webhooks import SIGNATURE_HEADER, verify_signature

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.status = 200
        # > 0: the answer's body (no length given) comes a byte at a time for this long.
        self.trickle_seconds = 0.0
        self.hooks: list[Hook] = []
        # Cleared: requests are recorded, then parked until it is set (a slow endpoint).
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                valid = verify_signature(secret, self.headers.get(SIGNATURE_HEADER), body)
                with receiver._lock:
                    receiver.hooks.append(Hook(time.time(), body, dict(self.headers), valid))
                receiver.gate.wait(60)
                status = receiver.status if valid else 400
                self.send_response(status)
                if receiver.trickle_seconds:
                    self.end_headers()
                    end = time.time() + receiver.trickle_seconds
                    try:
                        while time.time() < end:
                            self.wfile.write(b".")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:  # the sender stopped reading
                        pass
                    return
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Gateway(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[Hook]:
        with self._lock:
            return list(self.hooks)


class DeadEndpoint:
    """A clinic's webhook endpoint that is up but dead: it accepts every connection, reads
    nothing and never answers (a hung server behind a live listener), until `stop()`; or
    until `answer()`, from when on each new connection gets its request read and answered
    200 (the event id of each recorded in `answered`): the endpoint recovered."""

    def __init__(self) -> None:
        import socket

        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.accepted: list[float] = []  # time.time() of each connection accepted
        self._held: list[Any] = []
        self._lock = threading.Lock()
        self._answering = False
        self._reply = b""
        self.answered: list[str] = []  # Reminders-Event-Id of each request answered
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> DeadEndpoint:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            with self._lock:
                self.accepted.append(time.time())
                self._held.append(conn)
                answering = self._answering
            if answering:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def answer(self, reply: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n") -> None:
        """Recover: answer `reply` (a 200) to every connection accepted from now on."""
        with self._lock:
            self._answering = True
            self._reply = reply

    def _answer(self, conn: Any) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            with self._lock:
                self.answered.append(headers.get("reminders-event-id", ""))
            conn.sendall(self._reply)
            conn.close()

    def connections(self) -> int:
        with self._lock:
            return len(self.accepted)

    def answered_ids(self) -> list[str]:
        with self._lock:
            return list(self.answered)

    def stop(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._held:
                conn.close()
