"""A module fixture's costly result (a whole fault drill, a benchmark run) made once per
test run, however pytest-xdist spreads the module's tests over its workers.

A module-scoped fixture is made again on every worker that runs one of the module's tests:
`--dist worksteal` hands some of a module's tests to an idle worker, which then ran the
same two-minute drill a second time, beside the first. Here the first worker to ask makes
the result in this run's shared temporary folder; the others wait for it and read it.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def once_per_run(name: str, tmp_path_factory: pytest.TempPathFactory,
                 make: Callable[[Path], T]) -> T:
    """Return `make(folder)` (a picklable value), made once in this test run.

    Without xdist (no PYTEST_XDIST_WORKER) it is simply made. Under xdist the workers share
    their basetemp's parent (this run's own folder): the first to take the lock makes the
    value in a new folder there and pickles it; the others, blocked on the lock meanwhile,
    read that. A `make` that raises leaves nothing behind: the next worker tries itself.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    result = shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if result.exists():
            value: T = pickle.loads(result.read_bytes())
            return value
        value = make(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared)))
        result.write_bytes(pickle.dumps(value))
        return value
