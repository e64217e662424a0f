"""A clinic event's retry is due on Redis's clock (found by review, as the reminders'
hand-backs were: tests/test_clock_handbacks.py): events are claimed by Redis's TIME
(worker/webhooks.py `_CLAIM`), but a failed delivery's retry was dated `time.time() +
backoff` on the delivering host. A host 30 s behind Redis made every backoff under 30 s
into "due now" (a failing clinic endpoint hammered at each pump run); a host ahead made
each retry wait the skew more. Now the retry's due time is Redis's clock plus the backoff,
taken in the script that writes it.

The webhook's signature time stays the host's (receivers compare it with their own
clock): checked here too.

Real Redis, a real webhook endpoint answering 503, a real SMTP address refusing the held
alert; the skewed clock is the one edge patched: worker/webhooks.py's `time`."""

from __future__ import annotations

import time as real_time

import pytest

from tests.test_clock_skew import SKEW, Skewed
from tests.test_webhooks import deliver_all, events, glow, hooked, receiver  # noqa: F401
from worker import webhooks
from worker.clock import redis_time

BACKOFF = (15.0, 30.0)  # tests/test_webhooks.py settings: base 30 s, the first retry 15-30 s


@pytest.mark.parametrize("skew", [-SKEW, SKEW], ids=["host behind", "host ahead"])
@pytest.mark.parametrize("kind", ["webhook", "alert"])
def test_a_failed_clinic_event_is_retried_after_its_backoff_on_redis_clock(
        kind, skew, events, receiver, tmp_path, redis_client, monkeypatch):  # noqa: F811
    monkeypatch.setattr(webhooks, "time", Skewed(skew))  # the delivering host is off Redis's
    if kind == "webhook":
        receiver.status = 503
        clinic = hooked(receiver)
        event_id = events.emit("glow", "webhook", "reminder.failed",
                               {"booking_id": "A-1", "reason": "HTTP 400"})
    else:  # the held-booking alert, to an SMTP server that is not there
        clinic = glow(channels={
            "email": "mailto://127.0.0.1:9?from=noreply@glow.example&to={to}&mode=insecure",
            "sms": "json://127.0.0.1:9/sms?:to={to}"})
        event_id = events.emit("glow", "alert", "booking.held", {
            "booking_id": "A-1", "treatment": "microneedling", "starts_at": 1_800_000_000,
            "reason": "isotretinoin"})
    before = redis_time(redis_client)
    (result,) = deliver_all(events, clinic, tmp_path)
    after = redis_time(redis_client)
    assert result.startswith("retrying: "), result
    due = redis_client.zscore(events.due_key, event_id)
    assert due is not None
    # Its backoff counted on Redis's clock, the pump's: not the skew early, nor late.
    assert before + BACKOFF[0] - 1 <= due <= after + BACKOFF[1] + 1, (due - before, skew)
    assert events.claim(10, lease_seconds=30) == []  # not claimed again before its backoff
    if kind == "webhook":
        (hook,) = receiver.snapshot()
        assert hook.valid  # the receiver's own clock accepts the signature's time ...
        stamp = int(hook.headers[webhooks.SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
        # ... which stays the host's: receivers compare it with their own clocks.
        assert abs(stamp - (real_time.time() + skew)) < 5, stamp - real_time.time()
