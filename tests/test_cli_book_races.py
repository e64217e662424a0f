"""`reminders book` (the real console script, a subprocess) racing a send in flight.

Real Redis, real Apprise, a real HTTP gateway that parks the SMS (tests/test_send_races.py's
rig). Two seams: the attempt is parked at the gateway when the file is booked; and the
attempt begins between the command's read of the booking and its apply (the command's
apply script parked at a TCP proxy in front of Redis), in a file large enough that the
booking is in its second apply chunk. Either way: after the change no message goes with the
old words or at the old time, and none goes twice.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.test_send_races import PREFIX, PREP, STOP, Rig, assert_no_claim, gate, write_config
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


__all__ = ["gate"]  # the gateway fixture, used by `rig`


@pytest.fixture
def rig(tmp_path, redis_client, gate) -> Rig:  # noqa: F811
    """tests/test_send_races.py's rig, with a send timeout longer than a command's run."""
    config = write_config(tmp_path / "config", gate.port)
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", lease_seconds=60,
                        send_timeout_seconds=20, max_attempts=5, backoff_base_seconds=1,
                        backoff_cap_seconds=2, _env_file=None)
    catalog = Catalog.load(settings)
    store = Store(redis_client, PREFIX)
    ctx = Context(settings=settings, store=store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return Rig(store, ctx, catalog, gate)


class ApplyParker:
    """A TCP proxy in front of Redis that holds the first EVALSHA naming `<prefix>:layout`
    (the store's apply script) until `release()`; everything else passes."""

    def __init__(self, upstream: tuple[str, int], marker: bytes) -> None:
        self.upstream, self.marker = upstream, marker
        self.parked = threading.Event()
        self._go = threading.Event()
        self._held = False
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if inspect and b"EVALSHA" in data and self.marker in data:
                    with self._lock:
                        hold, self._held = not self._held, True
                    if hold:
                        self.parked.set()
                        self._go.wait(30)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self.listener.close()


def cli_env(rig: Any, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_url, REMINDERS_KEY_PREFIX=PREFIX,
               REMINDERS_CONFIG_DIR=str(rig.ctx.settings.config_dir),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
               REMINDERS_DATA_DIR=str(Path(rig.ctx.settings.config_dir).parent / "data"))
    return env


def others(rig: Any, n: int) -> list[dict[str, Any]]:
    """`n` other bookings of other patients (the first apply chunk of a large file)."""
    out = []
    for i in range(n):
        doc = rig.booking(booking_id=f"O-{i}", starts_in=timedelta(days=20))
        doc["patient"]["phone"] = f"+346001{i:05d}"
        out.append(doc)
    return out


def book_file(env: dict[str, str], docs: list[dict[str, Any]]) -> subprocess.Popen[str]:
    data = "".join(json.dumps(d) + "\n" for d in docs)
    proc = subprocess.Popen([str(BIN / "reminders"), "book", "-"], env=env, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def finished(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(60) == 0, err
    return err + out


def due_entries(rig: Any) -> dict[str, float]:
    found = rig.store.redis.zrangebyscore(rig.store.due_key, "-inf", "+inf", withscores=True)
    return {ref: score for ref, score in found if ref.startswith("rc/R-1/")}


def assert_after_the_move(rig: Any, moved_start: datetime) -> None:
    """The booking's version 2 plan stands: nothing of it is due before the new visit less
    a few hours (its steps are -3h and -2h), none leased; PREP went once (the old words),
    recorded beside the new plan, and nothing is claimable now."""
    timeline = rig.store.timeline("rc", "R-1")
    assert timeline["version"] == 2, timeline
    prep = {r["id"]: r for r in timeline["reminders"]}["prep:sms"]
    assert prep["status"] == "scheduled" and prep["sent_at"] and prep["sent_version"] == 1, prep
    assert prep["due_at"] == (moved_start - timedelta(hours=2)).isoformat().replace(
        "+00:00", "Z")
    earliest = (moved_start - timedelta(hours=3)).timestamp()
    assert due_entries(rig) and min(due_entries(rig).values()) >= earliest, due_entries(rig)
    assert rig.store.redis.zscore(rig.store.lease_key, PREP) is None
    assert rig.store.redis.get(rig.store.ledger_key(PREP)) is None  # may go at its new time
    assert_no_claim(rig)
    assert len(rig.gate.bodies) == 1, rig.gate.bodies


def test_a_move_booked_while_a_send_is_at_the_gateway(rig, redis_server):
    rig.book(rig.booking())
    thread, result = rig.park(PREP)
    moved = rig.booking(starts_in=timedelta(days=9))
    proc = book_file(cli_env(rig, redis_server.url), [*others(rig, 250), moved])
    finished(proc)
    rig.gate.answer(200)
    thread.join(20)
    assert result["outcome"] == "sent"
    assert_after_the_move(rig, datetime.fromisoformat(moved["starts_at"]))


def test_a_step_dropped_by_the_file_while_its_send_is_at_the_gateway(rig, redis_server):
    rig.book(rig.booking())
    thread, result = rig.park(STOP)
    proc = book_file(cli_env(rig, redis_server.url),
                     [*others(rig, 250), rig.booking(tretinoin=False)])
    finished(proc)
    rig.gate.answer(503)  # a transient failure: never tried again, the step is gone
    thread.join(20)
    s = rig.state(STOP)
    assert s["record"]["status"] == "cancelled", s
    assert (s["due"], s["lease"], s["dead"], s["ledger"]) == (None, None, None, None), s
    rig.store.redis.zrem(rig.store.due_key, PREP)  # due in 2 days: not what is asserted
    assert_no_claim(rig)
    assert len(rig.gate.bodies) == 1


@pytest.mark.parametrize("answer", [200, 503])
def test_a_send_begun_between_the_commands_read_and_its_apply(rig, redis_server, answer):
    """The file's second apply chunk holds the change; its read was made before the
    attempt began: the apply finds the booking changed and reads it again."""
    rig.book(rig.booking())
    host, port = redis_server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    proxy = ApplyParker((host, int(port)), f"{PREFIX}:layout".encode())
    try:
        url = redis_server.url.replace(f":{port}", f":{proxy.port}", 1)
        moved = rig.booking(starts_in=timedelta(days=9))
        proc = book_file(cli_env(rig, url), [*others(rig, 250), moved])
        assert proxy.parked.wait(30), "the command never applied"
        time.sleep(0.5)  # it prepares its second chunk meanwhile (read before the attempt)
        thread, result = rig.park(PREP)
        proxy.release()
        finished(proc)
        rig.gate.answer(answer)
        thread.join(20)
    finally:
        proxy.close()
    start = datetime.fromisoformat(moved["starts_at"])
    if answer == 200:
        assert result["outcome"] == "sent"
        assert_after_the_move(rig, start)
    else:
        s = rig.state(PREP)
        assert s["record"]["status"] == "scheduled" and "sent_at" not in s["record"], s
        assert s["due"] == (start - timedelta(hours=2)).timestamp(), s
        assert s["lease"] is None and s["ledger"] is None, s
        rig.store.redis.zrem(rig.store.due_key, PREP, STOP)
        assert_no_claim(rig)
        assert len(rig.gate.bodies) == 1
    assert {r["status"] for r in rig.store.timeline("rc", "O-0")["reminders"]} == {"scheduled"}
    assert datetime.now(UTC) < start


def test_an_unchanged_file_racing_reminders_cancel_books_it_again(rig, redis_server):
    """`reminders book -` of the booking exactly as stored (the clinic's nightly export),
    its apply parked after its read; `reminders cancel` (another real process) cancels it;
    the apply resumes. Review: the apply's no-op skipped its check, so the command said
    "unchanged" and left the booking cancelled, the clinic's export believing it booked. Now
    the later write wins entirely: the booking is read again and booked again, the command
    counts it changed, its reminders are due again and nothing of the cancel is left due."""
    doc = rig.booking(starts_in=timedelta(days=9))
    assert rig.book(doc)["version"] == 1
    host, port = redis_server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    proxy = ApplyParker((host, int(port)), f"{PREFIX}:layout".encode())
    env = cli_env(rig, redis_server.url)
    try:
        url = redis_server.url.replace(f":{port}", f":{proxy.port}", 1)
        proc = book_file(cli_env(rig, url), [doc])
        assert proxy.parked.wait(30), "the command never applied"
        cancel = subprocess.run([str(BIN / "reminders"), "cancel", "R-1"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert cancel.returncode == 0, cancel.stderr
        assert rig.store.timeline("rc", "R-1")["status"] == "cancelled"
        assert due_entries(rig) == {}
        proxy.release()
        said = finished(proc)
    finally:
        proxy.close()
    assert "1 changed, 0 unchanged" in said, said
    timeline = rig.store.timeline("rc", "R-1")
    assert timeline["status"] == "scheduled" and timeline["version"] == 3, timeline
    pending = {f"rc/R-1/{r['id']}": datetime.fromisoformat(r["due_at"]).timestamp()
               for r in timeline["reminders"] if r["status"] == "scheduled"}
    assert pending and due_entries(rig) == pending
    assert not [r for r in timeline["reminders"] if r["id"].startswith("cancelled#")]
    assert rig.gate.bodies == []  # nothing went out, nothing to tell
