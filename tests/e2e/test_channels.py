"""One queue per channel: a slow mail server never holds SMS back. Real Redis, a real
Celery worker and beat, a real SMTP server that takes 1 s per message, a real SMS gateway."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from tests.e2e.conftest import wait_until
from tests.e2e.test_failures import (
    _norm,
    assert_exactly_once,
    bookings,
    expected_keys,
    received_keys,
    settle,
)

pytestmark = pytest.mark.integration
BOOKINGS = 16
# Due to sent: a pump interval, the batch, 16 sends by 8 threads on a busy test machine.
# Held behind the emails (one queue, one pool) they would be 4 s late or more.
ON_TIME_SECONDS = 3.5


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def test_a_slow_mail_server_does_not_delay_sms(
        service, smtp_sink, sms_sink, make_booking, e2e_config, redis_client):
    smtp_sink.delay = 1.0  # every email holds its DATA answer for 1 s
    # 4 senders per channel in each of the worker's 2 processes: 4 to 8 emails at a time.
    service.configure(REMINDERS_SEND_THREADS="4").up()
    # 16 confirmations at once, then 16 "prep" emails and SMS due together 4 s later: 32
    # emails of 1 s each keep the email senders busy for 4 to 8 s; the SMS must not wait.
    docs = bookings(make_booking, "C", BOOKINGS, starts_in=12, first_phone=500)
    timelines = service.book(*docs)
    pairs = list(zip(docs, timelines, strict=True))
    expected = sum((expected_keys(e2e_config, d, t) for d, t in pairs), Counter())
    prep_texts = set(sum((expected_keys(e2e_config, d, t, only={"prep:sms"}) for d, t in pairs),
                         Counter()))
    due = {(d["patient"]["phone"], r["id"]): _epoch(r["due_at"])
           for d, t in pairs for r in t["reminders"] if r["channel"] == "sms"}

    def lateness(message) -> float:
        step = "prep:sms" if ("sms", message.to, _norm(message.text)) in prep_texts else "spf:sms"
        return message.at - due[(message.to, step)]

    wait_until(lambda: len(sms_sink.snapshot()) >= BOOKINGS, 30)  # the 16 prep SMS
    emails_by_then = len(smtp_sink.snapshot())
    # They went out on time while the mail server was still working through the emails.
    assert emails_by_then < 2 * BOOKINGS, emails_by_then
    assert all(-0.5 <= lateness(m) <= ON_TIME_SECONDS for m in sms_sink.snapshot()), [
        round(lateness(m), 2) for m in sms_sink.snapshot()]

    wait_until(lambda: sum(received_keys(smtp_sink, sms_sink).values()) >= len(expected), 90)
    settle(redis_client)
    assert_exactly_once(expected, received_keys(smtp_sink, sms_sink))
    late = sorted(round(lateness(m), 2) for m in sms_sink.snapshot())
    assert len(late) == 2 * BOOKINGS and all(-0.5 <= x <= ON_TIME_SECONDS for x in late), late
