"""If-Match on DELETE under a change landing between the version's check and the cancel
(review): the cancel script must apply only to the booking whose version was compared.

A DELETE with `If-Match: "7"` of a booking that does not exist yet reads it (missing: no
version to compare) and is parked just before the cancel script; another client creates
the booking (version 1); the DELETE resumes. It must not cancel version 1, which its
If-Match does not name: 412 with the ETag, and the booking is still scheduled in Redis
(its hash and its reminders in the due set). Real HTTP (uvicorn), real Redis.
"""

from __future__ import annotations

import threading
from typing import Any

from tests.api.conftest import future_booking


def test_a_booking_created_while_a_delete_with_if_match_waits_is_not_cancelled(
        api, glow, monkeypatch):
    store = api.app.state.services.store
    # Missing, and nothing lands meanwhile: the 404 of a missing booking (RFC 9110 13.2.1).
    assert glow.delete("/v1/bookings/A-1042", headers={"If-Match": '"7"'}).status_code == 404
    parked, go = threading.Event(), threading.Event()
    real_cancel = store._cancel

    def cancel_script(*args: Any, **kwargs: Any) -> Any:
        if not parked.is_set():  # the DELETE's first try, after its read
            parked.set()
            assert go.wait(10)
        return real_cancel(*args, **kwargs)

    # The route's If-Match store copies the app store's attributes, this one too.
    monkeypatch.setattr(store, "_cancel", cancel_script)
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.setdefault(
        "r", glow.delete("/v1/bookings/A-1042", headers={"If-Match": '"7"'})))
    thread.start()
    try:
        assert parked.wait(10)
        created = glow.put("/v1/bookings/A-1042", json=future_booking("A-1042"))
        assert created.status_code == 201, created.text
    finally:
        go.set()
        thread.join(30)
    response = answer["r"]
    assert response.status_code == 412, response.text
    assert response.headers["etag"] == '"1"'
    monkeypatch.undo()
    stored = store.redis.hgetall(store.booking_key("glow", "A-1042"))
    assert stored["status"] == "scheduled" and stored["version"] == "1"
    timeline = glow.get("/v1/bookings/A-1042").json()
    assert timeline["status"] == "scheduled" and timeline["version"] == 1
    pending = [r["id"] for r in timeline["reminders"] if r["status"] == "scheduled"]
    due = {m.split("/", 2)[2] for m in store.redis.zrange(store.due_key, 0, -1)
           if m.startswith("glow/A-1042/")}
    assert pending and set(pending) == due
