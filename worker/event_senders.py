"""This process's event senders: clinic events delivered by threads of their own.

A clinic event task (worker/tasks.py `clinic_event`) only hands its claim to these threads
and returns, as a send batch hands its claims to the senders (worker/dispatch.py
`hand_over`): a clinic endpoint that accepts the connection and never answers holds one of
these threads for the webhook's timeout, never a Celery pool process, so pump runs and
send batches go on. The pump claims no more events than the registered event senders take
at once (`Events.claim`'s capacity, P:ev:out and P:ev:senders; worker/webhooks.py): the
rest stay due in Redis instead of waiting in a thread's queue until their lease ends. A
thread done with a delivery claims the next due events itself (`_refill`: the same claim,
within the same count, up to this process's free threads) and queues them here, no task
between: a burst of events (a 09:00 burst's `reminder.sent`, one a reminder) goes at the
endpoints' pace, not a pump run's worth a run (before, 60 events took 30 pump runs with
one thread a process). Each event so claimed is noted as held here by the claim itself
(`Events.claim`'s `holder`, one Lua step): a process killed the moment after gives it back
once its registration lapses, as it does a task's (which `_hold` notes before queueing).
A clinic's webhook endpoint that did not answer rests (worker/webhooks.py): its events are
put back to the schedule without an attempt until the rest's end, by the claim or by the
thread that takes one (`Events.take`), so a dead endpoint holds about one of these threads
per rest, not all of them for a burst of its events, and other clinics' events go on.

Not `Lanes` itself: its bookkeeping is the send path's (the pump's per-channel counts and
latency, the send ledger, the cut of a send handing over). What is shared: the watchdog,
the same hand-over and warm shutdown shape.

The events' guarantees, as with the task: a delivery is fenced by its claim and finished
by `deliver_event` (delivered, retried with backoff, given up after
`webhook_max_attempts`). A delivery begins only while its lease leaves time for it: its
network waits are bounded to half of what is left of the lease less LEASE_MARGIN (and by
the settings' timeouts), so a dead endpoint ends it as a retry before the lease runs out
(no second delivery of the same claim meanwhile); a claim with less than
MIN_ATTEMPT_SECONDS so left goes back to the schedule, due now. A webhook's POST is cut
after its two network waits, whatever the endpoint does (one trickling its answer under
every timeout ends as no answer: worker/webhooks.py `post_webhook`); should a delivery still
run a second before its lease ends (an alert's email channel stuck past its timeouts), the
watchdog ends the process, as the task's hard time limit did. A worker killed mid-delivery
leaves the event claimed until its lease ends, then it is claimed again (the same id); it
counts against the event senders' capacity only until the dead process's registration
lapses (REGISTER_TTL): each claim is noted as held by this process before it is queued
(`P:ev:held:<node>`, worker/webhooks.py), and the pump's claim takes a gone process's off
its count, so the live processes' threads deliver the other events meanwhile.

Warm shutdown (`close`): claims not begun go back to the schedule at once (due now,
fenced by their claim); deliveries under way get the grace period; one still waiting then
is left to its lease (delivered again after it, with the same id).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import redis

from .dispatch import CLOCK, REGISTER_EVERY, REGISTER_TTL, Watchdog, watchdog
from .pump import process_node, sender_member
from .webhooks import HELD_KEEP_SECONDS, Events

log = logging.getLogger(__name__)
LEASE_MARGIN = 2.0  # seconds a delivery's network waits leave of its lease
MIN_ATTEMPT_SECONDS = 1.0  # a delivery begins only if its network waits may take this long
STOPPING = "handed back: the worker is stopping"
LEASE_NEARLY_OVER = "handed back: its lease leaves no time for a delivery"
STOP_WAIT_SECONDS = 1.0  # `stop` waits this long for its round trips (Redis unreachable)

Deliver = Callable[[str, str, float], str]  # (event id, claim, most seconds a wait may take)


class EventSenders:
    """A bounded thread pool delivering claimed clinic events (see the module docstring)."""

    def __init__(self, events: Events, deliver: Deliver, *, threads: int,
                 dog: Watchdog | None = None, lease_seconds: float | None = None) -> None:
        """`lease_seconds`: a thread done with a delivery claims the next due events itself,
        leased this long, up to this process's free threads (`_refill`); None: only what
        the pump hands over."""
        self.events = events
        self.deliver = deliver
        self.threads = threads
        self.lease_seconds = lease_seconds
        self._active = 0  # handed to the pool and not finished (queued or under way)
        self.watchdog = dog or Watchdog()
        self.node = sender_member(process_node(), threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="clinic-event")
        self._lock = threading.Lock()
        self._closing = False
        self._queued: dict[int, tuple[Future[str], str, str]] = {}  # not taken by a thread
        self._futures: set[Future[str]] = set()
        self._next_key = 0
        self._stop = threading.Event()
        self._leaving: threading.Thread | None = None  # `stop`'s round trips
        self._register()
        self._registrar = threading.Thread(target=self._register_loop, name="event-register",
                                           daemon=True)
        self._registrar.start()

    def submit(self, event_id: str, claim: str) -> str:
        """Hand one claimed event to a thread; return what happened (for the task's log)."""
        self._hold([(event_id, claim)])
        return self._queue(event_id, claim, reserved=False)

    def _queue(self, event_id: str, claim: str, *, reserved: bool) -> str:
        """Queue one held claim for a thread (`reserved`: its place in `_active` was taken
        by `_refill` before it claimed), or hand it back if stopping."""
        with self._lock:
            if not self._closing:
                self._next_key += 1
                key = self._next_key
                future = self._pool.submit(self._one, key, event_id, claim)
                if not reserved:
                    self._active += 1
                self._queued[key] = (future, event_id, claim)
                self._futures.add(future)
                future.add_done_callback(self._forget)
                return "handed to the event senders"
            if reserved:
                self._active -= 1
        return self._hand_back(event_id, claim, STOPPING)

    def _hold(self, claims: list[tuple[str, str]]) -> None:
        """Note the claims ((event id, claim) pairs) as held by this process, before they
        are queued: should the process go without a word, the pump stops counting them
        once the registration lapses (worker/webhooks.py `_CLAIM`). Redis unreachable: not
        noted (they count until their lease ends, as they did)."""
        held = self.events.held_key(self.node)
        try:
            pipe = self.events.redis.pipeline(transaction=False)
            pipe.sadd(held, *(f"{claim}@{event_id}" for event_id, claim in claims))
            pipe.expire(held, HELD_KEEP_SECONDS)
            pipe.sadd(self.events.holders_key, self.node)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("clinic event(s) %s: could not note them as held here (%s)",
                        ", ".join(event_id for event_id, _ in claims), type(exc).__name__)

    def _forget(self, future: Future[str]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _one(self, key: int, event_id: str, claim: str) -> str:
        with self._lock:  # taken by a thread: no longer the closer's to hand back
            self._queued.pop(key, None)
            closing = self._closing
        try:
            if closing:
                return self._hand_back(event_id, claim, STOPPING)
            return self.attempt(event_id, claim)
        except Exception as exc:  # Redis down, a bug: the lease brings the event back
            log.warning("clinic event %s: delivery not completed (%s); its lease will bring "
                        "it back", event_id, type(exc).__name__)
            return "not completed"
        finally:
            try:
                self.events.redis.srem(self.events.held_key(self.node), f"{claim}@{event_id}")
            except redis.RedisError:
                pass  # the pump ignores a claim finished since; the set expires
            with self._lock:
                self._active -= 1
                room = 0 if self._closing or self.lease_seconds is None \
                    else max(0, self.threads - self._active)
                # Taken now, before the claim: another thread finishing meanwhile counts
                # these places as taken, not free (together they claimed more than this
                # process has threads: the extra waited in the queue, counted against the
                # capacity, while other processes' threads idled).
                self._active += room
            if room > 0:
                self._refill(room)

    def _refill(self, room: int) -> None:
        """Claim up to `room` due events for this process's free threads (their places in
        `_active` taken by the caller), as the pump's run claims them (`Events.claim`: the
        same count of what the registered event senders take at once, the same rests),
        and queue them here: a burst of events goes at the endpoints' pace, not a pump
        run's worth a run. The places not filled are given back. Nothing due: one round
        trip. Redis unreachable: the pump's next run claims them."""
        assert self.lease_seconds is not None
        claimed: list[tuple[str, str]] = []
        try:
            claimed = self.events.claim(room, self.lease_seconds, self.threads,
                                        holder=self.node)  # noted as held here by the claim
        except redis.RedisError as exc:
            log.warning("event senders: could not claim the next clinic events (%s); the "
                        "pump's next run does", type(exc).__name__)
        finally:
            with self._lock:
                self._active -= room - len(claimed)
        if not claimed:
            return
        for event_id, claim in claimed:
            self._queue(event_id, claim, reserved=True)
        log.info("event senders: claimed %d more clinic event(s)", len(claimed))

    def attempt(self, event_id: str, claim: str) -> str:
        """Deliver one claimed event now, in this thread, inside its lease."""
        left = self.events.lease_left(event_id, claim)
        if left is None:
            return "gone (delivered, or claimed again after the lease)"
        wait_at_most = (left - LEASE_MARGIN) / 2  # a connect and a read, each at most this
        if wait_at_most < MIN_ATTEMPT_SECONDS:
            return self._hand_back(event_id, claim, LEASE_NEARLY_OVER)
        with self.watchdog.watch(event_id, time.monotonic() + left - 1, what="clinic event"):
            outcome = self.deliver(event_id, claim, wait_at_most)
        log.info("clinic event %s: %s", event_id, outcome)
        return outcome

    def _hand_back(self, event_id: str, claim: str, why: str) -> str:
        try:
            result = self.events.release(event_id, claim)
        except redis.RedisError:
            result = "not handed back (Redis unreachable): its lease brings it back"
        log.info("clinic event %s: %s (%s)", event_id, why, result)
        return why

    def _register(self) -> None:
        try:
            self.events.redis.zadd(self.events.senders_key,
                                   {self.node: CLOCK.now() + REGISTER_TTL})
        except redis.RedisError:  # the pump's count only: it expires on its own
            log.warning("event senders: could not register with the pump")

    def _register_loop(self) -> None:
        while not self._stop.wait(REGISTER_EVERY):
            self._register()

    def close(self, grace: float | None = None) -> None:
        """Stop (a warm shutdown): `stop`, then `wait` up to `grace` seconds."""
        self.stop()
        self.wait(grace)

    def stop(self) -> None:
        """Take no more events, leave the pump's count, and hand back at once the claims
        no thread has begun (due now, fenced by their claim).

        The round trips (leaving the count, the hand-backs) go in a thread of their own,
        waited for STOP_WAIT_SECONDS here and the rest of the grace period by `wait`: with
        Redis unreachable each waits out the client's retries (~40 s with the worker's
        profile), and the send lanes' shutdown, which follows in the worker's drain, must
        not wait for them (the stop would end past its grace period, and the container's:
        SIGKILL). What they could not do, the lease does (the count expires on its own)."""
        with self._lock:
            self._closing = True
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            cancelled = [(k, e, c) for k, (f, e, c) in self._queued.items() if f.cancelled()]
            for key, _, _ in cancelled:
                del self._queued[key]
        self._leaving = threading.Thread(target=self._leave, args=(cancelled,),
                                         name="event-handback", daemon=True)
        self._leaving.start()
        self._leaving.join(STOP_WAIT_SECONDS)  # done by then unless Redis is unreachable

    def _leave(self, cancelled: list[tuple[int, str, str]]) -> None:
        try:
            pipe = self.events.redis.pipeline(transaction=False)
            pipe.zrem(self.events.senders_key, self.node)
            pipe.srem(self.events.holders_key, self.node)
            pipe.delete(self.events.held_key(self.node))
            pipe.execute()
        except redis.RedisError:
            pass  # it expires on its own
        for _, event_id, claim in cancelled:
            self._hand_back(event_id, claim, STOPPING)
        if cancelled:
            log.info("event senders: stopping: %d clinic event(s) not begun handed back",
                     len(cancelled))

    def wait(self, grace: float | None) -> None:
        """Give the deliveries under way, and the hand-back of `stop`, `grace` seconds
        (None: as long as they take)."""
        began = time.monotonic()
        with self._lock:
            futures = [f for f in self._futures if not f.cancelled()]
        _, running = wait(futures, timeout=grace)
        leaving = self._leaving
        if leaving is not None:
            leaving.join(None if grace is None else max(0.0, began + grace - time.monotonic()))
        if running:
            log.warning("event senders: stopped after the %gs grace period with %d clinic "
                        "event(s) still being delivered (claimed again once their lease "
                        "ends, with the same id)", grace or 0, len(running))


_process_senders: EventSenders | None = None
_senders_lock = threading.Lock()


def event_senders(events: Callable[[], Events], deliver: Deliver, threads: int,
                  lease_seconds: float | None = None) -> EventSenders:
    """Return this process's event senders (made on first use, after a fork)."""
    global _process_senders
    with _senders_lock:
        if _process_senders is None:
            CLOCK.refresh(events().redis)  # their registration is an instant on Redis's clock
            _process_senders = EventSenders(events(), deliver, threads=threads, dog=watchdog(),
                                            lease_seconds=lease_seconds)
        return _process_senders


def stop_event_senders() -> EventSenders | None:
    """Stop this process's event senders, if any (`EventSenders.stop`); return them, for
    the caller to `wait` on."""
    global _process_senders
    with _senders_lock:
        current, _process_senders = _process_senders, None
    if current is not None:
        current.stop()
    return current


def _forget_after_fork() -> None:
    global _process_senders, _senders_lock
    _process_senders = None
    _senders_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
