"""The log scrubber masks every address the booking's validation accepts, whole: a local
part of RFC 5322 atext ({ana}, ana&luis, o'brien, a/b, ...) logged at INFO through the
project's real logging setup (worker.logs.configure, the root logger) leaves nothing of it."""

from __future__ import annotations

import io
import logging

import pytest

from worker.logs import configure
from worker.models import parse_email

ADDRESSES = [
    "{ana}@example.com", "ana&luis@example.com", "ana|luis@example.com",
    "ana!luis@example.com", "#ana@example.com", "$ana$@example.com", "ana*luis@example.com",
    "ana/luis@example.com", "ana^luis@example.com", "`ana`@example.com", "~ana~@example.com",
    "ana=luis@example.com", "ana?luis@example.com", "a!#$%&'*+/=?^_`{|}~-b@example.com",
    "ana.{luis}&co@clínica.es", "&ana@example.com", "*ana@example.com", "/ana@example.com",
]


@pytest.fixture
def root_log():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    yield out
    for added in list(root.handlers):
        root.removeHandler(added)
    for old in saved[0]:
        root.addHandler(old)
    root.setLevel(saved[1])


@pytest.mark.parametrize("address", ADDRESSES)
def test_an_address_booking_validation_accepts_is_masked_whole(root_log, address):
    assert parse_email(address), address  # the booking would carry it
    # One of our own loggers: Apprise's never reach the root's handler in a process that
    # sends (worker/delivery.py confines them to the send), so they cannot show the scrubber.
    log = logging.getLogger("worker.scrub_probe")
    log.info("Sending Email to %s via smtp.glow.example:587", address)
    log.warning("SMTP recipient <%s> refused: 550", address)
    log.info("to=%s&x=1", address)
    text = root_log.getvalue()
    assert text.count("[email]") == 3, text
    local = address.split("@")[0]
    for line in text.splitlines():
        assert local not in line, line
    assert "via smtp.glow.example:587" in text and '"to=[email]&x=1"' in text, text
