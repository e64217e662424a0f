"""What the send path observes for the worker's histograms, kept only where they can be shown.

The send duration, the lateness, the pump run's duration and the clock skew are kept in
worker/metrics.py's per-process histograms (`Histograms`), which the worker's metrics port
serves, merged over its pool processes (prometheus-client's multiprocess mode). That port
is served by the worker's main process, which imports worker/metrics.py before its pool
forks (worker/tasks.py `_serve_metrics`): every pool process then has it too. With the port
off (REMINDERS_METRICS_PORT=0, the default) nothing in the worker can show the histograms,
and a pool process that imported prometheus-client only to keep them held about 1.8 MB for
nothing (its `__init__` imports the exposition: http.server, wsgiref, urllib.request).

So the senders, the clock and the pump report here, and this module hands each
observation to worker/metrics.py's histograms if that module is loaded in this process (it
says so as it is imported: `keep_in`), or drops it. A process that imports worker/metrics.py
(the worker's main process with its port on, the API, a test reading a registry) keeps
them as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_histograms: Callable[[], Any] | None = None  # worker/metrics.py's `histograms`, once imported


def keep_in(histograms: Callable[[], Any]) -> None:
    """Hand every observation from now on to `histograms()` (worker/metrics.py, at import)."""
    global _histograms
    _histograms = histograms


def observe_send(channel: str, result: str, seconds: float) -> None:
    kept = _histograms
    if kept is not None:
        kept().send_seconds.labels(channel, result).observe(seconds)


def observe_lateness(channel: str, seconds: float) -> None:
    kept = _histograms
    if kept is not None:
        kept().lateness.labels(channel).observe(max(0.0, seconds))


def observe_pump(seconds: float) -> None:
    kept = _histograms
    if kept is not None:
        kept().pump_seconds.observe(seconds)


def set_clock_skew(seconds: float) -> None:
    kept = _histograms
    if kept is not None:
        kept().clock_skew.set(seconds)
