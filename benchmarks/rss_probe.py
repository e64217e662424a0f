"""Idle worker memory, ours and the naive peer's, in one run (not part of `make bench`).

    python -m benchmarks.rss_probe [--settle 3] [--only ours|naive] [--maps] [--burst N]
                                   [--keep]

Starts the sinks, then this service's worker (and beat) on a fresh Redis exactly as the side
by side harness does (benchmarks/side_by_side.py `OursService`), and the naive peer's worker
on another (`NaiveService`), waits --settle seconds after each is ready, and prints for each
worker process: VmRSS, and from /proc/PID/smaps_rollup the private (dirty + clean) and the
shared part of it and PSS; then each worker's group sum of VmRSS, the figure `make bench`
reports as "worker RSS" (benchmarks/procs.py `group_rss_bytes`). With --burst N, then N
emails and N SMS due at one instant through each worker, and the same figures once they
arrived (`make bench`'s "after the sends" is measured after its burst and steady stream).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import Processes, close_probe, group_pids, vm_rss_kib
from benchmarks.side_by_side import (
    NAIVE_INTAKE_PER_SECOND,
    NaiveService,
    OursService,
    Params,
    Sinks,
    _sleep_until,
    bench_booking,
    collect,
    email_of,
    naive_items,
    naive_publish,
    phone_of,
    rss_sample,
    sink_key,
    write_config,
    write_jsonl,
)

MB = 1024 * 1024


def rollup_kib(pid: int) -> dict[str, int]:
    """Return /proc/PID/smaps_rollup's fields in KiB (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[name] = int(parts[0])
    except OSError:
        pass
    return out


def by_mapping_kib(pid: int, top: int = 12) -> list[tuple[str, int]]:
    """Return the `top` mappings of `pid` by resident KiB, named by file (or [heap], anon)."""
    sizes: dict[str, int] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as fh:
            for line in fh:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else "[anon]"
                    name = path.rsplit("/site-packages/", 1)[-1]
                elif first == "Rss:":
                    sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    except OSError:
        pass
    return sorted(sizes.items(), key=lambda item: -item[1])[:top]


def describe(name: str, leader: int, maps: bool = False) -> int:
    """Print each process of `leader`'s group; return the group's median summed VmRSS."""
    print(f"{name}: pid  VmRSS  private  shared  PSS (MB)")
    for pid in group_pids(leader):
        roll = rollup_kib(pid)
        private = roll.get("Private_Dirty", 0) + roll.get("Private_Clean", 0)
        shared = roll.get("Shared_Dirty", 0) + roll.get("Shared_Clean", 0)
        role = "main" if pid == leader else "pool"
        print(f"  {role} {pid}: {vm_rss_kib(pid) / 1024:6.1f} {private / 1024:8.1f} "
              f"{shared / 1024:7.1f} {roll.get('Pss', 0) / 1024:6.1f}")
        if maps:
            print("      " + ", ".join(f"{path} {kib / 1024:.1f}"
                                      for path, kib in by_mapping_kib(pid)))
    total = rss_sample(leader)
    print(f"  {name} group VmRSS sum: {total / MB:.1f} MB", flush=True)
    return total


def burst_ours(svc: OursService, sinks: Sinks, n: int, workdir: Path) -> None:
    """Book n bookings, each an email and an SMS due at one instant; wait until they arrive."""
    due = time.time() + 6.0 + n / 500
    docs, expected = [], {}
    for i in range(n):
        email, phone = email_of("ours-burst", i), phone_of("ours-burst", i)
        docs.append(bench_booking(f"burst-{i}", due, email, phone, ["email", "sms"]))
        expected[("email", sink_key("email", email))] = due
        expected[("sms", sink_key("sms", phone))] = due
    mark = sinks.mark()
    svc.ours.book(write_jsonl(workdir / "burst.jsonl", docs))
    collect(sinks, mark, expected, due + 60.0, "ours burst")


def burst_naive(svc: NaiveService, sinks: Sinks, n: int) -> None:
    """The same burst as ETA tasks; wait until they arrive."""
    due = time.time() + 4.0 + 2 * n / NAIVE_INTAKE_PER_SECOND
    items, expected = naive_items("naive-burst", [due] * 2 * n, ["email", "sms"] * n)
    mark = sinks.mark()
    naive_publish(svc.app, items)
    _sleep_until(due)
    collect(sinks, mark, expected, due + 60.0, "naive burst")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rss_probe")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds to wait after a worker is ready (the harness waits 3)")
    ap.add_argument("--only", choices=("ours", "naive"), default=None)
    ap.add_argument("--maps", action="store_true",
                    help="also each process's largest mappings by resident size")
    ap.add_argument("--burst", type=int, default=0,
                    help="then this many emails and SMS through each, and the figures again")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rss-probe-"))
    procs = Processes()
    servers: list[Any] = []
    sinks = Sinks()
    sums: dict[str, int] = {}
    try:
        if args.only != "naive":
            (workdir / "ours").mkdir()
            config = write_config(workdir / "ours" / "config", sinks, pending_only=True)
            ours = OursService(workdir / "ours", config, procs, servers)
            ours.start()
            time.sleep(args.settle)
            assert ours.ours.worker is not None
            sums["ours"] = describe("ours", ours.ours.worker.pid, args.maps)
            if args.burst:
                burst_ours(ours, sinks, args.burst, workdir / "ours")
                time.sleep(args.settle)
                sums["ours after"] = describe("ours after the burst", ours.ours.worker.pid,
                                              args.maps)
            ours.stop()
        if args.only != "ours":
            (workdir / "naive").mkdir()
            naive = NaiveService(Params(), sinks, workdir / "naive", procs, servers)
            naive.start()  # waits 3 s after "ready", as the harness does
            time.sleep(max(0.0, args.settle - 3.0))
            sums["naive"] = describe("naive", naive.worker.pid, args.maps)
            if args.burst:
                burst_naive(naive, sinks, args.burst)
                time.sleep(args.settle)
                sums["naive after"] = describe("naive after the burst", naive.worker.pid,
                                               args.maps)
            naive.stop()
        for tail in ("", " after"):
            if f"ours{tail}" in sums and f"naive{tail}" in sums:
                diff = sums[f"ours{tail}"] - sums[f"naive{tail}"]
                print(f"ours - naive{tail}: {diff / MB:+.1f} MB")
    finally:
        close_probe(procs, servers, sinks, workdir, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
