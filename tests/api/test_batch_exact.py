"""`POST /v1/bookings:batch` answers and stores exactly what its code at `ece2d72` did,
however the route orders its work: each batch is sent through real HTTP to uvicorn on a
real Redis, then given, at the instant the route planned it at, to `reference_batch` (the
route's code at `ece2d72`: every item checked, then all the accepted ones stored in one
`Store.upsert_many`) on a second database of the same redis-server; the two answers (to
the byte) and the two databases' bookings (key for key) must be the same.

The batches are varied and long (over 800 items: several parts, for a route that stores
a batch a part at a time): realistic bookings (benchmarks/intake.py: names with accents,
five countries' numbers, zones, locales, three protocols, retinoid users, held ones),
refusals for many reasons among them, a booking id given twice (the second time hundreds
of items later), one patient's visits under the SMS cap spread over the whole batch (some
in each of the route's parts), then the same ids again: unchanged, changed (moved,
medications), new ones; and while a protocol's file is being rewritten, its items
answered 503 and the others stored. The
nudge (asked when a batch changes something due soon, in any part, not when it changes
nothing) and the log line are checked too.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import shutil
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from benchmarks.intake import realistic_bookings
from tests.api.conftest import future_booking, nudges, nudges_settled
from tests.conftest import ROOT
from tests.test_book_resubmit_caps import capped_visits
from worker.api.bookings import STORE_PART, _batch_items
from worker.api.errors import ApiError, error_body
from worker.api.intake import intake, refused
from worker.api.services import Services
from worker.secrets import secret_key, server_secret
from worker.store import CONTACT_SECRET, Store, connect

ROUTE = "/v1/bookings:batch"


def reference_batch(doc: Any, clinic: str, svc: Services, now: datetime) -> dict[str, Any]:
    """The route's answer as its code at `ece2d72` gave it (`batch_bookings`, but the
    nudge and the log line): every item checked in order, then the accepted ones stored
    together."""
    items = _batch_items(doc)
    results: list[dict[str, Any]] = []
    accepted = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        given = item.get("booking_id") if isinstance(item, dict) else None
        shown = given if isinstance(given, str) else None
        try:
            if isinstance(item, dict) and given is None:
                raise refused([("booking_id", "Field required")])
            if isinstance(given, str) and given in seen:
                raise refused([("booking_id", f"appears earlier in this batch (index "
                                              f"{seen[given]})")])
            booking, planned = intake(item, clinic, None, svc.catalog, now)
        except ApiError as exc:
            results.append({"index": index, "booking_id": shown, "status": exc.status,
                            **error_body(exc.code, exc.message, exc.fields)})
            continue
        seen[booking.booking_id] = index
        results.append({"index": index, "booking_id": booking.booking_id})
        accepted.append((index, booking, planned))
    if accepted:
        existed: list[str | None] = [None] * len(accepted)
        timelines = svc.store.upsert_many([(b, p) for _, b, p in accepted], now,
                                          previous=existed)
        for (index, _, _), timeline, old in zip(accepted, timelines, existed, strict=True):
            results[index].update({"status": 200 if old is not None else 201,
                                   "timeline": timeline})
    return {"stored": len(accepted), "refused": len(items) - len(accepted),
            "results": results}


EVENT = re.compile(r"^reminders:ev:(\d+)$")


def snapshot(client: Any) -> dict[str, Any]:
    """tests/test_book_resubmit_caps.py `snapshot` (each key's type, value and expiry to
    the second), read in three pipelined round trips instead of four a key.

    A key that expires while it is read (the API's short-lived keys) is left out. Every
    expiry the store sets is a whole second (EXPIREAT): it is the first whole second at or
    after the instant read before the round trip plus the time left, however long the round
    trip took (EXPIRETIME is Redis 7's)."""
    keys = sorted(client.scan_iter("reminders:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = pipe.execute()
    present = [(key, kind) for key, kind in zip(keys, kinds, strict=True) if kind != "none"]
    read = {"hash": pipe.hgetall, "zset": lambda k: pipe.zrange(k, 0, -1, withscores=True),
            "set": pipe.smembers, "list": lambda k: pipe.lrange(k, 0, -1), "string": pipe.get,
            "stream": pipe.xrange}
    for key, kind in present:
        read[kind](key)
        pipe.pttl(key)
    before = time.time()
    replies = pipe.execute()
    out = {}
    for n, (key, kind) in enumerate(present):
        value, left = replies[2 * n], replies[2 * n + 1]
        if left == -2:  # expired since its type was read
            continue
        if kind == "set":
            value = sorted(value)
        out[key] = (kind, value, None if left < 0 else math.ceil(before + left / 1000 - 0.002))
    return out


def bookings_of(client: Any) -> dict[str, Any]:
    """Every key of the store's bookings (`snapshot`), but the API's keys, its request
    counters, its health mark (`/readyz`) and the pump's queue (the nudge), which only the
    served database has. The clinic events (worker/webhooks.py: a held booking's alert)
    are numbered on Redis's clock when written: each is named by its place in their order
    instead, and the instants of that clock (when it is due, the counter, `created_at`)
    are left out."""
    keys = {k: v for k, v in snapshot(client).items()
            if not k.startswith(("reminders:apikey", "reminders:celery", "reminders:_kombu",
                                 "reminders:health", "reminders:ratelimit"))}
    ids = sorted(int(m[1]) for k in keys if (m := EVENT.match(k)))
    place = {str(n): f"#{i}" for i, n in enumerate(ids)}
    out = {}
    for key, (kind, value, expires) in keys.items():
        if key in ("reminders:ev:seq", "reminders:ev:last"):
            continue
        if key == "reminders:ev:due":
            value = [place[m] for m, _ in value]
        if (m := EVENT.match(key)):
            key = f"reminders:ev:{place[m[1]]}"
            body = orjson.loads(value["body"])
            body.pop("created_at")  # Redis's clock when written
            value = {**value, "body": body}
        out[key] = (kind, value, expires)
    return out


def realistic(prefix: str, n: int, seed: int) -> list[dict[str, Any]]:
    docs = []
    for doc in realistic_bookings(n, seed=seed):
        doc = orjson.loads(orjson.dumps(doc))
        doc["booking_id"] = f"{prefix}-{doc['booking_id']}"[:64]
        doc.pop("clinic")  # the key's
        docs.append(doc)
    return docs


def refusals(good: dict[str, Any]) -> list[Any]:
    """Items refused for many reasons (each a copy of `good` with one thing wrong)."""
    def bad(n: int, **changes: Any) -> dict[str, Any]:
        doc = copy.deepcopy(good)
        doc["booking_id"] = f"BAD-{n}"
        for path, value in changes.items():
            *parents, last = path.split("__")
            target = doc
            for part in parents:
                target = target[part]
            if value is KeyError:
                del target[last]
            else:
                target[last] = value
        return doc

    return [
        bad(1, clinic="demo"), bad(2, treatment="botox"), bad(3, starts_at="2026-13-01T10:00Z"),
        bad(4, starts_at="2020-01-01T10:00:00+00:00"), bad(5, starts_at=1700000000),
        bad(6, patient__timezone="Mars/Olympus"), bad(7, patient__phone="+3460011"),
        bad(8, patient__email="not an email"), bad(9, patient__locale="xx-QQ"),
        bad(10, patient__channels=["sms", "sms"]), bad(11, patient__channels=["fax"]),
        bad(12, patient__name="Ana\u202eLópez"),
        bad(13, medications__isotretinoin_last_dose="2099-01-01"),
        bad(14, medications__tretinoin="yes"), bad(15, extra=1),
        bad(16, booking_id=KeyError), bad(17, booking_id=42), bad(18, booking_id="has space"),
        bad(19, patient__phone=KeyError, patient__channels=["sms"]),
        [1, 2], "a string", None, 7, {},
    ]


def spread(base: list[Any], inserts: list[Any], seed: int) -> list[Any]:
    """`base` with each of `inserts` put at an even spread of places (seeded)."""
    import random

    out = list(base)
    rng = random.Random(seed)
    step = max(1, len(out) // (len(inserts) + 1))
    for n, item in enumerate(inserts):
        out.insert(min(len(out), (n + 1) * step + rng.randrange(step)), item)
    return out


@pytest.fixture
def config(tmp_path):
    """The repository's config/ and a copy of the peel's protocol as `peel-b`."""
    folder = tmp_path / "config"
    shutil.copytree(ROOT / "config", folder)
    shutil.copy(folder / "protocols" / "chemical-peel.toml", folder / "protocols" / "peel-b.toml")
    return folder


def test_batches_answer_and_store_what_they_did_before(serve, config, redis_server,
                                                       redis_client, caplog):
    server = serve(config_dir=config)
    reference = connect(redis_server.url.removesuffix("/0") + "/9")
    reference.flushdb()
    # The same server secret in both (contact ids are keyed with it).
    key = secret_key(server.settings.key_prefix, CONTACT_SECRET)
    server_secret(redis_client, server.settings.key_prefix, CONTACT_SECRET)
    reference.set(key, redis_client.get(key))
    try:
        with server.client(server.issue_key("glow")) as glow:
            _compare(server, glow, reference, redis_client, caplog)
    finally:
        reference.flushdb()
        reference.close()


def probe(booking_id: str) -> dict[str, Any]:
    """A new booking whose confirmation is due at once: due at the instant the route
    planned the batch at (its score in the due set)."""
    doc = future_booking(booking_id)
    doc.pop("clinic")
    return doc


def _post(server, glow, reference, redis_client, caplog, items: list[Any],
          probe_id: str | None) -> dict[str, Any]:
    """Send `items`; check the answer and the bookings stored against `reference_batch`'s,
    given the instant the route planned at: read from the due score of `probe_id`'s
    confirmation (None: no booking is new or changed; the instant after the answer)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.api.bookings"):
        answer = glow.post(ROUTE, json={"bookings": items}, timeout=120)
    assert answer.status_code == 200, answer.text[:500]
    got = answer.json()
    svc = server.app.state.services
    now = datetime.now(UTC)
    if probe_id is not None:
        due = [s for m, s in redis_client.zrange(svc.store.due_key, 0, -1, withscores=True)
               if m.startswith(f"glow/{probe_id}/")]
        now = datetime.fromtimestamp(min(due), UTC)
    store = Store(reference, server.settings.key_prefix,
                  retention_days=server.settings.retention_days,
                  hooks=lambda clinic: svc.catalog.hooks(clinic))
    expected = reference_batch({"bookings": orjson.loads(orjson.dumps(items))}, "glow",
                               dataclasses.replace(svc, store=store), now)
    assert got["stored"] == expected["stored"] and got["refused"] == expected["refused"]
    assert len(got["results"]) == len(expected["results"]) == len(items)
    for n, (mine, theirs) in enumerate(zip(got["results"], expected["results"], strict=True)):
        assert mine == theirs, f"item {n}"
    assert got == expected
    # The answer's bytes: compact JSON, as before (orjson of the same values).
    assert answer.content == orjson.dumps(expected)
    mine, theirs = bookings_of(redis_client), bookings_of(reference)
    assert mine.keys() == theirs.keys(), (mine.keys() ^ theirs.keys())
    for key in mine:
        assert mine[key] == theirs[key], key
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.api.bookings"]
    assert lines == [f"batch for clinic glow: {got['stored']} stored, "
                     f"{got['refused']} refused"]
    return got


def across(items: list[Any], inserts: list[Any]) -> list[Any]:
    """`items` with `inserts` put at an even spread over the whole of it, the first at its
    start, the last at its end: a batch of over 2 * STORE_PART has them in each of the
    route's parts."""
    out = list(items)
    for n, item in reversed(list(enumerate(inserts))):
        out.insert(n * len(items) // (len(inserts) - 1), item)
    return out


def parts_of(got: dict[str, Any], prefix: str) -> set[int]:
    """The route's parts (STORE_PART accepted items each, in request order) that stored
    the items whose booking id starts with `prefix`."""
    accepted = [r["booking_id"] for r in got["results"] if "timeline" in r]
    return {n // STORE_PART for n, booking_id in enumerate(accepted)
            if booking_id.startswith(prefix)}


def _compare(server, glow, reference, redis_client, caplog) -> None:
    first = realistic("R", 850, seed=11)
    visits = capped_visits("CAP", count=6)  # one patient, the SMS cap ties them together
    peel = [dict(d, booking_id=f"PB-{n}", treatment="peel-b")
            for n, d in enumerate(realistic("X", 4, seed=5))]
    twice = copy.deepcopy(first[30])  # given again 600 items later: refused there
    twice["patient"]["name"] = "Other Name"
    items = spread(across([probe("NOW-1"), *first], visits),
                   [*refusals(first[0]), twice, *peel], seed=1)
    assert len(items) > 2 * STORE_PART  # three of the route's parts at least
    got = _post(server, glow, reference, redis_client, caplog, items, "NOW-1")
    assert parts_of(got, "CAP-") == {0, 1, 2}  # the capped patient's visits in every part
    statuses = [r["status"] for r in got["results"]]
    assert statuses.count(201) > 800 and statuses.count(422) == 25, sorted(set(statuses))
    assert any(r["timeline"]["status"] == "held" for r in got["results"] if "timeline" in r)
    reasons = [m["reason"] or "" for r in got["results"] if "timeline" in r
               for m in r["timeline"]["reminders"]]
    assert any("SMS limit" in x for x in reasons)  # the cap moved some to email
    assert nudges_settled(redis_client) >= 1  # the confirmations are due at once

    # Again: the same bookings (unchanged), some moved or changed, some new, the capped
    # patient's visits in another order.
    again = copy.deepcopy(first[:500])
    for doc in again[::7]:
        doc["starts_at"] = datetime.fromisoformat(doc["starts_at"]).replace(
            minute=(datetime.fromisoformat(doc["starts_at"]).minute + 15) % 60).isoformat()
    for doc in again[3::11]:
        doc["medications"]["tretinoin"] = not doc["medications"]["tretinoin"]
    moved = copy.deepcopy(visits[::-1])
    moved[2]["starts_at"] = moved[1]["starts_at"]  # two visits of the patient the same day
    items = spread(across([probe("NOW-2"), *again, *realistic("S", 300, seed=12)], moved),
                   [*refusals(first[1]), again[10]], seed=2)
    got = _post(server, glow, reference, redis_client, caplog, items, "NOW-2")
    assert parts_of(got, "CAP-") == {0, 1, 2}
    statuses = [r["status"] for r in got["results"]]
    assert statuses.count(200) > 450 and statuses.count(201) >= 300
    versions = [r["timeline"]["version"] for r in got["results"] if r["status"] == 200]
    assert 1 in versions and 2 in versions  # unchanged and changed alike

    # Only unchanged bookings and refusals: nothing changed, no nudge asked.
    before = nudges_settled(redis_client, 0)
    _post(server, glow, reference, redis_client, caplog,
          spread(again[:450], refusals(first[2]), seed=4), None)
    time.sleep(0.5)
    assert nudges(redis_client) == before

    # A new booking due at once in the first part, then only unchanged ones (later parts):
    # the pump is asked for a run all the same.
    got = _post(server, glow, reference, redis_client, caplog,
                [probe("NOW-4"), *again, *first[500:]], "NOW-4")
    assert [r["status"] for r in got["results"]].count(201) == 1
    assert parts_of(got, "R-") == {0, 1, 2}
    assert nudges_settled(redis_client, before + 1) > before

    # The peel's copy being rewritten: its items 503 (send again), the others stored.
    (server.settings.config_dir / "protocols" / "peel-b.toml").unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    assert glow.get("/readyz").status_code == 200
    assert "peel-b" in server.app.state.services.catalog.former_protocols
    fresh = realistic("T", 450, seed=13)
    peel = [dict(d, booking_id=f"PT-{n}", treatment="peel-b") for n, d in enumerate(fresh[:5])]
    got = _post(server, glow, reference, redis_client, caplog,
                spread([probe("NOW-3"), *fresh[5:]], peel, seed=3), "NOW-3")
    assert [r["status"] for r in got["results"]].count(503) == 5
