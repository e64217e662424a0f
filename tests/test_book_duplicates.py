"""`reminders book` refuses a file that gives the same booking (clinic, booking id) twice.

Before, both lines were applied in input order as one-by-one upserts: the last stood, the
summary said "1 new, 1 changed", and with the two lines in different store batches the
first version was live for seconds (its at-booking message could go out) before the second
moved it. Now the second line is refused like any other refused line (exit 1, nothing
stored), naming the first line and the field, as the HTTP batch route does; the check
spans the chunks the file is checked in, here and in worker processes. Real `reminders`
processes against a real Redis.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.intake import realistic_bookings
from tests.conftest import ROOT
from worker.batch import AUTO_AFTER, CHUNK

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_server, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))
    return env


def book(env, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "reminders"), "book", *args, "-"], input=data, env=env,
                          cwd=ROOT, capture_output=True, timeout=300)


def jsonl(docs) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode() + b"\n" for d in docs)


def snapshot(redis_client) -> dict[bytes, bytes]:
    """Every key of the database with its serialised value."""
    return {key: redis_client.dump(key) for key in redis_client.scan_iter(count=1000)}


def moved(doc: dict, days: int) -> dict:
    """The same booking, its visit `days` later (another version of it)."""
    other = copy.deepcopy(doc)
    other["starts_at"] = (datetime.fromisoformat(doc["starts_at"])
                          + timedelta(days=days)).isoformat()
    return other


def duplicate_refusal(line: int, booking_id: str, first: int, kind: str = "line") -> str:
    return (f"{kind} {line} ({booking_id}) refused:\n  booking_id: appears earlier in this "
            f"input ({kind} {first}, clinic 'glow'): give each booking once\n")


def test_a_booking_twice_in_one_chunk_is_refused_and_nothing_changes(env, redis_client):
    docs = list(realistic_bookings(30, seed=41))
    stored = book(env, jsonl(docs[:5]))  # already stored: the refusal must leave it as is
    assert stored.returncode == 0, stored.stderr
    before = snapshot(redis_client)
    assert before
    # docs[2] again at line 9 with another time; docs[20] twice, at 22 and 32, the same.
    again = docs[:8] + [moved(docs[2], 3)] + docs[8:] + [docs[20]]
    done = book(env, jsonl(again))
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert duplicate_refusal(9, docs[2]["booking_id"], 3) in stderr
    assert duplicate_refusal(32, docs[20]["booking_id"], 22) in stderr
    assert "refused 2 of 32 bookings (line 9, line 32): nothing was stored" in stderr
    assert "booked" not in stderr
    assert snapshot(redis_client) == before
    # A JSON array names positions, as its other refusals do.
    array = json.dumps([docs[10], docs[11], moved(docs[10], 1)]).encode()
    done = book(env, array)
    assert done.returncode == 1
    assert duplicate_refusal(3, docs[10]["booking_id"], 1, "booking") in done.stderr.decode()
    assert snapshot(redis_client) == before


def test_a_duplicate_is_reported_with_the_other_refusals_in_input_order(env, redis_client):
    docs = list(realistic_bookings(12, seed=42))
    docs[4]["patient"]["phone"] = "12"
    data = jsonl(docs[:7] + [moved(docs[1], 2)] + docs[7:])
    done = book(env, data)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert f"line 5 ({docs[4]['booking_id']}) refused:\n  patient.phone:" in stderr
    assert duplicate_refusal(8, docs[1]["booking_id"], 2) in stderr
    assert stderr.index("line 5 (") < stderr.index("line 8 (")
    assert "refused 2 of 13 bookings (line 5, line 8): nothing was stored" in stderr
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]], ids=["default", "jobs2"])
def test_duplicates_across_chunks_checked_apart_are_refused(env, redis_client, jobs):
    n = (AUTO_AFTER + 1) * CHUNK + 100  # past the chunks checked here: worker processes
    assert n == 2600
    docs = list(realistic_bookings(n, seed=43))
    stored = book(env, jsonl(docs[:50]))
    assert stored.returncode == 0, stored.stderr
    before = snapshot(redis_client)
    lines = [*docs]
    # Line numbers are 1-based positions (no blank lines): chunks hold 500 each.
    lines[2449] = moved(docs[99], 7)  # line 2450 (chunk 5) repeats line 100 (chunk 1)
    lines[2549] = moved(docs[2099], 1)  # line 2550 (chunk 6) repeats line 2100 (chunk 5)
    lines[2019] = docs[2009]  # line 2020 repeats line 2010, both in chunk 5
    lines[999] = moved(docs[10], 2)  # line 1000 (chunk 2) repeats line 11 (chunk 1)
    done = book(env, jsonl(lines), *jobs)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr[-3000:]
    assert duplicate_refusal(1000, docs[10]["booking_id"], 11) in stderr
    assert duplicate_refusal(2020, docs[2009]["booking_id"], 2010) in stderr
    assert duplicate_refusal(2450, docs[99]["booking_id"], 100) in stderr
    assert duplicate_refusal(2550, docs[2099]["booking_id"], 2100) in stderr
    assert (f"refused 4 of {n:,} bookings (line 1000, line 2020, line 2450, line 2550): "
            "nothing was stored") in stderr
    assert snapshot(redis_client) == before


def test_the_same_booking_id_at_two_clinics_is_two_bookings(env, redis_client):
    glow = list(realistic_bookings(3, seed=44))
    demo = [{**moved(doc, 5), "clinic": "demo"} for doc in glow]  # the same ids, other visits
    done = book(env, jsonl(glow + demo))
    assert done.returncode == 0, done.stderr
    assert "booked 6 bookings: 6 new, 0 changed, 0 unchanged" in done.stderr.decode()
    booking_id = glow[0]["booking_id"]
    timelines = {}
    for clinic in ("glow", "demo"):
        shown = subprocess.run([str(BIN / "reminders"), "show", "--clinic", clinic, "--json",
                                booking_id], env=env, cwd=ROOT, capture_output=True)
        assert shown.returncode == 0, shown.stderr
        timelines[clinic] = json.loads(shown.stdout)
        assert (timelines[clinic]["clinic"], timelines[clinic]["version"]) == (clinic, 1)
    # Each clinic's booking as its own line gave it: neither overwrote the other.
    assert ([r["due_at"] for r in timelines["glow"]["reminders"]]
            != [r["due_at"] for r in timelines["demo"]["reminders"]])
    assert sum(1 for _ in redis_client.scan_iter("reminders:b:*")) == 6
