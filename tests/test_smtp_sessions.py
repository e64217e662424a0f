"""Email through Apprise with one TLS context per process and SMTP sessions kept for reuse
(worker/delivery.py `_KeptSMTPController`), against a real aiosmtpd server that counts its
sessions and can drop them."""

from __future__ import annotations

import asyncio
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
