"""A deployment upgraded in place: numbers opted out before the clinic's consent record
(P:ev:consent:<clinic>, worker/webhooks.py `tell_consent`) existed were confirmed and told
by the code of their day (the opt-out script, then `note_reply` "stop" on each booking it
touched), and have no record. Their next STOP gets nothing (no second confirmation, no
second event); their START is told once and restores their SMS as any START does; a new
STOP after it, and a fresh number's very first STOP after the upgrade, are told and
confirmed once.

Real HTTP (uvicorn, Twilio-signed form posts), a real Redis holding the legacy shape written
as the old code left it, and the clinic's events delivered, signed, to a real webhook
receiver (fixtures of tests/api/test_consent_events.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from tests.api.test_consent_events import receiver, replied, server, tw  # noqa: F401
from tests.api.test_inbound import ANA, EVA, book, link_for, message_of, reminders, text


def legacy_stop(api, phone: str = ANA) -> None:
    """What a STOP left in Redis before the consent record: the opt-out (its SMS skipped,
    the same script) and the clinic told by `note_reply` on each booking it touched; no
    P:ev:consent entry at all."""
    services = api.app.state.services
    store = services.store
    now = datetime.now(UTC)
    stamp = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    skipped, touched = store.opt_out("tw", "sms", phone,
                                     f"the patient replied STOP by SMS at {stamp}",
                                     critical=services.catalog.critical_steps)
    assert skipped and touched
    for booking_id in touched:
        store.note_reply("tw", booking_id, "", now, "stop")
    consent = f"{api.settings.key_prefix}:ev:consent:tw"
    services.redis.delete(consent)  # the old code wrote no such record
    assert store.opted_out("tw", "sms", phone)
    assert services.redis.exists(consent) == 0


def sms_states(client, booking_id: str) -> dict[str, str]:
    return {k: r["status"] for k, r in reminders(client, booking_id).items()
            if r["channel"] == "sms"}


def test_a_number_opted_out_before_the_upgrade_is_not_told_or_confirmed_again(
        server, tw, receiver):  # noqa: F811
    book(tw, "A-1")
    book(tw, "A-2", days=30)
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    before = {b: sms_states(tw, b) for b in ("A-1", "A-2")}
    assert all("scheduled" in states.values() for states in before.values())
    legacy_stop(server)
    told = [("A-1", "stop", "sms"), ("A-2", "stop", "sms")]
    assert sorted(replied(server, receiver)) == told  # the old code's own telling
    assert all(s != "scheduled" for b in ("A-1", "A-2") for s in sms_states(tw, b).values())

    # The upgraded code: STOP again (a text still came from elsewhere, the provider resent).
    assert message_of(text(server, "STOP")) is None  # no second confirmation
    assert message_of(text(server, "Stop texting me")) is None
    assert len(replied(server, receiver)) == 2  # no second event

    # START: told once, its SMS back in the schedule as before.
    reply = message_of(text(server, "START"))
    assert reply and "STOP" in reply
    assert sorted(replied(server, receiver)[2:]) == [("A-1", "start", "sms"),
                                                     ("A-2", "start", "sms")]
    assert {b: sms_states(tw, b) for b in ("A-1", "A-2")} == before
    assert server.app.state.services.store.opted_out("tw", "sms", ANA) is None
    message_of(text(server, "START"))
    assert len(replied(server, receiver)) == 4

    # A STOP now is a change: told once, confirmed once.
    assert message_of(text(server, "STOP")) is not None
    assert message_of(text(server, "STOP")) is None
    assert sorted(replied(server, receiver)[4:]) == told
    assert len(replied(server, receiver)) == 6
    # Eva's consent never changed: nothing told of her booking.
    assert all(b != "E-1" for b, *_ in replied(server, receiver))


def test_a_fresh_numbers_first_stop_after_the_upgrade_is_told_and_confirmed_once(
        server, tw, receiver):  # noqa: F811
    """Another number opted out before the upgrade (so the deployment holds legacy
    opt-outs); a number never opted out sends its first STOP: one event, one confirmation."""
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    legacy_stop(server, EVA)
    assert replied(server, receiver) == [("E-1", "stop", "sms")]
    book(tw, "A-1")
    assert message_of(text(server, "STOP")) is not None
    assert message_of(text(server, "STOP")) is None
    assert replied(server, receiver)[1:] == [("A-1", "stop", "sms")]
    assert all(s != "scheduled" for s in sms_states(tw, "A-1").values())


def test_a_legacy_email_unsubscribe_is_told_when_clicked_again(
        server, tw, receiver):  # noqa: F811
    """The old unsubscribe told the clinic nothing (no patient.replied): a click again on
    an address unsubscribed before the upgrade tells it once, as ba71a76 does."""
    book(tw, "A-1")
    path = link_for(server, "ana@example.com")
    services = server.app.state.services
    services.store.opt_out("tw", "email", "ana@example.com",
                           "the patient unsubscribed from email at 2026-11-20T10:00:00Z",
                           critical=services.catalog.critical_steps)
    services.redis.delete(f"{server.settings.key_prefix}:ev:consent:tw")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with server.client() as client:
        for _ in range(2):
            done = client.post(path, content="List-Unsubscribe=One-Click", headers=form)
            assert done.status_code == 200 and "unsubscribed" in done.text
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]


def test_a_start_from_a_number_opted_out_before_the_upgrade_is_told_once(
        server, tw, receiver):  # noqa: F811
    """START straight after the upgrade (no STOP again first): the clinic recorded the old
    STOP, so it hears "start" once, and the SMS the STOP skipped go back as before."""
    book(tw, "A-1")
    before = sms_states(tw, "A-1")
    legacy_stop(server)
    assert replied(server, receiver) == [("A-1", "stop", "sms")]
    assert message_of(text(server, "START")) is not None
    assert sms_states(tw, "A-1") == before
    message_of(text(server, "START"))
    assert replied(server, receiver) == [("A-1", "stop", "sms"), ("A-1", "start", "sms")]
    assert message_of(text(server, "STOP")) is not None
    assert message_of(text(server, "STOP")) is None
    assert replied(server, receiver)[2:] == [("A-1", "stop", "sms")]


def test_a_legacy_numbers_start_whose_event_was_not_written_is_told_when_sent_again(
        server, tw, receiver):  # noqa: F811
    """Redis fails right after the opt-in of a number opted out before the upgrade (its
    opt-out is gone, nothing told): the provider's retry still tells "start", once."""
    book(tw, "A-1")
    legacy_stop(server)
    store = server.app.state.services.store
    real = store.opt_in
    calls = []

    def then_redis_fails(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        if len(calls) == 1:
            raise redis.ConnectionError("forced: the connection broke after the write")
        return calls[-1]

    store.opt_in = then_redis_fails
    try:
        assert text(server, "START").status_code == 503
        assert store.opted_out("tw", "sms", ANA) is None
        assert message_of(text(server, "START")) is not None
    finally:
        del store.opt_in
    assert replied(server, receiver) == [("A-1", "stop", "sms"), ("A-1", "start", "sms")]
    message_of(text(server, "START"))
    assert len(replied(server, receiver)) == 2
