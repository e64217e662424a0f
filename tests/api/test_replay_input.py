"""The replay route refuses a body of the wrong types, naming the field, and replays
nothing (review): `all` must be a JSON boolean, the body a JSON object."""

from __future__ import annotations

import pytest

from tests.api.conftest import future_booking
from tests.api.test_isolation import dead_letter


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"all": "yes"}, "all", "boolean"),
    ({"all": 1}, "all", "boolean"),
    ({"refs": "D-1"}, "refs", "list"),
    (["D-1"], "body", "JSON object"),
    ({"refs": ["D-1"], "every": True}, "every", "not part of a replay request"),
])
def test_a_replay_of_the_wrong_types_is_refused_and_replays_nothing(api, glow, body, field,
                                                                     words):
    assert glow.put("/v1/bookings/D-1", json=future_booking("D-1")).status_code == 201
    store = api.app.state.services.store
    ref = dead_letter(store, "glow", "D-1")
    before = (store.redis.hgetall(store.booking_key("glow", "D-1")),
              store.redis.zrange(store.dead_key, 0, -1), store.redis.zrange(store.due_key, 0, -1))
    answer = glow.post("/v1/dead-letters/replay", json=body)
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["error"]["fields"]
    assert error["field"] == field and words in error["message"], error
    assert (store.redis.hgetall(store.booking_key("glow", "D-1")),
            store.redis.zrange(store.dead_key, 0, -1),
            store.redis.zrange(store.due_key, 0, -1)) == before
    assert ref in before[1]
