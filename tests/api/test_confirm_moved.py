"""A patient's confirmation is of the visit as it was when they confirmed it (review).

The patient replies "C" to confirm their visit of the 13th (the answer names that date);
the clinic then moves the visit to the 20th, or cancels it and books it again. The
timeline kept `confirmed_at`, so the clinic read the new visit as confirmed by a patient
who never heard of it. A move or a re-opening clears it; a confirmation of the new
date sets it again; a change that keeps the date (the patient's name) keeps it. Real HTTP
(uvicorn), real Redis, Twilio-signed posts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from tests.api.test_inbound import ANA, book, events, message_of, server, text, tw  # noqa: F401
from worker.store import Store


def put(client, doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    answer = client.put(f"/v1/bookings/{doc['booking_id']}", json=doc | changes)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


@contextmanager
def confirm_parked(server, monkeypatch) -> Iterator[dict[str, Any]]:  # noqa: F811
    """A patient's "C" that has read the visit, parked before it records the confirmation
    while the block runs (the competing change); then it resumes and its answer is in the
    yielded dict's "r"; recording is real again after."""
    parked, go = threading.Event(), threading.Event()
    real = Store.note_reply

    def note_reply(self: Store, *args: Any, **kwargs: Any) -> bool:
        parked.set()
        assert go.wait(10)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "note_reply", note_reply)
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", text(server, "C")))
    thread.start()
    try:
        assert parked.wait(10)
        yield answer
    finally:
        go.set()
        thread.join(30)
        monkeypatch.setattr(Store, "note_reply", real)


def test_a_move_or_a_reopening_clears_the_confirmation(server, tw):  # noqa: F811
    book(tw, "A-1")
    store = server.app.state.services.store
    doc = store.booking_doc("tw", "A-1")
    assert "is confirmed" in (message_of(text(server, "C")) or "")
    confirmed = tw.get("/v1/bookings/A-1").json()["confirmed_at"]
    assert confirmed

    # Another name, the same visit: still the visit the patient confirmed.
    renamed = put(tw, doc, patient=doc["patient"] | {"name": "Ana María López"})
    assert renamed["confirmed_at"] == confirmed
    doc = store.booking_doc("tw", "A-1")

    later = (datetime.fromisoformat(doc["starts_at"]) + timedelta(days=7)).isoformat()
    moved = put(tw, doc, starts_at=later)
    assert "confirmed_at" not in moved, moved
    assert "confirmed_at" not in tw.get("/v1/bookings/A-1").json()
    assert "confirmed_at" not in store.redis.hgetall(store.booking_key("tw", "A-1"))

    # The patient confirms the new date; then the clinic cancels and books it again.
    assert "is confirmed" in (message_of(text(server, "C")) or "")
    assert tw.get("/v1/bookings/A-1").json()["confirmed_at"]
    assert tw.delete("/v1/bookings/A-1").status_code == 200
    doc = store.booking_doc("tw", "A-1")
    reopened = put(tw, doc)
    assert reopened["status"] == "scheduled"
    assert "confirmed_at" not in reopened, reopened
    assert "confirmed_at" not in tw.get("/v1/bookings/A-1").json()


def test_a_confirmation_read_before_a_move_is_not_recorded_on_the_moved_visit(
        server, tw, monkeypatch):  # noqa: F811
    """The "C" has read the visit (the 13th, which its answer names) and is parked before
    it records the confirmation; the clinic moves the visit to the 20th; the reply resumes.
    The patient confirmed the 13th: the 20th is not recorded as confirmed."""
    book(tw, "A-1")
    store = server.app.state.services.store
    doc = store.booking_doc("tw", "A-1")
    with confirm_parked(server, monkeypatch) as answer:
        later = (datetime.fromisoformat(doc["starts_at"]) + timedelta(days=7)).isoformat()
        assert put(tw, doc, starts_at=later)["version"] == 2
    assert "is confirmed" in (message_of(answer["r"]) or "")  # of the date it read
    assert "confirmed_at" not in tw.get("/v1/bookings/A-1").json()
    assert "confirmed_at" not in store.redis.hgetall(store.booking_key("tw", "A-1"))
    # The patient still replied: the clinic hears of it.
    replied = [e for e in events(server) if e.type == "patient.replied"]
    assert [e.fields["reply"] for e in replied] == ["confirm"]
    # Confirming again (the date now told) records it.
    assert "is confirmed" in (message_of(text(server, "C")) or "")
    assert tw.get("/v1/bookings/A-1").json()["confirmed_at"]


def test_a_confirmation_read_before_a_cancel_confirms_no_cancelled_visit(
        server, tw, monkeypatch):  # noqa: F811
    """The "C" has read the visit (the 13th) and is parked before it records the
    confirmation; the clinic cancels the visit; the reply resumes. Review: the cancelled
    booking was recorded as confirmed and the patient answered "your visit on the 13th is
    confirmed" after the clinic cancelled it. Now: no `confirmed_at` on the cancelled
    booking, the patient is answered that no upcoming visit was found (call the clinic),
    and the clinic still hears of the reply, once."""
    book(tw, "A-1")
    store = server.app.state.services.store
    with confirm_parked(server, monkeypatch) as answer:
        cancelled = tw.delete("/v1/bookings/A-1")
        assert cancelled.status_code == 200 and cancelled.headers["etag"] == '"2"'
    said = message_of(answer["r"]) or ""
    assert "is confirmed" not in said, said
    assert "no upcoming visit" in said, said
    timeline = tw.get("/v1/bookings/A-1").json()
    assert timeline["status"] == "cancelled" and timeline["version"] == 2
    assert "confirmed_at" not in timeline
    assert "confirmed_at" not in store.redis.hgetall(store.booking_key("tw", "A-1"))
    replied = [e for e in events(server) if e.type == "patient.replied"]
    assert [e.fields["reply"] for e in replied] == ["confirm"]


def test_the_openapi_timeline_documents_the_replies_fields(server, tw):  # noqa: F811
    """Every field a timeline answers with is in the OpenAPI document's Timeline."""
    book(tw, "A-1")
    message_of(text(server, "C"))
    message_of(text(server, "R"))
    timeline = tw.get("/v1/bookings/A-1").json()
    assert timeline["confirmed_at"] and timeline["call_requested_at"]
    documented = tw.get("/openapi.json").json()["components"]["schemas"]["Timeline"]
    assert set(timeline) <= set(documented["properties"]), set(timeline) - set(
        documented["properties"])
