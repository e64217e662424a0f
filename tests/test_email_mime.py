"""worker.email_mime: Apprise's emails serialized faster, to exactly the stdlib's text."""

from __future__ import annotations

import random
import re
import string
import sys
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from typing import Any

import pytest
from apprise import conversion as apprise_conversion
from apprise.attachment.memory import AttachMemory
from apprise.plugins.email import base as apprise_email

import worker.delivery  # noqa: F401  # installs the fast classes in Apprise's email plugin
from worker import email_mime
from worker.email_mime import FastMIMEMultipart, FastMIMEText

SUBJECT = "Tu cita de microneedling del sábado 5 de diciembre de 2026 - Glow Skin Clinic"
LONG = "Reminder about your appointment " * 6  # folded over several lines
HTML = "<p>Hola <b>Ana</b>,</p><p>nos vemos pronto.</p>" * 20


def tree(multipart: type, text: type, body: str = "Hola Ana,\nnos vemos pronto.") -> Any:
    """A message as Apprise's email plugin builds one, from the given classes."""
    outer = multipart("mixed")
    alternative = multipart("alternative")
    alternative.attach(text(body, "plain", "utf-8"))
    alternative.attach(text(HTML, "html", "utf-8"))
    outer.attach(alternative)
    ics = MIMEApplication(b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n")
    ics.set_type("text/calendar; method=REQUEST; charset=UTF-8")
    ics.add_header("Content-Disposition", 'attachment; filename="{}"'.format(
        Header("cita.ics", "utf-8")))
    outer.attach(ics)
    outer["X-Application"] = Header("Apprise", None)
    outer["List-Unsubscribe"] = Header("<https://u.example/x?t=abc>", None)
    outer["List-Unsubscribe-Post"] = Header("List-Unsubscribe=One-Click", None)
    outer["Subject"] = Header(SUBJECT, "utf-8")
    outer["X-Long"] = Header(LONG, None)
    outer["Comments"] = LONG + "ñ"
    outer["From"] = "Glow Skin Clinic <hola@glow.example>"
    outer["To"] = "ana@example.com"
    return outer


def serialized(message: Any, seed: int, **kwargs: Any) -> str:
    random.seed(seed)  # the same boundaries for both
    return message.as_string(**kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"maxheaderlen": 40}, {"maxheaderlen": 78}])
def test_same_text_as_the_stdlib(kwargs):
    for seed in range(3):  # again: now from the header cache
        fast = serialized(tree(FastMIMEMultipart, FastMIMEText), seed, **kwargs)
        stdlib = serialized(tree(MIMEMultipart, MIMEText), seed, **kwargs)
        assert fast == stdlib
        assert "=?utf-8?" in fast and fast.count("\n--===============") == 6  # 2 multiparts


def test_a_boundary_found_in_the_text_is_changed_as_the_stdlib_changes_it():
    random.seed(7)
    token = random.randrange(sys.maxsize)
    taken = "--" + "=" * 15 + email_mime._BOUNDARY_FORMAT % token + "=="
    body = f"Hola Ana,\n{taken}\nnos vemos pronto."  # 7bit text: the line is as written

    def plain(multipart: type, text: type) -> Any:
        outer = multipart("mixed")
        outer.attach(text(body, "plain"))
        return outer

    fast = serialized(plain(FastMIMEMultipart, FastMIMEText), 7)
    assert fast == serialized(plain(MIMEMultipart, MIMEText), 7)
    assert f'boundary="{taken[2:]}.0"' in fast  # the first choice was refused


def test_the_header_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(email_mime, "FOLD_CACHE_SIZE", 5)
    email_mime._folded.clear()
    for i in range(20):  # a subject to fold (not ASCII): through the cache
        message, expected = FastMIMEText("x", "plain", "utf-8"), MIMEText("x", "plain", "utf-8")
        message["Subject"] = expected["Subject"] = f"sujet ñ {i}"
        assert message.as_string() == expected.as_string()
    assert 0 < len(email_mime._folded) <= 5


def test_a_plain_header_is_written_as_compat32_writes_it():
    """A header that is one line of printable ASCII is written without compat32's fold
    (`email_mime._plain`): the same line, for texts of every kind of space and sign."""
    rng = random.Random(7)
    signs = string.ascii_letters + string.digits + string.punctuation + "    \t"
    unfolded = Compat32().clone(max_line_length=0)
    plain = 0
    for _ in range(20_000):
        text = "".join(rng.choice(signs) for _ in range(rng.randint(0, 30)))
        for value in (text, Header(text, None), Header(text, "us-ascii")):
            written = email_mime._plain(value)
            if written is not None:
                plain += 1
                assert f"X-Name: {written}\n" == unfolded.fold("X-Name", value)
    assert plain > 20_000  # most are plain
    two = Header("a", None)
    two.append("b", "utf-8")
    for value in ["ñ", " lead", "trail ", "tab\there", "two\nlines", Header("ñ", "utf-8"),
                  two, ""]:
        assert email_mime._plain(value) is None


def test_apprise_builds_its_emails_with_the_fast_classes_and_the_same_text(monkeypatch):
    (plugin,) = worker.delivery.load_services("mailto://127.0.0.1:25?from=h@g.example&to=a@b.c")
    sends_from = sys.modules[type(plugin).send.__module__]  # the module a mailto:// send uses
    assert sends_from.MIMEMultipart is FastMIMEMultipart
    assert sends_from.MIMEText is FastMIMEText

    def prepared(seed: int) -> str:
        random.seed(seed)
        (message,) = apprise_email.NotifyEmail.prepare_emails(
            subject=SUBJECT, body=HTML, from_addr=("Glow", "hola@glow.example"),
            to=[(None, "ana@example.com")], notify_format="html",
            attach=[AttachMemory(content=b"BEGIN:VCALENDAR", name="cita.ics",
                                 mimetype="text/calendar")],
            headers={"List-Unsubscribe": "<https://u.example/x?t=abc>",
                     "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
        # The two lines that depend on the clock.
        return re.sub(r"(?m)^(Date|Message-ID): .*$", r"\1: -", message.body)

    fast = prepared(3)
    assert fast == prepared(3)  # again: the text parts' headers as kept
    monkeypatch.setattr(apprise_email, "MIMEMultipart", MIMEMultipart)
    monkeypatch.setattr(apprise_email, "MIMEText", MIMEText)
    monkeypatch.setattr(apprise_email.NotifyEmail, "_get_charset", staticmethod(
        apprise_email.NotifyEmail._get_charset.wrapped))  # Apprise's own
    assert fast == prepared(3)
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in fast
    assert 'filename="cita.ics"' in fast and "multipart/alternative" in fast


TEXTS = ["Hola Ana,\nnos vemos pronto.", "", "ñandú, 😀 " * 40, "x" * 300 + "\r\nend ",
         "=?utf-8?q?no?= tab\there", "Ana\udcff"]


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1", "us-ascii", "euc-jp", "utf-16"])
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_a_text_part_is_made_as_the_stdlib_makes_it(charset, subtype):
    """FastMIMEText's constructor (its headers kept per subtype and charset, where the
    body encoding is quoted-printable or base64; Apprise's utf-8 is quoted-printable):
    the same headers, payload, charset and text as MIMEText's, for the first part and the
    next ones; a text the charset cannot take fails as it does in the stdlib."""
    for _ in range(2):
        for text in TEXTS:
            try:
                expected = MIMEText(text, subtype, charset)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    FastMIMEText(text, subtype, charset)
                continue
            made = FastMIMEText(text, subtype, charset)
            assert made._headers == expected._headers
            assert made._payload == expected._payload
            assert str(made.get_charset()) == str(expected.get_charset())
            assert made.as_string() == expected.as_string()


def test_apprise_asks_the_charset_of_a_header_value_with_the_same_answers():
    get_charset = apprise_email.NotifyEmail._get_charset
    for value in ["", "Glow Skin Clinic", SUBJECT, "Zoë", "😀", "\x7f", "\x80"]:
        assert get_charset(value) == get_charset.wrapped(value)


@pytest.mark.parametrize("value", [
    "Tu cita\n\nInjected body",  # a blank line: the rest would become the body
    "Tu cita\nInjected line",
    "Tu cita\r\n\r\nInjected body",
])  # (a line that reads as a header of its own is refused when set, by the stdlib)
@pytest.mark.parametrize("header", ["Subject", "From", "X-Custom"])  # cached or not
def test_a_header_that_would_inject_lines_is_refused(header, value):
    """As Python's fix for CVE-2024-6923 has the stdlib refuse it, on every Python: the
    folded header would break out of its line."""
    email_mime._folded.clear()
    message = FastMIMEText("Hola Ana", "plain", "utf-8")
    message[header] = value
    with pytest.raises(email_mime.HeaderWriteError, match="newline"):
        message.as_string()
    assert not any(value in folded for folded in email_mime._folded.values())


def test_a_header_continued_on_a_line_starting_with_whitespace_is_written():
    value = "Tu cita de mañana\n\tcon la doctora Ruiz"  # folding white space: one header
    message = FastMIMEText("Hola Ana", "plain", "utf-8")
    message["Subject"] = value
    expected = MIMEText("Hola Ana", "plain", "utf-8")
    expected["Subject"] = value
    assert message.as_string() == expected.as_string()
    assert "\n =?utf-8?q?_con_la_doctora_Ruiz?=\n" in message.as_string()  # continued


def test_an_html_emails_plain_part_is_the_text_set_for_the_send_and_only_then():
    html = "<p>Hola <b>Ana</b>,</p><p>Sin maquillaje, por favor.</p>"
    convert = apprise_email.convert_between
    assert convert.wrapped is apprise_conversion.convert_between  # over Apprise's own, once
    apprise_own = convert.wrapped("html", "text", html)
    assert "Hola Ana" in apprise_own and "<b>" not in apprise_own
    assert convert("html", "text", html) == apprise_own  # no send under way: Apprise's
    token = email_mime.plain_text.set("Hola Ana,\n\nVen sin maquillaje.\n")
    try:
        assert convert("html", "text", html) == "Hola Ana,\n\nVen sin maquillaje.\n"
        assert convert("text", "html", "a < b") == convert.wrapped("text", "html", "a < b")
        assert convert("markdown", "text", "*x*") == convert.wrapped("markdown", "text", "*x*")
    finally:
        email_mime.plain_text.reset(token)
    assert convert("html", "text", html) == apprise_own
