"""The same file through `reminders book` again changes nothing, also when the SMS caps tie
its bookings together: one patient (one phone, one email address) with six visits a few
days apart, half of them by SMS only, so that their SMS exceed the daily and the weekly
caps and the care-critical ones of the SMS-only visits go beyond the cap (README "SMS
caps"). Real `reminders book` and `reminders show` processes, a real Redis.

Each booking is written in its own store round (a patient's bookings under a cap wait for
one another), capped against those written before it. Booked again, a booking already
stored and not changed keeps what the cap decided for it, whatever its cap-mates did
since, in the file's order or any other; a moved visit changes that booking and what the
cap then forces on the others.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from tests.api.conftest import awake_timezone
from tests.conftest import EXAMPLE_BOOKING, ROOT
from tests.test_book_batch import BIN, book, jsonl

pytestmark = pytest.mark.integration

PHONE = "+34600123456"


@pytest.fixture
def env(redis_server, redis_client, tmp_path):
    """The commands' environment: this Redis, and this checkout's code (not the one the
    virtualenv's `reminders` was installed from)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))
    return env


def capped_visits(prefix: str = "R", count: int = 6) -> list[dict[str, Any]]:
    """One patient's visits two days apart, starting three weeks from now; the odd ones by
    SMS only (no email address given), the others by SMS and email."""
    start = (datetime.now(UTC) + timedelta(days=21)).replace(hour=13, minute=30, second=0,
                                                             microsecond=0)
    docs = []
    for n in range(count):
        doc = copy.deepcopy(EXAMPLE_BOOKING)
        doc["booking_id"] = f"{prefix}-{n}"
        doc["starts_at"] = (start + timedelta(days=2 * n)).isoformat()
        doc["patient"]["phone"] = PHONE
        doc["patient"]["timezone"] = awake_timezone()  # what is due at once: due now
        if n % 2:
            doc["patient"].pop("email")
            doc["patient"]["channels"] = ["sms"]
        docs.append(doc)
    return docs


def snapshot(client: redis.Redis, prefix: str = "reminders:") -> dict[str, Any]:
    """Every key under `prefix`: its type, its value (by type) and when it expires; but the
    API's request counters (`ratelimit`), which each request changes."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter(prefix + "*")):
        if key.startswith(prefix + "ratelimit:"):
            continue
        kind = client.type(key)
        if kind == "hash":
            value: Any = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "string":
            value = client.get(key)
        else:  # a stream: its entries
            value = client.xrange(key)
        out[key] = (kind, value, expires_at(client, key))
    return out


def expires_at(client: redis.Redis, key: str) -> int | None:
    """When `key` expires, to the second (its expiry is set as a whole second); None: never.
    (EXPIRETIME is Redis 7's.)"""
    left = client.pttl(key)
    return None if left < 0 else round(time.time() + left / 1000)


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def sms_decisions(timeline: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [(r["id"], r["due_at"], r["status"], r["reason"]) for r in timeline["reminders"]]


def show(env, booking_id: str) -> dict[str, Any]:
    shown = subprocess.run([str(BIN / "reminders"), "show", "--clinic", "glow", "--json",
                            booking_id], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def booked(env, docs, summary: str) -> None:
    done = book(env, jsonl(docs))
    assert done.returncode == 0, done.stderr
    assert summary in done.stderr.decode(), done.stderr.decode()


def test_the_same_file_booked_again_in_any_order_changes_nothing(env, redis_client):
    """The file (its SMS do not all fit: some go by email, move or are skipped, and some
    care-critical SMS go beyond the cap) booked again, in the file's order, shuffled and
    reversed, then once more in the first order, changes nothing.

    One first booking serves every order: each booking again is checked to leave the store
    exactly as the first one left it, so each order starts from that same store (as a fresh
    one booked anew would be); each `reminders book` and `show` run costs a process start."""
    docs = capped_visits()
    booked(env, docs, "booked 6 bookings: 6 new, 0 changed, 0 unchanged")
    before = snapshot(redis_client)
    timelines = {d["booking_id"]: show(env, d["booking_id"]) for d in docs}
    # The scenario: some SMS go by email, some are not sent, some care-critical ones go
    # beyond the cap.
    reasons = [r["reason"] or "" for t in timelines.values() for r in t["reminders"]]
    assert any("by email: the patient's SMS limit" in x for x in reasons)
    assert any("not sent" in x and "SMS limit" in x for x in reasons)
    assert any("care-critical, the other SMS give way" in x for x in reasons)
    for order in ("same", "shuffled", "reversed"):
        again = list(docs)
        if order == "shuffled":
            random.Random(7).shuffle(again)
            assert again != docs
        elif order == "reversed":
            again.reverse()
        booked(env, again, "booked 6 bookings: 0 new, 0 changed, 6 unchanged")
        assert changed_keys(before, snapshot(redis_client)) == [], order
        assert {d["booking_id"]: show(env, d["booking_id"]) for d in docs} == timelines, order
        # And once more, in the first order.
        booked(env, docs, "booked 6 bookings: 0 new, 0 changed, 6 unchanged")
        assert changed_keys(before, snapshot(redis_client)) == [], order


def test_a_moved_visit_changes_that_booking_and_what_the_caps_force(env, redis_client):
    """R-2 moves a day later; every other line is as before. R-2 is planned again, capped
    against the others as stored; the others keep what they had: nothing the move does
    forces a change on them (their SMS held their days before R-2's new ones were capped)."""
    docs = capped_visits()
    booked(env, docs, "booked 6 bookings: 6 new, 0 changed, 0 unchanged")
    before = snapshot(redis_client)
    timelines = {d["booking_id"]: show(env, d["booking_id"]) for d in docs}
    moved = copy.deepcopy(docs)
    moved[2]["starts_at"] = (datetime.fromisoformat(moved[2]["starts_at"])
                             + timedelta(days=1)).isoformat()
    booked(env, moved, "booked 6 bookings: 0 new, 1 changed, 5 unchanged")
    after = {d["booking_id"]: show(env, d["booking_id"]) for d in docs}
    assert [b for b in timelines if after[b] != timelines[b]] == ["R-2"]
    assert after["R-2"]["version"] == 2
    # In the store: R-2's own keys; in the shared ones, only R-2's members (the due set, the
    # bookings and contact indexes, whose scores are when it is kept until), new texts, and
    # the counters of what is scheduled; and the pump asked to run (a booking changed).
    after_move = snapshot(redis_client)
    for key in changed_keys(before, after_move):
        if key in ("reminders:b:glow/R-2", "reminders:d:glow/R-2", "reminders:metrics",
                   "reminders:celery:reminders.pump"):
            continue
        kind, old, _ = before[key]
        new = after_move[key][1]
        if key == "reminders:t":
            assert old.items() <= new.items()
            continue
        assert kind == "zset", key
        moved_members = dict(old).items() ^ dict(new).items()
        assert moved_members and {m for m, _ in moved_members} <= {
            "R-2", *(m for m, _ in moved_members if m.startswith("glow/R-2/"))}, key
    # The same moved file again: nothing changes.
    settled = snapshot(redis_client)
    booked(env, list(reversed(moved)), "booked 6 bookings: 0 new, 0 changed, 6 unchanged")
    assert changed_keys(settled, snapshot(redis_client)) == []
