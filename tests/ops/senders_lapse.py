"""Loaded into a real worker with `-I tests.ops.senders_lapse`: its senders (and its clinic
event senders, worker/event_senders.py) refresh their registration for the pump
(worker/dispatch.py REGISTER_EVERY) every LAPSE_EVERY seconds and it lapses LAPSE_TTL
seconds after the last refresh (REGISTER_TTL), instead of 2 s and 10 s,
so that a test of what the pump does once a worker is gone takes seconds, not ten more.
Only these two timings change: the registration, its lapse and what follows are the
worker's and the pump's own code.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

LAPSE_EVERY = 0.5
LAPSE_TTL = 3.0


@worker_process_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _shorten(**_: Any) -> None:
    # In the pool process (the send path is not imported in the main one); read at each
    # refresh, so set before or after the senders' first one alike.
    from worker import dispatch, event_senders

    for module in (dispatch, event_senders):
        module.REGISTER_EVERY = LAPSE_EVERY  # type: ignore[attr-defined]
        module.REGISTER_TTL = LAPSE_TTL  # type: ignore[attr-defined]
    # Event senders made before (the warm-up's handler ran first) registered for 10 s.
    made = event_senders._process_senders
    if made is not None:
        made._register()
