"""worker.apprise_lines: the lines Apprise logs during a send, kept for classification only.

The classification of real failed sends through them is in test_delivery.py (SMTP
refusals, a server down, no answer, a soft time limit, concurrent sends); here, what is
kept, what is never even formatted, and that Apprise's logger is unchanged outside a send.
"""

from __future__ import annotations

import logging
import threading

import pytest
from apprise.logger import logger as apprise_logger

import worker.delivery  # noqa: F401  # as in the worker: delivery sets Apprise's logger up
from worker.apprise_lines import capturing, classified_lines


class Counted:
    """An argument that counts how often a line it is in was formatted."""

    def __init__(self, text: str) -> None:
        self.text, self.formatted = text, 0

    def __str__(self) -> str:
        self.formatted += 1
        return self.text


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recorder():
    handler = Recorder()
    apprise_logger.addHandler(handler)
    try:
        yield handler
    finally:
        apprise_logger.removeHandler(handler)


def test_a_send_keeps_warnings_info_and_the_socket_or_plugin_error_in_order(recorder):
    payload = Counted('{"to": "+34600111222", "message": "Ana, ..."}')
    with capturing() as lines:
        apprise_logger.debug("JSON Payload: %s", payload)  # never formatted
        apprise_logger.debug("%s send() completed in %.2fs.", "JSON", 0.01)
        apprise_logger.info("Sent JSON %s notification.", "POST")
        apprise_logger.warning("Failed to send JSON notification: error=%d.", 400)
        apprise_logger.debug("Socket Exception: %s", "Read timed out.")
        apprise_logger.debug("%s", "Socket Exception: built by a placeholder")
        apprise_logger.debug("Notification Exception: %s", "SoftTimeLimitExceeded()")
        apprise_logger.log(logging.WARNING, "logged with log(): %s", "kept too")
        apprise_logger.warning("kept out of results", extra={"apprise_capture": False})
        apprise_logger.error("malformed %d", "x")  # LogRecord.getMessage() would raise
    assert payload.formatted == 0
    assert classified_lines(lines) == [
        "Sent JSON POST notification.",
        "Failed to send JSON notification: error=400.",
        "Socket Exception: Read timed out.",
        "Socket Exception: built by a placeholder",
        "Notification Exception: SoftTimeLimitExceeded()",
        "logged with log(): kept too",
    ]
    # Nothing but the log() line made a LogRecord (the others went straight to the list).
    assert [r.getMessage() for r in recorder.records] == ["logged with log(): kept too"]


def test_outside_a_send_the_logger_is_apprises_own(recorder):
    def plugin_code() -> None:
        apprise_logger.debug("JSON Payload: %s", "x")
        apprise_logger.info("Sent %s", "y")

    with capturing() as lines:
        pass
    plugin_code()
    assert lines == []
    assert [(r.levelname, r.getMessage(), r.funcName) for r in recorder.records] == [
        ("DEBUG", "JSON Payload: x", "plugin_code"), ("INFO", "Sent y", "plugin_code")]


def test_concurrent_sends_each_keep_only_their_own_lines():
    """Two threads log in turn (forced by a barrier), each inside its own send."""
    turns = threading.Barrier(2)
    kept: dict[str, list[str]] = {}

    def send(name: str) -> None:
        with capturing() as lines:
            for i in range(3):
                turns.wait()
                apprise_logger.warning("%s line %d", name, i)
                turns.wait()
        kept[name] = classified_lines(lines)

    threads = [threading.Thread(target=send, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert kept == {n: [f"{n} line {i}" for i in range(3)] for n in ("a", "b")}


def _old_and_new(url: str, body: str, title: str = "") -> tuple[list[str], list[str]]:
    """The lines of one send as Apprise's own DEBUG capture gives them (filtered as delivery
    filtered them before), and as `capturing` keeps them, for the same failing send."""
    import apprise

    from worker.apprise_lines import KEPT_DEBUG, NO_CAPTURE
    from worker.delivery import load_services, with_timeouts

    def notifier() -> apprise.Apprise:
        n = apprise.Apprise(asset=apprise.AppriseAsset(service_timeout=0))
        n.add(load_services(with_timeouts(url, 2)))
        return n

    with notifier().notify(body=body, title=title, log_level=logging.DEBUG) as result:
        assert not result
        old = [e.message for e in result.logs()
               if e.level != "DEBUG" or e.message.startswith(KEPT_DEBUG)]
    with capturing() as lines:
        with notifier().notify(body=body, title=title, log_level=NO_CAPTURE) as result:
            assert not result and list(result.logs()) == []
    return old, classified_lines(lines)


def test_real_failed_sends_keep_the_lines_apprises_capture_kept(monkeypatch):
    from apprise.plugins.custom_json import NotifyJSON

    from tests.sinks import HttpSink, SmtpSink
    from worker.embedded import free_port

    http, smtp = HttpSink().start(), SmtpSink(refuse_code="550 5.1.1 No such user").start()
    try:
        http.status = 400
        sms = f"json://127.0.0.1:{http.port}/sms?:to=%2B34600111222"
        mail = f"mailto://127.0.0.1:{smtp.port}?from=h@g.example&to=x@example.com&mode=insecure"
        cases = {
            "HTTP 400": (sms, "Ana, hoy no"),
            "SMTP 550": (mail, "<p>Hola</p>"),
            "refused": (f"json://127.0.0.1:{free_port()}/sms?:to=%2B34600111222", "x"),
            "SMTP down": (f"mailto://127.0.0.1:{free_port()}?from=h@g.example&to=x@e.com"
                          "&mode=insecure", "x"),
        }
        seen = {}
        for name, (url, body) in cases.items():
            old, new = _old_and_new(url, body, "Tu cita")
            assert new == old, name
            seen[name] = new
        monkeypatch.setattr(NotifyJSON, "send", lambda *a, **k: 1 / 0)
        old, new = _old_and_new(sms, "x")
        assert new == old and "Notification Exception: division by zero" in new
    finally:
        http.stop()
        smtp.stop()
    assert any("error=400" in line for line in seen["HTTP 400"])
    assert any("550" in line for line in seen["SMTP 550"])
    assert any(line.startswith("Socket Exception") for line in seen["refused"])
    assert any(line.startswith("Socket Exception") for line in seen["SMTP down"])


def test_urllib3_answers_are_taken_without_records_during_a_send_only():
    """The HTTP status of a send's answers comes from urllib3.connectionpool's DEBUG line,
    taken without a LogRecord in the send; outside a send that logger is urllib3's own."""
    import requests

    from tests.sinks import HttpSink
    from worker import delivery

    pool = logging.getLogger("urllib3.connectionpool")
    handler = Recorder()
    pool.addHandler(handler)
    sink = HttpSink().start()
    try:
        sink.status = 503
        with pytest.raises(delivery.DeliveryError) as info:
            delivery.send_apprise(f"json://127.0.0.1:{sink.port}/sms?:to=%2B34600111222",
                                  delivery.RenderedMessage("sms", None, "x", None), 5)
        assert info.value.reason == "HTTP 503 from the provider"
        assert handler.records == []  # nothing made a record, so nothing could leak
        parent = logging.getLogger("urllib3")
        level, _ = parent.level, parent.setLevel(logging.DEBUG)  # someone debugging urllib3
        try:
            requests.post(f"http://127.0.0.1:{sink.port}/sms", json={"to": "+1"}, timeout=5)
        finally:
            parent.setLevel(level)
    finally:
        sink.stop()
        pool.removeHandler(handler)
    # Outside a send: urllib3's records as it makes them, where its level lets them pass.
    assert [('"POST /sms HTTP/1.1" 503' in r.getMessage(), r.funcName)
            for r in handler.records if "POST" in r.getMessage()] == [(True, "_make_request")]


def test_a_payloads_debug_copy_is_made_only_when_a_line_shows_it(recorder, monkeypatch):
    """Apprise's plugins hand `sanitize_payload(payload)` to a DEBUG line whenever their
    logger takes DEBUG, every send included: during a send (whose DEBUG payload line is
    never formatted) it is not worked out, and the SMS reaches the gateway as ever;
    outside a send the line reads exactly as with Apprise's own function."""
    from apprise.plugins import custom_json
    from apprise.utils import sanitize

    from tests.sinks import HttpSink
    from worker import delivery

    delivery.load_services("json://127.0.0.1/sms")  # the plugin as the senders load it
    assert custom_json.sanitize_payload is sanitize.sanitize_payload
    apprises = delivery._apprise_sanitize_payload  # Apprise's own function
    calls: list[object] = []

    def counted(payload: object, **kwargs: object) -> object:
        calls.append(payload)
        return apprises(payload, **kwargs)

    monkeypatch.setattr(delivery, "_apprise_sanitize_payload", counted)
    sink = HttpSink().start()
    try:
        assert delivery.send_apprise(
            f"json://127.0.0.1:{sink.port}/sms?:to=%2B34600111222",
            delivery.RenderedMessage("sms", None, "Ana, hoy no", None), 5) \
            == "sent through Apprise"
        assert [(p.to, p.text) for p in sink.posts] == [
            ("+34600111222", "Ana, hoy no")]
    finally:
        sink.stop()
    assert calls == []
    payload = {"message": "x" * 5000, "to": "+34600111222", "attachments": [
        {"base64": "QUJD" * 2000, "filename": "a.ics"}]}
    level = apprise_logger.level
    apprise_logger.setLevel(logging.DEBUG)
    try:
        apprise_logger.debug("JSON Payload: %s", custom_json.sanitize_payload(payload))
    finally:
        apprise_logger.setLevel(level)
    shown = apprises(payload)
    assert [r.getMessage() for r in recorder.records
            if r.getMessage().startswith("JSON Payload")] == [f"JSON Payload: {shown}"]
    assert f"JSON Payload: {shown}" != f"JSON Payload: {payload}"  # a blob summarized
    assert calls == [payload]
