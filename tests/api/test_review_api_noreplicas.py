"""A Redis that refuses writes for want of replicas (NOREPLICAS) answers 503, not 500 (review).

`min-replicas-to-write` (with Sentinel, the usual guard against losing writes to a
partitioned master) makes a master refuse every write while fewer replicas than that are
in sync: "-NOREPLICAS Not enough good replicas to write." Like OOM, MISCONF and READONLY
(11a96b9) it is Redis refusing writes for a while, and the request may be sent again as it
is once a replica is back; but it was not among them, so every keyed request (the rate
limiter writes first), STOP and unsubscribe answered the catch-all's 500 "internal error",
and /readyz said ok. Real redis-server set as ops would (CONFIG SET min-replicas-to-write,
no replica), real HTTP requests to the real app; every key holds the same before and after.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.api.conftest import future_booking, nudges_settled
from tests.api.test_errors import assert_error_shape
from tests.api.test_redis_refuses_writes import (  # noqa: F401 (fixtures)
    api,
    expiries,
    own,
    requests,
    snapshot,
)
from worker.store import connect


def test_noreplicas_is_503_and_nothing_is_stored(api, own):  # noqa: F811
    key = api.issue_key("tw")
    with api.client(key) as client:
        doc = future_booking("A-1", clinic="tw")
        doc["patient"] = doc["patient"] | {"phone": "+34600111222"}
        assert client.put("/v1/bookings/A-1", json=doc).status_code == 201
        held = future_booking("H-1", clinic="tw")
        held["medications"] = held["medications"] | {"isotretinoin_last_dose": (
            datetime.now(UTC) - timedelta(days=30)).date().isoformat()}
        assert client.put("/v1/bookings/H-1", json=held).json()["status"] == "held"
    admin = connect(own.url)
    nudges_settled(admin)  # these PUTs' pump nudges are in before the snapshots
    redis_of_api = api.app.state.services.redis
    with api.client(key) as client, api.client() as ops:
        sent = [("GET a timeline", lambda c: c.get("/v1/bookings/A-1")),
                *[(what, send) for what, _, send in requests()]]
        for what, send in sent:
            before, ttls = snapshot(redis_of_api), expiries(redis_of_api)
            admin.config_set("min-replicas-to-write", "1")  # and there is no replica
            try:
                answer = send(client)
                ready = ops.get("/readyz")
            finally:
                admin.config_set("min-replicas-to-write", "0")
            assert answer.status_code == 503, (what, answer.status_code, answer.text)
            assert answer.headers["retry-after"] == "5", what
            assert_error_shape(answer.json(), "unavailable")
            assert "refuses writes" in answer.json()["error"]["message"], what
            assert snapshot(redis_of_api) == before, what
            pushed = [name for name, ttl in expiries(redis_of_api).items() if name in ttls
                      and not (ttl <= ttls[name] if ttls[name] >= 0 else ttl == ttls[name])]
            assert not pushed, (what, pushed)
            assert ready.status_code == 503, ready.text
            assert ready.json()["redis"] == "refuses writes"
            assert "NOREPLICAS" in ready.json()["status"]
        # With a replica in sync again (here: none required), the same request works.
        assert requests()[0][2](client).status_code == 201
        assert ops.get("/readyz").status_code == 200
