"""Email through Apprise with one TLS context per process and SMTP sessions kept for reuse
(worker/delivery.py `_KeptSMTPController`), against a real aiosmtpd server that counts its
sessions and can drop them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

import worker.delivery as delivery
from worker.embedded import free_port
from worker.errors import DeliveryError
from worker.rendering import RenderedMessage

MAIL = RenderedMessage(channel="email", subject="Your visit", text="See you soon.\n",
                       html="<p>See you soon.</p>")


class _CuttingSMTP(SMTP):
    """aiosmtpd's session; closes itself at the DATA command, before its 354, when the
    server's `close_at_next_data` is set."""

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        handler = self.event_handler
        if handler.close_at_next_data and self.transport is not None:
            handler.close_at_next_data = False
            self.transport.close()  # as a server dropping the session right then: no 354
            return
        await super().smtp_DATA(arg)


class _CuttingController(Controller):
    def factory(self) -> SMTP:
        return _CuttingSMTP(self.handler, **self.SMTP_kwargs)


class CountingServer:
    """aiosmtpd that counts sessions (EHLO) and messages; `drop()` closes every session
    from the server side; `abort_next_data` makes the next DATA vanish unanswered;
    `close_at_next_data` closes the session at the next DATA command, before any of the
    message is asked for (no 354)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sessions = 0
        self.quits = 0
        self.messages: list[str] = []
        self.abort_next_data = False
        self.close_at_next_data = False
        self.refuse: str | None = None  # e.g. "550 5.1.1 No such user" for every recipient
        self._transports: list[asyncio.BaseTransport] = []
        self._lock = threading.Lock()
        self._controller = _CuttingController(self, hostname="127.0.0.1", port=self.port)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        with self._lock:
            self.sessions += 1
            self._transports.append(server.transport)
        session.host_name = hostname
        return responses

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802
        with self._lock:
            self.quits += 1
        return "221 Bye"

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: N802
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.abort_next_data:
            self.abort_next_data = False
            server.transport.abort()  # the whole message arrived; no answer ever comes
            return "250 never sent"
        with self._lock:
            self.messages.append(",".join(envelope.rcpt_tos))
        return "250 OK"

    def drop(self) -> None:
        """Close every open session, as a server does with idle connections."""
        loop = self._controller.loop
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            loop.call_soon_threadsafe(transport.close)
        time.sleep(0.2)

    def url(self, to: str) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=clinic@example.com&to={to}&mode=insecure"

    def __enter__(self) -> CountingServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


@pytest.fixture
def server() -> Iterator[CountingServer]:
    delivery.smtp_sessions.close()  # no session of another test's server lingers
    with CountingServer() as s:
        yield s
    delivery.smtp_sessions.close()


def send(server: CountingServer, n: int) -> str:
    return delivery.send_apprise(server.url(f"p{n}@example.com"), MAIL, timeout=5)


def test_one_session_and_one_tls_context_carry_many_messages(server, monkeypatch):
    made = []
    real = delivery.ssl.create_default_context

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(delivery.ssl, "create_default_context", counted)
    monkeypatch.setattr(delivery, "_tls_contexts", {})
    for n in range(5):
        assert send(server, n) == "sent through Apprise"
    assert server.messages == [f"p{n}@example.com" for n in range(5)]
    assert server.sessions == 1 and server.quits == 0
    assert len(made) == 1  # Apprise alone makes one per message


def test_a_kept_session_the_server_closed_is_replaced_before_anything_is_sent(server):
    assert send(server, 1) == "sent through Apprise"
    server.drop()  # the kept session is dead now; the client does not know yet
    assert send(server, 2) == "sent through Apprise"  # not an unknown outcome
    assert server.messages == ["p1@example.com", "p2@example.com"]  # each once
    assert server.sessions == 2


def test_a_kept_session_the_server_closed_at_the_data_command_is_replaced_too(server):
    """The server drops a kept session between its answer to RCPT and the 354 that asks for
    the message (a restart, a relay failover, an idle timeout firing as the client reuses
    it: the fault drill's cut of the open sessions lands there now and then). None of the
    message was handed over: it goes over a fresh session at once, as when MAIL or RCPT
    finds the session gone, not as a message of unknown outcome."""
    assert send(server, 1) == "sent through Apprise"
    server.close_at_next_data = True
    assert send(server, 2) == "sent through Apprise"
    assert not server.close_at_next_data  # the cut happened, at DATA
    assert server.messages == ["p1@example.com", "p2@example.com"]  # each once
    assert server.sessions == 2


def test_a_kept_session_lost_during_data_is_still_an_unknown_outcome(server):
    assert send(server, 1) == "sent through Apprise"
    server.abort_next_data = True
    with pytest.raises(DeliveryError) as caught:
        send(server, 2)
    assert caught.value.unknown and not caught.value.permanent
    assert "may have been delivered" in caught.value.reason
    assert server.sessions == 1  # not sent again over a new session
    assert send(server, 3) == "sent through Apprise"  # the broken session was not kept
    assert server.sessions == 2


def test_a_refused_recipient_is_permanent_and_its_session_not_kept(server):
    assert send(server, 1) == "sent through Apprise"
    server.refuse = "550 5.1.1 No such user"
    with pytest.raises(DeliveryError) as caught:
        send(server, 2)
    assert caught.value.permanent and "SMTP 550" in caught.value.reason
    server.refuse = None
    assert send(server, 3) == "sent through Apprise"
    assert server.sessions == 2


def test_senders_in_parallel_use_a_session_each(server):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: send(server, n), range(40)))
    assert results == ["sent through Apprise"] * 40
    assert sorted(server.messages) == sorted(f"p{n}@example.com" for n in range(40))
    assert server.sessions <= 8


def test_idle_sessions_are_closed_and_sessions_are_retired_after_a_while(server, monkeypatch):
    monkeypatch.setattr(delivery, "SMTP_MESSAGES_PER_SESSION", 3)
    for n in range(7):
        send(server, n)
    assert server.sessions == 3  # 3 + 3 + 1
    monkeypatch.setattr(delivery, "SMTP_IDLE_SECONDS", 0.1)
    time.sleep(0.3)
    delivery.smtp_sessions.sweep()
    time.sleep(0.2)
    assert server.quits == 3  # the two retired, and the idle one closed with a QUIT
    send(server, 8)
    assert server.sessions == 4


class SilentServer(CountingServer):
    """A mail server that, once `silent`, answers nothing more on the sessions it has open
    (hung; or its idle connections dropped without a word by a firewall or a NAT on the
    way): a QUIT on one of them waits for an answer that never comes."""

    silent = False

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802
        with self._lock:
            self.quits += 1
        deadline = time.monotonic() + 10
        while self.silent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return "221 Bye"


def test_another_servers_idle_sessions_never_hold_a_send(server, monkeypatch):
    """Clinic A's mail server went silent on its idle sessions. Those sessions are closed
    once idle for SMTP_IDLE_SECONDS by whichever thread finds them so first: another
    clinic's send (taking a session of its own server), or the senders' reporting thread
    (`sweep`). Each waited for its QUIT's answer, up to A's socket timeout (the send
    timeout), one after the other: clinic B's email waited seconds for A's server (and the
    reporting thread reported nothing to the pump meanwhile). The QUIT is sent; its answer
    is not waited for."""
    silent = SilentServer()
    with silent, ThreadPoolExecutor(3) as pool:
        barrier = threading.Barrier(3)

        def send_a(n: int) -> str:
            barrier.wait(5)  # three at once: three sessions kept
            return delivery.send_apprise(silent.url(f"a{n}@example.com"), MAIL, timeout=2)

        assert list(pool.map(send_a, range(3))) == ["sent through Apprise"] * 3
        kept = silent.sessions
        assert kept >= 2, kept
        silent.silent = True
        monkeypatch.setattr(delivery, "SMTP_IDLE_SECONDS", 0.1)
        time.sleep(0.3)
        started = time.monotonic()
        assert send(server, 1) == "sent through Apprise"  # clinic B's, on its own server
        took = time.monotonic() - started
        assert took < 0.5, f"clinic B's email waited {took:.1f}s for A's idle sessions"
        time.sleep(0.3)
        assert silent.quits == kept  # each closed with a QUIT all the same
        # The reporting thread's sweep does not wait either.
        silent.silent = False
        assert send_all(silent, 3, pool) == ["sent through Apprise"] * 3
        silent.silent = True
        time.sleep(0.3)
        started = time.monotonic()
        delivery.smtp_sessions.sweep()
        assert time.monotonic() - started < 0.5
        silent.silent = False
    assert server.messages == ["p1@example.com"]


def send_all(server: CountingServer, n: int, pool: ThreadPoolExecutor) -> list[str]:
    barrier = threading.Barrier(n)

    def one(i: int) -> str:
        barrier.wait(5)
        return delivery.send_apprise(server.url(f"b{i}@example.com"), MAIL, timeout=2)

    return list(pool.map(one, range(n)))


class TricklingServer:
    """A mail server that answers a connection with a greeting that never ends: a line
    ("220-...") every TRICKLE_EVERY seconds, each well within the client's socket timeout
    (a tarpit, or a server wedged in a loop)."""

    TRICKLE_EVERY = 0.3

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            deadline = time.monotonic() + 30
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.sendall(b"220-mail.clinic.example still greeting\r\n")
                except OSError:
                    return
                self._stop.wait(self.TRICKLE_EVERY)

    def url(self, to: str) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=clinic@example.com&to={to}&mode=insecure"

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


def test_a_server_trickling_its_answers_ends_the_send_within_two_timeouts():
    """Each line of the greeting came within the socket timeout, so the send waited on, as
    long as the server went on: until the watchdog ended the worker process before the
    attempt's ledger expired (the lease, 5 minutes by default), taking every other clinic's
    sends under way and claims waiting in that process with it (back only after their
    lease). A session's answers are read for at most two send timeouts in all (the lease
    outlasts that, settings.py): then the send fails as any timeout does, nothing handed
    over (transient)."""
    trickling = TricklingServer()
    outcome: list[BaseException | str] = []

    def send_one() -> None:
        try:
            outcome.append(delivery.send_apprise(trickling.url("p1@example.com"), MAIL,
                                                 timeout=1))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    started = time.monotonic()
    sender = threading.Thread(target=send_one, daemon=True)
    sender.start()
    sender.join(6)
    took = time.monotonic() - started
    trickling.close()
    assert not sender.is_alive(), "the send still waited on the trickling greeting after 6s"
    assert took < 2 + 1, took
    (error,) = outcome
    assert isinstance(error, DeliveryError), error
    assert not error.permanent and not error.unknown, error.reason
    assert trickling.connections == 1
