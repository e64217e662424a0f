"""A held booking (isotretinoin inside the washout) sends the patient one neutral message,
"we will call you before your visit" (the protocol's `hold_template`), and nothing else until
the clinic releases it."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.store import Attempt, Store

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
HELD_MEDS = {"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}
WORDS = ("isotretino", "tretino", "retino", "microneedl", "peel", "acne", "accutane",
         "roacut", "medic", "treatment", "tratamiento")


def held_doc(booking_doc: dict[str, Any], **patient: Any) -> dict[str, Any]:
    doc = copy.deepcopy(booking_doc)
    doc["medications"] = dict(HELD_MEDS)
    doc["patient"].update(patient)
    return doc


def planned(catalog, doc, protocol=None):
    booking = parse_booking(doc, catalog)
    return booking, plan(booking, protocol or catalog.protocols[booking.treatment],
                         catalog.clinics[booking.clinic], NOW)


def test_a_held_plan_has_one_message_for_the_patient(catalog, booking_doc):
    _, held = planned(catalog, held_doc(booking_doc))
    assert held.status == "held"
    (notice,) = [r for r in held.reminders if r.step == "hold-notice"]
    assert (notice.key, notice.template, notice.status) == (
        "hold-notice:sms", "hold-notice", "scheduled")
    assert notice.due_at == NOW and notice.at_booking  # 13:00 in Madrid: inside the window
    assert "held for the clinic's review" in notice.reason
    _, email_only = planned(catalog, held_doc(booking_doc, channels=["email"]))
    assert [r.key for r in email_only.reminders if r.step == "hold-notice"] == [
        "hold-notice:email"]
    # Not held: no such message. A protocol that turns it off: none either.
    assert not [r for r in planned(catalog, booking_doc)[1].reminders
                if r.step == "hold-notice"]
    quiet = catalog.protocols["microneedling"].model_copy(update={"hold_template": ""})
    assert not [r for r in planned(catalog, held_doc(booking_doc), quiet)[1].reminders
                if r.step == "hold-notice"]


@pytest.mark.parametrize("locale", ["en", "es"])
@pytest.mark.parametrize("discreet", [False, True])
def test_the_message_is_neutral(catalog, booking_doc, locale, discreet):
    renderer = Renderer(catalog.templates_dir)
    booking, held = planned(catalog, held_doc(booking_doc, locale=locale))
    clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
    for channel in ("sms", "email"):
        message = renderer.render(template="hold-notice", channel=channel, booking=booking,
                                  clinic=clinic, protocol=catalog.protocols["microneedling"],
                                  occurrence=1, due_at=NOW)
        words = " ".join(filter(None, (message.subject, message.text, message.html))).lower()
        assert not [w for w in WORDS if w in words], words
        assert ("will call you" if locale == "en" else "te llamaremos") in words


def test_only_the_hold_notice_goes_while_held(redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    timeline = store.upsert(*planned(catalog, held_doc(booking_doc)), NOW)
    assert timeline["status"] == "held"
    by_id = {r["id"]: r for r in timeline["reminders"]}
    assert by_id["hold-notice:sms"]["reason"].startswith("the booking is held")
    assert by_id["day-before:sms"]["reason"].startswith("booking held: ")
    assert store.redis.zrange(store.due_key, 0, -1) == ["glow/A-1042/hold-notice:sms"]
    assert store.timeline("glow", "A-1042") == timeline
    # It is claimed and passes the send fence although the booking is held...
    (claim,) = store.claim_due(10, 60)
    ref = "glow/A-1042/hold-notice:sms"
    assert claim.ref == ref
    assert store.begin_send(ref, claim.version, claim.claim, "tok", 60_000) == "ok"
    attempt = Attempt(claim.version, claim.claim, "tok")
    assert store.still_owned(ref, attempt)
    assert store.finish_sent(ref, attempt, NOW) == "ok"
    # ...while another reminder of the held booking, made due by hand, is not sent.
    other = "glow/A-1042/day-before:sms"
    store.redis.zadd(store.due_key, {other: 0})
    (claim,) = store.claim_due(10, 60)
    assert store.begin_send(other, claim.version, claim.claim, "t2", 60_000) == "booking held"
    # Submitting it again changes nothing; the release leaves the sent notice as history.
    assert store.upsert(*planned(catalog, held_doc(booking_doc)), NOW)["version"] == 1
    released = store.upsert(*planned(catalog, held_doc(booking_doc)), NOW, release=True)
    by_id = {r["id"]: r for r in released["reminders"]}
    assert released["status"] == "scheduled"
    assert by_id["hold-notice:sms"]["status"] == "sent"


def test_a_release_before_it_went_cancels_it(redis_client, catalog, booking_doc):
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    store.upsert(*planned(catalog, held_doc(booking_doc)), NOW)
    released = store.upsert(*planned(catalog, held_doc(booking_doc)), NOW, release=True)
    by_id = {r["id"]: r for r in released["reminders"]}
    assert by_id["hold-notice:sms"]["status"] == "cancelled"
    assert "glow/A-1042/hold-notice:sms" not in store.redis.zrange(store.due_key, 0, -1)
    # A new booking released at once never had one.
    fresh = held_doc(booking_doc)
    fresh["booking_id"] = "A-2"
    at_once = store.upsert(*planned(catalog, fresh), NOW, release=True)
    assert "hold-notice:sms" not in {r["id"] for r in at_once["reminders"]}
