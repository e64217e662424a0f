"""The pump: hand reminders that are due now to the senders, no ETA, no more than they can take.

Run by Celery beat every `pump_interval_seconds`, and again when a channel's senders ran
out of work (a nudge, see worker/tasks.py). Claiming is one Lua script on Redis's own clock,
so any number of pumps may run at once without double claims.

Claims follow what the senders can absorb, per channel. A claim is leased: if it waits in
a queue until its lease runs out, the pump claims it again and the first task is only
dropped later as stale, so the pump never hands out more than the senders can start soon:

  outstanding(c)  claims of channel c handed out and not yet settled (sent, retried, handed
                  back, dropped): a sorted set per channel, one member per claim, added
                  before the task is published and removed by the worker once the claim is
                  settled; a member also leaves when its score (the latest it may still be
                  running) passes, so a killed worker's claims stop counting on their own.
  rate(c)         claims of channel c begun (or dropped) per second, measured between
                  pump runs while the channel had work (a moving average; kept while idle).
  window(c)       max(2 x send_threads, rate(c) x send_backlog_seconds): a few seconds of
                  work, and never less than keeps one process's senders busy twice over.
  budget(c)       window(c) - outstanding(c): what this run may claim for channel c.

Counting claims in our own set rather than the queue's length (LLEN of the kombu list)
also counts the batches a worker has already taken and is sending, which LLEN cannot see.
A burst ramps up within a few runs: every nudge measures the rate again.

`Store.claim_due` claims whatever is due first, whatever its channel (the channel is the
suffix of the reminder key: "<clinic>/<booking_id>/<step>[#n]:<channel>"). A claim for a
channel whose budget is spent is held until the end of the run and then handed back to
the schedule (`Store.requeue`, due now), so a slow channel's backlog never keeps the
other channel's reminders from being claimed. A run stops after it has held
`pump_batch` such claims. (A store method claiming per channel would make this needless.)

Each channel's claims go out in batches of at most `send_batch_size`, one Celery task per
batch on the channel's own queue (`publish`), with the instant they were claimed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from .models import CHANNELS, Channel
from .store import Claim, Store

log = logging.getLogger(__name__)
MAX_ROUNDS = 20  # bound one pump run; the next beat tick picks up the rest
RATE_TIME_CONSTANT = 2.0  # seconds: how fast the measured drain rate follows a change
HANDED_BACK = "the {channel} senders are busy: handed back to the schedule"

Publish = Callable[[Channel, Sequence[Claim], float], None]


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
    """The pump's own keys, next to the store's: per channel, outstanding claims and rates."""

    prefix: str

    def outstanding(self, channel: str) -> str:
        return f"{self.prefix}:send:out:{channel}"

    def drained(self, channel: str) -> str:
        return f"{self.prefix}:send:done:{channel}"

    def rate(self, channel: str) -> str:
        return f"{self.prefix}:send:rate:{channel}"


@dataclass(frozen=True)
class Capacity:
    """How the pump sizes what it hands out (from the settings)."""

    lease_seconds: int
    batch_size: int  # most claims in one send task
    threads: int  # senders per channel in one worker process: twice this, the least window
    backlog_seconds: float  # the window is this many seconds of the measured drain rate
    hold_seconds: float  # an outstanding claim stops counting this long after its claim


@dataclass(frozen=True)
class Budget:
    channel: Channel
    outstanding: int
    rate: float
    window: int

    @property
    def free(self) -> int:
        return max(0, self.window - self.outstanding)


def budgets(client: redis.Redis, keys: Keys, capacity: Capacity, now: float) -> dict[str, Budget]:
    """Return each channel's budget now, and record the drain rate measured since last run."""
    read = client.pipeline(transaction=False)
    for channel in CHANNELS:
        read.zremrangebyscore(keys.outstanding(channel), "-inf", now)
        read.zcard(keys.outstanding(channel))
        read.get(keys.drained(channel))
        read.hgetall(keys.rate(channel))
    replies = read.execute()
    out: dict[str, Budget] = {}
    write = client.pipeline(transaction=False)
    for i, channel in enumerate(CHANNELS):
        _, outstanding, settled_raw, state = replies[4 * i: 4 * i + 4]
        settled = int(settled_raw or 0)
        rate = float(state.get("rate", 0.0))
        last_at, last_settled = float(state.get("at", 0.0)), int(state.get("settled", settled))
        busy = int(state.get("outstanding", 0)) > 0
        elapsed = now - last_at
        if busy and 0 < elapsed < 3600 and settled >= last_settled:
            # Settled per second while there was work: what the senders drain.
            measured = (settled - last_settled) / elapsed
            weight = 1.0 - math.exp(-elapsed / RATE_TIME_CONSTANT)
            rate += (measured - rate) * weight
        write.hset(keys.rate(channel), mapping={
            "rate": repr(rate), "at": repr(now), "settled": str(settled),
            "outstanding": str(outstanding)})
        window = max(2 * capacity.threads, math.ceil(rate * capacity.backlog_seconds))
        out[channel] = Budget(channel, int(outstanding), rate, window)
    write.execute()
    return out


def pump(store: Store, publish: Publish, *, capacity: Capacity, claim_round: int) -> int:
    """Claim what each channel's senders can take and publish it in batches; return how many.

    `claim_round`: most reminders one claim script takes at once.
    """
    keys = Keys(store.prefix)
    now = time.time()
    free = {c: b.free for c, b in budgets(store.redis, keys, capacity, now).items()}
    if not any(free.values()):
        return 0
    pending: dict[str, list[Claim]] = {c: [] for c in CHANNELS}
    held: list[Claim] = []  # claimed for a channel with no budget left: handed back at the end
    published = 0
    claimed_at = time.time()  # no later than the lease's start in Redis: a safe deadline

    def flush(channel: Channel, claims: list[Claim]) -> None:
        nonlocal published
        if not claims:
            return
        _hand_out(store, keys, capacity, publish, channel, claims, claimed_at)
        published += len(claims)

    try:
        for _ in range(MAX_ROUNDS):
            limit = min(claim_round, sum(free.values()))
            if limit == 0 or len(held) >= claim_round:
                break
            claimed_at = time.time()
            claims = store.claim_due(limit, capacity.lease_seconds)
            for claim in claims:
                channel = channel_of(claim.ref)
                if free[channel] > 0:
                    free[channel] -= 1
                    pending[channel].append(claim)
                    if len(pending[channel]) >= capacity.batch_size:
                        batch, pending[channel] = pending[channel], []
                        flush(channel, batch)
                else:
                    held.append(claim)
            if len(claims) < limit:
                break
        for channel in CHANNELS:
            batch, pending[channel] = pending[channel], []
            flush(channel, batch)
    finally:
        for channel in CHANNELS:  # left only if publishing failed: never leave a claim idle
            _hand_back(store, pending[channel], "the pump stopped before handing it out")
        for claim in held:
            _hand_back(store, [claim], HANDED_BACK.format(channel=channel_of(claim.ref)))
    if published or held:
        log.info("pump: published %d claim(s)%s", published,
                 f"; {len(held)} handed back (their channel's senders are busy)" if held else "")
    return published


def _hand_out(store: Store, keys: Keys, capacity: Capacity, publish: Publish, channel: Channel,
              claims: list[Claim], claimed_at: float) -> None:
    """Count the claims as outstanding, then publish them as one send task."""
    until = claimed_at + capacity.hold_seconds
    store.redis.zadd(keys.outstanding(channel), {member(c): until for c in claims})
    try:
        publish(channel, claims, claimed_at)
    except Exception:
        # The broker refused: hand them back now rather than after the lease.
        store.redis.zrem(keys.outstanding(channel), *[member(c) for c in claims])
        _hand_back(store, claims, "the broker refused the task")
        raise


def _hand_back(store: Store, claims: Sequence[Claim], reason: str) -> None:
    if not claims:
        return
    now = datetime.now(UTC)
    for claim in claims:
        store.requeue(claim.ref, now, reason, claim=claim.claim)
