"""For ops, without a key: health (Redis and the pump), readiness, Prometheus metrics.

`/healthz` is the whole service's health: Redis answers, and the pump keeps up — the
oldest reminder waiting in the due set is at most `max(30 s, 10 pump intervals)`
overdue. The pump leaves no trace of its ticks, so this is what is measured: a due
reminder nobody claims means no beat or no worker is running (or they are far behind).
With nothing due the pump cannot be judged, and `pump` says `idle`. `/readyz` is this
API process's readiness: Redis answers. Both answer 503 with `Retry-After` when not.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from .errors import REDIS_RETRY_AFTER_SECONDS
from .metrics import CONTENT_TYPE
from .schemas import Health
from .services import Svc

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


@router.get("/healthz", summary="Redis reachable and the pump keeping up", response_model=None,
            responses=_HEALTH)
def healthz(svc: Svc) -> JSONResponse:
    try:
        svc.redis.ping()
        due_in = svc.store.next_due_in()
    except (redis.ConnectionError, redis.TimeoutError):
        return _answer({"status": "Redis is unreachable", "redis": "unreachable"}, False)
    if due_in is None or due_in > 0:
        return _answer({"status": "ok", "redis": "ok", "pump": "idle",
                        "oldest_due_overdue_seconds": None}, True)
    overdue = round(-due_in, 3)
    limit = pump_lag_limit(svc.settings.pump_interval_seconds)
    if overdue > limit:
        return _answer({"status": f"the pump is behind: a reminder has waited {overdue:g}s "
                                  f"past its time (limit {limit:g}s); are beat and a worker "
                                  "running?",
                        "redis": "ok", "pump": "behind", "oldest_due_overdue_seconds": overdue},
                       False)
    return _answer({"status": "ok", "redis": "ok", "pump": "ok",
                    "oldest_due_overdue_seconds": overdue}, True)


@router.get("/readyz", summary="This API process can serve (Redis reachable)",
            response_model=None, responses=_HEALTH)
def readyz(svc: Svc) -> JSONResponse:
    try:
        svc.redis.ping()
    except (redis.ConnectionError, redis.TimeoutError):
        return _answer({"status": "Redis is unreachable", "redis": "unreachable"}, False)
    return _answer({"status": "ok", "redis": "ok"}, True)


@router.get("/metrics", summary="Prometheus metrics of the API", response_model=None,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
def metrics(svc: Svc) -> Response:
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)
