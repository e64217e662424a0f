"""`reminders book` cut short, as a real process on a real Redis.

- `reminders book` stopped by Ctrl-C while storing says exactly how many bookings are
  stored (the figure is what Redis holds), without a traceback;
- Ctrl-C while checking (the checking processes get it too): nothing stored, and said;
- a checking process killed half-way: the command says nothing was stored (and nothing is),
  without a traceback, and not with exit 1 ("a booking was refused").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def test_ctrl_c_while_storing_says_how_many_are_stored(redis_server, redis_client, tmp_path):
    docs = list(realistic_bookings(4301, seed=31))
    env = cli_env(redis_server.url, tmp_path)
    warm = subprocess.run([str(BIN / "reminders"), "book", "-"], input=json.dumps(docs[0]),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert warm.returncode == 0, warm.stderr
    path = tmp_path / "bookings.jsonl"
    path.write_text(jsonl(docs[1:]), encoding="utf-8")
    host, port = redis_server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    # The command's first apply script is held at a proxy: Ctrl-C lands while it stores.
    proxy = ApplyParker((host, int(port)), b"reminders:layout")
    try:
        env = cli_env(redis_server.url.replace(f":{port}", f":{proxy.port}", 1), tmp_path)
        proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "1", str(path)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proxy.parked.wait(60), "the command never stored"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proxy.release()
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    now_stored = stored(redis_client) - 1
    assert 0 < now_stored < 4300
    assert f"stopped after storing {now_stored:,} of 4,300 bookings" in err, (now_stored, err)


def test_a_checking_process_killed_half_way_stores_nothing_and_says_so(
        redis_server, redis_client, tmp_path):
    lines = jsonl(realistic_bookings(3000, seed=32)).splitlines(keepends=True)
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "2", "-"],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("".join(lines[:1200]))
    proc.stdin.flush()
    children: list[str] = []
    for _ in range(300):  # the pool starts with the first chunk
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if len(children) >= 2:
            break
        time.sleep(0.05)
    assert len(children) >= 2, children
    os.kill(int(children[0]), signal.SIGKILL)
    try:
        proc.stdin.write("".join(lines[1200:]))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it stopped reading: the pool is broken
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 2, err
    assert "a process checking the bookings ended abruptly" in err, err
    assert "nothing was stored" in err
    assert stored(redis_client) == 0


def test_ctrl_c_while_checking_stores_nothing_and_says_so(redis_server, redis_client, tmp_path):
    """As at a terminal: SIGINT to the whole process group, the checking processes too."""
    lines = jsonl(realistic_bookings(3000, seed=33)).splitlines(keepends=True)
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "--jobs", "2", "-"],
                            env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write("".join(lines[:1200]))
    proc.stdin.flush()
    for _ in range(300):
        if len(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # the chunks sent so far are checked: it waits for more input
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert "interrupted while checking" in err and "nothing was stored" in err, err
    assert stored(redis_client) == 0


# `reminders book` with its own signal sent to it at one instant: when the booking model's
# serializer (pydantic calls it from Rust, wrapping whatever it raises) is entered for the
# Nth time. The signal is real; only its instant is chosen.
SIGNAL_IN_SERIALIZER = """
import os, signal, sys
from worker.cli import main
calls = 0
def at_call(frame, event, arg):
    global calls
    if event == "call" and frame.f_code.co_name == "_without_unset_preferred_name":
        calls += 1
        if calls == 2:
            sys.setprofile(None)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
sys.setprofile(at_call)
sys.exit(main(["book", "--jobs", "1", sys.argv[2]]))
"""


@pytest.mark.parametrize(("signame", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_while_a_booking_is_serialized_is_a_stop_not_a_traceback(
        redis_server, redis_client, tmp_path, signame, code):
    # Ctrl-C or SIGTERM landing while a checked booking was dumped to its document: pydantic
    # wrapped the KeyboardInterrupt in a PydanticSerializationError, and book ended with a
    # traceback and exit 1 ("a booking was refused"), not "interrupted while checking".
    path = tmp_path / "bookings.jsonl"
    path.write_text(jsonl(realistic_bookings(3, seed=36)), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_SERIALIZER, signame, str(path)],
                          env=cli_env(redis_server.url, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.strip() == ("interrupted while checking (after 0 bookings): nothing "
                                   "was stored"), done.stderr
    assert stored(redis_client) == 0
