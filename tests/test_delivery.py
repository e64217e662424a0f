"""Delivery: failure classification, the outbox, and real plugins at the network edge."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from urllib.parse import parse_qs

import pytest
import responses

from tests.sinks import HttpSink, SmtpSink
from worker.clinics import Clinic
from worker.delivery import Envelope, classify, deliver, with_timeouts, write_outbox
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


@pytest.mark.parametrize(
    ("status", "lines", "permanent", "reason"),
    [
        ("TIMEOUT", [], False, "timed out"),
        (
            "FAILURE",
            ["Failed to send JSON POST notification: Bad Request, error=400."],
            True,
            "HTTP 400",
        ),
        ("FAILURE", ["Failed to send Twilio notification: error=404."], True, "HTTP 404"),
        ("FAILURE", ["error=408."], False, "HTTP 408"),
        ("FAILURE", ["error=429."], False, "HTTP 429"),
        ("FAILURE", ["error=500."], False, "HTTP 500"),
        ("FAILURE", ["error=503."], False, "HTTP 503"),
        (
            "FAILURE",
            ["Socket Exception: {'a@b.c': (550, b'5.1.1 No such user')}"],
            True,
            "SMTP 550",
        ),
        ("FAILURE", ["Socket Exception: (451, b'4.3.0 try later')"], False, "SMTP 451"),
        ("FAILURE", ['Connection error while submitting email to "x"'], False, "could not connect"),
        ("FAILURE", ["There are no valid Twilio targets to notify."], True, "refused"),
        ("FAILURE", ["something odd"], False, "reported a failure"),
        # Twilio logs its own error code; urllib3's line (when there is one) has the HTTP status.
        (
            "FAILURE",
            ["Failed to send Twilio notification to +3460: error=21211."],
            True,
            "error 21211",
        ),
        (
            "FAILURE",
            ["Failed to send Twilio notification to +3460: error=20429."],
            False,
            "error 20429",
        ),
        (
            "FAILURE",
            ["Failed to send Twilio notification to +3460: error=20500."],
            False,
            "error 20500",
        ),
        (
            "FAILURE",
            [
                'https://api.twilio.com:443 "POST /x HTTP/1.1" 503 20',
                "Failed to send Twilio notification to +3460: error=20500.",
            ],
            False,
            "HTTP 503",
        ),
        (
            "FAILURE",
            [
                'https://api.twilio.com:443 "POST /x HTTP/1.1" 400 20',
                "Failed to send Twilio notification to +3460: error=21211.",
            ],
            True,
            "HTTP 400",
        ),
    ],
)
def test_classify(status, lines, permanent, reason):
    error = classify(status, lines)
    assert error.permanent is permanent
    assert reason in error.reason


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
    assert info.value.permanent is permanent
    assert reason in info.value.reason
    assert len(responses.calls) == 1  # Apprise's own retries are off


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
