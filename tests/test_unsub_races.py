"""An email unsubscribe (the real one-click POST over HTTP) racing an email of the same
patient in another booking, forced: the other booking's attempt is parked at its seam
(after its begin, before its last check; or at the SMTP server, past it), the patient
unsubscribes, the attempt is released. Once the unsubscribe has answered, no email of any
of the patient's bookings goes but the one already handed over. Real Redis, a real API
(uvicorn), a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.api.conftest import serve  # noqa: F401 (the API fixture)
from tests.test_unsubscribe_send import PUBLIC, SECRET, Rig, sinks  # noqa: F401
from worker.dispatch import send_claimed
from worker.models import parse_booking
from worker.planner import plan
from worker.store import Store


@pytest.fixture
def both(tmp_path, redis_client, sinks, serve):  # noqa: F811
    rig = Rig(tmp_path / "config", redis_client, *sinks)
    server = serve(config_dir=tmp_path / "config", public_url=PUBLIC, unsubscribe_secret=SECRET)
    rig.store = Store(redis_client, server.settings.key_prefix)  # the API's store
    rig.ctx = replace(rig.ctx, store=rig.store)
    return rig, server


def book(rig: Rig, booking_id: str, email: str, days: int) -> None:
    starts = (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)
    doc = {"clinic": "uc", "booking_id": booking_id, "treatment": "unsub",
           "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "email": email, "timezone": "UTC",
                       "locale": "en", "channels": ["email"]}}
    booking = parse_booking(doc, rig.catalog)
    now = datetime.now(UTC)
    rig.store.upsert(booking, plan(booking, rig.catalog.protocols["unsub"],
                                   rig.catalog.clinics["uc"], now), now)


def claim(rig: Rig, ref: str) -> Any:
    rig.store.redis.zadd(rig.store.due_key, {ref: 0})
    (found,) = [c for c in rig.store.claim_due(100, 300) if c.ref == ref]
    return found


def first_link(rig: Rig) -> str:
    """U-1's email goes; return the unsubscribe link it carries."""
    c = claim(rig, "uc/U-1/plain:email")
    assert send_claimed(rig.ctx, c.ref, c.version, c.claim) == "sent"
    (mail,) = rig.smtp.snapshot()
    return str(mail.raw["List-Unsubscribe"])[1:-1]


def unsubscribe(server: Any, link: str) -> None:
    with server.client() as client:
        answer = client.post(link.replace(PUBLIC, ""),
                             content="List-Unsubscribe=One-Click",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 200 and "You are unsubscribed" in answer.text, answer.text


def test_an_email_of_another_booking_parked_before_its_last_check_never_goes(both):
    rig, server = both
    book(rig, "U-1", "Ana@Example.com", 2)
    book(rig, "U-2", "ana@example.com", 9)  # the same patient, written another way
    link = first_link(rig)
    ref = "uc/U-2/plain:email"
    c = claim(rig, ref)
    parked, release = threading.Event(), threading.Event()
    real = rig.store.still_owned

    def held(*args: Any, **kwargs: Any) -> bool:
        parked.set()
        assert release.wait(20)
        return real(*args, **kwargs)

    rig.store.still_owned = held  # type: ignore[method-assign]
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", send_claimed(rig.ctx, ref, c.version, c.claim)))
    thread.start()
    assert parked.wait(10)
    unsubscribe(server, link)  # answered: from here on, no email may go
    release.set()
    thread.join(20)
    del rig.store.still_owned
    assert out["r"] == "dropped: overtaken before sending"
    # Back to the begin, which applies the unsubscribe in full.
    c = claim(rig, ref)
    assert send_claimed(rig.ctx, ref, c.version, c.claim) == "dropped: opted out"
    record = rig.store.record(ref)
    assert record["status"] == "skipped" and record["reason"].startswith(
        "opted_out: the patient unsubscribed from email at "), record
    assert len(rig.smtp.snapshot()) == 1  # U-1's only
    assert rig.store.redis.zscore(rig.store.due_key, ref) is None
    assert rig.store.redis.zscore(rig.store.lease_key, ref) is None


def test_past_its_last_check_it_goes_and_nothing_after_the_answer_does(both):
    """Parked at the SMTP server's door (after its last check): it goes (the accepted
    window); every other email of the patient, in either booking, is skipped."""
    rig, server = both
    book(rig, "U-1", "Ana@Example.com", 2)
    book(rig, "U-2", "ana@example.com", 9)
    link = first_link(rig)
    ref = "uc/U-2/plain:email"
    c = claim(rig, ref)
    real = rig.store.still_owned
    parked, release = threading.Event(), threading.Event()

    def owned_then_park(*args: Any, **kwargs: Any) -> bool:
        ok = real(*args, **kwargs)
        parked.set()
        assert release.wait(20)
        return ok

    rig.store.still_owned = owned_then_park  # type: ignore[method-assign]
    out: dict[str, str] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", send_claimed(rig.ctx, ref, c.version, c.claim)))
    thread.start()
    assert parked.wait(10)
    unsubscribe(server, link)
    release.set()
    thread.join(20)
    del rig.store.still_owned
    assert out["r"] == "sent" and rig.store.record(ref)["status"] == "sent"
    assert len(rig.smtp.snapshot()) == 2
    # Nothing else goes: U-1's and U-2's other plain emails (care ones would go by SMS,
    # and this patient takes no SMS: skipped).
    for other in ("uc/U-1/care:email", "uc/U-2/care:email"):
        assert rig.store.record(other)["status"] == "skipped", rig.store.record(other)
        assert rig.store.redis.zscore(rig.store.due_key, other) is None
    rig.store.redis.zadd(rig.store.due_key, {"uc/U-2/care:email": 0})  # even if forced
    assert rig.store.claim_due(100, 300) == []
    assert len(rig.smtp.snapshot()) == 2
