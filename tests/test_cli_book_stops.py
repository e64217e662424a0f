"""`reminders book` stopped by something other than Ctrl-C, as a real process on a real Redis.

- SIGTERM while storing (`timeout`, a CI job cancelled, `docker stop` of a one-off
  container): the process died at once, saying nothing, with some store batches written
  and the rest not; now it stops between store calls as for a first Ctrl-C, says exactly
  how many bookings are stored (what Redis holds), exit 143 (128 + SIGTERM).
- Redis refusing writes while storing (NOREPLICAS here; OOM, MISCONF and READONLY alike):
  a traceback and exit 1, which the README says means "a booking was refused"; now one line
  saying Redis refuses writes, exit 3 (as for Redis unreachable), nothing claimed refused.
- One bad line among thousands (checked in worker processes): nothing is stored, and every
  key already in Redis is byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.intake import realistic_bookings
from tests.conftest import ROOT
from tests.test_cli_book_races import ApplyParker

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def cli_env(url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=url, REMINDERS_DATA_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))  # this checkout's code, whichever the venv points at
    return env


def jsonl(docs) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def stored(redis_client) -> int:
    return int(redis_client.zcard("reminders:bookings:glow"))


def snapshot(redis_client) -> dict[bytes, bytes]:
    return {key: redis_client.dump(key) for key in redis_client.scan_iter(count=1000)}


def test_sigterm_while_storing_stops_between_batches_and_says_how_many(
        redis_server, redis_client, tmp_path):
    docs = list(realistic_bookings(4301, seed=33))
    env = cli_env(redis_server.url, tmp_path)
    warm = subprocess.run([str(BIN / "reminders"), "book", "-"], input=json.dumps(docs[0]),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert warm.returncode == 0, warm.stderr
    path = tmp_path / "bookings.jsonl"
    path.write_text(jsonl(docs[1:]), encoding="utf-8")
    host, port = redis_server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    # The command's first apply script is held at a proxy: SIGTERM lands while it stores.
    proxy = ApplyParker((host, int(port)), b"reminders:layout")
    try:
        env = cli_env(redis_server.url.replace(f":{port}", f":{proxy.port}", 1), tmp_path)
        proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "1", str(path)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proxy.parked.wait(60), "the command never stored"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proxy.release()
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
    assert "Traceback" not in err, err
    now_stored = stored(redis_client) - 1
    assert proc.returncode == 143, (proc.returncode, now_stored, err)
    assert 0 < now_stored < 4300
    assert f"stopped after storing {now_stored:,} of 4,300 bookings" in err, (now_stored, err)


def test_sigterm_after_the_last_batch_says_everything_is_stored(
        redis_server, redis_client, tmp_path):
    # Stored, then the timelines' last write waits on a full stdout pipe (a slow reader):
    # SIGTERM there ended the command with 143 and not a word, as if it had stopped before
    # storing; the stop is said, with what is stored (all of it).
    (doc,) = realistic_bookings(1, seed=35)
    env = cli_env(redis_server.url, tmp_path)
    env.pop("PYTHONUNBUFFERED", None)  # stdout block-buffered: written at its last flush
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)  # the pipe full before the command writes
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--json", "-"], env=env, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE,
                            text=True)
    os.close(write_end)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(doc))
    proc.stdin.close()
    deadline = time.monotonic() + 60
    while stored(redis_client) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored(redis_client) == 1
    time.sleep(1)  # past the store call: blocked writing the timeline, nothing else to do
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with os.fdopen(read_end, "rb") as reader:
        reader.read()  # the reader catches up; the command may write
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, err
    assert "Traceback" not in err, err
    assert "stopped after storing 1 of 1 bookings" in err, err
    assert stored(redis_client) == 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_before_the_first_booking_is_read_says_nothing_was_stored(
        redis_server, redis_client, tmp_path, signum, code):
    # `slow-export | reminders book -` stopped while book waits for its first booking: it
    # ended 130/143 without a word (stopped while checking or storing it says what it
    # stored; here too: nothing).
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "-"],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write('{"clinic": "glow", ')  # the first booking, still coming
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # blocked reading stdin (read(2) of fd 0)
        if Path(f"/proc/{proc.pid}/syscall").read_text().startswith("0 0x0 "):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("book never waited on stdin")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == code, (proc.returncode, err)
    assert "nothing was stored" in err, err
    assert stored(redis_client) == 0


def test_redis_refusing_writes_while_storing_is_not_a_refused_booking(
        redis_server, redis_client, tmp_path):
    docs = list(realistic_bookings(30, seed=34))
    env = cli_env(redis_server.url, tmp_path)
    redis_client.config_set("min-replicas-to-write", 1)  # no replica: NOREPLICAS
    try:
        done = subprocess.run([str(BIN / "reminders"), "book", "-"], input=jsonl(docs),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        redis_client.config_set("min-replicas-to-write", 0)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "Redis refuses writes (NOREPLICAS)" in done.stderr, done.stderr
    # The apply script under way is refused at its first write: the range that may be stored.
    assert "stopped after storing 0 to 30 of 30 bookings" in done.stderr, done.stderr
    assert stored(redis_client) == 0


def test_one_bad_line_among_thousands_stores_nothing_and_changes_nothing(
        redis_server, redis_client, tmp_path):
    docs = list(realistic_bookings(4500, seed=35))
    env = cli_env(redis_server.url, tmp_path)
    first = subprocess.run([str(BIN / "reminders"), "book", "-"], input=jsonl(docs[:300]),
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = snapshot(redis_client)
    # The stored ones moved a week (each would change), and new ones; one bad line at 4,321,
    # past the chunks checked here (the rest is checked in worker processes by default).
    again = []
    for doc in docs:
        starts = datetime.fromisoformat(doc["starts_at"]) + timedelta(days=7)
        again.append(dict(doc, starts_at=starts.isoformat()))
    again[4320] = dict(again[4320], patient=dict(again[4320]["patient"], timezone="Mars/Base"))
    done = subprocess.run([str(BIN / "reminders"), "book", "-"], input=jsonl(again),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"line 4321 ({again[4320]['booking_id']}) refused:" in done.stderr, done.stderr
    assert "refused 1 of 4,500 bookings (line 4321): nothing was stored" in done.stderr
    assert snapshot(redis_client) == before


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_sigterm_while_checking_in_processes_leaves_no_process_behind(
        redis_server, redis_client, tmp_path):
    path = tmp_path / "bookings.jsonl"
    path.write_text(jsonl(realistic_bookings(12000, seed=36)), encoding="utf-8")
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "2", str(path)],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            kids = _children(proc.pid)
        assert len(kids) == 2, "the checking processes never started"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        # The checking processes held the command's stdout and stderr: a caller reading
        # them (a pipe, `subprocess.run`, CI) waited for ever.
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for kid in kids:  # without the fix they outlive the command (re-parented, blocked)
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "Traceback" not in err, err
    assert proc.returncode == 143, (proc.returncode, err)
    assert "interrupted while checking" in err and "nothing was stored" in err, err
    assert not any(os.path.exists(f"/proc/{kid}") and "zombie" not in
                   Path(f"/proc/{kid}/status").read_text() for kid in kids)
    assert stored(redis_client) == 0


def test_the_command_killed_while_checking_leaves_no_process_behind(
        redis_server, redis_client, tmp_path):
    """SIGKILL (the OOM killer, `docker kill`, `timeout -s KILL`): nothing can be said, but
    the checking processes end with it instead of holding its stdout and stderr for ever."""
    path = tmp_path / "bookings.jsonl"
    path.write_text(jsonl(realistic_bookings(12000, seed=37)), encoding="utf-8")
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "2", str(path)],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            kids = _children(proc.pid)
        assert len(kids) == 2, "the checking processes never started"
        time.sleep(0.3)
        proc.kill()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == -signal.SIGKILL
    assert stored(redis_client) == 0
