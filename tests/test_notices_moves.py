"""Review: two moves in quick succession (real Redis). The second move's notice names the
date the patient was last told, never one they were never told of."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.test_notices import MOVED_TO, NOW, book, deliver, fields, notices, store  # noqa: F401
from worker.store import Attempt

ORIGINAL = int(datetime(2026, 12, 5, 13, 30, tzinfo=UTC).timestamp())  # 14:30 Madrid
FIRST_MOVE = int(datetime(2026, 12, 12, 13, 30, tzinfo=UTC).timestamp())
AGAIN = "2026-12-19T14:30:00+01:00"


def test_a_move_superseding_an_unsent_notice_says_moved_from_the_date_told(
        store, catalog, booking_doc):  # noqa: F811
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")  # the patient knows 5 Dec
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))  # notice #1 not yet sent
    assert fields(store)["moved_from"] == str(ORIGINAL)
    timeline = book(store, catalog, dict(booking_doc, starts_at=AGAIN))
    told = notices(timeline)
    assert told["rescheduled#1:email"]["status"] == "cancelled"
    assert told["rescheduled#2:email"]["status"] == "scheduled"
    # Not "your appointment on 12 Dec has moved": nobody told the patient of 12 Dec.
    assert fields(store)["moved_from"] == str(ORIGINAL)


def test_a_move_racing_the_notice_in_flight_says_moved_from_its_date(
        store, catalog, booking_doc, repo_settings):  # noqa: F811
    """Notice #1 is being handed over (it may have gone out) when the second move lands,
    and it does go out: notice #2 names the first move's date as the one it moved from."""
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    deliver(store, "rescheduled#1:email", finish=False)  # parked mid-send
    ref = "glow/A-1042/rescheduled#1:email"
    record = store.record(ref)
    attempt = Attempt(record["version"], record["claim"], f"tok-{record['claim']}")
    timeline = book(store, catalog, dict(booking_doc, starts_at=AGAIN))
    assert set(notices(timeline)) == {"rescheduled#1:email", "rescheduled#2:email"}
    assert fields(store)["moved_from"] == str(FIRST_MOVE)
    assert fields(store)["seq"] == "2"
    assert store.finish_sent(ref, attempt, NOW).startswith("stale")
    told = notices(store.timeline("glow", "A-1042"))
    assert told["rescheduled#2:email"]["status"] == "scheduled"
    assert store.redis.zscore(store.due_key, "glow/A-1042/rescheduled#2:email") is not None
    # It did go out: notice #2, rendered as a send renders it, names 12 Dec as the old date.
    from worker.dispatch import Context, _render
    from worker.models import Booking
    from worker.rendering import Renderer

    ref2 = "glow/A-1042/rescheduled#2:email"
    stored = fields(store) | {"doc": store.redis.get(store.doc_key("glow", "A-1042"))}
    ctx = Context(settings=repo_settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    _, _, message, _, _ = _render(ctx, ref2, store.record(ref2),
                                  Booking.model_validate_json(stored["doc"]), NOW, stored)
    assert "del 12 de diciembre, 14:30 pasa al 19 de diciembre" in message.text, message.text


def test_moved_back_to_the_date_told_names_no_previous_date(
        store, catalog, booking_doc):  # noqa: F811
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))  # notice #1 not yet sent
    book(store, catalog, booking_doc)  # back to 5 Dec before anything was told
    assert fields(store).get("moved_from", "") == ""  # not "on 5 Dec has moved to 5 Dec"


def test_a_cancel_after_an_untold_move_names_the_date_the_patient_knows(
        store, catalog, booking_doc, repo_settings):  # noqa: F811
    """Moved 5 -> 12 Dec late in the evening (the notice waits for the morning), cancelled
    before it went out: the cancel notice, rendered as a send renders it, says the 5 Dec
    visit is cancelled (the patient never heard of 12 Dec), with the invite's CANCEL."""
    import icalendar

    from worker.dispatch import Context, _render
    from worker.invites import invite_uid
    from worker.models import Booking
    from worker.rendering import Renderer

    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))  # notice #1 not yet sent
    timeline = store.cancel("glow", "A-1042", NOW)
    told = notices(timeline)
    assert told["rescheduled#1:email"]["status"] == "cancelled"
    assert told["cancelled#2:email"]["status"] == "scheduled"
    ref = "glow/A-1042/cancelled#2:email"
    stored = fields(store) | {"doc": store.redis.get(store.doc_key("glow", "A-1042"))}
    booking = Booking.model_validate_json(stored["doc"])
    ctx = Context(settings=repo_settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    _, _, message, _, _ = _render(ctx, ref, store.record(ref), booking, NOW, stored)
    assert "5 de diciembre" in message.text and "12 de diciembre" not in message.text
    (event,) = icalendar.Calendar.from_ical(message.attachments[0].data).walk("VEVENT")
    assert str(event["UID"]) == invite_uid("glow", "A-1042") and event["SEQUENCE"] == 2
    assert event["STATUS"] == "CANCELLED"
    # Nothing else of the booking is due: only the cancel notice.
    assert [r.split("/")[-1] for r in store.redis.zrange(store.due_key, 0, -1)] == [
        "cancelled#2:email"]


def _claim(rems, key: str):
    ref = f"glow/A-1042/{key}"
    rems.redis.zadd(rems.due_key, {ref: 0})
    claims = rems.claim_due(100, 60)
    for c in claims:
        if c.ref != ref:
            assert rems.requeue(c.ref, NOW + timedelta(days=30), "not in this test", c.claim)
    (claim,) = [c for c in claims if c.ref == ref]
    return claim


class _AtNow(datetime):
    """The send path's clock at NOW (13:00 in Madrid: inside the patient's send window,
    whatever the hour the test runs at; the real clock deferred the notice after 19:00 UTC)."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return NOW.astimezone(tz) if tz is not None else NOW.replace(tzinfo=None)


def test_a_move_landing_while_the_last_notice_is_rendered_sends_only_the_new_date(
        store, catalog, booking_doc, repo_settings, tmp_path, monkeypatch):  # noqa: F811
    """Notice #1 (12 Dec) is rendered and about to be handed over when the clinic moves the
    visit again (19 Dec): #1 is dropped unsent, #2 goes with the 19 Dec date and SEQUENCE 2."""
    import email
    import email.policy

    import icalendar

    from worker.dispatch import Context, attempt
    from worker.rendering import Renderer

    monkeypatch.setattr("worker.dispatch.datetime", _AtNow)
    settings = repo_settings.model_copy(update={"outbox_dir": tmp_path})
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))
    first = _claim(store, "rescheduled#1:email")
    real = store.still_owned
    parked = []

    def park(*args, **kwargs):  # the seam just before the hand-over
        if not parked:
            parked.append(book(store, catalog, dict(booking_doc, starts_at=AGAIN)))
        return real(*args, **kwargs)

    store.still_owned = park  # type: ignore[method-assign]
    assert attempt(ctx, first.ref, first.version, first.claim) == (
        "dropped: overtaken before sending")
    store.still_owned = real  # type: ignore[method-assign]
    assert list(tmp_path.glob("*.eml")) == []
    told = notices(store.timeline("glow", "A-1042"))
    assert told["rescheduled#1:email"]["status"] == "cancelled"
    second = _claim(store, "rescheduled#2:email")
    assert attempt(ctx, second.ref, second.version, second.claim) == "sent"
    (path,) = tmp_path.glob("*.eml")
    raw = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    text = raw.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "19 de diciembre" in text and "5 de diciembre" in text, text
    assert "12 de diciembre" not in text  # never told: not named
    (part,) = [p for p in raw.walk() if p.get_content_type() == "text/calendar"]
    (event,) = icalendar.Calendar.from_ical(part.get_payload(decode=True)).walk("VEVENT")
    assert event["SEQUENCE"] == 2 and str(event["DTSTART"].dt.date()) == "2026-12-19"


def test_the_invite_sequence_rises_with_the_event_not_with_each_invite(
        store, catalog, booking_doc):  # noqa: F811
    """`Store.invite_sequence` on real Redis: the same event again keeps its SEQUENCE; another
    event goes one above the last (or at the change's own sequence, if higher); a booking no
    longer stored gets no hash (it would live forever: no expiry)."""
    book(store, catalog, booking_doc)
    assert store.invite_sequence("glow", "A-1042", 0, "a") == 0
    assert store.invite_sequence("glow", "A-1042", 0, "a") == 0  # the day-before: same event
    assert store.invite_sequence("glow", "A-1042", 0, "b") == 1  # a new treatment's title
    assert store.invite_sequence("glow", "A-1042", 0, "b") == 1  # a retry of it
    assert store.invite_sequence("glow", "A-1042", 1, "c") == 2  # a move's notice (seq 1)
    assert store.invite_sequence("glow", "A-1042", 5, "c") == 5  # never below the change's
    assert store.invite_sequence("glow", "A-1042", 0, "a") == 6  # back to the first: new too
    assert store.invite_sequence("glow", "GONE", 3, "a") == 3
    assert not store.redis.exists(store.booking_key("glow", "GONE"))
