"""START opts a number back in only when the text asks for that: a START word with at most
courtesy words around it ("START", "Unstop please", "Start again", "Alta por favor"), not
a sentence that merely begins with one ("Resume tretinoin tonight?", "Alta fiebre desde
ayer": a high fever). Since START puts the patient's skipped SMS back into the schedule
(worker/store.py `opt_in`), such a text would send SMS to a patient who opted out."""

from __future__ import annotations

import pytest

from tests.api import test_inbound as inbound
from tests.api.test_inbound import ANA, book, message_of, reminders, text
from worker.optout import classify

server = inbound.server  # the API's fixtures
tw = inbound.tw


@pytest.mark.parametrize("body", [
    "Resume tretinoin tonight?", "resume my retinol now", "Start the cream tomorrow?",
    "Alta fiebre desde ayer", "Alta temperatura, ¿es normal?", "Reanudar el retinol hoy?",
    "Unstop the peeling?",
])
def test_a_sentence_beginning_with_a_start_word_is_not_an_opt_in(body):
    assert classify(body) != "start", body


@pytest.mark.parametrize("body", [
    "START", "Start!", "unstop please", "Start again", "START texts please", "Alta",
    "alta por favor", "Reanudar mensajes", "Resume reminders", "start sending me texts",
])
def test_a_start_word_with_courtesy_words_is_an_opt_in(body):
    assert classify(body) == "start", body


def test_an_opted_out_patient_asking_about_resuming_tretinoin_stays_opted_out(server, tw):
    """Real HTTP: STOP, then the question "Resume tretinoin tonight?": the number stays
    opted out and none of its SMS goes back into the schedule."""
    book(tw, "A-1")
    message_of(text(server, "STOP"))
    store = server.app.state.services.store
    before = reminders(tw, "A-1")
    text(server, "Resume tretinoin tonight?")
    assert store.opted_out("tw", "sms", ANA) is not None
    assert reminders(tw, "A-1") == before
    due = store.redis.zrange(store.due_key, 0, -1)
    assert not [ref for ref in due if ref.endswith(":sms")], due
