"""A batch upsert gives what upserting its bookings one by one in input order gives, also
when the SMS cap ties bookings together through a phone that one of them leaves or takes,
in a real Redis (found by review).

The batch reads the patients' other bookings once and defers some bookings (the same
booking again, another booking of a capped patient, one changed since it was read) to a
later round; a booking after a deferred one must not be capped against what the deferred
one has not written yet.
"""

from __future__ import annotations

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from tests.test_store_caps import NOW, doc_of, planned, sms_days
from tests.test_store_layout import state
from worker.store import Store

P, R = "+34600999888", "+34600111222"


def one_by_one_and_batch(redis_client, catalog, before, batch, chunk, monkeypatch):
    """Store `before` one by one under two prefixes, then `batch` one by one under the
    first and as one batch under the second; return (one, many, timelines of each)."""
    monkeypatch.setattr("worker.store.APPLY_CHUNK", chunk)
    one, many = (Store(redis_client, "one", retention_days=FIXED_SCENARIO_RETENTION_DAYS),
                 Store(redis_client, "many", retention_days=FIXED_SCENARIO_RETENTION_DAYS))
    for doc in before:
        one.upsert(*planned(catalog, doc), NOW)
        many.upsert(*planned(catalog, doc), NOW)
    items = [planned(catalog, doc) for doc in batch]
    expected = [one.upsert(*item, NOW) for item in items]
    got = many.upsert_many(items, NOW)
    return one, many, expected, got


@pytest.mark.parametrize("chunk", [200, 1])
def test_a_booking_after_a_deferred_one_leaving_its_phone_is_not_capped_by_it(
        redis_client, catalog, booking_doc, monkeypatch, chunk):
    """A-2 moves from phone R to phone P, where A-1 (earlier in the batch) is: it waits for
    a later round. A-3, on phone R, must not be capped against A-2's SMS: one by one, A-2
    has left R by then. (It was: A-3's SMS moved to later days for nothing.)"""
    before = [doc_of(booking_doc, "A-2", phone=R, email=False)]
    batch = [doc_of(booking_doc, "A-1", phone=P, email=False),
             doc_of(booking_doc, "A-2", phone=P, email=False),
             doc_of(booking_doc, "A-3", phone=R, email=False)]
    one, many, expected, got = one_by_one_and_batch(redis_client, catalog, before, batch,
                                                    chunk, monkeypatch)
    assert sms_days(got[2]) == sms_days(expected[2]) == sms_days(expected[0])
    assert got == expected
    ids = ["A-1", "A-2", "A-3"]
    assert state(many, "glow", ids) == state(one, "glow", ids)


@pytest.mark.parametrize("chunk", [200, 1])
def test_a_booking_after_a_deferred_one_taking_its_phone_is_capped_by_it(
        redis_client, catalog, booking_doc, monkeypatch, chunk):
    """A-2 is in the batch twice: as stored (phone P), then corrected to phone R. The second
    waits for a later round; A-3, on phone R after it, must be capped against it, as one by
    one. (It was not: A-3 took the SMS days and A-2 lost them.)"""
    before = [doc_of(booking_doc, "A-2", phone=P)]
    batch = [doc_of(booking_doc, "A-2", phone=P),
             doc_of(booking_doc, "A-2", phone=R),
             doc_of(booking_doc, "A-3", phone=R)]
    one, many, expected, got = one_by_one_and_batch(redis_client, catalog, before, batch,
                                                    chunk, monkeypatch)
    assert sms_days(expected[2]) == [] and sms_days(expected[1])
    assert got == expected
    ids = ["A-2", "A-3"]
    assert state(many, "glow", ids) == state(one, "glow", ids)


@pytest.mark.parametrize("chunk", [200, 1])
def test_an_unchanged_booking_is_planned_again_once_a_booking_before_it_leaves_its_phone(
        redis_client, catalog, booking_doc, monkeypatch, chunk):
    """A-3 was capped against A-2 on phone R (its SMS went by email). The batch moves A-2 to
    phone P, then submits A-3 as it was: one by one, A-3 gets its SMS back. (Its plan, made
    from the batch's first read, looked unchanged and was kept without the cap's check.)"""
    before = [doc_of(booking_doc, "A-2", phone=R), doc_of(booking_doc, "A-3", phone=R)]
    batch = [doc_of(booking_doc, "A-2", phone=P), doc_of(booking_doc, "A-3", phone=R)]
    one, many, expected, got = one_by_one_and_batch(redis_client, catalog, before, batch,
                                                    chunk, monkeypatch)
    assert sms_days(expected[1]) == sms_days(expected[0])  # A-3 has its SMS again
    assert got == expected
    ids = ["A-2", "A-3"]
    assert state(many, "glow", ids) == state(one, "glow", ids)


@pytest.mark.parametrize("chunk", [200, 1])
def test_a_booking_after_one_changed_since_read_waits_for_it(
        redis_client, catalog, booking_doc, monkeypatch, chunk):
    """A-2 (moving from phone R to P) is claimed by the pump between the batch's read and
    its apply: it is read and written again in a later round. A-3, on phone R after it,
    must wait for it too: as one by one (the claim, then A-2, then A-3), A-2 has left R
    and A-3 keeps its SMS days. (A-3 was written first, capped against A-2 on R.)"""
    monkeypatch.setattr("worker.store.APPLY_CHUNK", chunk)
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    store.upsert(*planned(catalog, doc_of(booking_doc, "A-2", phone=R, email=False)), NOW)
    real = Store._reconcile
    claimed: list[str] = []

    # The pump claims the first reminder due: A-2's confirmation, due at NOW (its others, at
    # fixed dates, are due by Redis's real clock too once those dates pass).
    def claim_landing(stored_booking, stored, plan_, *args):
        if '"A-2"' in args[0] and not claimed:  # A-2 read, not written yet
            claimed.extend(c.ref for c in store.claim_due(1, 60))
        return real(stored_booking, stored, plan_, *args)

    store._reconcile = claim_landing  # type: ignore[method-assign]
    items = [planned(catalog, doc_of(booking_doc, "A-2", phone=P, email=False)),
             planned(catalog, doc_of(booking_doc, "A-3", phone=R, email=False))]
    got = store.upsert_many(items, NOW)
    assert claimed == ["glow/A-2/booking-confirmation:sms"]  # due at NOW
    # One by one after the claim, in another prefix: the same claim, then A-2, then A-3.
    one = Store(redis_client, "one", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    one.upsert(*planned(catalog, doc_of(booking_doc, "A-2", phone=R, email=False)), NOW)
    assert [c.ref for c in one.claim_due(1, 60)] == claimed
    expected = [one.upsert(*item, NOW) for item in items]
    assert sms_days(got[1]) == sms_days(expected[1]) != []
    assert [t["reminders"] for t in got] == [t["reminders"] for t in expected]


def _parked_batch(store: Store, items, change, monkeypatch):
    """Run `store.upsert_many(items)` with one booking per apply chunk, park the apply thread
    in the first chunk's apply once the second chunk is prepared (read, reconciled), run
    `change()`, release; return (timelines, previous, apply scripts run)."""
    import threading

    monkeypatch.setattr("worker.store.APPLY_CHUNK", 1)
    parked, go, second = threading.Event(), threading.Event(), threading.Event()
    real_send, real_prepared = Store._send, Store._prepared
    sends: list[int] = []
    prepares: list[int] = []

    def prepared(self, ready, now, release):
        out = real_prepared(self, ready, now, release)
        prepares.append(1)
        if len(prepares) == 2:
            second.set()
        return out

    def send(self, ready):
        if threading.current_thread() is threading.main_thread():  # the change's own
            return real_send(self, ready)
        sends.append(1)
        if len(sends) == 1:
            parked.set()
            assert go.wait(10)
        return real_send(self, ready)

    monkeypatch.setattr(Store, "_send", send)
    monkeypatch.setattr(Store, "_prepared", prepared)
    result: dict[str, object] = {}
    previous: list[str | None] = [None] * len(items)

    def run() -> None:
        result["timelines"] = store.upsert_many(items, NOW, previous=previous)

    thread = threading.Thread(target=run)
    thread.start()
    assert parked.wait(10) and second.wait(10)
    try:
        change()
    finally:
        go.set()
        thread.join(30)
    monkeypatch.setattr(Store, "_send", real_send)
    monkeypatch.setattr(Store, "_prepared", real_prepared)
    return result["timelines"], previous, len(sends)


@pytest.mark.parametrize("what", ["cancel", "upsert", "claim and finish"])
def test_a_booking_changed_while_the_chunk_before_it_applies_is_written_as_one_by_one(
        redis_client, catalog, booking_doc, monkeypatch, what):
    """The apply thread is parked on the first chunk while the second (B-1, already read and
    prepared) is changed by a cancel, another upsert, or a pump's claim and delivery; then
    released. B-1 is read again and written after that change, as if it came after it:
    the same timelines, records and `previous` versions as doing it one by one."""
    from worker.store import Attempt

    docs = [dict(booking_doc, booking_id=f"B-{n}",
                 patient=dict(booking_doc["patient"], phone=f"+3460011133{n}")) for n in range(3)]
    stores = {name: Store(redis_client, name, retention_days=FIXED_SCENARIO_RETENTION_DAYS)
              for name in ("one", "many")}
    for s in stores.values():
        s.upsert_many([planned(catalog, d) for d in docs], NOW)
    other = planned(catalog, dict(docs[1], patient=dict(docs[1]["patient"],
                                                       preferred_name="Anita")))

    def change(s: Store) -> None:
        if what == "cancel":
            s.cancel("glow", "B-1", NOW)
        elif what == "upsert":
            s.upsert(*other, NOW)
        else:
            ref = "glow/B-1/booking-confirmation:email"
            (claim,) = [c for c in s.claim_due(50, 60) if c.ref == ref]
            assert s.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
            assert s.finish_sent(ref, Attempt(claim.version, claim.claim, "tok"), NOW) == "ok"

    batch_docs = [dict(d, patient=dict(d["patient"], name="Ana María López")) for d in docs]
    items = [planned(catalog, d) for d in batch_docs]
    one = stores["one"]
    change(one)
    was = [redis_client.hget(one.booking_key("glow", d["booking_id"]), "version")
           for d in batch_docs]
    expected = [one.upsert(*item, NOW) for item in items]
    got, previous, sends = _parked_batch(stores["many"], items, lambda: change(stores["many"]),
                                  monkeypatch)
    # Three chunks, then B-1 again (the pump claims every booking's due confirmation).
    assert sends == (6 if what == "claim and finish" else 4)
    assert previous == was
    assert got == expected
    ids = [d["booking_id"] for d in docs]
    assert state(stores["many"], "glow", ids) == state(one, "glow", ids)
