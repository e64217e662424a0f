"""Whether Redis is configured to keep the schedule: persistence, eviction, a master.

The schedule, the send ledger and Celery's queues all live in Redis (DESIGN.md "Store"), so
the product asks of it (README "Redis requirements"):

  appendonly yes                without AOF a restart goes back to the last RDB snapshot:
                                reminders sent since are sent again, bookings stored since
                                are lost; with no save point, the whole schedule is lost
  appendfsync everysec|always   `no` leaves it to the OS when the AOF reaches the disk
                                (tens of seconds of writes lost in a crash)
  maxmemory-policy noeviction   any other evicts keys once memory is full: volatile-* the
                                keys with a TTL (every booking's, the send ledger's),
                                allkeys-* any key (the due set, Celery's queues); under
                                noeviction writes fail loudly (OOM) instead
  a master                      a replica refuses writes, or (replica-read-only no) takes
                                writes its next sync throws away

`read_settings` asks CONFIG GET and INFO replication in one round trip; where CONFIG is
refused (managed Redis renames or forbids it) it reads INFO persistence and memory
(aof_enabled, maxmemory_policy), and what neither shows (appendfsync) "could not be read".
`findings` is the rule, pure. None of it is fatal (ops may choose otherwise on purpose, a
throw-away staging Redis): `reminders check --redis` warns, `reminders health` adds a line,
/readyz and /healthz a field (without a replica's master's address: they need no key), a
starting worker logs it (worker/tasks.py), the metrics give it (worker/metrics.py
`redis_keeping`, with keys evicted and memory used; deploy/prometheus/alerts.yml alerts on
them), and no exit code or status changes for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

REQUIRED = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
SAFE_FSYNC = ("everysec", "always")
_CONFIG = ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")


@dataclass(frozen=True)
class RedisSettings:
    """What Redis said of each setting (None: could not be read, `unread` says why)."""

    appendonly: str | None
    appendfsync: str | None
    maxmemory_policy: str | None
    maxmemory: str | None
    role: str | None  # "master" or "replica"
    master: str | None  # a replica's master, host:port
    unread: str  # why a None was not read, e.g. "CONFIG refused: ResponseError ERR"


@dataclass(frozen=True)
class Finding:
    """One setting that can lose or evict the schedule, or that could not be read."""

    setting: str
    value: str | None  # None: could not be read
    problem: str  # one line naming the setting, what it costs and the fix

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _why(exc: Exception) -> str:
    from .health import error_name  # the class and Redis's error code, never the message

    return error_name(exc)


def read_settings(client: redis.Redis) -> RedisSettings:
    """Read the settings `findings` judges; connection errors are the caller's."""
    pipe = client.pipeline(transaction=False)
    for name in _CONFIG:
        pipe.config_get(name)
    pipe.info("replication")
    *answers, replication = pipe.execute(raise_on_error=False)
    values: dict[str, str | None] = {}
    unread = ""
    for name, answer in zip(_CONFIG, answers, strict=True):
        if isinstance(answer, Exception):
            values[name], unread = None, f"CONFIG refused: {_why(answer)}"
        else:
            found = {_s(k): _s(v) for k, v in answer.items()}
            values[name] = found.get(name)
    if None in values.values():  # managed Redis: INFO shows some of it
        pipe = client.pipeline(transaction=False)
        pipe.info("persistence")
        pipe.info("memory")
        persistence, memory = pipe.execute(raise_on_error=False)
        if isinstance(persistence, Exception):
            unread += f"; INFO refused: {_why(persistence)}"
        elif values["appendonly"] is None and "aof_enabled" in persistence:
            values["appendonly"] = "yes" if int(persistence["aof_enabled"]) else "no"
        if isinstance(memory, Exception):
            unread += f"; INFO refused: {_why(memory)}"
        else:
            if values["maxmemory-policy"] is None and "maxmemory_policy" in memory:
                values["maxmemory-policy"] = _s(memory["maxmemory_policy"])
            if values["maxmemory"] is None and "maxmemory" in memory:
                values["maxmemory"] = _s(memory["maxmemory"])
    role = master = None
    if not isinstance(replication, Exception):
        role = "replica" if replication.get("role") == "slave" else _s(replication.get("role"))
        if role == "replica":
            master = f"{replication.get('master_host')}:{replication.get('master_port')}"
    return RedisSettings(values["appendonly"], values["appendfsync"], values["maxmemory-policy"],
                         values["maxmemory"], role, master, unread or "not shown")


def findings(settings: RedisSettings) -> list[Finding]:
    """Return each setting of `settings` that can lose or evict the schedule (or could not
    be read), with what it costs and the fix; none when Redis keeps the schedule."""
    out: list[Finding] = []

    def unread(name: str) -> None:
        out.append(Finding(name, None, (
            f"{name} could not be read ({settings.unread}; INFO does not show it): make sure "
            f"it is {REQUIRED[name]} in your Redis's settings")))

    if settings.appendonly is None:
        unread("appendonly")
    elif settings.appendonly != "yes":
        out.append(Finding("appendonly", settings.appendonly, (
            f"appendonly is {settings.appendonly}: a restart goes back to the last RDB "
            "snapshot (reminders sent since are sent again, bookings stored since are lost; "
            "with no save point the whole schedule is lost); set appendonly yes (redis.conf, "
            "or CONFIG SET appendonly yes and CONFIG REWRITE)")))
    if settings.appendonly != "no":  # without AOF, how it is synced does not matter
        if settings.appendfsync is None:
            unread("appendfsync")
        elif settings.appendfsync not in SAFE_FSYNC:
            out.append(Finding("appendfsync", settings.appendfsync, (
                f"appendfsync is {settings.appendfsync}: the OS decides when the AOF reaches "
                "the disk, and a crash loses tens of seconds of writes (sends recorded in them "
                "are sent again); set appendfsync everysec")))
    policy = settings.maxmemory_policy
    if policy is None:
        unread("maxmemory-policy")
    elif policy != "noeviction":
        which = ("any key (the due set, the send ledger, Celery's queues)"
                 if policy.startswith("allkeys") else
                 "keys with a TTL (every booking's records and send ledger entries carry one)")
        unlimited = (" (no maxmemory is set now: nothing is evicted until one is)"
                     if settings.maxmemory == "0" else "")
        out.append(Finding("maxmemory-policy", policy, (
            f"maxmemory-policy is {policy}: once memory is full Redis evicts {which}, so "
            f"reminders vanish unsent or are sent twice{unlimited}; set maxmemory-policy "
            "noeviction (writes then fail loudly, OOM) and size Redis for the pending set")))
    if settings.role == "replica":
        out.append(Finding("role", "replica", (
            "role is replica: it refuses writes, or takes writes its next sync throws "
            f"away; point REMINDERS_REDIS_URL at its master"
            f"{f' ({settings.master})' if settings.master else ''}, or use "
            "REMINDERS_REDIS_SENTINELS")))
    return out


def summary(settings: RedisSettings) -> str:
    """The line said when no finding is: the settings as read."""
    return (f"appendonly {settings.appendonly}, appendfsync {settings.appendfsync}, "
            f"maxmemory-policy {settings.maxmemory_policy}, "
            f"{'a ' + settings.role if settings.role else 'role not read'}: "
            "the schedule survives a restart and is never evicted")


def findings_of(client: redis.Redis, *, addresses: bool = True) -> list[Finding]:
    """`findings` of the Redis `client` reaches; a Redis error (the connection lost, an
    ACL refusing the pipeline) is one finding, never raised: health must not fail on it.
    `addresses=False`: no internal address in them (a replica's master is not named), for
    answers given without a key (/readyz, /healthz); ops' own tools name it."""
    try:
        read = read_settings(client)
        return findings(read if addresses else replace(read, master=None))
    except redis.RedisError as exc:
        return [Finding("settings", None, f"settings could not be read ({_why(exc)}): make "
                        "sure of appendonly yes, appendfsync everysec, maxmemory-policy "
                        "noeviction")]
