"""Provider stand-ins for the benchmark and the fault drill: an SMTP server, an HTTP SMS gateway.

Both listen on 127.0.0.1 and record every message they accept, with the time. They live
here, not in tests/, because benchmarks never import tests (tests may import benchmarks).

The SMTP server can go down and come back on the same port, the way a mail server
restarts: `down()` stops listening (new connections are refused) and lets a session
already handing over a message finish; `up()` listens again. A message counts as
accepted only when the client is still there to get our "250". `cut_sessions()` (or
`down(cut=True)`) also drops every open session at once, from the server's side, as a
restarting or failing-over server does, and as a server closing a client's idle session
does: each connection is closed at once, mid-message or not; a message cut before our
"250" was not accepted (nothing recorded), one answered before the cut was.

The SMS gateway can fail for a while, the way a provider's outage looks: `fail(503)`
makes it answer every request with that status, taking nothing (the message is not
recorded: the provider did not accept it; `refused` counts these answers), until
`recover()`. It never takes a message and then answers an error.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.smtp import SMTP

from worker.embedded import free_port

START_TIMEOUT_SECONDS = 10.0


class _Gateway(ThreadingHTTPServer):
    """An HTTP server that takes many connections at once, as a provider's gateway does:
    with Python's default listen backlog (5), a sender with more threads than that sees
    connections dropped and reset, sends of unknown outcome that a real gateway would not
    cause."""

    request_queue_size = 128


@dataclass(frozen=True)
class Received:
    """One message a sink accepted."""

    at: float  # time.time() when accepted
    channel: str  # "email" or "sms"
    to: str
    subject: str | None  # email only
    text: str  # the SMS text (email: empty, the subject identifies it)
    # When its hand-over began: the SMTP MAIL command, the SMS post read (the sender's
    # attempt had begun before it). 0.0: not known.
    handed_at: float = 0.0


class _SinkSMTP(SMTP):
    """aiosmtpd's session, registered with its sink while its connection is open."""

    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self._sink = sink
        self.in_data = False  # DATA read and answered 354: the message is coming
        self.mail_at = 0.0  # when this session's last MAIL command arrived

    async def smtp_MAIL(self, arg: str) -> None:  # noqa: N802
        self.mail_at = time.time()
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        # Reading the command and pushing 354 (or an error) happen in one step of the loop:
        # a cut sees either neither or both.
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sink._live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._live.discard(self)
        super().connection_lost(error)


@dataclass(frozen=True)
class Cut:
    """What one cut of the open sessions dropped."""

    sessions: int  # connections closed
    mid_message: int  # of them, between MAIL and our answer to DATA...
    in_data: int = 0  # ...and of those, after our 354: the message was coming (the client
    # cannot know whether we took it); the others were cut before any of it was asked for


class SmtpSink:
    """An aiosmtpd server on its own event loop thread; can go down and come back, and
    can drop its open sessions."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data_abandoned = 0  # DATA whose client went away before our answer
        self._messages: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smtp-sink",
                                        daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._live: set[_SinkSMTP] = set()  # open sessions; touched on the loop thread only
        self.cuts: list[Cut] = []

    # aiosmtpd handler hook
    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        if server.transport is None or server.transport.is_closing():
            with self._lock:
                self.data_abandoned += 1
            return "421 client went away"  # never acknowledged: not delivered
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        with self._lock:
            self._messages.append(Received(at=time.time(), channel="email",
                                           to=",".join(envelope.rcpt_tos),
                                           subject=str(msg["Subject"] or ""), text="",
                                           handed_at=getattr(server, "mail_at", 0.0)))
        return "250 Message accepted"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT_SECONDS)

    def start(self) -> SmtpSink:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        """Listen (again) on the sink's port."""

        async def listen() -> asyncio.AbstractServer:
            return await self._loop.create_server(
                lambda: _SinkSMTP(self, hostname="sink.local", loop=self._loop),
                host="127.0.0.1", port=self.port, reuse_address=True)

        if self._server is None:
            self._server = self._run(listen())

    def down(self, cut: bool = False) -> Cut | None:
        """Stop listening: connections are refused until up(); open sessions may finish,
        or with `cut`, are dropped at the same instant (see cut_sessions)."""
        server, self._server = self._server, None

        async def close() -> Cut | None:
            if server is not None:
                server.close()
            return self._cut() if cut else None

        return self._run(close())  # type: ignore[no-any-return]

    def cut_sessions(self) -> Cut:
        """Close every open session at once from the server's side, as the kernel closes a
        killed server's sockets: no reply, no 421; what was already answered still reaches
        the client, then the connection ends, and the client finds it gone at its next
        read. Whatever the session was doing (idle, mid-message) stops there. The listener
        stays as it was: new connections are taken if up."""

        async def cut() -> Cut:
            return self._cut()

        return self._run(cut())  # type: ignore[no-any-return]

    def _cut(self) -> Cut:
        # On the loop thread, in one step: no session's handler runs meanwhile, so each is
        # cut between two of its awaits: handle_DATA has recorded and written its answer, or
        # not begun (then it finds the transport closing and records nothing). close(), not
        # abort(): an answer already written but still buffered is not thrown away.
        live = [s for s in self._live if s.transport is not None and not s.transport.is_closing()]
        mid = in_data = 0
        for session in live:
            if session.envelope is not None and session.envelope.mail_from is not None:
                mid += 1
                in_data += session.in_data
            assert session.transport is not None
            session.transport.close()
        done = Cut(sessions=len(live), mid_message=mid, in_data=in_data)
        with self._lock:
            self.cuts.append(done)
        return done

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop for good: close the listener, cancel every session, end the loop thread."""
        if not self._thread.is_alive():
            return
        self.down()

        def cancel_all() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.stop()

        self._loop.call_soon_threadsafe(cancel_all)
        self._thread.join(START_TIMEOUT_SECONDS)

    def snapshot(self, start: int = 0) -> list[Received]:
        """Return the messages accepted so far, from the `start`-th on."""
        with self._lock:
            return self._messages[start:]

    def count(self) -> int:
        """Return how many messages were accepted so far."""
        with self._lock:
            return len(self._messages)


class HttpSink:
    """A threaded HTTP server taking Apprise's json:// SMS posts; answers 200 (while
    failing, `fail`'s 5xx, taking nothing).

    It speaks HTTP/1.1 and keeps a connection open for the client's next request, as
    providers' gateways do (a sender that keeps its connection saves a TCP handshake and,
    here, the sink's thread per connection; a client that closes after each request, as
    the raw client's `requests.post` does, costs what it did). Each answer goes out in one
    write, without Nagle's delay: written as two (status and headers, then the body), the
    body of an answer on a kept connection waited for the client's delayed ACK, about
    40 ms a message, which no gateway makes its clients wait.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._messages: list[Received] = []
        self._lock = threading.Lock()
        self._failing: int | None = None  # the status answered while failing (under _lock)
        self._refused = 0  # requests answered with it (under _lock)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as providers' gateways do
            disable_nagle_algorithm = True
            wbufsize = -1  # buffered: the answer is flushed once, after do_POST

            def do_POST(self) -> None:  # noqa: N802
                handed_at = time.time()
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length)
                if len(data) < length or not data:
                    # The client went away mid-request (a worker killed while posting): a
                    # gateway never takes a request it did not receive whole.
                    self.close_connection = True
                    return
                body = json.loads(data)
                with sink._lock:  # one decision: refused (nothing kept) or accepted
                    status = sink._failing
                    if status is None:
                        sink._messages.append(Received(
                            at=time.time(), channel="sms", to=str(body.get("to", "")),
                            subject=None, text=str(body.get("message", "")),
                            handed_at=handed_at))
                    else:
                        sink._refused += 1
                answer = b"{}" if status is None else b'{"error": "service unavailable"}'
                self.send_response(status or 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Gateway(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        # A kept connection's thread waits for its client's next request: not joined.
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, name="sms-sink",
                                        daemon=True)

    def start(self) -> HttpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def fail(self, status: int = 503) -> None:
        """Answer every request with `status` (5xx), accepting nothing, until recover()."""
        if not 500 <= status < 600:
            raise ValueError(f"a gateway outage answers 5xx, not {status}")
        with self._lock:
            self._failing = status

    def recover(self) -> None:
        """Accept messages again (answer 200)."""
        with self._lock:
            self._failing = None

    @property
    def failing(self) -> int | None:
        """The status answered while failing, or None when accepting."""
        with self._lock:
            return self._failing

    @property
    def refused(self) -> int:
        """How many requests were answered with a failure status (nothing accepted)."""
        with self._lock:
            return self._refused

    def snapshot(self, start: int = 0) -> list[Received]:
        """Return the messages accepted so far, from the `start`-th on."""
        with self._lock:
            return self._messages[start:]

    def count(self) -> int:
        """Return how many messages were accepted so far."""
        with self._lock:
            return len(self._messages)
