"""The order the suite runs in under pytest-xdist: slowest modules first, spread evenly.

`make test` runs `-n 4 --dist worksteal` (or another count). Worksteal hands each process
a contiguous slice of the collected tests, equal in count, then lets an idle process take
the back half of a busy one's queue. In file order the slices are equal in count but not
in time: the e2e, ops and benchmark modules (a minute or more each) bunch up, and one
started late keeps the run going alone for its last minute or two.

Here the tests are reordered as worksteal will slice them (the same counts, computed the
same way): whole modules (module fixtures and the runs shared through tests/once.py stay
in one process) dealt heaviest first to the slice with the least time so far, each slice
starting with its heaviest modules, so what is left to steal at the end is short.

Times come from tests/durations.json (seconds per test id, from a `--durations=0` run:
`python -m tests.schedule < pytest-output`); a test not listed (under half a second then,
or new since) counts as UNLISTED seconds. Without xdist (one process) the order is left
as collected. Only the order changes: every test still runs, with the same fixtures.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

DURATIONS = Path(__file__).with_name("durations.json")
LISTED = 0.5  # the file lists the tests that took this long or longer
UNLISTED = 0.1  # the seconds a test not in the file counts as


class HasNodeId(Protocol):
    nodeid: str


Item = TypeVar("Item", bound=HasNodeId)


def slice_sizes(total: int, workers: int) -> list[int]:
    """How many tests worksteal's first hand-out gives each process (xdist 3.x
    `WorkStealingScheduling.check_schedule`: the pending tests divided evenly, in order)."""
    sizes, left = [], total
    for i in range(workers):
        size = left // (workers - i)
        sizes.append(size)
        left -= size
    return sizes


def order(items: Sequence[Item], workers: int, seconds: dict[str, float]) -> list[Item]:
    """`items` reordered for `workers` worksteal processes (see the module's docstring)."""
    if workers < 2 or not items:
        return list(items)
    modules: dict[str, list[Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    weight = {name: sum(seconds.get(i.nodeid, UNLISTED) for i in tests)
              for name, tests in modules.items()}
    room = slice_sizes(len(items), workers)
    load = [0.0] * workers
    slices: list[list[tuple[float, list[Item]]]] = [[] for _ in range(workers)]
    for name in sorted(modules, key=lambda m: (-weight[m], m)):
        tests = modules[name]
        while tests:
            # The least loaded slice with room; a module larger than any room left is cut.
            open_ = [k for k in range(workers) if room[k] > 0]
            fits = [k for k in open_ if room[k] >= len(tests)] or open_
            k = min(fits, key=lambda s: (load[s], s))
            part, tests = tests[:room[k]], tests[room[k]:]
            room[k] -= len(part)
            share = sum(seconds.get(i.nodeid, UNLISTED) for i in part)
            load[k] += share
            slices[k].append((share, part))
    out: list[Item] = []
    for parts in slices:
        for _, part in sorted(parts, key=lambda p: -p[0]):  # stable: ties keep file order
            out.extend(part)
    return out


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {str(k): float(v) for k, v in data.items()}


def workers_from_env() -> int:
    """The number of xdist processes, as xdist tells each of them (0: not under xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)


LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def parse_durations(text: str) -> dict[str, float]:
    """Seconds per test id from pytest's `--durations` table (setup, call and teardown
    added up)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = LINE.match(line)
        if found:
            out[found[3]] = round(out.get(found[3], 0.0) + float(found[1]), 2)
    return out


def main() -> None:
    """Read a `pytest --durations=0` output on stdin; write tests/durations.json (tests
    of LISTED seconds or more; the others count as UNLISTED)."""
    parsed = parse_durations(sys.stdin.read())
    if not parsed:
        sys.exit("no `--durations` lines on stdin (run pytest with --durations=0)")
    kept = {k: v for k, v in sorted(parsed.items()) if v >= LISTED}
    DURATIONS.write_text(json.dumps(kept, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{DURATIONS}: {len(kept)} tests, {sum(kept.values()):.0f} s in all")


if __name__ == "__main__":
    main()
