"""The pump: hand reminders that are due now to the senders, no ETA, no more than they can take.

Run by Celery beat every `pump_interval_seconds`, again when a channel's senders ran out of
work (a nudge), and when something falls due before the next tick: after each run the pump
looks when the next reminder falls due or lease runs out (`next_due`, one read) and, if that
comes before beat's next tick, its thread waits for that instant and runs again, at most
one run per FOLLOW_UP_GAP_SECONDS (worker/tasks.py `_pump_run`). So a reminder goes when it
falls due, not up to a tick later. Claiming is one Lua script on Redis's own clock,
so any number of pumps may run at once without double claims; a lock lets one run at a
time all the same, so that two do not hand out the same window twice. A run finding the
lock held asks the holder to run again once it is done (`Run.again`; a holder whose run
fails passes the request on with its error, `asked_again`): what it was started for (a
nudge for a booking written after the holder claimed) is not left to the next tick.

Claims follow what the senders can absorb, per channel. A claim is leased: one that waits
in a queue until its lease runs out is claimed again and its first task only dropped later
as stale. So the pump hands out no more than the senders can begin within
`send_backlog_seconds`:

  senders(c)      sender threads for channel c in the worker processes running now: each
                  process registers its own (`send_threads`) and refreshes it while alive;
                  none registered (no live worker takes c's queue: started without it, or
                  crashed): the workers' pump assumes none (`Capacity.threads` 0) and hands
                  c nothing, so its reminders wait due, not leased in a queue no one reads
                  and claimed again each lease (one passed in the line goes back saying
                  NO_SENDERS); once a worker for c registers, they go. A process that
                  stops refreshing (SIGKILLed, its container removed, paused) drops out
                  once its registration lapses (REGISTER_TTL, worker/dispatch.py), and so
                  do the claims it held (below)
  latency(c)      how long one attempt on channel c takes, measured by the senders (a
                  moving average over the last few dozen attempts): slow providers, and a
                  CPU-bound worker, both show here
  window(c)       senders(c) x max(1, send_backlog_seconds / latency(c)): what they finish
                  in that time, and never less than one claim per thread; before anything
                  was measured (a fresh store), twice the threads, and while such a channel
                  has no room and more due the pump runs again every FOLLOW_UP_GAP_SECONDS
                  (`Run.measuring`, worker/tasks.py `_follow_up`): once the senders report
                  their first attempts the window follows them, without waiting for the
                  senders to run dry and ask
  outstanding(c)  claims of channel c handed out and not yet settled (sent, retried, handed
                  back, dropped): a sorted set per channel, one member per claim, added
                  before the task is published and removed once the claim is settled; a
                  member also leaves when its score (the latest it may still be running)
                  passes, so a killed worker's claims stop counting on their own. Sooner:
                  the senders a batch reaches note its claims as held by their process
                  (`Keys.held`, before queueing them), and once that process's
                  registration lapses each run's first step (`_LAPSED`) takes them off
                  this count and the pump hands them back to the schedule, due now, each
                  fenced by its claim (`_hand_back_gone`): those it had not begun go to the
                  live senders within seconds of the lapse, not a hold (41 s) or lease
                  (300 s) later; one it had begun (maybe at the provider: outcome unknown)
                  is refused by the fence and left to its ledger and lease, as ever; a
                  process that was only slow and goes on finds the claims it had not begun
                  no longer its own (handed back, claimed again, sent or cancelled) and
                  drops them. (A batch still in the broker, or taken by the dead worker's
                  main process and not yet handed to its senders, is noted nowhere: it
                  counts until its hold and waits for its lease, as before.)
  budget(c)       window(c) - outstanding(c): what this run may claim for channel c

Counting claims in our own set rather than by the queue's length (LLEN of the kombu list)
also counts batches a worker has taken and not finished, which LLEN cannot see.

`Store.claim_due` claims whatever is due first, whatever its channel (the channel is the
suffix of the reminder key: "<clinic>/<booking_id>/<step>[#n]:<channel>"). So the pump
first looks (read only) at the refs next in line (expired leases, then the due set: the
order the claim script takes them) and claims only through the last one a channel with
room can use. While another channel still has room, a channel may go up to a window over
its own (in a burst the channels alternate in the line). A claim beyond that, taken
because a usable one was behind it (or the line changed since the look), is held until
the end of the run and handed back to the schedule (`Store.requeue_in`, all in one round
trip), due again once that channel's senders should have room (the time they need for
what they have, between HAND_BACK_MIN and send_backlog_seconds, then one at their pace
after another): a slow channel's backlog never keeps the other channel's reminders from
being claimed, and the next runs do not take the same reminders again at once. A run
passes at most `pump_batch` such claims. (A store method claiming per channel would make
the look and the hand-back needless.) Within a channel the senders keep a slow provider
(one clinic's) to its share of their threads (worker/dispatch.py `Lanes`): its claims
beyond that they hand back to the schedule unbegun, settled here like any, so the next runs
hand out what is behind them.

Each channel's claims go out in batches of at most `send_batch_size`, one Celery task per
batch on the channel's own queue, with the instant the batch's first claim was claimed (the
earliest: the senders count every claim's start-by deadline from it). A run hands out its
batches in two round trips, whatever their number: one pipeline counts them all as
outstanding, then one publishes all their tasks (`PublishAll`; the worker's is kombu's
batch publish, one pipelined LPUSH per task: worker/tasks.py `_publish_all`). A run that
claims again (another claim round) first hands out the full batches it has, so that they
do not wait for that round; what is left goes at the end with the rest. One round trip
each (a ZADD and a publish per batch of 20) cost about 1.8 ms a claim in a pool process
whose sender threads hold the GIL in turn: a large window took the run 0.5-1.9 s to hand
out. Should the count or the publish fail (Redis refusing writes, the connection lost
mid-pipeline), which of that call's tasks went out is not known: every claim of it leaves
the outstanding set and is handed back to the schedule at once (fenced by its claim: a
task that did go out then finds its claim gone and is dropped, or began first and the
hand-back leaves it alone); if the hand-back fails too, the lease brings them back. No
claim is left leased with no task.

Every instant the pump reads or writes is on Redis's clock (worker/clock.py `redis_time`),
never this host's: the claim script's, the instant a claim was made (the senders on other
hosts count their start-by deadline from it), what is due, the outstanding and senders
sets' scores, a hand-back's due time. A pump host whose clock is off claims and hands out
as one in step.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import redis

from .clock import redis_time
from .models import CHANNELS, Channel
from .store import Claim, Store

log = logging.getLogger(__name__)
MAX_ROUNDS = 20  # bound one pump run; the next beat tick picks up the rest
LATENCY_MEMORY = 30.0  # attempts: how fast the measured latency follows a change
HAND_BACK_MIN = 0.5  # seconds: a claim handed back for a busy channel is due again after it
HAND_BACK_UNKNOWN = 1.0  # ... or after this, before the channel's latency is known
PROBE_ROUNDS = 10  # how far past a busy channel's reminders a run looks for others
RUN_LOCK_MS = 2000  # one pump run at a time; a run that died frees the lock after this
RUN_LOCK_KEEP_SECONDS = 60.0  # a run stuck longer (a hung publish) gives the lock up
# Take the run lock; a run finding it held asks the holder to run again (KEYS[2], kept
# ARGV[3] ms): what it was asked to run for (a booking written after the holder claimed, due
# before that run began) is no later instant the holder would wait for. Returns 1 if taken.
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 0
"""
# Delete the run lock only if it is still this run's, and take the request to run again
# made meanwhile (in the same step: a run finding the lock held asks before this, or takes
# the lock after it). Returns 1 if a run was asked for.
_RELEASE = """
local key, token = KEYS[1], ARGV[1]
if redis.call('GET', key) == token then redis.call('DEL', key) end
return redis.call('DEL', KEYS[2])
"""
# Keep the run lock ARGV[2] ms more, only if it is still this run's. Returns 1 if kept.
_EXTEND = """
local key, token, ms = KEYS[1], ARGV[1], ARGV[2]
if redis.call('GET', key) == token then return redis.call('PEXPIRE', key, ms) end
return 0
"""
# Forget the senders whose registration lapsed (KEYS: the channel's senders, holders and
# outstanding sets; ARGV: Redis's clock now, the prefix of its held sets): each process
# that had claims handed to it (a `holders` member) and is no longer registered (its score
# passed, or gone) has its held claims taken off the outstanding set and its held set
# dropped, in this one step; returns them ("<claim>@<ref>") for the pump to hand back.
_LAPSED = """
local senders, holders, outstanding = KEYS[1], KEYS[2], KEYS[3]
local now, held_prefix = tonumber(ARGV[1]), ARGV[2]
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', holders)) do
  local live = redis.call('ZSCORE', senders, node)
  if not live or tonumber(live) <= now then
    local held = held_prefix .. node
    local members = redis.call('ZRANGE', held, 0, -1)
    for i = 1, #members, 1000 do
      redis.call('ZREM', outstanding, unpack(members, i, math.min(i + 999, #members)))
    end
    for _, m in ipairs(members) do out[#out + 1] = m end
    redis.call('DEL', held)
    redis.call('SREM', holders, node)
  end
end
redis.call('ZREMRANGEBYSCORE', senders, '-inf', now)
return out
"""
HANDED_BACK = "the {channel} senders are busy: handed back to the schedule"
GONE = ("the worker it was handed to is gone (its senders' registration lapsed): handed "
        "back to the schedule")
NO_SENDERS = "no worker takes the {channel} queue: handed back to the schedule"


@dataclass(frozen=True)
class Batch:
    """One send task's claims: all of one channel, and the instant (Redis's clock) no
    later than the earliest of them was claimed."""

    channel: Channel
    claims: Sequence[Claim]
    claimed_at: float


# Publish one batch as one send task (tests and tools; the worker publishes `PublishAll`).
Publish = Callable[[Channel, Sequence[Claim], float], None]
# Publish many batches, one send task each, in as few round trips as the broker allows. On
# an error, any of them may have gone out or not: the pump hands every one of them back.
PublishAll = Callable[[Sequence[Batch]], None]


def each(publish: Publish) -> PublishAll:
    """Return a `PublishAll` publishing each batch through `publish`, in order."""

    def publish_all(batches: Sequence[Batch]) -> None:
        for batch in batches:
            publish(batch.channel, batch.claims, batch.claimed_at)

    return publish_all


def channel_of(ref: str) -> Channel:
    """Return the channel of a reminder ref ("<clinic>/<booking>/<step>[#n]:<channel>").

    A ref without a known channel suffix (none is stored) counts as the first channel.
    """
    suffix = ref.rpartition(":")[2]
    for channel in CHANNELS:
        if suffix == channel:
            return channel
    return CHANNELS[0]


def member(claim: Claim) -> str:
    """Return the outstanding-set member of one claim."""
    return f"{claim.claim}@{claim.ref}"


@dataclass(frozen=True)
class Keys:
    """The pump's own keys, next to the store's: per channel, senders, claims and latency."""

    prefix: str

    def outstanding(self, channel: str) -> str:
        return f"{self.prefix}:send:out:{channel}"

    def senders(self, channel: str) -> str:
        return f"{self.prefix}:send:senders:{channel}"

    def drained(self, channel: str) -> str:
        return f"{self.prefix}:send:done:{channel}"

    def busy(self, channel: str) -> str:
        return f"{self.prefix}:send:busy:{channel}"

    def stats(self, channel: str) -> str:
        return f"{self.prefix}:send:stats:{channel}"

    def held(self, channel: str, node: str) -> str:
        """The claims of `channel` one process's senders were handed and have not settled
        (`sender_member` `node`): handed back by the pump once its registration lapses."""
        return f"{self.prefix}:send:held:{channel}:{node}"

    def holders(self, channel: str) -> str:
        """The processes (`sender_member`) with a `held` set of `channel`."""
        return f"{self.prefix}:send:holders:{channel}"

    def running(self) -> str:
        return f"{self.prefix}:send:pumping"

    def again(self) -> str:
        return f"{self.prefix}:send:pumping:again"


def sender_member(node: str, threads: int) -> str:
    """Return the senders-set member of one process's senders for a channel."""
    return f"{node}|{threads}"


def process_node() -> str:
    """Return a name for this process's senders, "<host>:<pid>:<token>" (`sender_member`),
    the token drawn afresh on each call (once per process: its senders' construction).

    Host and pid alone name the process that died as well as the one that took its place
    when a container restarts: it keeps its hostname and numbers its processes afresh, so
    its pool process has the dead one's pid (a pod's container restarted alike). Under one
    name, the new process's registration kept the dead one's alive: what the dead one held
    was never handed back (`_LAPSED`; worker/webhooks.py `_CLAIM`), but counted until its
    hold and left leased until its lease, and the new process's clean stop dropped it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Capacity:
    """How the pump sizes what it hands out (from the settings)."""

    lease_seconds: int
    batch_size: int  # most claims in one send task
    threads: int  # senders assumed for a channel no live process has registered (workers: 0)
    backlog_seconds: float  # the window: what the senders finish in this long
    hold_seconds: float  # an outstanding claim stops counting this long after its claim


@dataclass(frozen=True)
class Budget:
    channel: Channel
    senders: int
    latency: float | None
    outstanding: int
    window: int
    registered: bool = True  # some process's senders registered (else `senders` is assumed)
    # The claims ("<claim>@<ref>") held by processes whose registration lapsed: off the
    # count (`outstanding` is without them), to be handed back (`_pump`).
    gone: tuple[str, ...] = ()

    @property
    def free(self) -> int:
        return max(0, self.window - self.outstanding)

    def room_in(self, longest: float) -> float:
        """Return seconds until the senders have room: their work at hand, bounded (none
        live: `longest`)."""
        if self.senders == 0:
            return longest
        if self.latency is None:
            return min(longest, HAND_BACK_UNKNOWN)
        busy_for = self.outstanding * self.latency / max(1, self.senders)
        return min(longest, max(HAND_BACK_MIN, busy_for))

    @property
    def pace(self) -> float:
        """Return the seconds between two claims the senders finish (0 if not measured)."""
        return 0.0 if self.latency is None else self.latency / max(1, self.senders)


def budgets(client: redis.Redis, keys: Keys, capacity: Capacity, now: float) -> dict[str, Budget]:
    """Return each channel's budget now, and fold the latency measured since last run in.

    First the senders whose registration lapsed are forgotten, and the claims they held
    taken off the count (`_LAPSED`; `Budget.gone`): a worker gone without a word (SIGKILL,
    its container removed, the OOM killer) keeps no capacity from the live ones."""
    read = client.pipeline(transaction=False)
    for channel in CHANNELS:
        read.eval(_LAPSED, 3, keys.senders(channel), keys.holders(channel),
                  keys.outstanding(channel), repr(now), keys.held(channel, ""))
        read.zremrangebyscore(keys.outstanding(channel), "-inf", now)
        read.zcard(keys.outstanding(channel))
        read.zrange(keys.senders(channel), 0, -1)
        read.get(keys.drained(channel))
        read.get(keys.busy(channel))
        read.hgetall(keys.stats(channel))
    replies = read.execute()
    out: dict[str, Budget] = {}
    write = client.pipeline(transaction=False)
    for i, channel in enumerate(CHANNELS):
        gone, _, outstanding, members, drained_raw, busy_raw, state = replies[7 * i: 7 * i + 7]
        senders = sum(int(m.rpartition("|")[2]) for m in members) or capacity.threads
        drained, busy = int(drained_raw or 0), float(busy_raw or 0.0)
        latency = float(state["latency"]) if state.get("latency") else None
        count = drained - int(state.get("drained", drained))
        if count > 0:
            sample = max(0.0, busy - float(state.get("busy", busy))) / count
            weight = 1.0 - math.exp(-count / LATENCY_MEMORY)
            latency = sample if latency is None else latency + (sample - latency) * weight
        write.hset(keys.stats(channel), mapping={
            "drained": str(drained), "busy": repr(busy),
            **({"latency": repr(latency)} if latency is not None else {})})
        if latency is None:
            window = 2 * senders
        else:
            window = math.ceil(senders * max(1.0, capacity.backlog_seconds / max(latency, 1e-3)))
        out[channel] = Budget(channel, senders, latency, int(outstanding), window,
                              registered=bool(members), gone=tuple(gone))
    write.execute()
    return out


@dataclass(frozen=True)
class Run:
    """What one pump run did: the claims it published, and when it began on Redis's clock
    (None: another run held the lock, and this one left the work to it); `again`: a run
    that found this one under way left its work to it (run again now); `measuring`: a
    channel whose latency is not measured yet had no room left and more of it is due (run
    again soon: its senders' first attempts say how much more they take)."""

    published: int
    began: float | None
    again: bool = False
    measuring: bool = False


def pump(store: Store, publish: Publish | None, *, capacity: Capacity, claim_round: int,
         publish_all: PublishAll | None = None) -> int:
    """Claim what each channel's senders can take and publish it in batches; return how many.

    `publish`: one batch at a time; or `publish_all`: all of a round's batches at once (the
    worker's). `claim_round`: most reminders one claim script takes at once. One run at a
    time: a run that finds another under way (a beat tick and a nudge together) leaves the
    work to it, since both would read the same budgets. (Two at once would still claim
    nothing twice; the lock only keeps them from handing out a window twice.)
    """
    return pump_run(store, publish, capacity=capacity, claim_round=claim_round,
                    publish_all=publish_all).published


def pump_run(store: Store, publish: Publish | None, *, capacity: Capacity, claim_round: int,
             publish_all: PublishAll | None = None) -> Run:
    """`pump`, saying also whether the run took the lock and when it began (`Run`)."""
    if publish_all is None:
        if publish is None:
            raise TypeError("pump_run needs publish or publish_all")
        publish_all = each(publish)
    keys = Keys(store.prefix)
    token = uuid.uuid4().hex
    lock_ms = RUN_LOCK_MS
    if not store.redis.eval(_TAKE, 2, keys.running(), keys.again(), token, lock_ms,
                            int(RUN_LOCK_KEEP_SECONDS * 1000)):
        return Run(0, None)
    # A run may outlast the lock (a publish or a Redis call that stalls): keep it while the
    # run goes on, or a second run would read the same budgets and hand out a window twice.
    done = threading.Event()
    keeper = threading.Thread(target=_keep_lock, args=(store, keys, token, lock_ms, done),
                              name="pump-lock", daemon=True)
    keeper.start()
    failed: Exception | None = None
    try:
        began = redis_time(store.redis)
        published, measuring = _pump(store, keys, publish_all, capacity, claim_round, began)
    except Exception as exc:
        failed = exc
    finally:
        done.set()
        keeper.join(lock_ms / 1000)  # an extend after the release finds no lock of ours
        asked = store.redis.eval(_RELEASE, 2, keys.running(), keys.again(), token)
    if failed is not None:
        # The release took a request to run again made meanwhile, failed run or not: pass
        # it on with the error (`asked_again`), or what it was for waits for beat's next tick.
        if asked:
            setattr(failed, _ASKED_AGAIN, True)
        raise failed
    return Run(published, began, again=bool(asked), measuring=measuring)


_ASKED_AGAIN = "reminders_pump_asked_again"


def asked_again(error: BaseException) -> bool:
    """Whether the pump run that raised `error` was asked to run again while under way
    (`Run.again`, which a run that fails has no answer to carry): its caller runs again
    now, as after a run that went well, not at beat's next tick."""
    return bool(getattr(error, _ASKED_AGAIN, False))


def next_due(store: Store, after: float) -> tuple[float, float | None]:
    """Return Redis's clock now and the first instant later than `after` at which the claim
    script would find something new (None: nothing): a reminder falling due (the due set,
    which holds the hand-backs and retries too) or a lease running out (the lease set).
    One read: Redis's TIME and the first member of each set past `after`.

    `after`: when the last run began (`Run.began`): what was due by then that run saw, and
    took or left (its channel had no room: the senders running dry ask for a run, see
    worker/tasks.py); what falls due after it, no run has seen yet.
    """
    read = store.redis.pipeline(transaction=False)
    read.time()
    for key in (store.due_key, store.lease_key):
        read.zrangebyscore(key, f"({after!r}", "+inf", start=0, num=1, withscores=True)
    (seconds, micros), *firsts = read.execute()
    now = float(seconds) + float(micros) / 1_000_000
    scores = [float(first[0][1]) for first in firsts if first]
    return now, min(scores, default=None)


def _keep_lock(store: Store, keys: Keys, token: str, lock_ms: int,
               done: threading.Event) -> None:
    """Extend the run lock every third of its TTL until `done`, while it is still ours, for
    at most RUN_LOCK_KEEP_SECONDS: a run hung longer must not keep every other pump out."""
    give_up = time.monotonic() + RUN_LOCK_KEEP_SECONDS
    while not done.wait(lock_ms / 3000) and time.monotonic() < give_up:
        try:
            if not store.redis.eval(_EXTEND, 1, keys.running(), token, lock_ms):
                return  # lost (expired during an outage): nothing left to keep
        except redis.RedisError:
            continue  # Redis unreachable: the lock runs out, as for a run that died


class Room:
    """What a run may still take of each channel: what fills its window (`wanted`) and,
    while another channel still wants some, up to a window more (`spare`): in a burst the
    channels are interleaved in the line, and taking a little more of one rather than
    handing it back costs a few seconds of its queue, not a claim and a hand-back each."""

    def __init__(self, budgets: dict[str, Budget]) -> None:
        self.wanted = {c: b.free for c, b in budgets.items()}
        self.spare = {c: min(b.window, max(0, 2 * b.window - b.outstanding))
                      for c, b in budgets.items()}

    def copy(self) -> Room:
        other = object.__new__(Room)
        other.wanted, other.spare = dict(self.wanted), dict(self.spare)
        return other

    def left(self) -> bool:
        return any(self.wanted.values())

    def take(self, channel: str) -> str:
        """Decide for one claim of `channel`: "wanted", "spare" (both handed out) or "pass"."""
        if self.wanted[channel] > 0:
            self.wanted[channel] -= 1
            return "wanted"
        others = any(n > 0 for c, n in self.wanted.items() if c != channel)
        if others and self.spare[channel] > 0:
            self.spare[channel] -= 1
            return "spare"
        return "pass"


def _pump(store: Store, keys: Keys, publish_all: PublishAll, capacity: Capacity,
          claim_round: int, now: float) -> tuple[int, bool]:
    """Return the claims published, and whether a channel not measured yet wants more
    (`Run.measuring`)."""
    found = budgets(store.redis, keys, capacity, now)
    _hand_back_gone(store, found)
    room = Room(found)
    if not room.left():
        return 0, _unmeasured_waiting(store, found, room, now, claim_round)
    pending: dict[str, list[Claim]] = {c: [] for c in CHANNELS}
    since: dict[str, float] = {}  # when the first of a channel's pending claims was claimed
    ready: list[Batch] = []  # full batches not handed out yet (at the next round, or the end)
    held: list[Claim] = []  # claimed for a channel with no budget left: handed back at the end
    claims: list[Claim] = []  # this round's claims; those from `sorted_up_to` on are in
    sorted_up_to = 0  # neither `pending` nor `held` yet (handed back if publishing fails)
    published = 0
    # Redis's clock before the claim script runs: no later than its lease's start, so a
    # safe instant to count the senders' start-by deadline from.
    claimed_at = now

    def hand_out() -> None:
        nonlocal published, ready
        batches, ready = ready, []
        if batches:
            _hand_out(store, keys, capacity, publish_all, batches)
            published += sum(len(b.claims) for b in batches)

    def batch_of(channel: Channel) -> None:
        if pending[channel]:
            ready.append(Batch(channel, pending[channel], since.pop(channel)))
            pending[channel] = []

    try:
        for _ in range(MAX_ROUNDS):
            if not room.left() or len(held) >= claim_round:
                break
            claimed_at = redis_time(store.redis)
            limit = _worth_claiming(store, room, claim_round - len(held), claimed_at)
            if limit == 0:
                break
            hand_out()  # the last round's full batches, before this round's claim script
            claims = store.claim_due(limit, capacity.lease_seconds)
            sorted_up_to = 0
            for index, claim in enumerate(claims):
                channel = channel_of(claim.ref)
                sorted_up_to = index + 1
                if room.take(channel) == "pass":
                    held.append(claim)
                    continue
                since.setdefault(channel, claimed_at)
                pending[channel].append(claim)
                if len(pending[channel]) >= capacity.batch_size:
                    batch_of(channel)
            if len(claims) < limit:
                break
        for channel in CHANNELS:
            batch_of(channel)
        hand_out()
        measuring = _unmeasured_waiting(store, found, room, claimed_at, claim_round)
    finally:
        # Left only if publishing failed: never leave a claim idle (nor the rest of the
        # round, which the failing batch cut short).
        stopped = "the pump stopped before handing it out"
        _hand_back(store, [c for b in ready for c in b.claims], stopped)
        for channel in CHANNELS:
            _hand_back(store, pending[channel], stopped)
        _hand_back(store, claims[sorted_up_to:], stopped)
        for channel in CHANNELS:
            # Due again when the senders should get to them, in order, at their pace: each
            # is taken once more, not at every run.
            mine = [c for c in held if channel_of(c.ref) == channel]
            budget = found[channel]
            why = HANDED_BACK if budget.senders else NO_SENDERS
            _hand_back(store, mine, why.format(channel=channel),
                       after=budget.room_in(capacity.backlog_seconds), pace=budget.pace)
    if published or held:
        log.info("pump: published %d claim(s)%s", published,
                 f"; {len(held)} handed back (their channel's senders are busy or gone)"
                 if held else "")
    return published, measuring


def _hand_back_gone(store: Store, found: dict[str, Budget]) -> None:
    """Hand back, due now, the claims held by senders whose registration lapsed (`Budget.gone`).

    Each hand-back is fenced by its claim as any (`Store.requeue`): it happens only while
    the reminder is still `sending` under that claim and no attempt of that claim holds the
    ledger. So a claim the gone process never began goes back and the next run hands it to
    the live senders; one it began (it may be at the provider: outcome unknown) is left to
    its ledger and lease, never sent beside it; one that finished meanwhile keeps its
    outcome. A process that was only slow (paused past its lapse) and goes on later finds
    the claims it had not begun no longer its own (its begin is fenced by the claim: the
    reminder was handed back, claimed again, sent or cancelled meanwhile) and drops them.
    Redis refusing the hand-back: the claims are left to their lease, as before."""
    gone = [Claim(ref, "", claim) for budget in found.values() for claim, _, ref in
            (m.partition("@") for m in budget.gone)]
    if not gone:
        return
    try:
        _hand_back(store, gone, GONE)
    except redis.RedisError as exc:
        log.warning("pump: could not hand back %d claim(s) of senders gone (%s): their lease "
                    "brings them back", len(gone), type(exc).__name__)
        return
    log.info("pump: senders gone (their registration lapsed) held %d claim(s): those not "
             "begun handed back to the schedule", len(gone))


def _unmeasured_waiting(store: Store, found: dict[str, Budget], room: Room, now: float,
                        look: int) -> bool:
    """Whether a channel whose latency is not measured yet, its senders registered, has no
    room left in this run and has more due among the next `look` in line (`now`: Redis's
    clock). Its window is the guess of two claims a thread until its senders' first
    attempts are measured; from then it follows their latency, and the next run hands out
    what that allows (`Run.measuring`)."""
    full = {c for c, b in found.items()
            if b.latency is None and b.registered and room.wanted[c] == 0}
    if not full:
        return False
    read = store.redis.pipeline(transaction=False)
    read.zrangebyscore(store.lease_key, "-inf", now, start=0, num=look)
    read.zrangebyscore(store.due_key, "-inf", now, start=0, num=look)
    return any(channel_of(ref) in full for refs in read.execute() for ref in refs)


def _worth_claiming(store: Store, room: Room, skip: int, now: float) -> int:
    """Return how many of the claims due next to take.

    A read-only look at what the claim script takes next (expired leases, then the due
    set, in that order): through the last one a channel with room wants, passing at most
    `skip` of channels without room. If none is reachable so, but one lies further on (up
    to PROBE_ROUNDS x skip), `skip`: passing that many moves the line on for the next run.
    `now`: Redis's clock.
    """
    look = sum(room.wanted.values()) + sum(room.spare.values()) + skip
    read = store.redis.pipeline(transaction=False)
    read.zrangebyscore(store.lease_key, "-inf", now, start=0, num=look)
    read.zrangebyscore(store.due_key, "-inf", now, start=0, num=look)
    expired, due = read.execute()
    trial = room.copy()
    worth = passed = 0
    for index, ref in enumerate([*expired, *due][:look]):
        decided = trial.take(channel_of(ref))
        if decided == "wanted":
            worth = index + 1
            if not trial.left():
                return worth
        elif decided == "pass":
            passed += 1
            if passed > skip:
                break
    if worth or passed <= skip or skip == 0:
        return worth
    # Only reminders of busy channels within reach: is one of a channel with room further on?
    wanted = {channel for channel, n in trial.wanted.items() if n > 0}
    for offset in range(len(due), PROBE_ROUNDS * skip, look):
        further = cast(list[str], store.redis.zrangebyscore(
            store.due_key, "-inf", now, start=offset, num=look))
        if any(channel_of(ref) in wanted for ref in further):
            return skip
        if len(further) < look:
            break
    return 0


def _hand_out(store: Store, keys: Keys, capacity: Capacity, publish_all: PublishAll,
              batches: Sequence[Batch]) -> None:
    """Count the batches' claims as outstanding (one pipeline), then publish them, one send
    task each (`publish_all`: one round trip for them all, the worker's)."""
    claims = [c for b in batches for c in b.claims]
    count = store.redis.pipeline(transaction=False)
    for batch in batches:
        until = batch.claimed_at + capacity.hold_seconds
        count.zadd(keys.outstanding(batch.channel), {member(c): until for c in batch.claims})
    try:
        count.execute()
    except redis.ResponseError:
        # Refused (out of memory since the claim, whose own writes may have filled Redis):
        # nothing published, so back now rather than after the lease (out of memory Redis
        # takes a hand-back: its script's first write removes the lease, growing nothing).
        # (Unreachable past the client's retries: a hand-back would fail too; the lease.)
        _uncount(store, keys, batches)
        _hand_back(store, claims, "Redis refused to count it as handed out")
        raise
    try:
        publish_all(batches)
    except Exception:
        # The broker refused all or some of them (Redis refusing writes, the connection
        # lost mid-pipeline): which went out is not known. Back now rather than after the
        # lease, each fenced by its claim: a task that went out finds its claim gone and is
        # dropped, unless it began first (then its hand-back does nothing).
        _uncount(store, keys, batches)
        _hand_back(store, claims, "the broker refused the task, or its answer was lost")
        raise


def _uncount(store: Store, keys: Keys, batches: Sequence[Batch]) -> None:
    """Take the batches' claims out of the outstanding sets (one round trip; best effort:
    a member left behind stops counting once its score passes)."""
    pipe = store.redis.pipeline(transaction=False)
    for batch in batches:
        pipe.zrem(keys.outstanding(batch.channel), *[member(c) for c in batch.claims])
    try:
        pipe.execute(raise_on_error=False)
    except redis.RedisError:
        pass


def _hand_back(store: Store, claims: Sequence[Claim], reason: str, after: float = 0.0,
               pace: float = 0.0) -> None:
    """Put claims back in the schedule, the first due `after` seconds from now, each next
    one `pace` seconds after the one before: one round trip for them all (each fenced by
    its claim as ever), since the run lock is held meanwhile. Raise the first error met,
    once every other claim was tried."""
    if not claims:
        return
    now = datetime.fromtimestamp(redis_time(store.redis), UTC)
    pipe = store.redis.pipeline(transaction=False)
    for index, claim in enumerate(claims):
        at = now + timedelta(seconds=after + index * pace)
        store.requeue_in(pipe, [(claim.ref, claim.claim)], at, reason)
    for answer in pipe.execute(raise_on_error=False):
        if isinstance(answer, Exception):
            raise answer
