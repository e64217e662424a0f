"""A patient's question or report that starts with a stop word is not an opt-out (review).

The first reminder of a tretinoin protocol says "stop tretinoin / retinol tonight"; the
aftercare ones ask about swelling and fever. "Stop the cream?", "Stop retinol tonight?",
"¿Baja la hinchazón?" (is the swelling going down?) and "Baja la fiebre" (the fever is
going down) opted the number out of every SMS at the clinic, care-critical ones included,
and answered with the STOP confirmation. Real HTTP (uvicorn), real Redis, Twilio-signed
posts: the number stays opted in, its reminders stay scheduled, the answer is the
clarifying one. Clear opt-outs, questions included, still opt out; "Opt me out" too (it
was an unknown text: one help answer a day, the number never opted out).
"""

from __future__ import annotations

import pytest

from tests.api.test_inbound import ANA, book, message_of, reminders, server, text, tw  # noqa: F401
from worker.optout import classify


@pytest.mark.parametrize("body", ["Stop the cream?", "Stop retinol tonight?",
                                  "¿Baja la hinchazón?", "Baja la fiebre",
                                  # the reminder's words echoed back, or acknowledged (review
                                  # s20): statements about the product, not the texts
                                  "Stop tretinoin tonight", "Ok stop tretinoin",
                                  "Will stop retinol", "STOP tretinoin", "Stop the cream",
                                  # the pause reminder acknowledged (review s20, second
                                  # look): 7eb47e9 let a product stand between STOP and a
                                  # messaging word at any length, and "message received"
                                  # after it made these opt-outs (they were not)
                                  "Ok stop retinol, message received",
                                  "Stop the cream, message received thanks",
                                  "Stop tretinoin, reminder received",
                                  "Stop retinol, message received"])
def test_a_question_or_report_starting_with_a_stop_word_opts_nothing_out(server, tw, body):  # noqa: F811
    book(tw, "Q-1")
    before = reminders(tw, "Q-1")
    assert any(r["channel"] == "sms" and r["status"] == "scheduled" for r in before.values())
    reply = message_of(text(server, body))
    assert reply and "reply STOP" in reply, reply  # the clarifying answer, not the confirmation
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is None
    after = reminders(tw, "Q-1")
    assert {k: r["status"] for k, r in after.items()} == \
        {k: r["status"] for k, r in before.items()}


@pytest.mark.parametrize("body", [
    "Stop the reminders?", "Unsubscribe me?", "stop it?", "STOP?", "Stop texting me?",
    "¿Baja?", "Baja ya", "Baja de los mensajes", "BAJA gracias", "Baja por favor",
    # a product named beside the texts: still about the texts
    "Stop tretinoin texts", "stop the tretinoin reminders", "Stop retinol and stop texting me",
    "Stop the retinol reminders please", "Stop retinol messages now thanks",
    "Retinol texts: STOP",
])
def test_clear_opt_outs_still_opt_out(body):
    assert classify(body) == "stop", body


@pytest.mark.parametrize("body", ["Opt me out", "please opt me out", "OPT ME OUT!"])
def test_opt_me_out_opts_out(server, tw, body):  # noqa: F811
    book(tw, "O-1")
    reply = message_of(text(server, body))
    assert reply and "no more texts" in reply, reply  # the one confirmation
    store = server.app.state.services.store
    assert store.opted_out("tw", "sms", ANA) is not None
    assert all(r["status"] == "skipped" for r in reminders(tw, "O-1").values()
               if r["channel"] == "sms")
