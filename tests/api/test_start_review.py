"""START after STOP, reviewed cold: forced cases of the opt-in (`Store.opt_in`) against the
clinic's changes of the booking and the SMS cap. Real HTTP (uvicorn on a loopback port,
Twilio-signed form posts) against a real Redis."""

from __future__ import annotations

from tests.api import test_inbound as inbound
from tests.api.test_inbound import book, message_of, reminders, text

server = inbound.server  # the API's fixtures
tw = inbound.tw
FUTURE_SMS = ("day-before:sms", "spf:sms", "resume-retinoids:sms", "week-check:sms")


def test_a_booking_cancelled_while_opted_out_and_booked_again_after_start_sends_its_sms(
        server, tw):
    """STOP skips A-1's SMS; the clinic cancels A-1 (START puts nothing back in a cancelled
    booking), the patient replies START, then the clinic books A-1 again with the same
    document (a re-open). The patient is opted in: the re-opened booking's SMS go, as its
    emails do; they must not stay skipped for an opt-out that no longer holds."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    assert tw.delete("/v1/bookings/A-1").status_code == 200
    message_of(text(server, "START"))
    store = server.app.state.services.store
    again = tw.put("/v1/bookings/A-1", json=store.booking_doc("tw", "A-1"))
    assert again.status_code in (200, 201), again.text
    assert again.json()["status"] == "scheduled"
    after = reminders(tw, "A-1")
    for key in FUTURE_SMS:
        assert after[key]["status"] == "scheduled", after[key]
        assert store.redis.zscore(store.due_key, f"tw/A-1/{key}") is not None, key

