"""The hostile corpus (tests/hostile_corpus.py) over real HTTP: refused naming the field.

The same cases the CLI refuses (tests/test_hostile_input.py) sent as the body of
`PUT /v1/bookings/H-1`: a 4xx in the one error shape naming the field (413 for the ones
over the size limit), never a 5xx or a traceback, and nothing stored.
"""

from __future__ import annotations

import pytest

from tests.hostile_corpus import CORPUS, Hostile

IDS = [case.name for case in CORPUS]
# Over HTTP the clinic comes from the key and the booking id from the URL: an empty
# document is refused for the other fields it lacks.
API_FIELD = {"document-empty-object": "treatment"}


def names(field: str, expected: str) -> bool:
    return field == expected or field.startswith(expected + ".")


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_the_api_refuses_it_naming_the_field_and_stores_nothing(case: Hostile, glow,
                                                                 redis_client):
    answer = glow.put("/v1/bookings/H-1", content=case.raw,
                      headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    error = answer.json()["error"]
    assert "Traceback" not in answer.text
    if case.too_large:
        assert answer.status_code == 413, answer.text[:500]
    else:
        assert answer.status_code == 422, answer.text[:500]
        fields = [f["field"] for f in error["fields"]]
        expected = API_FIELD.get(case.name, case.field)
        assert any(names(field, expected) for field in fields), (expected, fields)
        assert all(f["message"] for f in error["fields"])
    assert glow.get("/v1/bookings/H-1").status_code == 404
    assert [k for k in redis_client.scan_iter("*:b:*")] == []
