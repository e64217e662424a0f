"""A task for tests only, loaded into a real worker with `-I tests.ops.pump_park`.

`tests.pump.park(key)` starts, in its pool process, what a pump run under way looks like to
a warm shutdown (worker/tasks.py `_drain`): a thread holding the process's pump-run lock.
It holds it while the Redis string `key` reads "parked" (at most 30 s): a run stalled on
its broker or on Redis.
"""

from __future__ import annotations

import threading
import time

from worker.celery_app import PUMP_QUEUE, app

TASK = "tests.pump.park"
QUEUE = PUMP_QUEUE  # a queue the service's worker consumes


@app.task(name=TASK, ignore_result=True)  # type: ignore[untyped-decorator]  # celery is untyped
def park(key: str) -> None:
    from worker import tasks

    client = tasks.context().store.redis
    assert tasks._pumping.acquire(timeout=5)  # a real run under way ends within that

    def parked() -> None:
        try:
            client.set(key, "parked")
            deadline = time.monotonic() + 30
            while client.get(key) == "parked" and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            tasks._pumping.release()

    threading.Thread(target=parked, name="pump", daemon=True).start()
