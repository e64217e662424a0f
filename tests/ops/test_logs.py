"""Log lines (worker/logs.py): the JSON form, the ids bound to a send, the scrub filter."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker.logs import about_reminder, access_path, handler, redact_url, scrub


@pytest.fixture
def capture():
    """A logger writing through the project's handler into a buffer, per format."""
    made = []

    def make(fmt: str) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        log = logging.getLogger(f"tests.logs.{fmt}.{len(made)}")
        log.handlers, log.propagate = [handler(fmt, out)], False
        log.setLevel(logging.DEBUG)
        made.append(log)
        return log, out

    return make


def test_json_lines_carry_the_reminder_ids_bound_to_an_attempt(capture):
    log, out = capture("json")

    @about_reminder
    def attempt(ctx: object, ref: str) -> None:
        log.info("send %s: sent", ref)

    attempt(None, "glow/A-1042/day-before:sms")
    log.warning("pump: published %d claim(s)", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("a bug")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "send glow/A-1042/day-before:sms: sent"
    assert (first["clinic"], first["booking_id"], first["reminder"]) == (
        "glow", "A-1042", "day-before:sms")
    assert first["level"] == "INFO" and first["ts"].endswith("Z")
    assert "booking_id" not in second and second["level"] == "WARNING"
    assert "ValueError: boom" in third["exc"] and len(out.getvalue().splitlines()) == 3


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_contact_details_above_debug_are_masked_whoever_logs_them(capture, fmt):
    log, out = capture(fmt)
    log.warning("SMTP recipient %s was refused", "ana@example.com")
    log.error("POST json://127.0.0.1:9/sms?:to=%%2B34600111222 failed for +34 600 111 222")
    log.info("loaded mailtos://user:s3cret@smtp.glow.example?to=ana%40example.com")
    log.debug("DEBUG may say ana@example.com")  # the level for such details
    text = out.getvalue()
    for secret in ("ana@example.com", "34600111222", "600 111 222", "s3cret", "ana%40"):
        assert secret not in text.replace("DEBUG may say ana@example.com", "")
    assert "[email]" in text and "[phone]" in text and "mailtos://****@smtp" in text
    assert "DEBUG may say ana@example.com" in text


@pytest.mark.parametrize("address", [
    "José.García@correo.es", "JOSÉ@example.es", "maría-josé.núñez@clínica.es",
    "Jose\u0301.Garci\u0301a@correo.es",  # decomposed accents
    "françois.o'brien@exemple.fr", "müller@bücher.de", "ана@пример.рф", "山田@例え.テスト",
    "user+tag@xn--bcher-kva.example", "jos%C3%A9%40correo.es", "ana%40caf%C3%A9.es",
])
def test_scrub_masks_non_ascii_addresses_whole(address):
    for line in (f"SMTP recipient {address} refused", f"to={address}&x=1",
                 f"<{address}>", f"'{address}'"):
        assert scrub(line) == line.replace(address, "[email]"), line


@pytest.mark.parametrize("phone", [
    "+34600111222", "+34 600 111 222", "+34 600-111-222", "+34.600.111.222",
    "+1 (415) 555-0100", "+44 20 7946 0958", "+34\u00a0600\u00a0111\u00a0222",
    "%2B34600111222", "%2B34%20600%20111%20222", "+٣٤٦٠٠١١١٢٢٢",
])
def test_scrub_masks_phone_numbers_in_their_usual_forms(phone):
    clean = scrub(f"SMS to {phone} failed.")
    assert clean == "SMS to [phone] failed.", (phone, clean)


def test_scrub_leaves_ordinary_lines_alone():
    for line in ("w1@vm ready.", "Task reminders.pump[6792c6c1-0bf8] received",
                 "retry at 2026-12-04T09:00:00+00:00", "send glow/A-1042/spf:sms: sent",
                 "Connected to redis://:**@127.0.0.1:6379/0", "took 0.0012749240013363305s",
                 "due 2026-12-04T09:00:00+01:00 (+3600 s)", "José García's booking A-1",
                 "celery@3f2a9c1b0d7e ready", "send 1 of 2 (+5)"):
        assert scrub(line) == line


def test_redact_url_hides_secrets_and_recipients():
    for url, secrets in (
            ("mailtos://user:s3cret@smtp.glow.example?from=hola@glow.example&to=ana@example.com",
             ("s3cret", "ana", "example.com")),
            ("json://127.0.0.1:8080/sms?:to=+34600111222", ("34600111222",)),
            ("twilio://ACabc123:tok456@+15551234567/+34600111222", ("tok456", "34600111222"))):
        shown = redact_url(url)
        assert shown.split("://")[0] == url.split("://")[0]
        for secret in secrets:
            assert secret not in shown, (url, shown)
    assert redact_url("mailtos://user:s3cret@smtp.glow.example?to=x@y.com").endswith(
        "smtp.glow.example/…")


TOKEN = "v1.eyJjIjoiZ2xvdyIsImNoIjoiZW1haWwifQ.nkNsUkHtNk8rtxpMf04o5EYUucpdK24k7TISZjTGczg"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_unsubscribe_token_is_cut_from_every_line_debug_included(capture, fmt):
    log, out = capture(fmt)
    log.error("unhandled KeyError on POST /v1/unsubscribe/%s (incident 1a2b) at x.py:3", TOKEN)
    log.debug("List-Unsubscribe: <https://r.example/v1/unsubscribe/%s>", TOKEN)
    log.warning("GET https://r.example/V1/UNSUBSCRIBE/%s?x=1 failed", TOKEN)
    try:
        raise ValueError(f"/v1/unsubscribe/{TOKEN}")
    except ValueError:
        log.exception("a bug")
    text = out.getvalue()
    assert not any(part in text for part in TOKEN.split(".")[1:]), text
    assert "POST /v1/unsubscribe/… (incident 1a2b)" in text
    assert "<https://r.example/v1/unsubscribe/…>" in text
    assert "/V1/UNSUBSCRIBE/…?x=1 failed" in text
    assert len(text.splitlines()) >= 4


def test_access_path_keeps_the_route_and_the_bookings_filters_only():
    assert access_path(f"/v1/unsubscribe/{TOKEN}") == "/v1/unsubscribe/…"
    assert access_path(f"/v1/unsubscribe/{TOKEN}/more?a=b") == "/v1/unsubscribe/…?a=…"
    assert access_path("/v1/bookings?status=held&from=2026-12-01T00%3A00%3A00Z&limit=5"
                       "&cursor=A-1") == ("/v1/bookings?status=held&from=2026-12-01T00%3A00"
                                          "%3A00Z&limit=5&cursor=A-1")
    assert access_path("/v1/inbound/sms/glow?From=%2B34600111222&Body=STOP") == (
        "/v1/inbound/sms/glow?From=…&Body=…")
    assert access_path("/v1/bookings?ana%40example.com&x") == "/v1/bookings?…&…"
    assert access_path("/v1/bookings/A-1042") == "/v1/bookings/A-1042"
    assert access_path("/healthz") == "/healthz"
