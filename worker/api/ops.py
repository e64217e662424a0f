"""For ops, without a key: health (Redis and the pump), readiness, Prometheus metrics.

`/healthz` is the whole service's health: Redis answers; the pump's heartbeat (stamped by
every pump run, worker/health.py) is younger than `Settings.heartbeat_max_age` (default
max(30 s, 10 pump intervals)), so beat ticks and a worker runs them; and the pump keeps up:
the oldest reminder waiting in the due set is at most `max(30 s, 10 pump intervals)`
overdue. `pump` says `never` (no run recorded), `stale`, `behind` or `ok`. `/readyz` is
this API process's readiness: Redis answers and takes writes (the compose healthcheck of
the api service: an API is worth serving while beat is down). Both answer 503 with
`Retry-After` when not; `"redis": "refuses writes"` when Redis answers but refuses writes
(OOM under `noeviction`, MISCONF, a read-only replica): every keyed route writes first
(the rate limiter's token), so the API then serves no clinic request, reads included.
Writes are probed with a short-lived key, `P:health:api`, and the rate limiter's Lua script
(on its own bucket, `P:ratelimit:health-probe`), which every keyed request runs first. Any
other error reply to a check's command (NOPERM: the ACL user lacks it, `@scripting` say;
WRONGTYPE...) is a 503 too, `"redis": "error"`,
naming the error (and the command NOPERM denies), logged at WARNING. A Redis reading its
data back at start (LOADING) is "unreachable" too, its status saying it is loading, and so is
one refusing the API's password (AuthenticationError), its status saying so.
When they answer 200 both add
`redis_settings`: each Redis setting that can lose or evict the schedule (AOF off, appendfsync
no, an evicting maxmemory-policy, a replica; worker/durability.py), a warning, never a 503;
"connected to a replica" without its master's host and port (no key is asked here: internal
addresses are for `reminders health` and the logs).
`/metrics` is the API's requests and the schedule's figures (worker/metrics.py).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from ..durability import findings_of
from ..health import LOADING, REFUSAL_CAUSE, check, error_detail, refused_write, write_refusal
from .errors import REDIS_RETRY_AFTER_SECONDS
from .metrics import CONTENT_TYPE
from .schemas import Health
from .services import Svc

log = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])
_HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"model": Health}, 503: {"model": Health, "description": "not healthy"}}


def _answer(body: dict[str, Any], healthy: bool) -> JSONResponse:
    if healthy:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503,
                        headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)})


def pump_lag_limit(pump_interval_seconds: float) -> float:
    return max(30.0, 10 * pump_interval_seconds)


# The rate limiter's bucket the checks take a token of: what every keyed request runs first.
PROBE_KEY_ID = "health-probe"


def refuses_writes(svc: Svc) -> str | None:
    """Which refusal of writes Redis answers ("OOM", "MISCONF", "READONLY", "NOREPLICAS"),
    or None when it answers PING and takes a small write (worker/health.py
    `write_refusal`, which `reminders health --role api` asks too), and runs the rate
    limiter's Lua script, which every keyed request runs first: an ACL user without
    `@scripting` (a "+@read +@write" user) answers PING and SET, but no clinic request
    (NOPERM, raised: `_error_reply`)."""
    if why := write_refusal(svc.redis, svc.settings.key_prefix):
        return why
    try:
        svc.limiter.take(PROBE_KEY_ID)
    except redis.ResponseError as exc:
        if (why := refused_write(exc)) is None:
            raise
        return why
    return None


CREDENTIALS = ("Redis refuses this service's credentials (AuthenticationError): a wrong user "
               "or password in REMINDERS_REDIS_URL, or its ACL user disabled")


def _unreachable(route: str, exc: redis.RedisError) -> JSONResponse:
    """Not serving: down, or (LOADING) reading its data back at start, which answers but
    serves nothing yet, or refusing the credentials, logged at WARNING (redis-py's
    AuthenticationError is a ConnectionError): "redis": "unreachable" each."""
    if isinstance(exc, redis.AuthenticationError):
        log.warning("%s: %s", route, CREDENTIALS)
        status = CREDENTIALS
    elif isinstance(exc, redis.exceptions.BusyLoadingError):
        status = LOADING
    else:
        status = "Redis is unreachable"
    return _answer({"status": status, "redis": "unreachable"}, False)


def _error_reply(route: str, exc: redis.RedisError) -> JSONResponse:
    """Redis answered a check's command with an error reply that is no refusal of writes:
    NOPERM (the ACL user lacks a command the check runs), WRONGTYPE... (MASTERDOWN is a
    refusal of writes: `refuses_writes`). Not ready either;
    logged for ops by its class, code and (NOPERM) the command denied: never the message,
    which can name the user, a key or arguments."""
    detail = error_detail(exc)
    log.warning("%s: Redis answered an error (%s)", route, detail)
    return _answer({"status": f"Redis answered an error ({detail}); see the API's log",
                    "redis": "error"}, False)


def _refusing(why: str) -> JSONResponse:
    return _answer({"status": f"Redis refuses writes ({why}): {REFUSAL_CAUSE[why]}",
                    "redis": "refuses writes"}, False)


@router.get("/healthz", summary="Redis reachable and the pump keeping up", response_model=None,
            responses=_HEALTH)
def healthz(svc: Svc) -> JSONResponse:
    settings = svc.settings
    try:
        if why := refuses_writes(svc):
            return _refusing(why)
        verdict = check(svc.redis, settings.key_prefix, "worker", settings.heartbeat_max_age)
        due_in = svc.store.next_due_in()
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # LOADING too
        return _unreachable("/healthz", exc)
    except redis.RedisError as exc:
        return _error_reply("/healthz", exc)
    age = verdict.details["age_seconds"]
    overdue = None if due_in is None or due_in > 0 else round(-due_in, 3)
    body = {"redis": "ok", "pump_heartbeat_age_seconds": age,
            "oldest_due_overdue_seconds": overdue}
    if not verdict.healthy:
        return _answer({"status": verdict.reason, "pump": "never" if age is None else "stale",
                        **body}, False)
    limit = pump_lag_limit(settings.pump_interval_seconds)
    if overdue is not None and overdue > limit:
        return _answer({"status": f"the pump is behind: a reminder has waited {overdue:g}s "
                                  f"past its time (limit {limit:g}s); are beat and a worker "
                                  "running?", "pump": "behind", **body}, False)
    return _answer({"status": "ok", "pump": "ok", **body, "redis_settings": _settings(svc)},
                   True)


def _settings(svc: Svc) -> list[dict[str, Any]]:
    """The Redis settings that can lose or evict the schedule (worker/durability.py), naming
    no internal address (a replica's master): these answers need no key."""
    return [f.as_json() for f in findings_of(svc.redis, addresses=False)]


@router.get("/readyz", summary="This API process can serve (Redis reachable, taking writes)",
            response_model=None, responses=_HEALTH)
def readyz(svc: Svc) -> JSONResponse:
    try:
        why = refuses_writes(svc)
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # LOADING too
        return _unreachable("/readyz", exc)
    except redis.RedisError as exc:
        return _error_reply("/readyz", exc)
    if why:
        return _refusing(why)
    return _answer({"status": "ok", "redis": "ok", "redis_settings": _settings(svc)}, True)


@router.get("/metrics", summary="Prometheus metrics of the API", response_model=None,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
def metrics(svc: Svc) -> Response:
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)
