"""A task for tests only, loaded into a real worker with `-I tests.e2e.worker_probe`.

`tests.probe.modules(key, hold)` waits `hold` seconds (so that the next probe goes to the
other pool process), then writes what its pool process has imported to the Redis hash
`key`, field = its pid: the names of the modules in sys.modules (those really imported).
"""

from __future__ import annotations

import json
import os
import sys
import time

from worker.celery_app import PUMP_QUEUE, app

TASK = "tests.probe.modules"
QUEUE = PUMP_QUEUE  # a queue the service's worker consumes


@app.task(name=TASK, ignore_result=True)  # type: ignore[untyped-decorator]  # celery is untyped
def modules(key: str, hold: float) -> None:
    from worker.tasks import context

    time.sleep(hold)
    names = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    context().store.redis.hset(key, str(os.getpid()), json.dumps(names))
