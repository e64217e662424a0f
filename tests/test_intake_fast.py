"""The intake's fast paths give what the straightforward code gives.

- `planner.sms_fits` (walks the days that have SMS) against the 13-day sliding count it
  replaced, on hypothesis' counts;
- `models.trusted_booking` (builds the models directly) against `model_construct`;
- the store's memoised instant forms (`_stamps`) against `_num(timestamp)` and `_utc`, for
  equal instants given in different zones too;
- the contact ids' HMAC (`store._hmac_sha256`, from padded keys kept) against `hmac.digest`;
- a batch stored from its plans' records (`upsert_many(records=...)`, as `reminders book`
  stores) against the same batch stored from the plan objects: every key, field, score and
  expiry the same;
- a store batch read ahead (`Store.read_first`, `ReadAhead`: before the batch before is
  applied, or while it is) against the batches read and stored in turn, with patients under
  the SMS cap whose bookings are in both batches: the same, key for key.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from benchmarks.intake import realistic_bookings
from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import Booking, Medications, Patient, parse_booking, trusted_booking
from worker.planner import WEEK_DAYS, sms_fits
from worker.store import _micro_epoch, _num, _stamps, _utc

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def fits_reference(counts: dict[int, int], day: int, per_day: int, per_week: int) -> bool:
    """The cap's check as first written: every 7-day window over the 13 days around."""
    if counts.get(day, 0) >= per_day:
        return False
    near = [counts.get(day + k, 0) for k in range(1 - WEEK_DAYS, WEEK_DAYS)]
    total = sum(near[:WEEK_DAYS])
    if total >= per_week:
        return False
    for k in range(WEEK_DAYS, len(near)):
        total += near[k] - near[k - WEEK_DAYS]
        if total >= per_week:
            return False
    return True


@settings(max_examples=3000, deadline=None)
@given(
    st.dictionaries(st.integers(738000, 738030), st.integers(1, 4), max_size=12),
    st.integers(737995, 738035),
    st.integers(1, 4),
    st.integers(1, 12),
)
def test_sms_fits_is_the_sliding_count(counts: dict[int, int], day: int, per_day: int,
                                       per_week: int) -> None:
    per_week = max(per_week, per_day)
    assert sms_fits(counts, day, per_day, per_week) == fits_reference(
        counts, day, per_day, per_week)


ZONES = [ZoneInfo(z) for z in ("UTC", "Europe/Madrid", "America/New_York", "Australia/Lord_Howe",
                               "Asia/Kathmandu")]


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 4_000_000_000), st.integers(0, 999_999), st.sampled_from(ZONES),
       st.sampled_from(ZONES))
def test_stamps_are_the_plain_forms(seconds: int, micros: int, zone: ZoneInfo,
                                    other: ZoneInfo) -> None:
    instant = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds, microseconds=micros)
               ).astimezone(zone)
    expected = (_num(instant.timestamp()), _utc(instant))
    assert _stamps(instant) == expected
    assert _stamps(instant.astimezone(other)) == expected  # the same instant elsewhere
    # From a plan record's exact microseconds (`_new_from_record`), before the epoch too.
    whole = seconds * 1_000_000 + micros
    assert _micro_epoch(whole) == expected[0] == _micro_epoch(whole)  # again: from its memo
    before = datetime(1970, 1, 1, tzinfo=UTC) - timedelta(microseconds=whole)
    assert _micro_epoch(-whole) == _num(before.timestamp())


def constructed(doc: dict) -> Booking:
    """The Booking as `model_construct` (pydantic's own trusted path) builds it."""
    meds = doc["medications"]
    dose = meds["isotretinoin_last_dose"]
    return Booking.model_construct(
        clinic=doc["clinic"], booking_id=doc["booking_id"], treatment=doc["treatment"],
        starts_at=datetime.fromisoformat(doc["starts_at"]),
        patient=Patient.model_construct(**doc["patient"]),
        medications=Medications.model_construct(
            tretinoin=meds["tretinoin"], retinol=meds["retinol"],
            isotretinoin_last_dose=None if dose is None else date.fromisoformat(dose)))


def fields_of(model: Any) -> Any:
    """Everything pydantic keeps on a model instance, nested models too."""
    return {name: fields_of(value) if isinstance(value, BaseModel) else value
            for name, value in {**model.__dict__,
                                "(fields set)": model.__pydantic_fields_set__,
                                "(extra)": model.__pydantic_extra__,
                                "(private)": model.__pydantic_private__}.items()}


def test_trusted_booking_is_model_construct(catalog: Any) -> None:
    docs = list(realistic_bookings(300, seed=3, now=NOW))
    docs[0]["patient"]["preferred_name"] = "María José"
    docs[1]["patient"].pop("email")
    docs[1]["patient"]["channels"] = ["sms"]
    docs[2]["patient"].pop("phone")
    docs[2]["patient"]["channels"] = ["email"]
    docs[3]["medications"] = {"isotretinoin_last_dose": "2025-01-02"}
    for doc in docs:
        booking = parse_booking(doc, catalog)
        dumped = booking.model_dump(mode="json")
        rebuilt = trusted_booking(dumped)
        assert fields_of(rebuilt) == fields_of(constructed(dumped))
        assert rebuilt == booking
        assert rebuilt.model_dump_json() == booking.model_dump_json()
        assert rebuilt.patient.first_name == booking.patient.first_name
        # From the JSON text `reminders book` hands from its check to its store: the same.
        from_text = trusted_booking(orjson.loads(booking.model_dump_json()))
        assert fields_of(from_text) == fields_of(rebuilt)
        assert from_text.model_dump_json() == booking.model_dump_json()


def test_upsert_many_writes_the_documents_given(redis_client: Any, catalog: Any) -> None:
    """`docs` (each booking's `model_dump_json()`, as the batch's check made it) is what is
    stored, new or reconciled, with the same outcome as the store making it itself."""
    from worker.planner import plan
    from worker.store import Store

    docs = list(realistic_bookings(8, seed=6, now=NOW))
    items = []
    for doc in docs:
        booking = parse_booking(doc, catalog)
        items.append((booking, plan(booking, catalog.protocols[booking.treatment],
                                    catalog.clinics[booking.clinic], NOW)))
    texts = [b.model_dump_json() for b, _ in items]
    given = Store(redis_client, "docs-given", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    made = Store(redis_client, "docs-made", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    assert given.upsert_many(items[:5], NOW, docs=texts[:5]) == made.upsert_many(items[:5], NOW)
    # Again (reconciled: unchanged) with three new ones.
    assert given.upsert_many(items, NOW, docs=texts) == made.upsert_many(items, NOW)
    for (booking, _), text in zip(items, texts, strict=True):
        assert redis_client.get(given.doc_key(*booking.key)) == text
        assert redis_client.get(made.doc_key(*booking.key)) == text
    with pytest.raises(ValueError):
        given.upsert_many(items, NOW, docs=texts[:3])


def test_bookings_exist_is_what_summaries_say(redis_client: Any, catalog: Any) -> None:
    """The batch route's existence check answers as `booking_summaries` (not None)."""
    from worker.planner import plan
    from worker.store import Store

    store = Store(redis_client, "exist-test", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    docs = list(realistic_bookings(6, seed=4, now=NOW))
    for doc in docs[:3]:
        booking = parse_booking(doc, catalog)
        store.upsert(booking, plan(booking, catalog.protocols[booking.treatment],
                                   catalog.clinics[booking.clinic], NOW), NOW)
    ids = [d["booking_id"] for d in docs] + ["no-such-booking"]
    redis_client.delete(store.doc_key("glow", ids[1]))  # half gone: not a stored booking
    redis_client.hdel(store.booking_key("glow", ids[2]), "status")
    expected = [s is not None for s in store.booking_summaries("glow", ids)]
    assert expected == [True, False, False, False, False, False, False]
    assert store.bookings_exist("glow", ids) == expected


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=16, max_size=150), message=st.binary(max_size=300))
def test_contact_ids_hmac_is_the_standard_one(key: bytes, message: bytes) -> None:
    """The padded-key shortcut of contact ids gives RFC 2104's HMAC-SHA256, for keys shorter
    and longer than SHA-256's block, and again from its memo."""
    import hmac

    from worker.store import _hmac_sha256

    assert _hmac_sha256(key, message) == hmac.digest(key, message, "sha256")
    assert _hmac_sha256(key, message) == hmac.digest(key, message, "sha256")


def test_read_ahead_is_each_batch_decoded(redis_client: Any, catalog: Any) -> None:
    """`ReadAhead` (each next store batch decoded and read in a thread while the one before
    is stored) gives each spool batch with exactly what `decode` makes of it, in order, with
    its first read of those very items (none for the first, nor when that read fails:
    `upsert_many` reads it itself); and nothing once the spool is done."""
    import redis

    from worker.batch import CHUNK, Document, ReadAhead, Spool, _check_chunk, decode
    from worker.store import Store

    docs = list(realistic_bookings(2 * CHUNK + 70, seed=9, now=NOW))
    spool = Spool()
    lines = [orjson.dumps(d) for d in docs]
    for start in range(0, len(lines), CHUNK):
        part = [Document(n + 1, n + 1, raw=lines[n])
                for n in range(start, min(start + CHUNK, len(lines)))]
        spool.add_chunk(_check_chunk(part, catalog, None, NOW))
    size = 450  # batches of 450: 3 of them, the last 170
    expected = [(chunk, [decode(item, catalog) for item in chunk])
                for chunk in spool.chunks(size)]
    assert [len(c) for c, _ in expected] == [450, 450, 170]
    class Unreadable(Store):
        def read_first(self, *args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("gone")

    store = Store(redis_client, "ahead", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    gone = Unreadable(redis_client, "gone", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    for timelines, reading in ((False, store), (True, store), (False, gone)):
        ahead = ReadAhead(spool.chunks(size), catalog, reading, timelines)
        got = []
        while (taken := ahead.take()) is not None:
            got.append(taken)
        assert ahead.take() is None
        assert len(got) == len(expected)
        for n, ((chunk, items, first), (want_chunk, want_items)) in enumerate(
                zip(got, expected, strict=True)):
            assert chunk == want_chunk
            assert [b.model_dump_json() for b, _ in items] == [
                b.model_dump_json() for b, _ in want_items]
            assert [p for _, p in items] == [p for _, p in want_items]
            if n == 0 or reading is gone:
                # The first batch is read by `upsert_many`; so is one whose read failed.
                assert first is None
            else:
                assert first is not None
                assert first.items is items and first.timelines == timelines
                assert len(first.round.batch) == len(first.round.stored) == len(items)


def test_store_batches_grow_and_each_next_is_read_once_started(redis_client: Any,
                                                                 catalog: Any) -> None:
    """`reminders book`'s store batches: the first FIRST (its read is made with nothing
    applied meanwhile), each next twice the one before up to the batch size, in input
    order, every booking once. The batch after the one taken is read in a thread only once
    `start` is called (`reminders book` calls it through `upsert_many`'s `idle`, its first
    chunk at Redis) or at the next `take`, whichever comes first."""
    import threading

    from worker.batch import CHUNK, Document, ReadAhead, Spool, _check_chunk
    from worker.store import Store

    docs = list(realistic_bookings(3 * CHUNK + 140, seed=10, now=NOW))
    spool = Spool()
    lines = [orjson.dumps(d) for d in docs]
    for start in range(0, len(lines), CHUNK):
        spool.add_chunk(_check_chunk([Document(n + 1, n + 1, raw=lines[n]) for n in range(
            start, min(start + CHUNK, len(lines)))], catalog, None, NOW))
    whole = [item for chunk in spool.chunks(len(docs)) for item in chunk]
    assert len(whole) == len(docs)
    for size, first, sizes in ((400, 50, [50, 100, 200, 400, 400, 400, 90]),
                               (1000, 300, [300, 600, 740]), (500, None, [500] * 3 + [140]),
                               (500, 800, [500] * 3 + [140])):
        batches = list(spool.chunks(size, first=first))
        assert [len(b) for b in batches] == sizes
        assert [item for b in batches for item in b] == whole

    def reading() -> bool:
        return any(t.name == "store-read" for t in threading.enumerate())

    store = Store(redis_client, "grow", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    reader = ReadAhead(spool.chunks(400, first=50), catalog, store, timelines=False)
    taken = reader.take()
    assert taken is not None and len(taken[1]) == 50
    assert reader.next is not None and not reader.next.done()
    time.sleep(0.2)
    assert not reader.next.done() and not reading()  # not begun: nothing started it
    reader.start()
    second = reader.next.result(timeout=30)
    assert second is not None and len(second[1]) == 100 and second[2] is not None
    reader.start()  # again: nothing more begins
    assert reader.take() is second
    assert [len(b[1]) for b in iter(reader.take, None)] == [200, 400, 400, 400, 90]


def test_upsert_many_runs_idle_while_each_chunk_is_applied(redis_client: Any,
                                                           catalog: Any) -> None:
    """`idle` runs once a chunk is sent to Redis and before its reply is taken (the apply
    thread at work), once per apply chunk; what is stored and answered is as without it."""
    import threading

    from worker.planner import plan
    from worker.store import APPLY_CHUNK, Store

    docs = list(realistic_bookings(2 * APPLY_CHUNK + 30, seed=8, now=NOW))
    items = []
    for doc in docs:
        booking = parse_booking(doc, catalog)
        items.append((booking, plan(booking, catalog.protocols[booking.treatment],
                                    catalog.clinics[booking.clinic], NOW)))
    texts = [b.model_dump_json() for b, _ in items]
    calls: list[bool] = []

    def idle() -> None:
        calls.append(any(t.name.startswith("store-apply") for t in threading.enumerate()))

    with_idle = Store(redis_client, "idle-on", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    plain = Store(redis_client, "idle-off", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    before_idle: list[str | None] = [None] * len(items)
    before_plain: list[str | None] = [None] * len(items)
    got = with_idle.upsert_many(items, NOW, previous=before_idle, timelines=False, docs=texts,
                                idle=idle)
    assert got == plain.upsert_many(items, NOW, previous=before_plain, timelines=False,
                                    docs=texts)
    assert before_idle == before_plain == [None] * len(items)
    assert calls == [True, True, True]
    for booking, _ in items:
        # Each store keys its contact ids by its own secret: all the rest is the same.
        stored = redis_client.hgetall(with_idle.booking_key(*booking.key))
        expected = redis_client.hgetall(plain.booking_key(*booking.key))
        assert stored.pop("contacts") and expected.pop("contacts")
        assert stored == expected
        assert redis_client.get(with_idle.doc_key(*booking.key)) == \
            redis_client.get(plain.doc_key(*booking.key))


def _dumped(redis_client: Any, prefix: str) -> dict[str, Any]:
    """Everything under `prefix`, as comparable values: each key (the prefix cut) with its
    type, value and expiry. Clinic events are keyed and stamped by Redis's clock at the
    apply: compared as a list of their fields without their stamps."""
    import re

    out: dict[str, Any] = {}
    events: list[Any] = []
    keys = sorted(redis_client.scan_iter(f"{prefix}:*", count=1000))
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = pipe.execute()
    reads = {"string": pipe.get, "hash": pipe.hgetall, "set": pipe.smembers,
             "zset": lambda k: pipe.zrange(k, 0, -1, withscores=True),
             "list": lambda k: pipe.lrange(k, 0, -1)}
    for key, kind in zip(keys, kinds, strict=True):
        reads[kind](key)
        pipe.execute_command("EXPIRETIME", key)
    replies = pipe.execute()
    for key, kind, value, expiry in zip(keys, kinds, replies[0::2], replies[1::2],
                                        strict=True):
        name = key[len(prefix) + 1:]
        if name.startswith("ev:") and kind == "hash":
            events.append(sorted((f, re.sub(r'"created_at":[0-9.]+,?', "", v))
                                 for f, v in value.items()))
        elif name in ("ev:due", "ev:last", "ev:seq"):
            out[name] = len(value) if kind == "zset" else kind
        elif not name.startswith("secret:"):
            out[name] = (kind, value, expiry)
    out["(events)"] = sorted(events)
    return out


@pytest.mark.parametrize("release", [False, True])
def test_a_batch_stored_from_its_records_is_stored_as_from_its_plans(
        redis_client: Any, catalog: Any, release: bool) -> None:
    """`upsert_many(records=...)`, as `reminders book` stores a batch (each new booking's
    reminders written from its plan's record: `_new_from_record`), writes key for key, field
    for field, score for score what the same batch writes from the plan objects, and
    answers the same: varied bookings (three treatments, held, released, late, patients
    with several bookings whose SMS the cap moves by the others'), booked, then booked
    again (unchanged), then with changes."""
    from worker.batch import Document, _check_chunk, decode
    from worker.planner import decoded_from
    from worker.store import APPLY_CHUNK, Store

    now = NOW
    docs = list(realistic_bookings(2 * APPLY_CHUNK + 50, seed=12, now=now))
    for n in range(0, 60, 3):  # patients with three bookings each, a day apart
        for k in (1, 2):
            docs[n + k]["patient"] = dict(docs[n]["patient"], channels=["sms"])
            docs[n + k]["starts_at"] = (datetime.fromisoformat(docs[n]["starts_at"])
                                        + timedelta(days=k)).isoformat()
    docs[71]["starts_at"] = (now + timedelta(hours=30)).isoformat()  # steps late
    docs[72]["treatment"] = "microneedling"
    docs[72]["medications"] = {"tretinoin": True, "retinol": False,
                               "isotretinoin_last_dose": (now - timedelta(days=30)).date()
                               .isoformat()}  # held (released with `release`)
    changed = [dict(d, starts_at=(datetime.fromisoformat(d["starts_at"]) + timedelta(days=1))
                    .isoformat()) if n % 5 == 0 else d for n, d in enumerate(docs)]
    with_records = Store(redis_client, "from-records",
                         retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    from_plans = Store(redis_client, "from-plans", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    from_plans._contact_secret = with_records.contact_secret  # the same contact ids
    lazy_left: int | None = None
    for batch in (docs, docs, changed):
        lines = [orjson.dumps(d) for d in batch]
        chunk = _check_chunk([Document(n + 1, n + 1, raw=line) for n, line in enumerate(lines)],
                             catalog, None, now)
        assert not chunk.refused
        accepted = chunk.accepted()
        items = [decode(item, catalog) for item in accepted]
        texts = [doc for doc, _ in accepted]
        before: list[list[str | None]] = [[None] * len(items) for _ in range(2)]
        got = with_records.upsert_many(items, now, release=release, previous=before[0],
                                       timelines=False, docs=texts,
                                       records=[record for _, record in accepted])
        if lazy_left is None:  # new bookings: stored from their records
            lazy_left = sum(decoded_from(p, r) for (_, p), (_, r) in zip(items, accepted,
                                                                           strict=True))
        assert got == from_plans.upsert_many(items, now, release=release, previous=before[1],
                                             timelines=False, docs=texts)
        assert before[0] == before[1]
        assert _dumped(redis_client, "from-records") == _dumped(redis_client, "from-plans")
    assert with_records._kinds, "no booking was stored from its record"
    # Most plans' reminders were never made: stored from the record, the plan left lazy
    # (until the second store, from the plan objects, read them).
    assert lazy_left is not None and lazy_left > len(docs) // 2, lazy_left
    stored = _dumped(redis_client, "from-plans")
    held = stored["b:glow/" + docs[72]["booking_id"]][1]
    assert held["status"] == ("scheduled" if release else "held")
    texts_by_id = stored["t"][1]
    late = stored["b:glow/" + docs[71]["booking_id"]][1]
    assert any("late:" in texts_by_id[v.rsplit("@", 1)[1]] for k, v in late.items()
               if ":" in k and "@" in v), "no step late"
    # The cap moved some of the three-booking patients' SMS (a reason beyond the planner's).
    reasons = {texts_by_id[v.rsplit("@", 1)[1]] for n in range(60)
               for k, v in stored["b:glow/" + docs[n]["booking_id"]][1].items()
               if k.endswith(":sms") and "@" in v}
    assert any("SMS" in reason for reason in reasons), reasons
    with pytest.raises(ValueError):
        with_records.upsert_many(items, now, records=[])


def test_a_plan_decoded_lazily_is_the_plan_decoded_at_once(catalog: Any) -> None:
    """`plan_from_record(lazy=True)` (what `reminders book` decodes): a plan the SMS cap
    left alone makes its reminders when first read, the same as made at once, however they
    are first reached (compared, copied, pickled, replaced); its `uncapped` reads None
    before that (a plan the cap changed is made at once, `uncapped` and all); whether it
    has an SMS scheduled is said from its record without making them."""
    import copy
    import dataclasses
    import pickle

    from worker.batch import Document, _check_chunk
    from worker.planner import decoded_from, plan_from_record, scheduled_sms

    docs = list(realistic_bookings(300, seed=13, now=NOW))
    for n in range(0, 30, 3):  # a patient with three bookings: the cap changes some plans
        docs[n + 1]["patient"] = docs[n + 2]["patient"] = dict(docs[n]["patient"],
                                                               channels=["sms"])
        docs[n + 1]["starts_at"] = docs[n + 2]["starts_at"] = docs[n]["starts_at"]
    lines = [orjson.dumps(d) for d in docs]
    chunk = _check_chunk([Document(n + 1, n + 1, raw=line) for n, line in enumerate(lines)],
                         catalog, None, NOW)
    kinds = {"lazy": 0, "made at once": 0}
    for doc, record in chunk.accepted():
        clinic = catalog.clinics[orjson.loads(doc)["clinic"]]

        def made(lazy: bool, record: Any = record, clinic: Any = clinic) -> Any:
            return plan_from_record(record, clinic.send_window, clinic.sms, lazy=lazy)

        eager = made(False)
        lazy = made(True)
        kinds["lazy" if decoded_from(lazy, record) else "made at once"] += 1
        assert lazy.uncapped == eager.uncapped  # read first: before its reminders are made
        assert scheduled_sms(lazy) == scheduled_sms(eager)
        assert decoded_from(lazy, record) == (record[7] is None)  # still lazy if it was
        assert lazy == eager
        assert [r.__dict__ for r in lazy.reminders] == [r.__dict__ for r in eager.reminders]
        assert not decoded_from(lazy, record)  # made now: a plain plan
        assert copy.deepcopy(made(True)) == eager
        assert pickle.loads(pickle.dumps(made(True))) == eager
        assert dataclasses.replace(made(True), hold_reason="x").reminders == eager.reminders
        assert made(True).reminders == eager.reminders
        assert not hasattr(made(True), "no_such_field")
    assert kinds["lazy"] and kinds["made at once"], kinds


def _capped_across(docs: list[dict[str, Any]], size: int, now: datetime) -> None:
    """Patients under the SMS cap (SMS only) with a booking in each of two store batches of
    `size`: the one in the first batch, another a day later in the next; and three with
    three bookings, the middle one in the batch after."""
    for n in range(0, 40, 2):
        other = n + size
        docs[other]["patient"] = dict(docs[n]["patient"], channels=["sms"])
        docs[n]["patient"] = docs[other]["patient"]
        docs[other]["starts_at"] = (datetime.fromisoformat(docs[n]["starts_at"])
                                    + timedelta(days=1)).isoformat()
    for n in (50, 60, 70):
        for k, at in ((1, size + n), (2, n + 1)):
            docs[at]["patient"] = dict(docs[n]["patient"], channels=["sms"])
            docs[at]["starts_at"] = (datetime.fromisoformat(docs[n]["starts_at"])
                                     + timedelta(days=k)).isoformat()


def _rounds_of(now: datetime, size: int, seed: int) -> list[list[dict[str, Any]]]:
    """A file of two store batches of `size` (`_capped_across`), booked new, then again
    (unchanged), then with every fifth booking moved a day (its version changes) and one
    patient's phone changed."""
    docs = list(realistic_bookings(2 * size, seed=seed, now=now))
    _capped_across(docs, size, now)
    changed = [dict(d, starts_at=(datetime.fromisoformat(d["starts_at"]) + timedelta(days=1))
                    .isoformat()) if n % 5 == 0 else d for n, d in enumerate(docs)]
    # One of those patients' first-batch booking given another phone (a number corrected):
    # it leaves the phone that the cap of the booking in the next batch reads.
    changed[2] = dict(changed[2], patient=dict(changed[2]["patient"],
                                               phone=docs[1]["patient"]["phone"]))
    return [docs, docs, changed]


def _accepted(batch: list[dict[str, Any]], catalog: Any, now: datetime) -> list[Any]:
    from worker.batch import Document, _check_chunk

    lines = [orjson.dumps(d) for d in batch]
    chunk = _check_chunk([Document(n + 1, n + 1, raw=line) for n, line in enumerate(lines)],
                         catalog, None, now)
    assert not chunk.refused
    return chunk.accepted()


def _stores(redis_client: Any, *prefixes: str) -> list[Any]:
    from worker.store import Store

    stores = [Store(redis_client, p, retention_days=FIXED_SCENARIO_RETENTION_DAYS)
              for p in prefixes]
    for store in stores[1:]:
        store._contact_secret = stores[0].contact_secret  # the same contact ids
    return stores


def _redone(store: Any) -> list[int]:
    """Spy on `store`: the bookings each `upsert_many` read and wrote again after its
    first pass (a check that failed, or a booking waiting for another)."""
    counts: list[int] = []
    rounds = store._upsert_rounds

    def spy(todo: list[int], *args: Any) -> None:
        counts.append(len(todo))
        rounds(todo, *args)

    store._upsert_rounds = spy
    return counts


@pytest.mark.parametrize("when", ["before", "midway"])
def test_a_batch_read_before_the_batch_before_is_applied_is_stored_as_in_turn(
        redis_client: Any, catalog: Any, when: str) -> None:
    """The race `reminders book`'s read ahead (`ReadAhead`) makes, forced: the next store
    batch read (`Store.read_first`) before the batch before is applied ("before"), or while
    its first apply chunk is at Redis ("midway", from `upsert_many`'s `idle`), then stored
    from that read. Patients under the SMS cap have bookings in both batches, so that read
    is out of date for them (their other booking new, unchanged, then moved): the apply's
    guard refuses those, which are read and written again; every key, field, score and
    expiry, each answer and each version before is what storing the batches in turn gives."""
    from worker.batch import decode
    from worker.store import APPLY_CHUNK

    now, size = NOW, APPLY_CHUNK + 30
    in_turn, ahead = _stores(redis_client, "in-turn", "read-ahead")
    # Each batch's bookings read and written again after its first pass.
    redone, redone_in_turn = _redone(ahead), _redone(in_turn)
    for round_no, batch in enumerate(_rounds_of(now, size, seed=21)):
        parts = []
        for part in (batch[:size], batch[size:]):
            accepted = _accepted(part, catalog, now)
            parts.append(([decode(item, catalog) for item in accepted], accepted))
        answers: list[list[Any]] = [[], []]
        befores: list[list[str | None]] = [[], []]
        unsure: list[int] = []
        for n, store in enumerate((in_turn, ahead)):
            reads: list[Any] = []
            for k, (items, accepted) in enumerate(parts):
                following = parts[k + 1][0] if k + 1 < len(parts) else None

                def read_next(following: Any = following, items: Any = items,
                              reads: list[Any] = reads, store: Any = store,
                              unsure: list[int] = unsure) -> None:
                    if following is not None and not reads:
                        reads.append(store.read_first(following, timelines=False,
                                                      after=items))
                        unsure.append(len(reads[0].unsure))

                if store is ahead and when == "before":
                    read_next()
                before: list[str | None] = [None] * len(items)
                answers[n] += store.upsert_many(
                    items, now, previous=before, timelines=False,
                    docs=[doc for doc, _ in accepted],
                    records=[record for _, record in accepted],
                    first=reads.pop() if store is ahead and k else None,
                    idle=read_next if store is ahead and when == "midway" else None)
                befores[n] += before
                assert not reads or k == 0
        assert answers[0] == answers[1]
        assert befores[0] == befores[1]
        assert _dumped(redis_client, "in-turn") == _dumped(redis_client, "read-ahead")
        if round_no == 0:
            assert befores[0] == [None] * (2 * size)
        else:
            assert None not in befores[0]
        # The race was met: the second batch read with the first batch's bookings of the
        # same patients new, unchanged, then moved, not yet written; those patients' caps
        # read again, none refused at the apply.
        assert unsure == [23], unsure
        assert redone == redone_in_turn and redone[-1] == 0, redone
    stored = _dumped(redis_client, "in-turn")
    texts_by_id = stored["t"][1]
    reasons = {texts_by_id[v.rsplit("@", 1)[1]] for n in range(size, size + 40, 2)
               for k, v in stored["b:glow/" + _rounds_of(now, size, 21)[2][n]["booking_id"]][1]
               .items() if k.endswith(":sms") and "@" in v}
    assert any("SMS" in reason for reason in reasons), reasons  # the cap counted the other


def test_reminders_books_read_ahead_stores_as_each_batch_in_turn(redis_client: Any,
                                                                catalog: Any) -> None:
    """`ReadAhead` as `reminders book` stores with it (the spool's batches, small here: a
    patient under the SMS cap has bookings in two of them), each next batch's read parked
    until it is done before the batch before is stored: every key, field, score and expiry,
    and each answer, is what storing each batch in turn (read when its turn comes) gives."""
    from worker.batch import CHUNK, Document, ReadAhead, Spool, _check_chunk, decode
    from worker.store import APPLY_CHUNK

    now, size = NOW, APPLY_CHUNK + 30
    in_turn, ahead = _stores(redis_client, "book-in-turn", "book-ahead")
    redone, redone_in_turn = _redone(ahead), _redone(in_turn)
    for batch in _rounds_of(now, size, seed=22):
        spool = Spool()
        lines = [orjson.dumps(d) for d in batch]
        for start in range(0, len(lines), CHUNK):
            spool.add_chunk(_check_chunk(
                [Document(n + 1, n + 1, raw=lines[n])
                 for n in range(start, min(start + CHUNK, len(lines)))], catalog, None, now))
        answers: list[list[Any]] = [[], []]
        for chunk in spool.chunks(size):
            items = [decode(item, catalog) for item in chunk]
            answers[0] += in_turn.upsert_many(items, now, timelines=False,
                                              docs=[d for d, _ in chunk],
                                              records=[r for _, r in chunk])
        reader = ReadAhead(spool.chunks(size), catalog, ahead, timelines=False)
        taken_sizes, unsure = [], []
        while (taken := reader.take()) is not None:
            chunk, items, first = taken
            taken_sizes.append(len(items))
            unsure.append(None if first is None else len(first.unsure))
            if reader.next is not None:
                reader.start()
                reader.next.result()  # the next batch read before this one is applied
            answers[1] += ahead.upsert_many(items, now, timelines=False,
                                            docs=[d for d, _ in chunk], first=first,
                                            records=[r for _, r in chunk])
        assert reader.next is None and reader.take() is None
        spool.close()
        assert taken_sizes == [size, size]
        # The first batch read by `upsert_many`; the second's patients of the first.
        assert unsure == [None, 23], unsure
        assert answers[0] == answers[1]
        assert _dumped(redis_client, "book-in-turn") == _dumped(redis_client, "book-ahead")
        # None refused at the apply: written again only those that wait in their batch.
        assert redone == redone_in_turn and redone[-1] == 0, redone


def test_an_email_unsubscribe_after_the_read_ahead_is_capped_as_in_turn(
        redis_client: Any, catalog: Any) -> None:
    """The SMS cap sends an SMS that does not fit by email only to a patient who has not
    unsubscribed from email (read with the cap's read, `_CapsRead.email`). Forced: the next
    store batch read ahead (`Store.read_first`, as `ReadAhead` reads it), then the patient
    unsubscribes from email (the unsubscribe link: `Store.opt_out`), then the batch before
    and that batch stored. Reading each batch in its turn reads the unsubscribe: the SMS
    that does not fit is capped as for a patient without email (here: not sent, saying
    the limit is reached and the patient takes no email). The read ahead must store the
    same, not an email to the address just unsubscribed ("by email: the SMS limit is
    reached", then skipped at its begin as opted out)."""
    from worker.batch import decode

    now, size = NOW, 40
    docs = list(realistic_bookings(2 * size + 1, seed=31, now=now))
    earlier = docs[2 * size]  # the patient's booking stored by an earlier run
    # Not in the batch before: nothing there marks this patient's cap unsure.
    for n in range(size):
        assert docs[n]["patient"]["phone"] != earlier["patient"]["phone"]
    patient = dict(earlier["patient"], channels=["email", "sms"])
    earlier["patient"] = patient
    docs[size + 5] = dict(docs[size + 5], patient=patient, starts_at=(
        datetime.fromisoformat(earlier["starts_at"]) + timedelta(days=1)).isoformat())
    in_turn, ahead = _stores(redis_client, "unsub-in-turn", "unsub-ahead")
    batches = []
    for part in ([earlier], docs[:size], docs[size:2 * size]):
        accepted = _accepted(part, catalog, now)
        batches.append(([decode(item, catalog) for item in accepted], accepted))

    def stored(store: Any, k: int, first: Any = None) -> list[Any]:
        items, accepted = batches[k]
        return store.upsert_many(items, now, timelines=False, first=first,
                                 docs=[doc for doc, _ in accepted],
                                 records=[record for _, record in accepted])

    answers = []
    for store in (in_turn, ahead):
        stored(store, 0)
        read = None
        if store is ahead:  # read while the batch before is still to be applied
            read = store.read_first(batches[2][0], timelines=False, after=batches[1][0])
            assert read.unsure == []
            assert any(r is not None and r.email and r.taken for r in read.round.caps)
        store.opt_out("glow", "email", patient["email"], "unsubscribed by the link")
        answers.append(stored(store, 1) + stored(store, 2, read))
    assert answers[0] == answers[1]
    # The race was met: the cap could not keep one of this booking's SMS (the other booking
    # took its day) and, the patient unsubscribed from email, said so; not "by email".
    key = f"b:glow/{docs[size + 5]['booking_id']}"
    want, got = (_dumped(redis_client, p)[key][1] for p in ("unsub-in-turn", "unsub-ahead"))
    assert "spf:sms" in want and "spf:email" not in want, want
    assert want == got
    assert _dumped(redis_client, "unsub-in-turn") == _dumped(redis_client, "unsub-ahead")
