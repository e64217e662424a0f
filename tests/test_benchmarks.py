"""The benchmark harness (benchmarks/) at a tiny size: real Redis, real Celery processes.

Checks what the README's table relies on: ours sends each reminder exactly once, the
table has its rows, every number printed is the number measured (recomputed here from
the raw observations in the JSON), every ratio is naive ÷ ours, and no process outlives
the run, even when it is interrupted.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.eta_vs_schedule import (
    ROWS,
    Measured,
    Params,
    build_rows,
    percentile,
    render_table,
    summarize,
)
from tests.conftest import ROOT

TINY = ["--n", "10", "--m", "100", "--lead", "2", "--window", "3", "--visibility-timeout", "2",
        "--grace", "3", "--hold", "2"]
N, M = 10, 100


def _processes_using(folder: Path) -> list[str]:
    """Return the command lines of live processes whose cwd or arguments mention `folder`."""
    found = []
    needle = str(folder)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (needle in cmdline or cwd.startswith(needle)):
            found.append(f"{entry.name}: {cmdline}")
    return found


# --- pure parts ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 95) == 10.0
    assert percentile(list(reversed(values)), 10) == 1.0
    assert percentile([], 50) == 0.0


def test_summary_counts_duplicates_misses_and_first_send_lateness():
    m = Measured(expected=["a", "b", "c"],
                 sends=[("a", 10.0, 10.5), ("a", 10.0, 10.1), ("b", 20.0, 20.2), ("a", 10.0, 11.0)],
                 rss_before_m=100 * 1024, rss_with_m=300 * 1024, redis_before_m=1000,
                 redis_with_m=3000)
    s = summarize(m, Params(n=3, m=2))
    assert s["sends"] == 4 and s["duplicate_sends"] == 2 and s["missed"] == 1
    assert s["reminders_sent_twice_or_more"] == 1 and s["max_sends_one_reminder"] == 3
    assert s["lateness_max_ms"] == pytest.approx(200.0)  # a's first send was 0.1 s late
    assert s["lateness_p50_ms"] == pytest.approx(100.0)
    assert s["worker_rss_per_pending_kb"] == pytest.approx(100.0)
    assert s["redis_bytes_per_pending"] == pytest.approx(1000.0)


def test_table_is_aligned_and_ratio_needs_a_nonzero_denominator():
    naive = {key: 10.0 for key, *_ in ROWS}
    ours = {key: 4.0 for key, *_ in ROWS} | {"duplicate_sends": 0.0,
                                            "worker_rss_per_pending_kb": 0.001}
    rows = build_rows(naive, ours)
    by_key = {r["key"]: r for r in rows}
    assert by_key["sends"]["ratio"] == pytest.approx(2.5)
    assert by_key["duplicate_sends"]["ratio"] is None
    assert by_key["worker_rss_per_pending_kb"]["ratio"] is None  # prints as 0.00
    lines = render_table(rows).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert len({len(line) for line in lines}) == 1  # every line as wide as the header


# --- a real tiny run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("bench")
    workdir, out = folder / "work", folder / "report.json"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "benchmarks", *TINY, "--workdir", str(workdir),
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"stdout": result.stdout, "report": json.loads(out.read_text()), "workdir": workdir,
            "seconds": time.monotonic() - started}


@pytest.mark.integration
def test_ours_sends_each_reminder_exactly_once(tiny_run):
    rows = {r["key"]: r for r in tiny_run["report"]["rows"]}
    assert rows["sends"]["ours"] == N
    assert rows["duplicate_sends"]["ours"] == 0 and rows["missed"]["ours"] == 0
    ours = tiny_run["report"]["measured"]["ours"]
    assert sorted(s[0] for s in ours["sends"]) == sorted(ours["expected"])
    assert len(list((tiny_run["workdir"] / "ours" / "outbox").glob("*.eml"))) == N
    # The naive side sends everything too, some reminders more than once (the point).
    assert rows["missed"]["naive"] == 0
    assert rows["sends"]["naive"] > N and rows["duplicate_sends"]["naive"] > 0
    # Every send was a delivered task (a redelivery to ours is dropped by the ledger).
    assert rows["deliveries"]["naive"] >= rows["sends"]["naive"]
    assert rows["deliveries"]["ours"] >= N


@pytest.mark.integration
def test_rows_are_the_measurements_and_ratios_divide_them(tiny_run):
    report = tiny_run["report"]
    assert [r["key"] for r in report["rows"]] == [key for key, *_ in ROWS]
    assert report["params"]["n"] == N and report["params"]["m"] == M
    rows = {r["key"]: r for r in report["rows"]}
    for side in ("naive", "ours"):
        raw = report["measured"][side]
        first: dict[str, float] = {}
        counts: dict[str, int] = defaultdict(int)
        for rid, due, sent in raw["sends"]:
            counts[rid] += 1
            first[rid] = min(first.get(rid, math.inf), sent - due)
        late = sorted(first[rid] * 1000 for rid in raw["expected"] if rid in first)
        expected = {
            "sends": len(raw["sends"]),
            "duplicate_sends": len(raw["sends"]) - len(counts),
            "max_sends_one_reminder": max(counts.values()),
            "deliveries": raw["deliveries"],
            "lateness_p50_ms": late[math.ceil(len(late) / 2) - 1],
            "lateness_p95_ms": late[math.ceil(len(late) * 0.95) - 1],
            "lateness_max_ms": late[-1],
            "worker_rss_pending_mb": raw["rss_with_m"] / 2**20,
            "worker_rss_per_pending_kb": (raw["rss_with_m"] - raw["rss_before_m"]) / M / 1024,
            "redis_bytes_per_pending": (raw["redis_with_m"] - raw["redis_before_m"]) / M,
        }
        for key, value in expected.items():
            assert rows[key][side] == pytest.approx(value), (side, key)
        assert raw["rss_with_m"] > 0 and raw["redis_with_m"] > raw["redis_before_m"]
    for row in report["rows"]:
        if row["ratio"] is None:
            assert round(row["ours"], row["decimals"]) == 0, row
        else:
            assert row["ratio"] == pytest.approx(row["naive"] / row["ours"]), row


@pytest.mark.integration
def test_printed_table_shows_the_measured_numbers(tiny_run):
    report, stdout = tiny_run["report"], tiny_run["stdout"]
    printed = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 4:
            printed[re.sub(r" \([A-Za-z]+\)$", "", cells[0])] = cells[1:]
    for row in report["rows"]:
        naive, ours, ratio = printed[row["metric"]]
        tolerance = 0.5 * 10 ** -row["decimals"] + 1e-9
        assert abs(float(naive.replace(",", "")) - row["naive"]) <= tolerance, row
        assert abs(float(ours.replace(",", "")) - row["ours"]) <= tolerance, row
        if row["ratio"] is None:
            assert ratio == "—", row
        else:
            shown = float(ratio.rstrip("×").replace(",", ""))
            assert shown == pytest.approx(row["ratio"], rel=0.05, abs=0.005), row
    rows = {r["key"]: r for r in report["rows"]}
    assert (f"naive sent {rows['sends']['naive']:.0f}, ours sent {N}." in stdout)
    assert "python -m benchmarks" in stdout and "visibility_timeout 2 s" in stdout


@pytest.mark.integration
def test_no_process_outlives_the_run(tiny_run):
    assert _processes_using(tiny_run["workdir"]) == []


@pytest.mark.integration
def test_interrupted_run_stops_every_process(tmp_path: Path):
    workdir = tmp_path / "work"
    harness = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--n", "2", "--m", "5", "--lead", "0.5",
         "--window", "0.5", "--grace", "0.5", "--hold", "0.5", "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Interrupt while our side runs: Redis, a worker with its pool, and beat.
        deadline = time.monotonic() + 60
        ours_log = workdir / "ours" / "ours.log"
        while not (ours_log.exists() and b"Task reminders.pump[" in ours_log.read_bytes()):
            assert harness.poll() is None, harness.communicate()
            assert time.monotonic() < deadline, "our side never started"
            time.sleep(0.1)
        # The harness itself, redis-server, the worker and its 2 pool processes, beat.
        assert len(_processes_using(workdir)) >= 6, _processes_using(workdir)
        harness.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = harness.communicate(timeout=40)
        assert harness.returncode == 130, err
        assert _processes_using(workdir) == []
    finally:
        if harness.poll() is None:  # a failed assertion above: let the harness clean up
            harness.terminate()
            try:
                harness.wait(timeout=40)
            except subprocess.TimeoutExpired:
                harness.kill()
                harness.wait()
        for line in _processes_using(workdir):  # only what this test's harness started
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
