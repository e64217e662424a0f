"""A burst on its own, for profiling the send path (not part of `make bench`).

    python -m benchmarks.burst_probe [--burst 500] [--channels email,sms] [--keep]
                                     [--profile DIR [--profile-rate 50]] [--raw]
                                     [--set REMINDERS_NAME=VALUE ...]

Starts the sinks, a fresh Redis and this service's worker and beat exactly as the side by
side harness does (benchmarks/side_by_side.py), books --burst bookings whose reminders fall
due at one instant, and prints each channel's drain rate and the lateness; --raw runs the
raw clients against the same sinks first, for the ratio. With --profile DIR, py-spy (if
installed) records the worker's process group during the drain into DIR/worker.txt (raw
stacks, one line per stack, with counts: `sort -k2` them or feed to a flame graph tool).
--set gives the worker and beat a setting (REMINDERS_SEND_THREADS=4, ...).

Beside the rates it prints the CPU seconds each process used during the drain (a worker's
split between its main thread and the others: the senders, the pump's thread) and the
workers' CPU milliseconds per message delivered: the figure to compare between runs on a
machine that other work loads (the rates follow that load, the CPU per message much less).
A/B two checkouts by running this alternately from each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import side_by_side
from benchmarks.procs import Processes, close_probe, group_pids
from benchmarks.side_by_side import (
    OursService,
    Sinks,
    _sleep_until,
    bench_booking,
    burst_figures,
    collect,
    email_of,
    phone_of,
    sink_key,
    write_config,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> complex:
    """Return the user + system CPU seconds `pid` used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0j
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick + int(fields[12]) / tick * 1j


def thread_cpu(pid: int) -> dict[int, float]:
    """Return each thread of `pid` (by id) and the CPU seconds it used so far."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_of(pids: dict[str, int]) -> dict[str, complex]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def raw(sinks: Sinks, n: int, channels: list[str]) -> None:
    for channel in channels:
        port = sinks.smtp.port if channel == "email" else sinks.sms.port
        tos = [email_of("raw", i) if channel == "email" else phone_of("raw", i)
               for i in range(n)]
        expected = {(channel, sink_key(channel, to)): 0.0 for to in tos}
        mark = sinks.mark()
        start_at = time.time() + 1.5
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.raw_client", channel,
                                 "--port", str(port), "--start-at", repr(start_at), "-"],
                                stdin=subprocess.PIPE, cwd=ROOT)
        proc.communicate("\n".join(tos).encode())
        obs = collect(sinks, mark, {k: start_at for k in expected}, start_at + 60, "raw")
        figs = burst_figures(obs | {"due": start_at})
        print(f"raw {channel}: {figs[f'{channel}_rate']:.1f} msg/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.burst_probe")
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--channels", default="email,sms")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--profile-rate", type=int, default=50, help="py-spy samples a second")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the worker and beat (REMINDERS_SEND_THREADS=8)")
    args = ap.parse_args(argv)
    if args.set:
        extra = dict(item.split("=", 1) for item in args.set)
        plain = side_by_side.child_env
        side_by_side.child_env = lambda env: plain(env | extra)  # type: ignore[assignment]
    channels = args.channels.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="burst-probe-"))
    procs = Processes()
    servers: list[Any] = []
    sinks = Sinks()
    spy = None
    try:
        if args.raw:
            raw(sinks, args.burst, channels)
        config = write_config(workdir / "config", sinks, pending_only=True)
        svc = OursService(workdir, config, procs, servers)
        svc.start()
        time.sleep(2.0)
        n = args.burst
        due = time.time() + 6.0 + n / 500
        docs, expected = [], {}
        for i in range(n):
            email = email_of("ours-burst", i) if "email" in channels else None
            phone = phone_of("ours-burst", i) if "sms" in channels else None
            docs.append(bench_booking(f"burst-{i}", due, email, phone, channels))
            if email:
                expected[("email", sink_key("email", email))] = due
            if phone:
                expected[("sms", sink_key("sms", phone))] = due
        mark = sinks.mark()
        svc.ours.book(write_jsonl(workdir / "burst.jsonl", docs))
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            assert svc.ours.worker is not None
            spy = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                 "record", "--subprocesses", "--gil", "-r", str(args.profile_rate), "-f", "raw",
                 "-o", str(args.profile / "worker.txt"), "-p", str(svc.ours.worker.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert svc.ours.worker is not None and svc.ours.beat is not None
        pids = {f"worker {pid}": pid for pid in group_pids(svc.ours.worker.pid)}
        pids |= {"beat": svc.ours.beat.pid, "redis": svc.server.process.pid,
                 "harness (sinks)": os.getpid()}
        _sleep_until(due)
        before, clock = cpu_of(pids), time.monotonic()
        threads_before = {pid: thread_cpu(pid) for name, pid in pids.items()
                          if name.startswith("worker")}
        left = due - time.time()
        print(f"booked {len(expected)} reminders, due in {left:.1f}s", flush=True)
        obs = collect(sinks, mark, expected, due + args.drain_timeout, "ours burst")
        figs = burst_figures(obs | {"due": due})
        took, after = time.monotonic() - clock, cpu_of(pids)
        threads_after = {pid: thread_cpu(pid) for pid in threads_before}
        print(f"CPU seconds over the {took:.1f}s drain (load {os.getloadavg()[0]:.1f}):")
        workers = 0.0
        for name in pids:
            used = after[name] - before[name]
            print(f"  {name}: {used.real:.2f} (system {used.imag:.2f})")
            workers += used.real if name.startswith("worker") else 0.0
            if name.startswith("worker") and used.real >= 0.05:
                # Main thread apart, the busiest threads: the senders, many of about the same
                # figure, and the pump's thread and the senders' reporter (a few each).
                was, pid = threads_before[pids[name]], pids[name]
                used_by = sorted(((t - was.get(tid, 0.0), tid) for tid, t in
                                  threads_after[pid].items() if tid != pid), reverse=True)
                print(f"    main thread {threads_after[pid].get(pid, 0.0) - was.get(pid, 0.0):.2f}"
                      f", {len(used_by)} others {sum(u for u, _ in used_by):.2f}: "
                      + ", ".join(f"{u:.2f}" for u, _ in used_by[:6]) + " ...")
        sent = sum(1 for m in obs["messages"] if m[2])
        if sent:  # the figure to compare across runs on a loaded machine
            print(f"worker CPU per message: {1000 * workers / sent:.2f} ms ({sent} messages)")
        for channel in channels:
            times = sorted(m[2] - due for m in obs["messages"] if m[0] == channel and m[2])
            buckets = [0] * (int(times[-1]) + 1 if times else 0)
            for t in times:
                buckets[max(0, int(t))] += 1
            print(f"{channel} per second after due: {buckets}")
        for key in ("email_rate", "sms_rate", "both_rate", "lateness_p50", "lateness_p99",
                    "drain_seconds", "missing", "extra_copies"):
            value = figs.get(key)
            print(f"{key}: {value:.2f}" if value is not None else f"{key}: -", flush=True)
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        close_probe(procs, servers, sinks, workdir, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
