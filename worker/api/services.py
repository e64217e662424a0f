"""What the routes work with: settings, catalog, store, keys and rate limiter, built once.

The API's Redis client gives up fast. The worker's client (worker/store.py `connect`)
rides out a 30-second outage, which is right for a send in flight and wrong for a clinic
waiting on an HTTP answer: here a connection error is retried twice within about a
second, then the request is answered 503 with `Retry-After` and the clinic retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated

import redis
from fastapi import Depends, Request

from .. import connections
from ..catalog import Catalog
from ..keys import ApiKeys
from ..metrics import ConfigCollector, ScheduleCollector
from ..nudge import PumpNudge
from ..settings import Settings
from ..store import Store
from .metrics import ApiMetrics
from .ratelimit import RateLimiter


@dataclass(frozen=True)
class Services:
    settings: Settings
    catalog: Catalog
    redis: redis.Redis
    store: Store
    keys: ApiKeys
    limiter: RateLimiter
    metrics: ApiMetrics
    nudge: PumpNudge = field(repr=False, compare=False)
    """Asks the pump for a run after a write storing something due soon (worker/nudge.py)."""
    current: list[Catalog] = field(repr=False, compare=False)
    """Holds `catalog`, shared by every copy: what the store's clinic events follow."""


def api_client(url: str) -> redis.Redis:
    """Return a client of the Redis at `url` with a short retry budget (about a second)."""
    return connections.from_url(url, connections.API)


def build(settings: Settings, catalog: Catalog, url: str | None = None) -> Services:
    """The app's services; Redis at `url`, else as the settings say (URL or Sentinel)."""
    client = api_client(url) if url else connections.client(settings, connections.API)
    current = [catalog]  # the catalog the routes work with now (`services` reads config/ again)
    return Services(
        settings=settings,
        catalog=catalog,
        redis=client,
        store=Store(client, settings.key_prefix, retention_days=settings.retention_days,
                    hooks=lambda clinic_id: current[0].hooks(clinic_id)),
        current=current,
        keys=ApiKeys(client, settings.key_prefix),
        limiter=RateLimiter(client, settings.key_prefix, settings.api_rate_per_second,
                            settings.api_rate_burst),
        metrics=ApiMetrics(ScheduleCollector(client, settings.key_prefix),
                           ConfigCollector(settings)),
        nudge=PumpNudge(settings, url),
    )


def services(request: Request) -> Services:
    """FastAPI dependency: the app's services."""
    svc: Services = request.app.state.services
    catalog = svc.catalog.fresh(svc.settings)  # config/ edited: read again (worker/catalog.py)
    if catalog is not svc.catalog:
        svc = request.app.state.services = replace(svc, catalog=catalog)
        svc.current[0] = catalog  # the store's clinic events follow it too
    return svc


Svc = Annotated[Services, Depends(services)]
