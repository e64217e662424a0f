"""The suite's order under xdist (tests/schedule.py): worksteal's own first hand-out, read
from pytest-xdist's scheduler, slices the reordered tests where the schedule planned."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from xdist.scheduler.worksteal import WorkStealingScheduling

from tests.schedule import (
    DURATIONS,
    LISTED,
    UNLISTED,
    load_durations,
    order,
    parse_durations,
    slice_sizes,
)


@dataclass(frozen=True)
class FakeItem:
    nodeid: str


@dataclass(eq=False)
class Node:
    """What worksteal calls on a worker process: the tests it is handed, in order."""

    name: str
    handed: list[int] = field(default_factory=list)
    shutting_down: bool = False

    @property
    def gateway(self) -> SimpleNamespace:
        return SimpleNamespace(id=self.name)

    def send_runtest_some(self, indices: list[int]) -> None:
        self.handed.extend(indices)

    def shutdown(self) -> None:  # nothing left to hand it
        self.shutting_down = True


class Config:
    def __init__(self, workers: int) -> None:
        self.workers = workers

    def getvalue(self, name: str) -> list[str]:
        assert name == "tx"
        return [f"{self.workers}*popen"]


def handed_out(collection: list[str], workers: int) -> list[list[str]]:
    """What xdist's worksteal scheduler hands each process first, for this collection."""
    scheduler = WorkStealingScheduling(Config(workers))  # type: ignore[arg-type]
    nodes = [Node(f"gw{i}") for i in range(workers)]
    for node in nodes:
        scheduler.add_node(node)  # type: ignore[arg-type]
    for node in nodes:
        scheduler.add_node_collection(node, collection)  # type: ignore[arg-type]
    scheduler.schedule()
    return [[collection[i] for i in node.handed] for node in nodes]


def suite(seed: int) -> tuple[list[FakeItem], dict[str, float]]:
    """A made-up suite shaped like ours: 60 modules, most of them many quick tests, one in
    five a few tests of seconds to minutes (real workers, servers, a benchmark run)."""
    rng = random.Random(seed)
    items, seconds = [], {}
    for m in range(60):
        heavy = rng.random() < 0.2
        for t in range(rng.randint(1, 10) if heavy else rng.randint(1, 80)):
            item = FakeItem(f"tests/test_m{m}.py::test_{t}")
            items.append(item)
            if heavy:
                seconds[item.nodeid] = round(rng.uniform(5, 90), 2)
            elif rng.random() < 0.3:
                seconds[item.nodeid] = round(rng.uniform(0.5, 3), 2)
    return items, seconds


@pytest.mark.parametrize("total,workers", [(2749, 3), (2749, 4), (10, 4), (7, 3), (1, 2)])
def test_slice_sizes_are_worksteals_first_hand_out(total, workers):
    collection = [f"t{i}" for i in range(total)]
    assert [len(part) for part in handed_out(collection, workers)] == slice_sizes(total, workers)


@pytest.mark.parametrize("workers", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(5))
def test_each_process_is_handed_the_modules_planned_for_it_heaviest_first(seed, workers):
    items, seconds = suite(seed)
    ordered = order(items, workers, seconds)
    assert sorted(i.nodeid for i in ordered) == sorted(i.nodeid for i in items)  # all, once
    slices = handed_out([i.nodeid for i in ordered], workers)

    def time(ids: list[str]) -> float:
        return sum(seconds.get(i, UNLISTED) for i in ids)

    def module(nodeid: str) -> str:
        return nodeid.split("::")[0]

    loads = [time(part) for part in slices]
    heaviest_module = max(time([i.nodeid for i in items if module(i.nodeid) == m])
                          for m in {module(i.nodeid) for i in items})
    # Greedy balance: no process gets more than an even share plus one module's time.
    assert max(loads) <= sum(loads) / workers + heaviest_module
    for part in slices:
        # Modules stay together in a process, in their file order, heaviest module first.
        runs = [module(part[0])]
        for nodeid in part[1:]:
            if module(nodeid) != runs[-1]:
                runs.append(module(nodeid))
        assert len(runs) == len(set(runs)), runs
        weights = [time([i for i in part if module(i) == m]) for m in runs]
        assert weights == sorted(weights, reverse=True)
        for m in runs:
            mine = [i for i in part if module(i) == m]
            assert mine == [i.nodeid for i in items if i.nodeid in mine]


def test_the_file_order_balances_worse_than_the_schedule():
    """What the reordering is for: file order puts the heavy modules' time unevenly."""
    items, seconds = suite(11)
    for workers in (3, 4):
        def spread(listed: list[FakeItem], n: int = workers) -> float:
            parts = handed_out([i.nodeid for i in listed], n)
            loads = [sum(seconds.get(i, UNLISTED) for i in part) for part in parts]
            return max(loads) - min(loads)

        assert spread(order(items, workers, seconds)) < spread(items) / 2


def test_one_process_or_none_keeps_the_collected_order():
    items, seconds = suite(1)
    assert order(items, 0, seconds) == items
    assert order(items, 1, seconds) == items
    assert order([], 4, seconds) == []


def test_durations_are_read_from_pytests_table_setup_call_and_teardown_added():
    text = """
============================= slowest durations ==============================
94.13s call     tests/test_benchmarks.py::test_a_run[email]
1.50s setup    tests/test_benchmarks.py::test_a_run[email]
0.20s teardown tests/test_benchmarks.py::test_a_run[email]
0.01s call     tests/test_x.py::test_fast
=========== 1 failed, 2748 passed, 3 warnings in 1057.80s (0:17:37) ============
"""
    assert parse_durations(text) == {"tests/test_benchmarks.py::test_a_run[email]": 95.83,
                                     "tests/test_x.py::test_fast": 0.01}


def test_the_committed_durations_name_tests_that_exist():
    """tests/durations.json is the one the suite is ordered by: it parses, lists tests of
    LISTED seconds or more, and most of them are still in the suite (a renamed test just
    counts as UNLISTED; a file of stale names would order nothing)."""
    seconds = load_durations()
    assert seconds and all(v >= LISTED for v in seconds.values())
    assert json.loads(DURATIONS.read_text(encoding="utf-8")) == seconds
    root = DURATIONS.parent.parent
    found = 0
    for nodeid in seconds:
        path, _, name = nodeid.partition("::")
        name = name.split("[")[0].split("::")[-1]
        source = root / path
        found += source.exists() and f"def {name}(" in source.read_text(encoding="utf-8")
    assert found >= 0.9 * len(seconds)
