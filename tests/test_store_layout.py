"""Store layout 2 against a real Redis server: what is stored how, and the batch upsert.

The fast path for new bookings gives exactly what the general reconcile gives; a batch gives
what upserting one by one gives; a change landing mid-batch is re-read for that booking only;
text ids that collide (forced with one-letter ids) never show the wrong words; data of
another layout is refused, not misread.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import parse_booking
from worker.planner import plan
from worker.reconcile import record_fields
from worker.store import (
    Attempt,
    Store,
    StoreLayoutError,
    _Stored,
    decode_reminder,
    encode_reminder,
    split_ref,
)

NOW = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)


def planned(catalog, doc, now=NOW):
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], now)


def variants(booking_doc, catalog):
    """Bookings that exercise every branch a new booking can take."""
    docs = {"example": booking_doc}
    docs["soon (late and skipped steps)"] = dict(booking_doc, starts_at="2026-11-22T09:00:00+01:00")
    docs["in three days"] = dict(booking_doc, starts_at="2026-11-24T14:30:00+01:00")
    docs["held"] = dict(booking_doc, medications={"tretinoin": True,
                                                  "isotretinoin_last_dose": "2026-10-01"})
    docs["sms only"] = dict(booking_doc, patient=dict(booking_doc["patient"], channels=["sms"]))
    docs["email only"] = dict(booking_doc,
                              patient=dict(booking_doc["patient"], channels=["email"]))
    for protocol in sorted(catalog.protocols):
        docs[protocol] = dict(booking_doc, treatment=protocol, booking_id=f"P-{protocol}")
    return docs


def apply_args(prepared):
    """The apply script's input for one booking, order-free where order does not matter."""
    head, doc = prepared.args
    (clinic, booking_id, check, keep, hset, hdel, due, emits, unindex, guard, counts, contacts,
     *removals) = json.loads(head)
    return (clinic, booking_id, check, doc, keep, dict(zip(hset[0::2], hset[1::2], strict=True)),
            hdel, dict(zip(due[1::2], due[0::2], strict=True)), removals, emits, unindex, guard,
            dict(zip(counts[0::2], counts[1::2], strict=True)), contacts)


@pytest.mark.parametrize("timeline", [True, False])  # False: as `reminders book` stores
@pytest.mark.parametrize("release", [False, True])
def test_a_new_booking_is_stored_as_the_general_reconcile_would_store_it(
        redis_client, catalog, booking_doc, release, timeline):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    for name, doc in variants(booking_doc, catalog).items():
        booking, p = planned(catalog, doc)
        fast_texts: dict[str, str] = {}
        slow_texts: dict[str, str] = {}
        fast = store._prepare_new(booking, p, NOW, release, fast_texts, timeline=timeline)
        slow = store._prepare_reconciled(booking, p, _Stored({}, None, {}), NOW, release,
                                         slow_texts, timeline=timeline)
        assert apply_args(fast) == apply_args(slow), name
        assert fast.timeline == slow.timeline, name
        assert fast_texts == slow_texts, name
    assert "#2" in "".join(apply_args(fast)[5]), "no protocol with occurrences was tried"


def test_a_booking_stays_a_compact_listpack_while_pending_and_once_its_first_message_is_sent(
        redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    store.upsert(*planned(catalog, booking_doc), NOW)
    bkey = store.booking_key("glow", "A-1042")
    assert redis_client.object("encoding", bkey) == "listpack"
    assert max(len(v) for v in redis_client.hvals(bkey)) <= 64
    assert sorted(redis_client.keys("t:*")) == sorted([  # no attempt log, no ledger yet
        "t:b:glow/A-1042", "t:bookings:glow", "t:d:glow/A-1042", "t:due", "t:layout", "t:t",
        "t:metrics", "t:secret:contact",  # the key of contact ids, made once
        store.contact_key("glow", "phone", "+34600111222"),
        store.contact_key("glow", "email", "ana@example.com")])
    ref = "glow/A-1042/booking-confirmation:email"
    redis_client.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    token = uuid.uuid4().hex  # as dispatch makes them
    assert store.begin_send(ref, claim.version, claim.claim, token, 60_000) == "ok"
    sent_at = datetime(2026, 11, 21, 12, 0, 1, 654321, tzinfo=UTC)
    assert store.finish_sent(ref, Attempt(claim.version, claim.claim, token), sent_at) == "ok"
    assert redis_client.object("encoding", bkey) == "listpack"
    record = store.record(ref)
    assert (record["status"], record["sent_at"], record["sent_version"], record["attempts"],
            record["claim"], record["tok"]) == ("sent", "2026-11-21T12:00:01.654321Z", "1", "1",
                                                "1", token)
    assert "tok" not in store.attempts(ref)[0]  # the log's token fences, it is not shown


def test_a_store_refuses_data_of_another_layout(redis_server, redis_client, catalog,
                                                 booking_doc):
    redis_client.sadd("t:k:glow/A-1042", "day-before:sms")  # what layout 1 kept per booking
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    for call in (lambda: store.timeline("glow", "A-1042"),
                 lambda: store.upsert(*planned(catalog, booking_doc), NOW),
                 lambda: store.claim_due(10, 60)):
        with pytest.raises(StoreLayoutError,
                           match="store layout 1 .*reads layout 2 only.*`reminders migrate`"):
            call()
    assert sorted(redis_client.keys("*")) == ["t:k:glow/A-1042"]  # nothing written
    redis_client.flushdb()
    redis_client.set("t:layout", "3")
    with pytest.raises(StoreLayoutError, match="layout 3 .*reads layout 2 only"):
        Store(redis_client, "t").timeline("glow", "A-1042")
    # The command line says so and stops.
    redis_client.flushdb()
    redis_client.sadd("reminders:r:glow/A-1042/day-before:sms", "x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url)
    shown = subprocess.run([str(Path(sys.executable).parent / "reminders"), "show", "--clinic",
                            "glow", "A-1042"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 3, shown.stderr
    assert "configuration error: reminders:layout: Redis holds schedule data of store " \
           "layout 1" in shown.stderr


def moved(doc, days, **changes):
    start = datetime.fromisoformat(doc["starts_at"]) + timedelta(days=days)
    return dict(doc, starts_at=start.isoformat(), **changes)


def state(store, clinic, booking_ids):
    """Everything a booking shows: timeline, every record, its place in the schedule."""
    out = {}
    for booking_id in booking_ids:
        timeline = store.timeline(clinic, booking_id)
        refs = [f"{clinic}/{booking_id}/{r['id']}" for r in timeline["reminders"]]
        out[booking_id] = (timeline, {ref: (store.record(ref),
                                           store.redis.zscore(store.due_key, ref))
                                      for ref in refs})
    return out


@pytest.mark.parametrize("chunk", [200, 3, 1])  # one chunk; chunks applied while the next
def test_a_batch_gives_what_upserting_one_by_one_gives(  # is prepared, the same booking in two
        redis_client, catalog, booking_doc, monkeypatch, chunk):
    monkeypatch.setattr("worker.store.APPLY_CHUNK", chunk)
    one, many = (Store(redis_client, "one", retention_days=FIXED_SCENARIO_RETENTION_DAYS),
                 Store(redis_client, "many", retention_days=FIXED_SCENARIO_RETENTION_DAYS))
    # asked for versions only, as `reminders book` asks
    bare = Store(redis_client, "bare", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    docs = [dict(doc, booking_id=f"B-{n}") for n, doc in
            enumerate(variants(booking_doc, catalog).values())]
    first = [planned(catalog, d) for d in docs]
    timelines = [one.upsert(b, p, NOW) for b, p in first]
    assert many.upsert_many(first, NOW) == timelines
    previous: list[str | None] = [None] * len(first)
    assert bare.upsert_many(first, NOW, timelines=False, previous=previous) == [
        {"version": t["version"]} for t in timelines]
    assert previous == [None] * len(first)
    later = NOW + timedelta(hours=1)
    second_docs = [
        docs[0],  # unchanged
        moved(docs[1], 2),  # moved
        dict(docs[2], patient=dict(docs[2]["patient"], email="ana@new.example")),  # new words
        dict(docs[3], medications={"tretinoin": False}),  # a step leaves the plan; released
        moved(docs[4], 1),
        moved(docs[4], 5),  # the same booking twice in one batch: the later one wins
        dict(booking_doc, booking_id="NEW-1"),  # new
        dict(booking_doc, booking_id="NEW-1"),  # and again, unchanged
    ]
    second = [planned(catalog, d, later) for d in second_docs]
    expected, was = [], []
    for b, p in second:
        was.append(redis_client.hget(one.booking_key(*b.key), "version"))
        expected.append(one.upsert(b, p, later))
    assert many.upsert_many(second, later) == expected
    previous = [None] * len(second)
    assert bare.upsert_many(second, later, timelines=False, previous=previous) == [
        {"version": t["version"]} for t in expected]
    assert previous == was == ["1", "1", "1", "1", "1", "2", None, "1"]
    ids = sorted({d["booking_id"] for d in docs + second_docs})
    assert state(many, "glow", ids) == state(one, "glow", ids) == state(bare, "glow", ids)
    assert expected[5]["version"] == 3 and expected[7]["version"] == 1


def test_a_change_landing_mid_batch_is_read_again_for_that_booking_only(
        redis_client, redis_server, catalog, booking_doc):
    """A delivery lands between the batch's read and its apply: that booking is reconciled
    again (its reminder is history, not rescheduled); the others are written once."""
    from worker.store import connect

    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    docs = [dict(booking_doc, booking_id=f"B-{n}",  # three patients: no SMS cap between them
                 patient=dict(booking_doc["patient"], phone=f"+3460011122{n}")) for n in range(3)]
    store.upsert_many([planned(catalog, d) for d in docs], NOW)
    ref = "glow/B-1/day-before:sms"
    redis_client.zadd(store.due_key, {ref: 0})
    (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
    attempt = Attempt(claim.version, claim.claim, "tok")
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    other = Store(connect(redis_server.url), "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    calls: list[str] = []
    real = Store._reconcile

    def reconcile_with_a_delivery_landing(stored_booking, stored, plan_, *args):
        booking_id = json.loads(args[0])["booking_id"]
        calls.append(booking_id)
        if booking_id == "B-1" and calls.count("B-1") == 1:
            assert other.finish_sent(ref, attempt, NOW) == "ok"
        return real(stored_booking, stored, plan_, *args)

    store._reconcile = reconcile_with_a_delivery_landing  # type: ignore[method-assign]
    timelines = store.upsert_many([planned(catalog, moved(d, 3)) for d in docs], NOW)
    assert sorted(calls) == ["B-0", "B-1", "B-1", "B-2"]
    entries = [{r["id"]: r for r in t["reminders"]}["day-before:sms"] for t in timelines]
    assert [e["status"] for e in entries] == ["scheduled", "sent", "scheduled"]
    assert entries[1]["sent_version"] == 1 and [t["version"] for t in timelines] == [2, 2, 2]
    assert redis_client.zscore(store.due_key, ref) is None
    assert redis_client.zscore(store.lease_key, ref) is None
    assert store.timeline("glow", "B-1") == timelines[1]


class OneLetterIds(Store):
    TEXT_ID_LENGTH = 1  # 64 possible ids for dozens of texts: collisions are certain


def test_text_ids_that_collide_never_show_the_wrong_words(redis_client, catalog, booking_doc):
    normal, tiny = (Store(redis_client, "n", retention_days=FIXED_SCENARIO_RETENTION_DAYS),
                    OneLetterIds(redis_client, "s", retention_days=FIXED_SCENARIO_RETENTION_DAYS))
    docs = list(variants(booking_doc, catalog).values())
    items = [planned(catalog, dict(d, booking_id=f"B-{n}")) for n, d in enumerate(docs)]
    assert tiny.upsert_many(items, NOW) == normal.upsert_many(items, NOW)
    ids = redis_client.hkeys("s:t")
    assert len({redis_client.hget("s:t", i) for i in ids}) == len(ids)  # one text per id
    assert {len(i) for i in ids} != {1}  # some had to take longer ids
    # Another process, knowing nothing and meeting the texts in another order: the apply
    # script finds the collisions in Redis.
    fresh = OneLetterIds(redis_client, "s", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    more = [planned(catalog, dict(d, booking_id=f"C-{n}")) for n, d in enumerate(docs)][::-1]
    assert fresh.upsert_many(more, NOW) == normal.upsert_many(more, NOW)
    assert fresh._taken  # it was told of ids other words hold
    for n in range(len(docs)):
        assert fresh.timeline("glow", f"B-{n}") == normal.timeline("glow", f"B-{n}")


def test_the_reminder_codec_round_trips_what_an_upsert_writes(catalog, booking_doc):
    doc = copy.deepcopy(booking_doc)
    doc["treatment"] = "tretinoin-start"
    _, p = planned(catalog, doc)
    texts: dict[str, str] = {}

    def text_id(text: str) -> str:
        texts[f"id{len(texts)}"] = text
        return f"id{len(texts) - 1}"

    for r in p.reminders + [p.reminders[0].__class__(**{
            **p.reminders[0].__dict__, "key": f"odd:{p.reminders[0].channel}", "step": "odd",
            "occurrence": 3,
            "due_at": NOW, "expires_at": None, "expires_note": "", "at_booking": True})]:
        fields = record_fields(r, "scheduled", r.reason) | {"version": "7"}
        main, attempt = encode_reminder(r.key, fields, text_id=text_id)
        assert decode_reminder(r.key, main, attempt, texts) == fields, r.key


def test_words_written_at_send_time_are_kept_exactly(redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    store.upsert(*planned(catalog, booking_doc), NOW)
    for ref, reason in (("glow/A-1042/day-before:sms", "@home: 550 | mailbox full"),
                        ("glow/A-1042/spf:sms", "\\ odd | one")):
        redis_client.zadd(store.due_key, {ref: 0})
        (claim,) = [c for c in store.claim_due(50, 60) if c.ref == ref]
        assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
        assert store.finish_failed(ref, Attempt(claim.version, claim.claim, "tok"), reason) == "ok"
        record = store.record(ref)
        assert (record["reason"], record["last_error"]) == (reason, reason)
        assert store.purge([ref], NOW) == [ref]
        assert store.record(ref)["reason"] == (
            f"purged from the dead letters at 2026-11-21T12:00:00.123456Z: {reason}")
        clinic, booking_id, key = split_ref(ref)
        assert store.timeline(clinic, booking_id)
