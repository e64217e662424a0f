"""`reminders book`, as a real process against a real Redis, where only storing finds the
problem (review): data of another layout under the prefix refuses the whole file before
anything is written, with --jobs 2 too; text ids already taken by other words in Redis
(a collision the check cannot see) are stored under longer ids, with the right words, in
every chunk."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from benchmarks.intake import realistic_bookings
from tests.test_book_batch import book, env, jsonl  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.integration


def at_booking_as_now(timelines):
    """The timelines with the instants of the two runs' "now" (at-booking steps) as "now",
    and those an SMS cap moved from "now" to the same time a few days later as "now+Nd"
    (the two runs book a minute apart: a hold notice capped to tomorrow is at each run's
    minute)."""
    now = datetime.now(UTC)
    for t in timelines:
        for r in t["reminders"]:
            due = datetime.fromisoformat(r["due_at"])
            for days in range(8):
                later = timedelta(days=days)
                if now - timedelta(minutes=10) + later <= due <= now + later:
                    r["due_at"] = f"now+{days}d" if days else "now"
                    break
    return timelines


def test_another_layout_refuses_the_file_and_stores_nothing(env, redis_client):  # noqa: F811
    redis_client.set("reminders:layout", "3")
    docs = list(realistic_bookings(2100, seed=31))
    done = book(env, jsonl(docs), "--jobs", "2")
    assert done.returncode == 3, done.stderr[-2000:]
    assert b"layout 3" in done.stderr
    assert redis_client.keys("*") == ["reminders:layout"]
    assert redis_client.get("reminders:layout") == "3"


def test_text_ids_taken_by_other_words_are_stored_under_longer_ones(env, redis_client):  # noqa: F811
    docs = list(realistic_bookings(900, seed=32))
    reference = dict(env, REMINDERS_KEY_PREFIX="ref")
    done = book(reference, jsonl(docs), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = json.loads(done.stdout)
    # Every id the reference used now names other words under the prefix booked next.
    texts = redis_client.hgetall("ref:t")
    assert len(texts) > 20
    redis_client.hset("reminders:t", mapping={tid: f"other words {n}"
                                              for n, tid in enumerate(texts)})
    done = book(env, jsonl(docs), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert at_booking_as_now(got) == at_booking_as_now(expected)
    stored = redis_client.hgetall("reminders:t")
    # The words the reference used, each under a longer id.
    assert {text for tid, text in stored.items() if len(tid) > 6} == set(texts.values())
    assert "900 new" in done.stderr.decode()


def test_a_refusal_in_the_last_chunk_checked_by_two_processes_stores_nothing(
        env, redis_client):  # noqa: F811
    docs = list(realistic_bookings(3000, seed=33))
    docs[-1]["patient"]["phone"] = "12"  # the last line, in the last chunk of a process
    done = book(env, jsonl(docs), "--jobs", "2")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "line 3000 (" in done.stderr.decode()
    assert "refused 1 of 3,000 bookings (line 3000): nothing was stored" in \
        done.stderr.decode()
    assert redis_client.dbsize() == 0
