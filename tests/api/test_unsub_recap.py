"""The unsubscribe route (RFC 8058 one-click POST) caps the patient's bookings at the clinic
again, as a re-submission of each would: the SMS the cap had sent by email instead (the
clinic's default cap, 1 a day and 3 a week) go by SMS where there is room, or say why not,
and no longer as emails skipped for the unsubscribe; the clinic sending the same documents
again afterwards changes nothing. Before, only that re-submission capped them again.
Real uvicorn, real Redis, real HTTP requests."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.api.conftest import future_booking
from tests.api.test_inbound import (  # noqa: F401
    ANA,
    PUBLIC,
    SECRET,
    TOKEN,
    link_for,
    server,
    tw,
    write_config,
)
from tests.e2e.conftest import QUICK_PROTOCOL


def _doc(booking_id: str, days: float) -> dict[str, Any]:
    doc = future_booking(booking_id, clinic="tw", days=days)
    doc["patient"] = doc["patient"] | {"phone": ANA, "email": "ana@example.com",
                                       "locale": "en"}
    return doc


def _by_email(timeline: dict[str, Any]) -> set[str]:
    """The emails still to go that carry a step whose SMS the cap sent by email."""
    return {r["id"] for r in timeline["reminders"] if r["channel"] == "email"
            and r["status"] == "scheduled" and "by email" in (r["reason"] or "")}


def _book(tw: Any) -> dict[str, dict[str, Any]]:  # noqa: F811
    """Two visits of the patient a day apart: their SMS share weeks beyond the cap."""
    docs = {"A-1": _doc("A-1", 20), "A-2": _doc("A-2", 21)}
    for booking_id, doc in docs.items():
        assert tw.put(f"/v1/bookings/{booking_id}", json=doc).status_code == 201
    return docs


def _unsubscribe(server: Any) -> None:  # noqa: F811
    """The patient's one-click unsubscribe (RFC 8058 POST) of the link their emails carry."""
    with server.client() as client:
        done = client.post(link_for(server, "ana@example.com"),
                           content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "unsubscribed" in done.text, done.text


def test_an_unsubscribe_caps_the_bookings_again_as_a_resubmission_would(server, tw):  # noqa: F811
    docs = _book(tw)
    emailed = {b: _by_email(tw.get(f"/v1/bookings/{b}").json()) for b in docs}
    assert emailed["A-2"], emailed  # some of A-2's SMS go by email
    _unsubscribe(server)
    after = {b: tw.get(f"/v1/bookings/{b}").json() for b in docs}
    for booking_id, timeline in after.items():
        shown = {r["id"]: r for r in timeline["reminders"]}
        assert not _by_email(timeline), timeline
        # Every email still to go goes by SMS, or its step's own SMS carries it (its begin
        # skips it): those the unsubscribe skipped (the confirmation at booking too) stay
        # skipped, not scheduled to be skipped again.
        assert all("by SMS" in r["reason"]
                   or shown.get(r["id"][: -len("email")] + "sms", {}).get("status")
                   == "scheduled" for r in timeline["reminders"]
                   if r["channel"] == "email" and r["status"] == "scheduled"), timeline
        for key in emailed[booking_id]:
            # The step's SMS goes (a day with room), or says why it cannot.
            sms = shown[key[: -len("email")] + "sms"]
            assert sms["status"] == "scheduled" or "1 a day" in (sms["reason"] or "") \
                or "3 in any 7 days" in (sms["reason"] or ""), sms
    assert any(shown["status"] == "scheduled"
               for key in emailed["A-2"]
               for shown in [{r["id"]: r for r in after["A-2"]["reminders"]}[
                   key[: -len("email")] + "sms"]])
    # The clinic sending the same documents again: nothing left to cap again.
    for booking_id, doc in docs.items():
        again = tw.put(f"/v1/bookings/{booking_id}", json=doc)
        assert again.status_code == 200, again.text
        assert again.json()["version"] == after[booking_id]["version"], (
            booking_id, after[booking_id], again.json())
        assert again.json()["reminders"] == after[booking_id]["reminders"]


def test_an_email_the_unsubscribe_skipped_still_says_so_after_the_caps_again(server, tw):  # noqa: F811
    """The emails the cap had sent instead of A-2's SMS are skipped by the unsubscribe
    ("opted_out: the patient unsubscribed from email at ..."), but for a care-critical
    step's (left to go by SMS); capping A-2 again then plans those steps by SMS, and
    rewrote each email as `cancelled`, "no longer in the plan after a change": the clinic
    changed nothing, and the timeline no longer said that the patient's unsubscribe is why
    it was not sent. A skipped one stays `skipped`, saying so; a care-critical step's
    email, called off for its step's own SMS, says the unsubscribe took it out."""
    _book(tw)
    emailed = _by_email(tw.get("/v1/bookings/A-2").json())
    assert emailed
    _unsubscribe(server)
    shown = {r["id"]: r for r in tw.get("/v1/bookings/A-2").json()["reminders"]}
    skipped = {key for key in emailed if shown[key]["status"] == "skipped"}
    assert skipped, shown
    for key in emailed:
        email, sms = shown[key], shown[key[: -len("email")] + "sms"]
        assert "after a change" not in email["reason"], email
        if key in skipped:
            assert email["reason"].startswith(
                "not sent: the patient unsubscribed from email at "), email
        else:
            assert (email["status"], email["reason"]) == (
                "cancelled", "no longer in the plan once the patient unsubscribed from email")
            assert sms["status"] == "scheduled" and "care-critical" in sms["reason"], sms


# Steps an hour and two after the start: the second finds the day taken by the first (the
# clinic's default cap, 1 a day) and goes by email; one a second after it, by email.
SOON = """
name = "Soon after"
[[steps]]
id = "gone"
offset = "1s"
channels = ["email"]
template = "microneedling-aftercare"
[[steps]]
id = "first"
offset = "1h"
channels = ["sms"]
template = "spf-morning"
late = "send"
late_until = "3d"
[[steps]]
id = "second"
offset = "2h"
channels = ["sms"]
template = "spf-morning"
late = "send"
late_until = "3d"
""" + "[advice]" + QUICK_PROTOCOL.split("[advice]", 1)[1]


@pytest.fixture
def soon(serve, tmp_path, monkeypatch):
    """tests/api/test_inbound.py's server, with the protocol above."""
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "hook-secret")
    config = write_config(tmp_path / "config")
    (config / "protocols" / "soon.toml").write_text(SOON, encoding="utf-8")
    return serve(config_dir=config, public_url=PUBLIC, unsubscribe_secret=SECRET,
                 data_dir=tmp_path / "data")


def test_an_unsubscribe_after_the_visit_caps_the_booking_again(soon):
    """The visit two seconds ahead, then past when the patient clicks the link. Before,
    the re-plan refused the visit as past: the second SMS's email was skipped for the
    unsubscribe and the step was lost. Now it goes by SMS the next day at the same time,
    saying why; the first SMS and the email whose time passed stay as they were; the
    clinic still cannot re-submit the booking (its visit is past)."""
    with soon.client(soon.issue_key("tw")) as clinic:
        doc = _doc("A-1", 3 / 86400) | {"treatment": "soon"}
        assert clinic.put("/v1/bookings/A-1", json=doc).status_code == 201
        before = {r["id"]: r for r in clinic.get("/v1/bookings/A-1").json()["reminders"]}
        assert before["second:email"]["status"] == "scheduled", before
        assert "by email" in before["second:email"]["reason"], before
        start = datetime.fromisoformat(doc["starts_at"])
        time.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()) + 1.5)
        refused = clinic.put("/v1/bookings/A-1", json=doc)  # as before: the visit is past
        assert refused.status_code == 422 and "starts_at" in refused.text, refused.text
        _unsubscribe(soon)
        shown = {r["id"]: r for r in clinic.get("/v1/bookings/A-1").json()["reminders"]}
    assert "second:sms" in shown, shown  # before: the step had no SMS left
    second = shown["second:sms"]
    day = (start + timedelta(hours=2)).astimezone(ZoneInfo(doc["patient"]["timezone"]))
    assert second["status"] == "scheduled", second
    # The next day at the same patient-local clock time (to the minute, as the cap moves).
    assert datetime.fromisoformat(second["due_at"]) == (
        start + timedelta(days=1, hours=2)).replace(second=0)
    assert f"moved to {day.date() + timedelta(days=1)}" in second["reason"], second
    assert f"(1 a day, 3 in any 7 days) is reached on {day.date()}" in second["reason"]
    email = shown["second:email"]  # skipped for the unsubscribe, saying so
    assert email["status"] == "skipped", email
    assert email["reason"].startswith("not sent: the patient unsubscribed from email"), email
    assert set(shown) == set(before) | {"second:sms"}, shown
    assert shown["first:sms"] == before["first:sms"]
    gone = shown["gone:email"]  # its time passed: as the unsubscribe skipped it
    assert gone["status"] == "skipped" and gone["reason"].startswith("opted_out: "), gone
    assert gone["due_at"] == before["gone:email"]["due_at"]
