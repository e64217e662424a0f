"""The per-clinic contact index (worker/store.py) against a real Redis server."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import parse_booking
from worker.planner import plan
from worker.store import (
    Attempt,
    Store,
    connect,
    contact_id,
    legacy_contact_id,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PHONE, OTHER_PHONE = "+34600111222", "+34600999888"


@pytest.fixture
def store(redis_client) -> Store:
    return Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)


def planned(catalog, doc):
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], NOW)


def book(store, catalog, doc):
    return store.upsert(*planned(catalog, doc), NOW)


def doc_of(booking_doc, booking_id, *, phone=PHONE, email="ana@example.com"):
    doc = copy.deepcopy(booking_doc)
    doc["booking_id"] = booking_id
    doc["patient"]["phone"] = phone
    doc["patient"]["email"] = email
    doc["patient"]["channels"] = [c for c, v in (("sms", phone), ("email", email)) if v]
    return doc


def test_bookings_of_one_contact_across_bookings(store, catalog, booking_doc):
    book(store, catalog, doc_of(booking_doc, "A-1"))
    book(store, catalog, doc_of(booking_doc, "A-2", email="ana.lopez@example.com"))
    book(store, catalog, doc_of(booking_doc, "B-1", phone=OTHER_PHONE, email=None))
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1", "A-2"]
    assert store.bookings_for_contact("glow", phone=OTHER_PHONE) == ["B-1"]
    # An address is found whatever its case; both contacts give the union.
    assert store.bookings_for_contact("glow", email="ANA@Example.COM") == ["A-1"]
    assert store.bookings_for_contact("glow", phone=OTHER_PHONE,
                                      email="ana.lopez@example.com") == ["A-2", "B-1"]
    assert store.bookings_for_contact("glow", phone="+34600000000") == []
    # Another clinic's index is another key: the same phone there knows none of these.
    assert store.bookings_for_contact("demo", phone=PHONE) == []
    with pytest.raises(ValueError):
        store.bookings_for_contact("glow")


def test_no_contact_in_any_key_name(store, catalog, booking_doc):
    book(store, catalog, doc_of(booking_doc, "A-1"))
    keys = list(store.redis.scan_iter("*"))
    assert any(k.startswith("t:c:glow/") for k in keys)
    for key in keys:
        assert "600111222" not in key and "ana" not in key.lower(), key
    assert store.contact_key("glow", "phone", PHONE) == \
        f"t:c:glow/{contact_id('phone', PHONE, store.contact_secret)}"


def test_a_contact_id_cannot_be_reversed_without_the_secret(store, catalog, booking_doc):
    """The id in a key name is keyed with the server secret P:secret:contact: trying every
    number with the unkeyed hash (what /tmp/rv/contact_id_reverse.py did) finds nothing."""
    book(store, catalog, doc_of(booking_doc, "A-1"))
    secret = store.contact_secret
    assert len(secret) == 32 and store.redis.get("t:secret:contact")
    ids = {k.rsplit("/", 1)[1] for k in store.redis.scan_iter("t:c:glow/*")}
    assert ids == {contact_id("phone", PHONE, secret),
                   contact_id("email", "ana@example.com", secret)}
    tried = {legacy_contact_id("phone", f"+34600{n:06d}") for n in range(100_000, 120_000)}
    assert legacy_contact_id("phone", PHONE) in tried  # the search space holds the number
    assert not ids & tried
    # Another Redis (another secret) gives other ids; the same store's secret is stable.
    assert contact_id("phone", PHONE, b"x" * 32) not in ids
    assert Store(store.redis, "t").contact_id("phone", PHONE) in ids
    with pytest.raises(ValueError):
        contact_id("phone", PHONE, b"")


def test_bookings_indexed_under_the_unkeyed_ids_are_found_until_stored_again(
        store, catalog, booking_doc):
    """A booking stored before ids were keyed: its hash's `contacts` and its index sets use
    the unkeyed ids. A STOP still finds it (lookups read both sets); its next upsert moves it
    to the keyed sets and out of the unkeyed ones."""
    book(store, catalog, doc_of(booking_doc, "A-1"))
    r = store.redis
    bkey = store.booking_key("glow", "A-1")
    keyed = [store.contact_key("glow", "phone", PHONE),
             store.contact_key("glow", "email", "ana@example.com")]
    legacy = [f"t:c:glow/{legacy_contact_id('phone', PHONE)}",
              f"t:c:glow/{legacy_contact_id('email', 'ana@example.com')}"]
    # Rewrite it as the old code stored it.
    score = r.zscore(keyed[0], "A-1")
    r.delete(*keyed)
    for key in legacy:
        r.zadd(key, {"A-1": score})
    r.hset(bkey, "contacts", " ".join(k.rsplit("/", 1)[1] for k in legacy))
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1"]
    assert store.bookings_for_contact("glow", email="Ana@Example.com") == ["A-1"]
    skipped, touched = store.opt_out("glow", "sms", PHONE, "STOP")
    assert touched == ["A-1"] and skipped > 0
    # Stored again (the clinic's next change): moved to the keyed sets.
    doc = doc_of(booking_doc, "A-1")
    doc["starts_at"] = doc["starts_at"].replace("T14", "T15")
    book(store, catalog, doc)
    assert all(not r.exists(k) for k in legacy)
    assert all(r.zscore(k, "A-1") is not None for k in keyed)
    assert r.hget(bkey, "contacts") == " ".join(k.rsplit("/", 1)[1] for k in keyed)
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1"]


def test_a_changed_contact_moves_the_booking_in_the_index(store, catalog, booking_doc):
    book(store, catalog, doc_of(booking_doc, "A-1"))
    timeline = book(store, catalog, doc_of(booking_doc, "A-1", phone=OTHER_PHONE,
                                           email="new@example.com"))
    assert timeline["version"] == 2
    assert store.bookings_for_contact("glow", phone=PHONE) == []
    assert store.bookings_for_contact("glow", email="ana@example.com") == []
    assert store.bookings_for_contact("glow", phone=OTHER_PHONE,
                                      email="new@example.com") == ["A-1"]
    # The emptied sets are gone, not left behind.
    assert not store.redis.exists(store.contact_key("glow", "phone", PHONE))
    # Dropping the email keeps the phone's entry only.
    book(store, catalog, doc_of(booking_doc, "A-1", phone=OTHER_PHONE, email=None))
    assert store.bookings_for_contact("glow", email="new@example.com") == []
    assert store.bookings_for_contact("glow", phone=OTHER_PHONE) == ["A-1"]


def test_the_index_lives_and_dies_with_the_booking(store, catalog, booking_doc):
    book(store, catalog, doc_of(booking_doc, "A-1"))
    bkey = store.booking_key("glow", "A-1")
    ckey = store.contact_key("glow", "phone", PHONE)
    keep = int(store.redis.hget(bkey, "keep_until"))
    assert store.redis.zscore(ckey, "A-1") == keep
    assert store.redis.expiretime(ckey) == store.redis.expiretime(bkey) == keep
    # A cancelled booking stays listed (its history stays) until its keys expire.
    store.cancel("glow", "A-1", NOW)
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1"]
    # A dead letter keeps the booking, and its index entry, for good; a purge lets them go.
    book(store, catalog, doc_of(booking_doc, "A-1"))
    ref = "glow/A-1/day-before:sms"
    store.redis.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"), "permanent: 550")
    assert store.redis.ttl(bkey) == -1 and store.redis.ttl(ckey) == -1
    assert store.redis.zscore(ckey, "A-1") == float("inf")
    assert store.purge([ref], NOW) == [ref]
    keep = int(store.redis.hget(bkey, "keep_until"))
    assert store.redis.zscore(ckey, "A-1") == keep
    assert store.redis.expiretime(ckey) == store.redis.expiretime(bkey) == keep
    # A booking whose keys expired is not listed, even while its contact's set lives on.
    store.redis.zadd(ckey, {"GONE-1": 1000})
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1"]
    book(store, catalog, doc_of(booking_doc, "A-2"))  # the next write clears it out
    assert store.redis.zscore(ckey, "GONE-1") is None


def test_a_booking_stored_before_the_index_is_indexed_by_its_next_upsert(
    store, catalog, booking_doc
):
    first = book(store, catalog, doc_of(booking_doc, "A-1"))
    store.redis.hdel(store.booking_key("glow", "A-1"), "contacts")
    for kind, value in (("phone", PHONE), ("email", "ana@example.com")):
        store.redis.delete(store.contact_key("glow", kind, value))
    assert store.bookings_for_contact("glow", phone=PHONE) == []
    again = book(store, catalog, doc_of(booking_doc, "A-1"))
    assert again == first  # same version: nothing the clinic sees changed
    assert store.bookings_for_contact("glow", phone=PHONE) == ["A-1"]


def test_a_contact_change_racing_an_upsert_leaves_the_index_right(
    store, catalog, booking_doc, redis_server
):
    """Park an upsert between its read and its write; another process changes the
    booking's phone meanwhile; the parked one is then found stale and redone: the index
    holds exactly the final document's contacts."""
    book(store, catalog, doc_of(booking_doc, "A-1"))
    other = Store(connect(redis_server.url), "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    calls: list[str] = []
    real = Store._reconcile

    def reconcile_with_a_change_landing(stored_booking, stored, plan_, *args):
        calls.append(json.loads(args[0])["booking_id"])
        if len(calls) == 1:
            other.upsert(*planned(catalog, doc_of(booking_doc, "A-1", phone=OTHER_PHONE)), NOW)
        return real(stored_booking, stored, plan_, *args)

    store._reconcile = reconcile_with_a_change_landing  # type: ignore[method-assign]
    final = doc_of(booking_doc, "A-1", phone="+34600555444", email="b@example.com")
    timeline = store.upsert(*planned(catalog, final), NOW)
    assert calls == ["A-1", "A-1"] and timeline["version"] == 3
    assert store.bookings_for_contact("glow", phone=PHONE) == []
    assert store.bookings_for_contact("glow", phone=OTHER_PHONE) == []
    assert store.bookings_for_contact("glow", email="ana@example.com") == []
    assert store.bookings_for_contact("glow", phone="+34600555444") == ["A-1"]
    assert store.bookings_for_contact("glow", email="b@example.com") == ["A-1"]
    assert sorted(k for k in store.redis.scan_iter("t:c:*")) == sorted(
        [store.contact_key("glow", "phone", "+34600555444"),
         store.contact_key("glow", "email", "b@example.com")])


def test_upsert_many_indexes_every_booking(store, catalog, booking_doc):
    items = [planned(catalog, doc_of(booking_doc, f"B-{n}", phone=f"+3460011{n:04d}"))
             for n in range(450)]  # more than two apply chunks
    store.upsert_many(items, NOW)
    assert store.bookings_for_contact("glow", phone="+34600110449") == ["B-449"]
    assert store.bookings_for_contact("glow", email="ana@example.com") == [
        f"B-{n}" for n in sorted(range(450), key=lambda n: f"B-{n}")]
