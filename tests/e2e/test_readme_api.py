"""The README's "Clinic API" walk-through, run exactly as printed against a real `reminders run`.

The commands are taken from the README itself (its first ```sh block under "## Clinic
API"); only the port (a free one instead of 8000, which a parallel test may hold) and the
`.venv/bin/` prefix (this venv's) are replaced, as tests/test_readme.py does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until
from worker.embedded import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def walkthrough() -> str:
    section = README.split("\n## Clinic API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, flags=re.S)[1]


def test_the_walkthrough_is_the_one_the_issue_asks_for():
    script = walkthrough()
    assert script.startswith("KEY=$(.venv/bin/reminders keys issue --clinic demo)")
    for step in ("-X PUT", "api http://127.0.0.1:8000/v1/bookings/DEMO-2", "-X DELETE",
                 "status=held", "/release"):
        assert step in script


def test_the_readme_curl_walkthrough_works_as_printed(tmp_path: Path):
    home = tmp_path / "clone"
    for folder in ("config", "templates", "examples"):
        shutil.copytree(ROOT / folder, home / folder)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    run_env = dict(env, REMINDERS_API_PORT=str(port))
    log_path = home / "run.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen([str(BIN / "reminders"), "run"], cwd=home, env=run_env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"press Ctrl-C" in log_path.read_bytes() or run.poll() is not None,
                   60)
        assert run.poll() is None, log_path.read_text()
        assert f"HTTP API on http://127.0.0.1:{port}" in log_path.read_text()

        script = walkthrough().replace(".venv/bin/", f"{BIN}/").replace(
            "127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=home,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "shown only this once" in done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        assert len(answers) == 6, done.stdout
        created, shown, cancelled, held, listed, released = answers
        assert created["clinic"] == "demo" and created["booking_id"] == "DEMO-2"
        assert created["status"] == "scheduled" and created["version"] == 1
        assert shown["booking_id"] == "DEMO-2" and shown["version"] == 1
        assert cancelled["status"] == "cancelled"
        assert held["booking_id"] == "DEMO-3" and held["status"] == "held"
        assert "isotretinoin" in held["hold_reason"]
        assert [b["booking_id"] for b in listed["bookings"]] == ["DEMO-3"]
        assert released["status"] == "scheduled" and released["version"] == 2

        children = psutil.Process(run.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=40) == 0
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
