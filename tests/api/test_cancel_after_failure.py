"""A booking cancelled after one of its reminders failed for good keeps why it failed.

The mail server refused the confirmation (SMTP 550: no such mailbox): a dead letter, told
on the timeline as `failed`, "permanent failure: SMTP 550". Then the clinic cancelled the
booking. The cancel takes the dead letter out (it must never be replayed for a visit that
is off) and marks it cancelled, but wrote "cancelled by the clinic" over the failure: the
timeline then said the confirmation was not sent because the clinic cancelled it, while
it had been refused by the patient's mail server first (a wrong address the clinic should
hear of before it books the patient again). The reason now says both, in order.

Real HTTP (uvicorn on a loopback port) against a real Redis; the email refused by a real
SMTP server through the real send path.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.test_unsubscribe_send import Rig, sinks  # noqa: F401 - fixture
from worker.dispatch import Context, send_claimed
from worker.rendering import Renderer
from worker.timeline import render_table

FAILED = "permanent failure: SMTP 550 from the mail server"


def test_a_cancel_after_a_dead_letter_keeps_why_it_failed(
        tmp_path, redis_client, sinks, serve):  # noqa: F811 - the fixture
    smtp, sms = sinks
    folder = tmp_path / "config"
    Rig(folder, redis_client, smtp, sms)  # writes the clinic `uc` and its protocol
    server = serve(config_dir=folder)
    svc = server.app.state.services
    store = svc.store
    ctx = Context(settings=svc.settings, store=store, catalog=svc.catalog,
                  renderer=Renderer(svc.catalog.templates_dir))
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
    doc = {"booking_id": "U-1", "treatment": "unsub", "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "email": "ana@example.com", "timezone": "UTC",
                       "locale": "en", "channels": ["email"]}}
    ref = "uc/U-1/plain:email"
    with server.client(server.issue_key("uc")) as uc:
        assert uc.put("/v1/bookings/U-1", json=doc).status_code == 201
        smtp.refuse_code = "550 5.1.1 No such user"
        store.redis.zadd(store.due_key, {ref: 0})
        (claim,) = [c for c in store.claim_due(100, 300) if c.ref == ref]
        assert send_claimed(ctx, claim.ref, claim.version, claim.claim) == "failed"
        assert smtp.refused == 1 and smtp.snapshot() == []
        failed = {r["id"]: r for r in uc.get("/v1/bookings/U-1").json()["reminders"]}
        assert failed["plain:email"]["status"] == "failed", failed["plain:email"]
        assert failed["plain:email"]["reason"] == FAILED
        assert [d["ref"] for d in uc.get("/v1/dead-letters").json()["dead_letters"]] == [ref]

        cancelled = uc.delete("/v1/bookings/U-1")
        assert cancelled.status_code == 200, cancelled.text
        got = uc.get("/v1/bookings/U-1").json()
        # Out of the dead letters, for good: nothing to replay for a cancelled visit.
        assert uc.get("/v1/dead-letters").json() == {"dead_letters": []}
        assert uc.post("/v1/dead-letters/replay", json={"all": True}).json() == {
            "replayed": []}
    by_id = {r["id"]: r for r in got["reminders"]}
    plain, care = by_id["plain:email"], by_id["care:email"]
    assert cancelled.json()["reminders"] == got["reminders"]  # the DELETE's answer too
    assert plain["status"] == "cancelled" and plain["attempts"] == 1, plain
    assert plain["reason"] == f"cancelled by the clinic; it had failed before: {FAILED}", plain
    # A reminder that was still to go: cancelled, nothing more to say.
    assert care["status"] == "cancelled" and care["reason"] == "cancelled by the clinic"
    (row,) = [line for line in render_table(got, "UTC").splitlines() if "plain:email" in line]
    assert row.endswith(f"cancelled by the clinic; it had failed before: {FAILED}"), row
    assert store.redis.zscore(store.due_key, ref) is None


def test_a_change_that_drops_a_dead_letters_step_keeps_why_it_failed(
        tmp_path, redis_client, sinks, serve):  # noqa: F811 - the fixture
    """The same for a correction that takes the failed step out of the plan (the patient
    now takes SMS only): "no longer in the plan after a change" was all it said."""
    smtp, sms = sinks
    folder = tmp_path / "config"
    Rig(folder, redis_client, smtp, sms)
    server = serve(config_dir=folder)
    svc = server.app.state.services
    store = svc.store
    ctx = Context(settings=svc.settings, store=store, catalog=svc.catalog,
                  renderer=Renderer(svc.catalog.templates_dir))
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
    doc = {"booking_id": "U-1", "treatment": "unsub", "starts_at": starts.isoformat(),
           "patient": {"name": "Ana López", "email": "ana@example.com",
                       "phone": "+34600111222", "timezone": "UTC", "locale": "en",
                       "channels": ["email"]}}
    ref = "uc/U-1/plain:email"
    with server.client(server.issue_key("uc")) as uc:
        assert uc.put("/v1/bookings/U-1", json=doc).status_code == 201
        smtp.refuse_code = "550 5.1.1 No such user"
        store.redis.zadd(store.due_key, {ref: 0})
        (claim,) = [c for c in store.claim_due(100, 300) if c.ref == ref]
        assert send_claimed(ctx, claim.ref, claim.version, claim.claim) == "failed"
        doc["patient"]["channels"] = ["sms"]  # the clinic's correction
        changed = uc.put("/v1/bookings/U-1", json=doc)
        assert changed.status_code == 200, changed.text
        assert uc.get("/v1/dead-letters").json() == {"dead_letters": []}
        got = uc.get("/v1/bookings/U-1").json()
    plain = {r["id"]: r for r in got["reminders"]}["plain:email"]
    assert plain["status"] == "cancelled" and plain["attempts"] == 1, plain
    assert plain["reason"] == ("no longer in the plan after a change; it had failed before: "
                               f"{FAILED}"), plain
