"""The project's own Celery app, with the benchmark's broker transport options.

`celery -A benchmarks.ours_app worker|beat` is `celery -A worker.celery_app worker|beat`
(same app object, same tasks, same settings from REMINDERS_*) with one change: the broker
transport options in BENCH_TRANSPORT_OPTIONS (JSON) are merged over the project's, so
both sides of the benchmark run with the same scaled-down visibility timeout. The
project's own setting cannot do that: REMINDERS_BROKER_VISIBILITY_TIMEOUT_SECONDS
refuses values under 60 s.
"""

from __future__ import annotations

import json
import os

from worker.celery_app import app

_extra = json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS", "{}"))
if _extra:
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **_extra}

__all__ = ["app"]
