"""A pool process, once warmed up, sets aside what the warm-up made and collects young
garbage less often (worker/tasks.py `quiet_gc`); the sends still free their cyclic garbage.
Run in a fresh interpreter: the test process's own collector stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent("""
    import gc, json, weakref
    from worker import tasks
    warmed = []
    tasks._warm_up = lambda: warmed.append(1)  # the warm-up itself needs Redis: not here
    before = (gc.get_freeze_count(), gc.get_threshold())

    class Node:
        pass

    tasks._warm_up_pool_process()
    after = (gc.get_freeze_count(), gc.get_threshold())
    # Cyclic garbage made after the warm-up is still collected.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    print(json.dumps({"warmed": warmed, "before": before, "after": after,
                      "cycle_freed": gone() is None, "sender_gc": tasks.SENDER_GC}))
""")


def test_pool_process_freezes_the_warm_up_and_collects_less_often() -> None:
    # Celery's app needs a broker URL to be made; nothing connects to it here.
    env = os.environ | {"REMINDERS_REDIS_URL": "redis://127.0.0.1:9/0"}
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["warmed"] == [1]
    assert found["before"][0] == 0 and found["before"][1] == [700, 10, 10]
    assert found["after"][0] > 10_000  # the imported modules' objects, set aside
    assert found["after"][1] == found["sender_gc"] == [10_000, 10, 10]
    assert found["cycle_freed"]
