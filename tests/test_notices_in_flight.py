"""Review: the next change notice is sent while the last one is still being handed over
(real Redis, the real send path, the outbox as sink). It names the date the patient was
told by the notice that went out, and never overtakes it."""

from __future__ import annotations

import email
import email.policy
import threading
from pathlib import Path

from tests.test_notices import MOVED_TO, book, deliver, notices, store  # noqa: F401
from tests.test_notices import NOW as NOW_
from tests.test_notices_moves import AGAIN, _AtNow, _claim

REF1 = "glow/A-1042/rescheduled#1:email"
REF2 = "glow/A-1042/rescheduled#2:email"


def _plain(path: Path) -> str:
    raw = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return raw.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def test_the_next_notice_waits_for_the_notice_being_handed_over(
        store, catalog, booking_doc, repo_settings, tmp_path, monkeypatch):  # noqa: F811
    """Notice #1 (5 -> 12 Dec) is at its provider (a slow server) when the clinic moves the
    visit again (19 Dec) and notice #2 is claimed. #2 used to go at once, naming 5 Dec as the
    old date (#1's outcome was not known yet), and #1 then arrived after it: the patient
    read "5 Dec moves to 19 Dec" and then "5 Dec moves to 12 Dec". Now #2 waits until #1's
    outcome is known, and says 12 Dec moves to 19 Dec."""
    import worker.dispatch as dispatch
    from worker.dispatch import Context, attempt
    from worker.rendering import Renderer

    monkeypatch.setattr("worker.dispatch.datetime", _AtNow)
    settings = repo_settings.model_copy(update={"outbox_dir": tmp_path})
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    book(store, catalog, booking_doc)
    deliver(store, "booking-confirmation:email")  # the patient knows 5 Dec
    book(store, catalog, dict(booking_doc, starts_at=MOVED_TO))

    real_deliver = dispatch.deliver
    at_provider, release = threading.Event(), threading.Event()

    def slow_provider(url, envelope, *args, **kwargs):  # the hand-over seam
        if envelope.ref == REF1:
            at_provider.set()
            assert release.wait(20)
        return real_deliver(url, envelope, *args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", slow_provider)
    first = _claim(store, "rescheduled#1:email")
    outcome1: list[str] = []
    sender = threading.Thread(target=lambda: outcome1.append(
        attempt(ctx, first.ref, first.version, first.claim)))
    sender.start()
    try:
        assert at_provider.wait(10)
        book(store, catalog, dict(booking_doc, starts_at=AGAIN))  # the second move lands
        second = _claim(store, "rescheduled#2:email")
        outcome2 = attempt(ctx, second.ref, second.version, second.claim)
        early = sorted(tmp_path.glob("*.eml"))
    finally:
        release.set()
        sender.join(20)
    assert outcome1 == ["sent"]
    assert early == [], f"notice #2 went while #1 was at its provider ({outcome2})"
    # Back in the schedule (not lost): once #1 is known to have gone, #2 goes.
    assert store.record(REF2)["status"] == "scheduled"
    assert store.redis.zscore(store.due_key, REF2) is not None
    second = _claim(store, "rescheduled#2:email")
    assert attempt(ctx, second.ref, second.version, second.claim) == "sent"
    told = notices(store.timeline("glow", "A-1042"))
    assert told["rescheduled#1:email"]["status"] == "sent"
    assert told["rescheduled#2:email"]["status"] == "sent"
    texts = [_plain(p) for p in sorted(tmp_path.glob("*.eml"))]
    assert len(texts) == 2
    assert "12 de diciembre" in texts[0] and "19 de diciembre" not in texts[0], texts[0]
    # The patient was told 12 Dec by #1: #2 moves that date, not 5 Dec.
    assert "del 12 de diciembre, 14:30 pasa al 19 de diciembre" in texts[1], texts[1]


def test_a_cancel_notice_never_arrives_before_the_pause_message_in_flight(
        store, catalog, booking_doc, repo_settings, tmp_path, monkeypatch):  # noqa: F811
    """"Stop tretinoin tonight" is at its (slow) SMS provider when the clinic cancels: the
    cancel's "you may resume" SMS used to go at once and arrive first, so the last word the
    patient had was to stop. Now it waits until the pause message's outcome is known."""
    import worker.dispatch as dispatch
    from worker.dispatch import Context, attempt
    from worker.rendering import Renderer

    monkeypatch.setattr("worker.dispatch.datetime", _AtNow)
    settings = repo_settings.model_copy(update={"outbox_dir": tmp_path})
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    book(store, catalog, booking_doc)
    pause = "glow/A-1042/stop-retinoids:sms"
    real_deliver = dispatch.deliver
    at_provider, release = threading.Event(), threading.Event()

    def slow_provider(url, envelope, *args, **kwargs):  # the hand-over seam
        if envelope.ref == pause:
            at_provider.set()
            assert release.wait(20)
        return real_deliver(url, envelope, *args, **kwargs)

    monkeypatch.setattr(dispatch, "deliver", slow_provider)
    first = _claim(store, "stop-retinoids:sms")
    outcome1: list[str] = []
    sender = threading.Thread(target=lambda: outcome1.append(
        attempt(ctx, first.ref, first.version, first.claim)))
    sender.start()
    try:
        assert at_provider.wait(10)
        told = notices(store.cancel("glow", "A-1042", NOW_))
        assert set(told) == {"cancelled#1:sms"}
        notice = _claim(store, "cancelled#1:sms")
        outcome2 = attempt(ctx, notice.ref, notice.version, notice.claim)
        early = sorted(tmp_path.glob("*.sms.txt"))
    finally:
        release.set()
        sender.join(20)
    assert outcome1 == ["sent"]
    assert early == [], f"the cancel notice went while the pause was at its provider ({outcome2})"
    assert store.redis.zscore(store.due_key, notice.ref) is not None  # waiting, not lost
    notice = _claim(store, "cancelled#1:sms")
    assert attempt(ctx, notice.ref, notice.version, notice.claim) == "sent"
    arrived = sorted(tmp_path.glob("*.sms.txt"), key=lambda p: p.stat().st_mtime_ns)
    assert [p.name.endswith("stop-retinoids-sms.sms.txt") for p in arrived] == [True, False]
