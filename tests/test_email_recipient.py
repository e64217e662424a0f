"""An email goes to the patient's address exactly as booked, whatever it holds.

The address reaches Apprise inside the channel URL (`{to}`, URL-quoted) and Apprise's
email plugin reads it back with its own pattern (apprise/utils/parse.py GET_EMAIL_RE),
which takes an apostrophe in the first word of an address as the end of a display name:
"o'brien@example.com" became the recipient "brien@example.com" named "o", another
person's mailbox. Real aiosmtpd server: the envelope recipient and the To header.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.sinks import SmtpSink
from worker.clinics import Clinic
from worker.delivery import Envelope, deliver
from worker.errors import DeliveryError
from worker.models import parse_email
from worker.rendering import RenderedMessage

NOW = datetime(2026, 11, 28, 17, 0, 1, tzinfo=UTC)
MAIL = RenderedMessage("email", "Tu cita - Glow", "Hola,\nnos vemos pronto.",
                       "<p>Hola,</p><p>nos vemos pronto.</p>")


@pytest.fixture(scope="module")
def sink():
    server = SmtpSink().start()
    yield server
    server.stop()


@pytest.mark.parametrize("address", [
    "o'brien@example.com",
    "mary'ann.smith@example.com",
    "x+o'brien@example.com",
    "a&cc=eve@example.com",
    "a?to=eve%40example.org#x/y@example.com",
    "ana+tag@example.com",
    "ana'@example.com",
    "a+b+c@example.com",
])
def test_email_reaches_exactly_the_booked_address(sink, address):
    to = parse_email(address)
    assert to == address  # a valid address, kept as written
    url = Clinic(id="glow", name="Glow", phone="+34910000000", timezone="Europe/Madrid",
                 channels={"email": f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example"
                                    "&to={to}&mode=insecure"}).channel_url("email", to)
    before = len(sink.snapshot())
    deliver(url, Envelope("glow/A-1/prep:email", "glow", "email", to), MAIL, outbox=None,
            timeout=5, now=NOW)
    got = sink.snapshot()[before:]
    assert [m.to for m in got] == [address]
    assert got[0].raw["To"].addresses[0].addr_spec == address


@pytest.mark.parametrize(("address", "sent_to"), [
    ("ana@münchen.de", "ana@xn--mnchen-3ya.de"),
    # An international top-level domain: Apprise read "ana@example" (a host named
    # "example") from both forms, cutting at the first character it does not take.
    ("ana@example.рф", "ana@example.xn--p1ai"),
    ("ana@example.xn--p1ai", "ana@example.xn--p1ai"),
])
def test_an_address_on_an_international_domain_goes_to_its_ascii_form(sink, address,
                                                                       sent_to):
    # Apprise's pattern reads ASCII domains only: it dropped the recipient, and the send
    # failed as "the provider reported a failure", retried, then dead-lettered.
    to = parse_email(address)
    url = Clinic(id="glow", name="Glow", phone="+34910000000", timezone="Europe/Madrid",
                 channels={"email": f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example"
                                    "&to={to}&mode=insecure"}).channel_url("email", to)
    before = len(sink.snapshot())
    deliver(url, Envelope("glow/A-1/prep:email", "glow", "email", to), MAIL, outbox=None,
            timeout=5, now=NOW)
    got = sink.snapshot()[before:]
    assert [m.to for m in got] == [sent_to]  # the same mailbox (IDNA)


# "ñ+a@example.com": Apprise reads it whole, smtplib then cannot write it: the plugin
# raised, "the message may have been delivered", retried to a dead letter.
@pytest.mark.parametrize("address", ["ñoño@example.com", "o'ñoño@münchen.de", "ñ+a@example.com",
                                     "ñ-a@münchen.de"])
def test_an_address_apprise_cannot_write_fails_for_good_and_sends_nothing(sink, address):
    # Valid addresses, but a non-ASCII mailbox name needs SMTPUTF8, which Apprise's SMTP
    # session does not ask for: the same data fails again, so retrying only delays the
    # dead letter.
    to = parse_email(address)
    url = Clinic(id="glow", name="Glow", phone="+34910000000", timezone="Europe/Madrid",
                 channels={"email": f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example"
                                    "&to={to}&mode=insecure"}).channel_url("email", to)
    before = len(sink.snapshot())
    with pytest.raises(DeliveryError) as info:
        deliver(url, Envelope("glow/A-1/prep:email", "glow", "email", to), MAIL,
                outbox=None, timeout=5, now=NOW)
    assert info.value.permanent is True and info.value.unknown is False
    assert "address" in info.value.reason and address not in info.value.reason
    assert sink.snapshot()[before:] == []


def test_an_sms_through_an_email_to_sms_gateway_goes_to_the_number_at_the_gateway(sink):
    # The SMS channel's URL may be an email gateway's: {to}, the number, is part of the
    # address; the patient's number is no email address and must not be taken for one.
    url = Clinic(id="glow", name="Glow", phone="+34910000000", timezone="Europe/Madrid",
                 channels={"sms": f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example"
                                  "&to=sms-{to}@sms.example&mode=insecure"}).channel_url(
        "sms", "+34600111222")
    before = len(sink.snapshot())
    deliver(url, Envelope("glow/A-1/prep:sms", "glow", "sms", "+34600111222"),
            RenderedMessage("sms", None, "Glow: mañana a las 10:00", None), outbox=None,
            timeout=5, now=NOW)
    assert [m.to for m in sink.snapshot()[before:]] == ["sms-+34600111222@sms.example"]


def test_a_gateway_address_apprise_drops_fails_for_good_and_sends_nothing(sink):
    # "{to}@gateway" with an E.164 number: Apprise's email plugin drops "+34...@..." (its
    # pattern takes no "+" at the start) and has no recipient; the same data fails again.
    url = Clinic(id="glow", name="Glow", phone="+34910000000", timezone="Europe/Madrid",
                 channels={"sms": f"mailto://127.0.0.1:{sink.port}?from=hola@glow.example"
                                  "&to={to}@sms.example&mode=insecure"}).channel_url(
        "sms", "+34600111222")
    before = len(sink.snapshot())
    with pytest.raises(DeliveryError) as info:
        deliver(url, Envelope("glow/A-1/prep:sms", "glow", "sms", "+34600111222"),
                RenderedMessage("sms", None, "Glow: mañana a las 10:00", None), outbox=None,
                timeout=5, now=NOW)
    assert info.value.permanent is True and info.value.unknown is False
    assert "+34600111222" not in info.value.reason
    assert sink.snapshot()[before:] == []
