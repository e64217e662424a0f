"""Every Redis client the service makes is made here: from one URL, or through Sentinel.

Two ways to reach Redis (worker/settings.py):
  REMINDERS_REDIS_URL               one Redis (unset: the embedded default of `reminders run`)
  REMINDERS_REDIS_SENTINELS         host:port,host:port,... of Redis Sentinels, and
  REMINDERS_REDIS_SENTINEL_MASTER   the name they monitor: every client asks them for the
                                    current master, so a failover is followed by all: the
                                    schedule store, the Celery broker, the API, the health
                                    checks. With Sentinel, REMINDERS_REDIS_URL (if set) gives
                                    only the database number, user name and password.

With Sentinel each new connection asks a sentinel for the master (redis-py's
`Sentinel.master_for`; kombu's `sentinel://` transport for the broker, see worker/broker.py),
and a connection that finds the old master gone, or demoted to a replica (READONLY), is
dropped and made again: the retries below ride out the failover (Sentinel promotes a
replica within seconds of `down-after-milliseconds`).

With a plain URL, a failover that moves the URL's name (a managed Redis's endpoint, a DNS
name or a virtual IP ops flip) leaves the old master, now a replica, holding the connections
made before: every command on them answers READONLY (or MASTERDOWN) for good, and redis-py
makes a new connection only when its pool has none free. So a connection that was answered
READONLY or MASTERDOWN is made again before its next command (`_Demotable`): the caller's
own try again (worker/dispatch.py `durably`: the record of a delivery; the pump's next run;
a clinic's request sent again) reaches whatever the name points at now. (The answer itself
stays the caller's: a Redis that is a replica for good says so at once, as before.)

Profiles (how long a caller waits for Redis):
  WORKER  the send path, the pump, the CLI: connection errors retried for about 30 s
  API     a clinic waits on an HTTP answer: about a second, then 503 with Retry-After
  PROBE   health checks: one try, 2 s timeouts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from .settings import Settings

SENTINEL_TIMEOUT = 1.0  # seconds: a sentinel that does not answer is passed over quickly


@dataclass(frozen=True)
class Profile:
    retries: int
    backoff_base: float
    backoff_cap: float
    connect_timeout: float
    socket_timeout: float
    health_check_interval: int = 0


WORKER = Profile(retries=25, backoff_base=0.05, backoff_cap=2.0, connect_timeout=5,
                 socket_timeout=30, health_check_interval=30)
API = Profile(retries=2, backoff_base=0.05, backoff_cap=0.5, connect_timeout=1, socket_timeout=5)
PROBE = Profile(retries=0, backoff_base=0.0, backoff_cap=0.0, connect_timeout=2,
                socket_timeout=2)


def _options(profile: Profile, decode: bool) -> dict[str, Any]:
    backoff = (ExponentialWithJitterBackoff(base=profile.backoff_base, cap=profile.backoff_cap)
               if profile.retries else NoBackoff())
    options: dict[str, Any] = {
        "decode_responses": decode,
        "retry": Retry(backoff, retries=profile.retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "socket_connect_timeout": profile.connect_timeout,
        "socket_timeout": profile.socket_timeout,
    }
    if profile.health_check_interval:
        options["health_check_interval"] = profile.health_check_interval
    return options


class _Demotable:
    """A connection made again before its next command once Redis answered it READONLY or
    MASTERDOWN (see the module docstring). Not at once: the replies of a pipeline's other
    commands are still to be read on it."""

    _demoted = False

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError):
            self._demoted = True
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._demoted:
            self._demoted = False
            self.disconnect()  # type: ignore[attr-defined]  # the next line connects again
        super().send_packed_command(command, check_health)  # type: ignore[misc]


_DEMOTABLE: dict[type, type] = {
    base: type(f"Demotable{base.__name__}", (_Demotable, base), {})
    for base in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)}


def from_url(url: str, profile: Profile = WORKER, *, decode: bool = True) -> redis.Redis:
    """Return a client of the Redis at `url` (tests, benchmarks, the embedded default)."""
    base = parse_url(url).get("connection_class", redis.Connection)  # type: ignore[no-untyped-call]
    return redis.Redis.from_url(url, connection_class=_DEMOTABLE.get(base, base),
                                **_options(profile, decode))


def _credentials(settings: Settings) -> dict[str, Any]:
    """The database, user name and password from REMINDERS_REDIS_URL (with Sentinel)."""
    if settings.redis_url is None:
        return {"db": 0}
    parsed: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
        settings.redis_url.get_secret_value())
    return {k: parsed[k] for k in ("db", "username", "password") if parsed.get(k) is not None} \
        | {"db": int(parsed.get("db", 0) or 0)}


def client(settings: Settings, profile: Profile = WORKER, *, decode: bool = True) -> redis.Redis:
    """Return a client of the service's Redis: the Sentinel master, or the URL's Redis."""
    addresses = settings.sentinel_addresses
    if not addresses:
        from .embedded import redis_url

        return from_url(redis_url(settings), profile, decode=decode)
    options = _options(profile, decode) | _credentials(settings)
    sentinel_timeout = min(SENTINEL_TIMEOUT, profile.socket_timeout)
    sentinel = Sentinel(addresses, sentinel_kwargs={  # type: ignore[no-untyped-call]
        "socket_timeout": sentinel_timeout, "socket_connect_timeout": sentinel_timeout})
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, **options)
    return master


def broker(settings: Settings) -> tuple[str, str, dict[str, Any]]:
    """Return Celery's broker URL, its transport (worker/broker.py) and the transport options
    that depend on how Redis is reached."""
    addresses = settings.sentinel_addresses
    if not addresses:
        from .embedded import redis_url

        return redis_url(settings), "worker.broker:Transport", {}
    creds = _credentials(settings)
    auth = ""
    if creds.get("password") is not None:
        auth = f"{quote(creds.get('username') or '', safe='')}:" \
               f"{quote(creds['password'], safe='')}@"
    urls = [f"sentinel://{auth}{host}:{port}/{creds['db']}" for host, port in addresses]
    return ";".join(urls), "worker.broker:SentinelTransport", {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT,
                            "socket_connect_timeout": SENTINEL_TIMEOUT},
    }


def broker_transport_options(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """Celery's `broker_transport_options` for the service's broker: the worker's and beat's
    app (worker/celery_app.py) and the API's pump nudges (worker/nudge.py) alike, so that
    both reach the same queues. `options`: the third of `broker`'s answer."""
    return {
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        "global_keyprefix": f"{settings.key_prefix}:celery:",
        **options,
    }


def describe(settings: Settings) -> str:
    """Where Redis is, for logs and errors (no password)."""
    addresses = settings.sentinel_addresses
    if addresses:
        where = ",".join(f"{host}:{port}" for host, port in addresses)
        return f"Sentinel master {settings.redis_sentinel_master!r} via {where}"
    if settings.redis_url is None:
        return "the embedded default"
    parsed: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
        settings.redis_url.get_secret_value())
    return f"redis://{parsed.get('host', '?')}:{parsed.get('port', 6379)}/{parsed.get('db', 0)}"
