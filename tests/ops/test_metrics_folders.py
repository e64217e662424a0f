"""A worker's metrics folder (`<data>/metrics/<host>-<pid>/`) does not outlive it for good:
a worker starting its metrics port removes the folders of workers that are gone (this host:
pid not alive; another host: untouched for STALE_AFTER, as a re-created container leaves),
and keeps those of live ones. Real processes: each run is its own Python process, as a
`make run` restart or a re-created container is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from worker.metrics import ALIVE_FILE, STALE_AFTER

START = """
import sys, time, redis
from pathlib import Path
from worker.metrics import histograms, start_worker_metrics, worker_metrics_dir
data = Path(sys.argv[1])
assert start_worker_metrics(redis.Redis(port=9), "t", data, "127.0.0.1", int(sys.argv[2]))
histograms().pump_seconds.observe(0.5)  # this process's histogram file
print(worker_metrics_dir(data).name, flush=True)
if sys.argv[3] == "stay":
    time.sleep(60)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(data: Path, stay: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", START, str(data), str(free_port()),
                             "stay" if stay else "exit"], stdout=subprocess.PIPE, text=True)


def test_a_starting_worker_removes_the_folders_of_gone_workers_only(tmp_path):
    data, root = tmp_path / "data", tmp_path / "data" / "metrics"
    # A live worker on this host; a run that ended (a `make run` restart, Ctrl-C) left its
    # folder; and two of another host: one touched a minute ago (alive), one a re-created
    # container's, untouched for longer than STALE_AFTER.
    live = start(data, stay=True)
    try:
        live_folder = live.stdout.readline().strip()  # type: ignore[union-attr]
        first = start(data)
        first_folder = first.communicate(timeout=30)[0].strip()
        assert first.returncode == 0 and (root / first_folder).is_dir()
        assert any(p.suffix == ".db" for p in (root / first_folder).iterdir())
        other_live, other_gone = root / "3f2a9c1b0d7e-1", root / "9e8d7c6b5a4f-1"
        for folder, age in ((other_live, 60), (other_gone, STALE_AFTER + 60)):
            folder.mkdir()
            for name in (ALIVE_FILE, "histogram_7.db"):
                (folder / name).write_bytes(b"x")
                os.utime(folder / name, (time.time() - age,) * 2)
            os.utime(folder, (time.time() - age,) * 2)
        assert {p.name for p in root.iterdir()} == {
            first_folder, live_folder, other_live.name, other_gone.name}
        # The next run (a restart): only the gone workers' folders go.
        second = start(data)
        second_folder = second.communicate(timeout=30)[0].strip()
        assert second.returncode == 0
        assert {p.name for p in root.iterdir()} == {
            live_folder, other_live.name, second_folder}
        assert (root / live_folder / ALIVE_FILE).exists()  # the live one says so
    finally:
        live.kill()
        live.wait()
