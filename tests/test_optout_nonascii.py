"""Opt-outs of addresses with upper-case letters outside ASCII ("JOSÉ@…", the Turkish
dotted "İ"): the address is normalised once, in Python (worker/optout.py
`normal_contact`), and handed to the scripts; no script lower-cases (Lua's string.lower
knows ASCII only). Real Redis, a real SMTP server (aiosmtpd), real Apprise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests import test_unsubscribe_send as unsub
from tests.test_unsubscribe_send import Rig
from worker.models import parse_booking
from worker.optout import normal_contact
from worker.planner import plan

rig, sinks = unsub.rig, unsub.sinks  # the rig's fixtures
WHY = "the patient unsubscribed from email at 2026-11-22T10:00:00Z"
ADDRESSES = ["JOSÉ@example.es", "İNCİ@example.com.tr", "Ñandú.Ö@Example.org"]


def book(r: Rig, booking_id: str, email: str) -> None:
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    doc = {"clinic": "uc", "booking_id": booking_id, "treatment": "unsub",
           "starts_at": starts.isoformat(),
           "patient": {"name": "José Pérez", "email": email, "phone": "+34600111222",
                       "timezone": "UTC", "locale": "en", "channels": ["email"]}}
    booking = parse_booking(doc, r.catalog)
    assert booking.patient.email != normal_contact("email", email)  # upper case kept
    now = datetime.now(UTC)
    r.store.upsert(booking, plan(booking, r.catalog.protocols["unsub"],
                                 r.catalog.clinics["uc"], now), now)


def claim(r: Rig, ref: str):
    r.store.redis.zadd(r.store.due_key, {ref: 0})
    (found,) = [c for c in r.store.claim_due(100, 300) if c.ref == ref]
    return found


@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize("given", ["as stored", "normalised"])
def test_an_opt_out_of_a_non_ascii_upper_case_address_is_honoured(rig, address, given):
    from worker.dispatch import send_claimed

    book(rig, "U-1", address)
    claimed = claim(rig, "uc/U-1/plain:email")  # the pump took it before the opt-out
    contact = address if given == "as stored" else normal_contact("email", address)
    skipped, touched = rig.store.opt_out("uc", "email", contact, WHY)
    # The one waiting is skipped at once (the one being sent is its attempt's to settle).
    assert (skipped, touched) == (1, ["U-1"])
    assert rig.store.record("uc/U-1/care:email")["status"] == "skipped"
    # The attempt's fenced begin reads the opt-out: skipped with the reason, nothing sent.
    assert send_claimed(rig.ctx, claimed.ref, claimed.version, claimed.claim) == \
        "dropped: opted out"
    record = rig.store.record("uc/U-1/plain:email")
    assert record["status"] == "skipped" and record["reason"] == f"opted_out: {WHY}"
    # A booking stored after the opt-out is refused at its begin too, not looped on.
    book(rig, "U-2", address)
    for key in ("care:email", "plain:email"):
        later = claim(rig, f"uc/U-2/{key}")
        assert send_claimed(rig.ctx, later.ref, later.version, later.claim) == \
            "dropped: opted out"
        assert rig.store.redis.zscore(rig.store.due_key, later.ref) is None
        assert rig.store.redis.zscore(rig.store.lease_key, later.ref) is None
    assert rig.smtp.snapshot() == []
    assert rig.store.opted_out("uc", "email", address) == WHY


def test_an_address_changed_between_the_read_and_the_begin_is_read_again(rig):
    """begin_send reads the document's addresses, then runs its script: a change landing in
    between (here the new address, opted out) makes the script refuse to guess; the begin
    reads again and the opt-out of the new address holds."""
    import json

    from worker.dispatch import send_claimed

    book(rig, "U-1", "ANA@example.es")
    rig.store.opt_out("uc", "email", "JOSÉ@example.es", WHY)
    claimed = claim(rig, "uc/U-1/plain:email")
    real = rig.store._begin
    calls: list[str] = []

    def begin_after_a_change(*args, **kwargs):
        if not calls:
            dkey = rig.store.doc_key("uc", "U-1")
            doc = json.loads(rig.store.redis.get(dkey))
            doc["patient"]["email"] = "JOSÉ@example.es"
            rig.store.redis.set(dkey, json.dumps(doc, ensure_ascii=False))
        calls.append(str(real(*args, **kwargs)))
        return calls[-1]

    rig.store._begin = begin_after_a_change
    assert send_claimed(rig.ctx, claimed.ref, claimed.version, claimed.claim) == \
        "dropped: opted out"
    assert calls == ["contacts changed", "opted out"]
    assert rig.smtp.snapshot() == []
