"""The same batch through `POST /v1/bookings:batch` again changes nothing, also when the SMS
caps tie its bookings together (the scenario of tests/test_book_resubmit_caps.py: one
patient, six visits two days apart, half by SMS only). Real HTTP requests to the app
served by uvicorn, a real Redis."""

from __future__ import annotations

import copy
import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.api.conftest import nudges_settled
from tests.test_book_resubmit_caps import capped_visits, changed_keys, snapshot


def post(glow, docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each booking's result, by booking id."""
    answer = glow.post("/v1/bookings:batch", json={"bookings": docs})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stored"] == len(docs) and body["refused"] == 0
    return {r["booking_id"]: r for r in body["results"]}


def timelines(glow, docs) -> dict[str, Any]:
    out = {}
    for doc in docs:
        got = glow.get(f"/v1/bookings/{doc['booking_id']}")
        assert got.status_code == 200, got.text
        out[doc["booking_id"]] = got.json()
    return out


@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_the_same_batch_posted_again_changes_nothing(glow, redis_client, order):
    docs = capped_visits("H")
    first = post(glow, docs)
    assert {r["status"] for r in first.values()} == {201}
    # Its pump nudge (worker/nudge.py: published after the answer) is in before the snapshot;
    # the batch posted again changes nothing, so it asks for none.
    nudges_settled(redis_client)
    before = snapshot(redis_client)
    shown = timelines(glow, docs)
    reasons = [r["reason"] or "" for t in shown.values() for r in t["reminders"]]
    assert any("care-critical, the other SMS give way" in x for x in reasons)
    assert any("by email: the patient's SMS limit" in x for x in reasons)
    again = list(docs)
    if order == "shuffled":
        random.Random(3).shuffle(again)
    second = post(glow, again)
    assert {b: (r["status"], r["timeline"]["version"]) for b, r in second.items()} == {
        b: (200, 1) for b in first}
    assert {b: r["timeline"] for b, r in second.items()} == {
        b: r["timeline"] for b, r in first.items()}
    assert changed_keys(before, snapshot(redis_client)) == []
    assert timelines(glow, docs) == shown


def test_a_moved_visit_in_the_batch_changes_that_booking_only(glow, redis_client):
    docs = capped_visits("H")
    post(glow, docs)
    nudged = nudges_settled(redis_client)
    shown = timelines(glow, docs)
    moved = copy.deepcopy(docs)
    moved[3]["starts_at"] = (datetime.fromisoformat(moved[3]["starts_at"])
                             + timedelta(days=1)).isoformat()
    second = post(glow, moved)
    assert {b: r["timeline"]["version"] for b, r in second.items()} == {
        **{b: 1 for b in shown}, "H-3": 2}
    after = timelines(glow, docs)
    assert [b for b in shown if after[b] != shown[b]] == ["H-3"]
    nudges_settled(redis_client, nudged)  # the move's nudge, if it asked one, is in too
    settled = snapshot(redis_client)
    post(glow, moved)
    assert changed_keys(settled, snapshot(redis_client)) == []
