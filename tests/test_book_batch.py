"""`reminders book` on a large JSON lines file, as a real process against a real Redis.

All or nothing: one refused line anywhere (past the bookings kept in memory too) and none
is stored; otherwise all are, a chunk at a time. A summary counts new, changed and
unchanged bookings; more than 20 timelines are not printed (--json prints them all, as one
array); a progress bar appears on a terminal only.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.intake import realistic_bookings
from tests.conftest import ROOT
from worker.cli import STORE_BATCH

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_server, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    # PYTHONPATH: this checkout's code, whichever checkout the virtualenv was installed from.
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))
    return env


def book(env, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "reminders"), "book", *args, "-"], input=data, env=env,
                          cwd=ROOT, capture_output=True, timeout=600)


def jsonl(docs) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode() + b"\n" for d in docs)


def stored_bookings(redis_client) -> int:
    return sum(1 for _ in redis_client.scan_iter("reminders:b:*"))


def test_a_file_of_thirty_is_stored_with_a_summary_and_again_unchanged(env, redis_client):
    docs = list(realistic_bookings(30, seed=21))
    first = book(env, jsonl(docs))
    assert first.returncode == 0, first.stderr
    assert first.stdout == b""  # more than 20 bookings: no tables
    stderr = first.stderr.decode()
    assert "booked 30 bookings: 30 new, 0 changed, 0 unchanged in" in stderr
    assert "30 timelines not printed" in stderr
    assert stored_bookings(redis_client) == 30
    again = book(env, jsonl(docs))
    assert "booked 30 bookings: 0 new, 0 changed, 30 unchanged" in again.stderr.decode()
    docs[7]["starts_at"] = (datetime.fromisoformat(docs[7]["starts_at"])
                            + timedelta(days=1)).isoformat()
    moved = book(env, jsonl(docs), "--json")
    assert "booked 30 bookings: 0 new, 1 changed, 29 unchanged" in moved.stderr.decode()
    timelines = json.loads(moved.stdout)
    assert [t["booking_id"] for t in timelines] == [d["booking_id"] for d in docs]
    assert timelines[7]["version"] == 2 and timelines[0]["version"] == 1
    shown = subprocess.run([str(BIN / "reminders"), "show", "--clinic", "glow", "--json",
                            docs[7]["booking_id"]], env=env, cwd=ROOT, capture_output=True)
    assert json.loads(shown.stdout) == timelines[7]


def test_a_few_bookings_print_their_tables_as_before(env):
    docs = list(realistic_bookings(2, seed=22))
    done = book(env, jsonl(docs))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.count("status=scheduled  version=1") + out.count("status=held") == 2
    # A small file's summary gives its time, not a rate.
    assert re.search(r"^booked 2 bookings: 2 new, 0 changed, 0 unchanged in [\d.]+ s$",
                     done.stderr.decode(), re.MULTILINE), done.stderr.decode()


def test_one_refused_line_past_the_bookings_kept_in_memory_stores_nothing(env, redis_client):
    docs = list(realistic_bookings(2600, seed=23))  # more than SPOOL_AFTER (2,000)
    docs[2499]["patient"]["name"] = "Ana \u202eLópez"
    docs[10]["medications"]["isotretinoin_last_dose"] = "2999-01-01"
    data = jsonl(docs[:2000]) + b"\n" + jsonl(docs[2000:])  # a blank line: line numbers move
    done = book(env, data)
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert f"line 11 ({docs[10]['booking_id']}) refused:\n  medications.isotretinoin_last_dose" \
        in stderr
    assert f"line 2501 ({docs[2499]['booking_id']}) refused:\n  patient.name:" in stderr
    assert "refused 2 of 2,600 bookings (line 11, line 2501): nothing was stored" in stderr
    assert redis_client.dbsize() == 0
    docs[2499]["patient"]["name"] = "Ana López"
    docs[10]["medications"]["isotretinoin_last_dose"] = None
    done = book(env, jsonl(docs), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)) == 2600
    assert stored_bookings(redis_client) == 2600


def test_a_line_that_is_not_json_stops_everything(env, redis_client):
    docs = list(realistic_bookings(50, seed=24))
    done = book(env, jsonl(docs[:40]) + b'{"clinic": \n' + jsonl(docs[40:]))
    assert done.returncode == 2
    assert "-: line 41: not JSON (Expecting value, column 12); nothing was stored" in \
        done.stderr.decode()
    assert redis_client.dbsize() == 0


def test_a_reader_leaving_stdout_does_not_cut_the_file_half_way(env, redis_client, tmp_path):
    # `reminders book --json FILE | head`: the reader leaves after the first timelines. The
    # file was accepted whole; it is stored whole, and the summary says so (it stored the
    # first STORE_BATCH, said "stopped after storing 0 of 4,300", and exited 0).
    docs = list(realistic_bookings(STORE_BATCH + 300, seed=27))
    path = tmp_path / "bookings.jsonl"
    path.write_bytes(jsonl(docs))
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--json", str(path)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100).startswith(b"[")  # `head -c 100`: timelines came out
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, stderr
    assert stored_bookings(redis_client) == len(docs)
    assert f"booked {len(docs):,} bookings: {len(docs):,} new" in stderr, stderr
    assert "stopped" not in stderr and "Traceback" not in stderr, stderr


def test_redis_gone_says_so_and_how_far_it_got(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL="redis://127.0.0.1:9/0", REMINDERS_DATA_DIR=str(tmp_path))
    done = book(env, jsonl(realistic_bookings(3, seed=25)))
    assert done.returncode == 3
    assert "cannot reach Redis" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def run_on_a_terminal(env, data: bytes) -> tuple[int, str]:
    """Run `reminders book FILE` with stderr on a pseudo-terminal; return (exit, what it showed)."""
    path = Path(env["REMINDERS_DATA_DIR"]) / "bookings.jsonl"
    path.write_bytes(data)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen([str(BIN / "reminders"), "book", str(path)], env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=60), shown.decode("utf-8", "replace")


def test_a_large_file_shows_a_progress_bar_on_a_terminal_only(env, redis_client):
    # The bar shows once a phase has lasted a second, and storing advances it a store batch
    # at a time (500, 1,000, 2,000, then STORE_BATCH, 4,000): six batches, so it is updated
    # past its first second even on a machine three times faster than this one (4,000
    # alone stored in about 1 s, and the bar's one update came just before or just after
    # its second).
    docs = list(realistic_bookings(3 * STORE_BATCH, seed=26))
    code, shown = run_on_a_terminal(env, jsonl(docs))
    assert code == 0, shown[-2000:]
    assert "checking" in shown and "storing" in shown  # both phases
    assert "bookings/s" in shown and "%|" in shown  # a rate and a bar with a percentage
    assert f"booked {len(docs):,} bookings: {len(docs):,} new" in shown
    redis_client.flushdb()
    piped = book(env, jsonl(docs))
    assert piped.returncode == 0
    assert "\r" not in piped.stderr.decode() and "%|" not in piped.stderr.decode()
    assert piped.stderr.decode().count("\n") == 2  # timelines not printed; the summary
