"""The pump nudged from a process without a Celery worker: the API, the `reminders` CLI.

A write through the API (a PUT, a batch, a release, a cancel that plans a notice, a START
that resumes texts) may store a reminder due before the pump's next planned run: a
booking's confirmation is due at once, a move brings a reminder forward, a notice is due
at once. Nothing of the pump sees it until beat's next tick (up to
REMINDERS_PUMP_INTERVAL_SECONDS) or the follow-up run the pump planned for a later
instant: so the API asks for a run at once, as `reminders book` does.

The message is the worker's (worker/celery_app.py `nudge_pump`): a `reminders.pump` task on
the pump queue, expiring after 30 s, published to the same broker (worker/connections.py
`broker`, the kombu transport of worker/broker.py) by a Celery app of this process made
for publishing only: the worker's app is not imported here (made at import from the
environment's settings, it registers the tasks and beat's heartbeat). A worker receiving
it starts a pump run, wakes its pump thread waiting for a later instant, or has the run
under way go again after (worker/tasks.py `pump_task`); another process's run under way
is asked to go again through the pump's own lock (worker/pump.py `Run.again`).

`reminders book`, `cancel` and `release` publish in their own thread
(`PumpNudge.publish_now`, bounded by PUBLISH_TIMEOUT_SECONDS a try) after the write, under
the same rule (`due_soon` of the timelines written); a failure is their one stderr line.

Never in the request: `PumpNudge.ask` sets a flag and returns; one thread per process
publishes. The broker slow or down holds that thread, not the clinic's answer: the write
is stored and answered, and the failure is logged once at WARNING (no patient data: what
failed and that the next tick sends it), again only after a publish went through.

Coalesced: the thread publishes once for all the asks made before it began to publish,
then waits GAP_SECONDS before the next, so a burst of writes publishes a nudge per
GAP_SECONDS at most, not one each. No ask is lost: one made while a publish or the gap is
under way has another publish after it, and a publish begun after the write it was asked
for has its pump run begin after that write, so the run claims it. None is published while
TICKS_WAITING_MAX pump tasks wait unrun (no worker takes the queue): the worker that comes
back runs the pump, as beat's next tick does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .settings import Settings
from .status import Status

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)
PUMP_QUEUE = "reminders.pump"  # worker/celery_app.py imports these (this module must not import it)
PUMP_TASK = "reminders.pump"
EXPIRES_SECONDS = 30  # a late nudge is worthless (the tick sends one anyway)
GAP_SECONDS = 0.2  # one nudge per this long at most, per process, whatever the writes
PUBLISH_TIMEOUT_SECONDS = 2.0  # the broker's connect and socket timeouts for a nudge
# Pump tasks waiting unrun in their queue (no worker consuming it: workers down, crash-looping
# or refusing to start): beat adds no tick to this many (worker/celery_app.py), and no nudge
# is added either, so the queue does not grow by a message (~1 KB) per write while the
# workers are away, and a worker coming back does not first discard every expired one.
TICKS_WAITING_MAX = 5


def due_soon(timelines: Iterable[Mapping[str, Any]], now: datetime, within: float) -> bool:
    """Whether any of the timelines (as a write returned them) has a reminder scheduled to
    go by `now` + `within` seconds: before beat's next tick at the latest."""
    soon = (now + timedelta(seconds=within)).astimezone(UTC)
    second = soon.strftime("%Y-%m-%dT%H:%M:%S")  # as the timeline writes its instants
    for timeline in timelines:
        for reminder in timeline.get("reminders", ()):
            due = reminder.get("due_at")
            if reminder.get("status") != Status.SCHEDULED or not due:
                continue
            # To the second, as text (a thousand timelines' reminders: a millisecond, not
            # the tens that parsing each costs); the same second is parsed to decide.
            head = str(due)[:19]
            if len(head) == 19 and head[10] == "T" and head != second:
                if head < second:
                    return True
                continue
            if datetime.fromisoformat(str(due).replace("Z", "+00:00")) <= soon:
                return True
    return False


class PumpNudge:
    """Asks the pump for a run from outside a worker (see the module's docstring)."""

    def __init__(self, settings: Settings, url: str | None = None,
                 gap: float = GAP_SECONDS) -> None:
        """`url`: the broker's Redis (the API's, when it was given one); default the
        service's broker as the settings say (URL, embedded default or Sentinel)."""
        self._settings = settings
        self._url = url
        self.gap = gap
        self.published = 0  # nudges this process published
        self.left = 0  # nudges not published: TICKS_WAITING_MAX pump tasks waited unrun
        self._probe: Any = None  # a Redis client reading the pump queue's length
        self._asked = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._app: Celery | None = None
        self._failing = False

    def ask(self) -> None:
        """Have the pump run soon; returns at once (the publish is the nudge thread's)."""
        self._asked.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:  # first ask in this process (or after a fork): start the thread
            if self._closing.is_set():
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pump-nudge",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (asks not yet published are left to the tick)."""
        with self._lock:
            self._closing.set()
            self._asked.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._asked.wait()
            if self._closing.is_set():
                return
            # Cleared before the publish: an ask from now on has another publish after it.
            self._asked.clear()
            self._publish()
            if self._closing.wait(self.gap):
                return

    def publish_now(self) -> None:
        """Publish one nudge in the caller's thread, now, and return once it is published
        (a `reminders` command, which may wait: bounded by PUBLISH_TIMEOUT_SECONDS a try,
        two tries); raises what the publish raised, logging nothing (the caller says it).
        Nothing is published while TICKS_WAITING_MAX pump tasks wait unrun: no worker
        takes them, and the one that comes back runs the pump (or beat's next tick does)."""
        if self._waiting() >= TICKS_WAITING_MAX:
            self.left += 1
            return
        if self._app is None:
            self._app = self._make_app()
        self._app.send_task(PUMP_TASK, queue=PUMP_QUEUE, expires=EXPIRES_SECONDS)
        self.published += 1

    def _publish(self) -> None:
        try:
            self.publish_now()
        except Exception as exc:  # noqa: BLE001 - any failure: the tick sends it all the same
            if not self._failing:
                self._failing = True
                log.warning("could not nudge the pump (%s: %s): what was just stored and is "
                            "due now goes at the pump's next tick (within %gs) instead; "
                            "said once until a nudge goes through", type(exc).__name__, exc,
                            self._settings.pump_interval_seconds)
            else:
                log.debug("could not nudge the pump (%s)", type(exc).__name__)
            return
        if self._failing:
            self._failing = False
            log.info("the pump is nudged again")

    def _waiting(self) -> int:
        """How many pump tasks wait in their queue (the broker's Redis list); 0 if Redis does
        not answer (the publish then says what fails)."""
        import redis

        from . import connections

        try:
            if self._probe is None:
                self._probe = (connections.from_url(self._url, connections.PROBE)
                               if self._url is not None
                               else connections.client(self._settings, connections.PROBE))
            return int(self._probe.llen(f"{self._settings.key_prefix}:celery:{PUMP_QUEUE}"))
        except (redis.RedisError, OSError):
            return 0

    def _make_app(self) -> Celery:
        from celery import Celery

        from .connections import broker, broker_transport_options

        options: dict[str, Any]
        if self._url is not None:
            url, transport, options = self._url, "worker.broker:Transport", {}
        else:
            url, transport, options = broker(self._settings)
        app = Celery("reminders", broker=url, set_as_current=False)
        app.conf.update(
            broker_transport=transport,
            # A broker that accepts and never answers holds the nudge thread this long.
            broker_transport_options=broker_transport_options(self._settings, options)
            | {"socket_timeout": PUBLISH_TIMEOUT_SECONDS},
            broker_connection_timeout=PUBLISH_TIMEOUT_SECONDS,
            broker_connection_retry=False,
            task_serializer="json",
            accept_content=["json"],
            task_publish_retry_policy={"max_retries": 1, "interval_start": 0,
                                       "interval_step": 0.2, "interval_max": 0.2},
        )
        return app
