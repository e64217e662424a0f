"""A booking the clinic sends again without SMS (withdrawn from the patient's channels, or
the phone removed too) after the patient unsubscribed from email: its care-critical
emails no longer go by SMS (their begin skips them), so its timeline no longer says
`via: sms` and the SMS cap of the patient's other bookings no longer counts them, at each
write the clinic has: PUT, `POST /v1/bookings:batch` and `reminders book` (the real
console script). Before, the re-submission kept their flag "s": shown as going by SMS, and
a booking of the patient written after it gave their days to texts that never go.

Twins: Ana's A-1 is stored allowing SMS, the patient unsubscribes (the real one-click
POST), then A-1 is sent again without SMS; Eva unsubscribes and her E-1 is stored without
SMS from the start. Each then books the same second visit: its SMS must be decided alike.
Real uvicorn, real Redis, real HTTP requests."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from tests.api.conftest import future_booking
from tests.api.test_inbound import ANA, EVA, TOKEN, link_for, server, tw  # noqa: F401
from tests.conftest import ROOT
from tests.test_book_batch import BIN, jsonl

pytestmark = pytest.mark.integration


def _doc(booking_id: str, phone: str, email: str, days: float,
         channels: list[str]) -> dict[str, Any]:
    doc = future_booking(booking_id, clinic="tw", days=days)
    doc["patient"] = doc["patient"] | {"phone": phone, "email": email, "locale": "en",
                                       "channels": channels}
    return doc


def _unsubscribe(server: Any, address: str) -> None:  # noqa: F811
    with server.client() as client:
        done = client.post(link_for(server, address), content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "unsubscribed" in done.text, done.text


def _write(how: str, server: Any, tw: Any, doc: dict[str, Any]) -> None:  # noqa: F811
    """Send `doc` again as the clinic does: PUT, a batch, or `reminders book`."""
    if how == "put":
        answer = tw.put(f"/v1/bookings/{doc['booking_id']}", json=doc)
        assert answer.status_code == 200, answer.text
    elif how == "batch":
        answer = tw.post("/v1/bookings:batch", json={"bookings": [doc]})
        assert answer.status_code == 200, answer.text
        assert [r["status"] for r in answer.json()["results"]] == [200], answer.text
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
        env.update(REMINDERS_REDIS_URL=server.redis_url,
                   REMINDERS_CONFIG_DIR=str(server.settings.config_dir),
                   REMINDERS_DATA_DIR=str(server.settings.data_dir), PYTHONPATH=str(ROOT),
                   TW_AUTH_TOKEN=TOKEN, TW_HOOK_SECRET="hook-secret")
        done = subprocess.run([str(BIN / "reminders"), "book", "-"], input=jsonl([doc]),
                              env=env, cwd=ROOT, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _by_sms(timeline: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in timeline["reminders"]
            if r.get("via") == "sms" or "by SMS" in (r["reason"] or "")]


def _sms(timeline: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [(r["id"], r["due_at"], r["status"], r["reason"]) for r in timeline["reminders"]
            if r["channel"] == "sms"]


@pytest.mark.parametrize("phone", [True, False], ids=["sms-withdrawn", "phone-removed"])
@pytest.mark.parametrize("how", ["put", "batch", "book"])
def test_a_booking_sent_again_without_sms_takes_no_sms_days(server, tw, how, phone):  # noqa: F811
    ana = _doc("A-1", ANA, "ana@example.com", 20, ["sms", "email"])
    assert tw.put("/v1/bookings/A-1", json=ana).status_code == 201
    _unsubscribe(server, "ana@example.com")
    assert _by_sms(tw.get("/v1/bookings/A-1").json())  # its care-critical emails by SMS
    _unsubscribe(server, "eva@example.com")
    eva = _doc("E-1", EVA, "eva@example.com", 20, ["email"])
    assert tw.put("/v1/bookings/E-1", json=eva).status_code == 201
    ana["patient"]["channels"] = ["email"]
    if not phone:
        del ana["patient"]["phone"]
    _write(how, server, tw, ana)
    first = tw.get("/v1/bookings/A-1").json()
    assert not _by_sms(first), first
    assert not _by_sms(tw.get("/v1/bookings/E-1").json())
    # The second visit, a day later: Ana's SMS decided as Eva's (A-1's emails take no day).
    again = {}
    for booking_id, phone_of, email in (("A-2", ANA, "ana@example.com"),
                                        ("E-2", EVA, "eva@example.com")):
        answer = tw.put(f"/v1/bookings/{booking_id}",
                        json=_doc(booking_id, phone_of, email, 21, ["sms", "email"]))
        assert answer.status_code == 201, answer.text
        again[booking_id] = _sms(answer.json())
    assert again["A-2"] == again["E-2"], again
