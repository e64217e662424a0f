"""/readyz and /healthz while Redis is up but refuses writes (review).

Every keyed route writes before anything else (the rate limiter takes its token in
Redis), so while Redis refuses writes (out of memory under `noeviction`: OOM; a failed
save: MISCONF; a read-only replica: READONLY) the API answers every clinic request 503 —
reads of a timeline too. /readyz only sent PING, which such a Redis answers: it said
`{"status": "ok"}` (200), so the compose healthcheck (and any load balancer or
orchestrator) showed the API ready while it could serve nothing, and /healthz said ok
until the pump's heartbeat went stale, then blamed the pump. Both now answer 503 with
Retry-After, naming the refusal (`"redis": "refuses writes"`); once Redis takes writes
again, /readyz is 200. Real redis-server put into each state as ops would (CONFIG SET,
a failed BGSAVE, REPLICAOF), real HTTP to the real app.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import future_booking
from tests.api.test_redis_refuses_writes import Refusal, api, own  # noqa: F401 (fixtures)
from worker.health import pump_beat


@pytest.mark.parametrize("kind", ["OOM", "MISCONF", "READONLY"])
def test_readyz_and_healthz_are_503_while_redis_refuses_writes(api, own, kind):  # noqa: F811
    store = api.app.state.services.store
    key = api.issue_key("tw")
    with api.client(key) as clinic, api.client() as ops:
        assert clinic.put("/v1/bookings/A-1", json=future_booking("A-1", clinic="tw")
                          ).status_code == 201
        pump_beat(store.redis, store.prefix, 0.01)  # a running pump: healthy but for Redis
        assert ops.get("/readyz").status_code == 200
        assert ops.get("/healthz").status_code == 200
        refusal = Refusal(kind, own)
        refusal.arm()
        try:
            served = clinic.get("/v1/bookings/A-1")
            ready, health = ops.get("/readyz"), ops.get("/healthz")
        finally:
            refusal.disarm()
        again = ops.get("/readyz")
    # What a clinic gets meanwhile: the API cannot serve even a read.
    assert served.status_code == 503, served.text
    for answer in (ready, health):
        assert answer.status_code == 503, (answer.request.url, answer.text)
        assert answer.headers["retry-after"] == "5"
        body = answer.json()
        assert body.get("redis") == "refuses writes", body
        assert kind in body["status"], body
    assert again.status_code == 200 and again.json() == {"status": "ok", "redis": "ok",
                                                       "redis_settings": []}
