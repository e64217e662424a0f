"""A reminder handed back to the schedule unbegun (`Store.requeue`: another attempt holds
its ledger, or its begin came too late) shows when it is tried next (`next_try_at`, read
from the due set). GET showed it; the answers of PUT and of the batch for the same version
did not (their timeline is built from the upsert's read, which did not read the due set):
a clinic comparing its PUT's answer with a GET saw two stories of one version.

Real HTTP (uvicorn on a loopback port), a real Redis; the hand-back is the store's own.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.api.conftest import future_booking
from tests.e2e.conftest import QUICK_PROTOCOL

REF = "nt/N-1/confirm:email"  # due when the booking arrives


@pytest.fixture
def server(serve, tmp_path):
    config = tmp_path / "config"
    (config / "protocols").mkdir(parents=True)
    (config / "clinics").mkdir()
    (config / "protocols" / "quick.toml").write_text(QUICK_PROTOCOL, encoding="utf-8")
    (config / "clinics" / "nt.toml").write_text("""
name = "Next Try Clinic"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
outbox = true
[send_window]
start = "00:00"
end = "24:00"
""", encoding="utf-8")
    return serve(config_dir=config, data_dir=tmp_path / "data")


STARTS = future_booking(days=1)["starts_at"]


def booking(name: str = "Ana López") -> dict[str, Any]:
    doc = future_booking("N-1", clinic="nt", treatment="quick") | {"starts_at": STARTS}
    doc["patient"] = doc["patient"] | {"name": name, "timezone": "UTC", "locale": "en"}
    doc["medications"] = {"tretinoin": False, "retinol": False}
    return doc


def by_id(timeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in timeline["reminders"]}


def handed_back(server) -> float:
    """Claim the confirmation as the pump does and hand it back unbegun, ten minutes on;
    return its score in the due set."""
    store = server.app.state.services.store
    (claim,) = [c for c in store.claim_due(100, 60) if c.ref == REF]
    assert store.requeue(REF, datetime.now(UTC) + timedelta(minutes=10),
                         "another attempt holds the ledger", claim.claim)
    return float(store.redis.zscore(store.due_key, REF))


def test_put_and_batch_answers_show_next_try_at_as_get_does(server):
    with server.client(server.issue_key("nt")) as nt:
        first = nt.put("/v1/bookings/N-1", json=booking())
        assert first.status_code == 201, first.text
        retry = handed_back(server)
        got = nt.get("/v1/bookings/N-1").json()
        shown = by_id(got)["confirm:email"]
        assert shown["status"] == "scheduled" and shown["due_at"] < shown["next_try_at"]
        next_try = datetime.fromisoformat(shown["next_try_at"].replace("Z", "+00:00"))
        assert abs(next_try.timestamp() - retry) < 0.001, shown

        # The same booking again: unchanged, the same version; its answer is GET's.
        again = nt.put("/v1/bookings/N-1", json=booking())
        assert again.status_code == 200, again.text
        assert again.json()["version"] == got["version"]
        assert by_id(again.json()) == by_id(got), (by_id(again.json())["confirm:email"],
                                                    shown)

        # A change that keeps the step (the patient's name): a new version, the hand-back
        # still where it was; the answer is what a GET of that version says.
        changed = nt.put("/v1/bookings/N-1", json=booking("Ana María López"))
        assert changed.status_code == 200, changed.text
        now = nt.get("/v1/bookings/N-1").json()
        assert changed.json()["version"] == now["version"] == got["version"] + 1
        assert by_id(now)["confirm:email"]["next_try_at"] == shown["next_try_at"]
        assert by_id(changed.json()) == by_id(now), by_id(changed.json())["confirm:email"]

        # The batch answers each booking's timeline as PUT does.
        batch = nt.post("/v1/bookings:batch",
                        json={"bookings": [booking("Ana María López")]})
        assert batch.status_code == 200, batch.text
        (result,) = batch.json()["results"]
        assert result["status"] == 200 and result["timeline"]["version"] == now["version"]
        assert by_id(result["timeline"]) == by_id(now), by_id(result["timeline"])[
            "confirm:email"]

