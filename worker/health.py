"""Liveness evidence in Redis, and the checks that read it (`reminders health`, /healthz).

Two heartbeats, both HASHes stamped with Redis's own clock (so a checker on another host
with a skewed clock still reads the age right):

  P:health:pump   at, node, seconds   refreshed by every pump run (worker/tasks.py
                  `pump_now`), in whichever worker process ran it: a pump ran, so beat
                  ticks, the broker carries them and a worker consumes the pump queue
  P:health:beat   at, node            refreshed by Celery beat each time it has published a
                  pump tick (the `after_task_publish` signal, connected in the beat process
                  only, see `install_beat_heartbeat`): beat's own evidence, whether or not a
                  worker is there to run the tick

`reminders health --role worker` is healthy while the pump heartbeat is younger than
`Settings.heartbeat_max_age` (default max(30 s, 10 pump intervals)); `--role beat` while
beat's tick is. Neither looks at the broker's queues, so a busy or an idle broker makes no
difference. Both answer in one line (or `--json`), exit 0 healthy, 1 not: a Docker
healthcheck. Without `--role` it is `worker` (the CLI's default); `--role api` checks the
same pump heartbeat and Redis, as /healthz does: first that Redis takes writes, as /readyz
and /healthz do (`write_refusal`: PING and a short-lived key `P:health:api`; out of memory
under `noeviction`, a replica or short of replicas, Redis answers PING but refuses writes,
so the API serves no clinic request: "Redis refuses writes (OOM)"). Every role then adds a
line (`--json`: `redis_settings`) for each Redis setting that can lose or evict the schedule
(AOF off, appendfsync no, an evicting maxmemory-policy, a replica: worker/durability.py),
a warning that never makes it unhealthy: ops may run such a Redis on purpose.

Why the pump heartbeat for the worker: with one worker it is that worker's evidence; with
several, any of them running the pump refreshes it, so a single dead worker of many is not
seen here (its claims come back with their leases), but a service that stopped sending is.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

Role = Literal["worker", "beat", "api"]

# Stamp a heartbeat hash with Redis's clock: KEYS[1]; ARGV: field, value, ...
_STAMP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'at', string.format('%.6f', now), unpack(ARGV))
return 1
"""


# How Redis says it refuses writes; an error in a pipeline is prefixed by redis-py with
# "Command # N (...) of pipeline caused error: ", and a write refused inside a Lua script is
# quoted by Redis 6 as "Error running script (...): @user_script: N: -NOREPLICAS ...".
# NOREPLICAS: a master with `min-replicas-to-write` (the usual guard with Sentinel) and
# fewer replicas in sync. MASTERDOWN: a replica whose master link is down and that serves
# no stale data (`replica-serve-stale-data no`; a failover's old master for a moment)
# refuses every command, reads too, before running it: like the others, nothing done.
_REFUSES_WRITES = re.compile(r"(?:^|caused error: |@user_script: \d+: -)"
                             r"(MISCONF|OOM|READONLY|NOREPLICAS|MASTERDOWN)\b")
# Each refusal's own cause, in words for ops (`reminders`, /readyz, /healthz and `reminders
# health` name the one it is).
REFUSAL_CAUSE = {
    "OOM": "out of memory under noeviction",
    "MISCONF": "unable to persist (a failed RDB save or AOF write)",
    "READONLY": "a read-only replica",
    "NOREPLICAS": "short of the replicas min-replicas-to-write asks for",
    "MASTERDOWN": "a replica whose master is down (a failover under way)",
}
WRITE_PROBE_MS = 60_000  # life of the write probe's key
LOADING = ("Redis is loading its data (LOADING): it serves nothing until it has read its "
           "AOF or RDB file back; try again shortly")


def refused_write(exc: redis.ResponseError) -> str | None:
    """Which refusal of writes `exc` is ("OOM", "MISCONF", "READONLY", "NOREPLICAS",
    "MASTERDOWN"), or None."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, redis.exceptions.MasterDownError):
        return "MASTERDOWN"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "READONLY"
    found = _REFUSES_WRITES.search(str(exc))
    return found.group(1) if found else None


# A Lua script running past `busy-reply-threshold`: every other command is answered BUSY,
# not run, until it ends (or SCRIPT KILL).
_BUSY = re.compile(r"(?:^|caused error: )BUSY\b")


def busy(exc: redis.ResponseError) -> bool:
    """Whether `exc` is Redis's BUSY: a script is running; the command was not run."""
    return bool(_BUSY.search(str(exc)))


def not_run(exc: redis.ResponseError) -> str | None:
    """Which answer of Redis's that ran nothing `exc` is: a refusal of writes
    (`refused_write`: "OOM", "MISCONF", ...) or "BUSY" (another script running); or None.
    Sending the command again once Redis takes it is safe: nothing of it was done."""
    return refused_write(exc) or ("BUSY" if busy(exc) else None)


def api_probe_key(prefix: str) -> str:
    return f"{prefix}:health:api"


def write_refusal(client: redis.Redis, prefix: str) -> str | None:
    """Which refusal of writes Redis answers ("OOM", "MISCONF", "READONLY", "NOREPLICAS"),
    or None when it answers PING and takes a small write. PING alone does not tell: out of
    memory, a replica or short of replicas, Redis answers it (MISCONF refuses PING too).
    Any other error reply is raised, as are connection errors."""
    try:
        client.ping()
        client.set(api_probe_key(prefix), "1", px=WRITE_PROBE_MS)
    except redis.ResponseError as exc:
        why = refused_write(exc)
        if why is None:
            raise
        return why
    return None


def pump_key(prefix: str) -> str:
    return f"{prefix}:health:pump"


def beat_key(prefix: str) -> str:
    return f"{prefix}:health:beat"


def node_name() -> str:
    """Return this process's name in heartbeats: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def stamp(client: redis.Redis, key: str, **fields: str) -> None:
    """Refresh a heartbeat hash with Redis's clock and `fields`."""
    args: list[str] = []
    for name, value in fields.items():
        args += [name, value]
    client.eval(_STAMP, 1, key, *args)


def pump_beat(client: redis.Redis, prefix: str, seconds: float) -> None:
    """Record that a pump run just ended (it took `seconds`)."""
    stamp(client, pump_key(prefix), node=node_name(), seconds=f"{seconds:.6f}")


def age_of(client: redis.Redis, key: str) -> tuple[float | None, dict[str, str]]:
    """Return (age in seconds by Redis's clock or None if never stamped, the hash)."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(key)
    (seconds, micros), raw = pipe.execute()
    fields = {_s(k): _s(v) for k, v in cast(dict[Any, Any], raw).items()}
    if "at" not in fields:
        return None, fields
    return max(0.0, seconds + micros / 1_000_000 - float(fields["at"])), fields


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # one line
    details: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "status": self.reason, **self.details}


def _heartbeat(client: redis.Redis, key: str, what: str, limit: float, hint: str) -> Verdict:
    age, fields = age_of(client, key)
    details: dict[str, Any] = {"age_seconds": None if age is None else round(age, 3),
                               "max_age_seconds": limit, "node": fields.get("node")}
    if age is None:
        return Verdict(False, f"no {what} recorded yet; {hint}", details)
    if age > limit:
        return Verdict(False, f"the last {what} was {age:.0f}s ago (limit {limit:g}s); {hint}",
                       details)
    return Verdict(True, f"ok: the last {what} was {age:.1f}s ago", details)


def check(client: redis.Redis, prefix: str, role: Role, max_age: float) -> Verdict:
    """Return the health of `role` from its heartbeat (Redis errors are the caller's);
    `api`: unhealthy first if Redis refuses writes (`write_refusal`), as /readyz is."""
    if role == "api" and (why := write_refusal(client, prefix)):
        return Verdict(False, f"Redis refuses writes ({why}): {REFUSAL_CAUSE[why]}",
                       {"redis": "refuses writes"})
    if role == "beat":
        return _heartbeat(client, beat_key(prefix), "beat tick published", max_age,
                          "is celery beat running and can it reach the broker?")
    return _heartbeat(client, pump_key(prefix), "pump run", max_age,
                      "are beat and a worker taking the reminders.pump queue running?")


def evaluate(client: redis.Redis, prefix: str, role: Role, max_age: float) -> Verdict:
    """`check` on a short-lived client (worker/connections.py PROBE: it is closed after);
    an unreachable Redis is unhealthy. The details add `redis_settings`: each setting that
    can lose or evict the schedule (worker/durability.py), which never makes it unhealthy."""
    from .durability import findings_of

    try:
        verdict = check(client, prefix, role, max_age)
        settings = [f.as_json() for f in findings_of(client)]
        return Verdict(verdict.healthy, verdict.reason,
                       {**verdict.details, "redis_settings": settings})
    except redis.exceptions.BusyLoadingError:  # a ConnectionError, of a Redis that answers
        return Verdict(False, LOADING, {"redis": "unreachable"})
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return Verdict(False, f"Redis is unreachable ({type(exc).__name__})",
                       {"redis": "unreachable"})
    except redis.RedisError as exc:  # an error reply (NOPERM, MASTERDOWN, WRONGTYPE...)
        return Verdict(False, f"Redis answered an error ({error_detail(exc)})",
                       {"redis": "error"})
    finally:
        client.close()


_ERROR_CODE = re.compile(r"(?:^|caused error: )([A-Z][A-Z_-]{1,30})\b")


def error_name(exc: Exception) -> str:
    """`ResponseError WRONGTYPE`: the class and Redis's error code, never the message (a
    pipelined command's quotes its arguments)."""
    found = _ERROR_CODE.search(str(exc))
    return type(exc).__name__ + (f" {found.group(1)}" if found else "")


# NOPERM's message: "User <name> has no permissions to run the '<command>' command".
_DENIED_COMMAND = re.compile(r"no permissions to run the '([a-z|_-]{1,40})' command")


# NOPERM for a key outside the user's key patterns, and a denial inside a Lua script, which
# Redis 7 answers without the NOPERM code ("The user executing the script can't run this
# command or subcommand script: <sha>, on @user_script:1.", "... can't access at least one
# of the keys ...").
_DENIED_KEY = re.compile(r"no permissions to access (?:a|one of the) key|"
                         r"can't access at least one of the keys")
_DENIED_IN_SCRIPT = re.compile(r"The user executing the script can't")


def acl_denied(exc: Exception) -> bool:
    """Whether `exc` is Redis's ACL denying the user a command, a key or a channel (NOPERM,
    in a pipeline or a Lua script too): a deployment to fix, not a bug of ours."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and bool(_DENIED_IN_SCRIPT.search(str(exc))))


def error_detail(exc: Exception) -> str:
    """`error_name`, and for NOPERM what the ACL denies ("NoPermissionError: 'ping'
    denied", "NoPermissionError: a key denied", "NOPERM in a Lua script"): what ops must
    grant. Never the user's name, a key or an argument."""
    text = str(exc)
    found = _DENIED_COMMAND.search(text)
    if found:
        return error_name(exc) + f": '{found.group(1)}' denied"
    if _DENIED_IN_SCRIPT.search(text):
        what = "a key" if _DENIED_KEY.search(text) else "a command or a key"
        return f"{error_name(exc)} NOPERM: {what} of a Lua script denied (grant @scripting's " \
               "commands and the key prefix's keys)"
    if _DENIED_KEY.search(text):
        return error_name(exc) + ": a key denied (the ACL user's key patterns)"
    return error_name(exc)


# --- beat's heartbeat -------------------------------------------------------------------

_beat_client: redis.Redis | None = None
_beat_last = 0.0
BEAT_STAMP_EVERY = 0.5  # seconds: at most this often, however often beat publishes


def install_beat_heartbeat() -> None:
    """In the beat process: stamp beat's heartbeat after each pump tick it published."""
    from celery.signals import after_task_publish, beat_init

    def on_beat_init(**_: object) -> None:
        after_task_publish.connect(on_published, weak=False)

    def on_published(sender: str | None = None, **_: object) -> None:
        if sender == "reminders.pump":
            beat_alive()

    beat_init.connect(on_beat_init, weak=False)


def beat_client() -> redis.Redis:
    """Return the beat process's Redis client for its own checks (made once; PROBE)."""
    global _beat_client
    if _beat_client is None:
        from .connections import PROBE, client
        from .settings import get_settings

        _beat_client = client(get_settings(), PROBE, decode=False)
    return _beat_client


def beat_alive() -> None:
    """In the beat process: stamp beat's heartbeat (at most every BEAT_STAMP_EVERY): it
    published a pump tick, or found ticks waiting unrun and left them to the workers."""
    global _beat_last
    now = time.monotonic()
    if now - _beat_last < BEAT_STAMP_EVERY:
        return
    _beat_last = now
    from .settings import get_settings

    try:
        stamp(beat_client(), beat_key(get_settings().key_prefix), node=node_name())
    except redis.RedisError:
        pass  # a heartbeat missed is seen as such by the check
