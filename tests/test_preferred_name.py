"""`patient.preferred_name`: what the messages greet the patient by ("María José", not the
first word "María"), validated as the name is; a booking without it is stored as before."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.fixed_scenario import FIXED_SCENARIO_RETENTION_DAYS
from worker.catalog import Catalog
from worker.errors import BookingRejected
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.store import Store

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def with_names(booking_doc: dict[str, Any], name: str, preferred: Any = None) -> dict[str, Any]:
    doc = copy.deepcopy(booking_doc)
    doc["patient"]["name"] = name
    if preferred is not None:
        doc["patient"]["preferred_name"] = preferred
    return doc


@pytest.mark.parametrize(("value", "word"), [
    ("", ""), ("   ", "blank"), ("María\nJosé", "control"), ("María \u202eJosé", "U+202E"),
    ("María\u200b", "U+200B"), ("A" * 101, "100"), (12, "string"),
])
def test_preferred_name_is_validated_as_the_name_is(catalog: Catalog, booking_doc, value, word):
    with pytest.raises(BookingRejected) as refused:
        parse_booking(with_names(booking_doc, "María José Pérez", value), catalog)
    fields = dict(refused.value.errors)
    assert list(fields) == ["patient.preferred_name"], fields
    assert word in fields["patient.preferred_name"]


def test_greetings_use_the_preferred_name(catalog: Catalog, booking_doc) -> None:
    renderer = Renderer(catalog.templates_dir)
    clinic, protocol = catalog.clinics["glow"], catalog.protocols["microneedling"]
    plain = parse_booking(with_names(booking_doc, "María José Pérez"), catalog)
    preferred = parse_booking(with_names(booking_doc, "María José Pérez", " María José "),
                              catalog)
    assert plain.patient.first_name == "María"
    assert preferred.patient.preferred_name == "María José"
    assert preferred.patient.first_name == "María José"
    for channel in ("sms", "email"):
        message = renderer.render(booking=preferred, clinic=clinic, protocol=protocol,
                                  template="day-before", channel=channel, occurrence=1,
                                  due_at=NOW)
        text = message.text
        assert ("Maria José" if channel == "sms" else "María José") in text, text
        before = renderer.render(booking=plain, clinic=clinic, protocol=protocol,
                                 template="day-before", channel=channel, occurrence=1,
                                 due_at=NOW).text
        assert "José" not in before and "Jose" not in before


def test_a_booking_without_one_is_stored_as_before(redis_client, catalog, booking_doc) -> None:
    store = Store(redis_client, "t", retention_days=FIXED_SCENARIO_RETENTION_DAYS)
    booking = parse_booking(booking_doc, catalog)
    assert "preferred_name" not in booking.model_dump_json()
    planned = plan(booking, catalog.protocols["microneedling"], catalog.clinics["glow"], NOW)
    first = store.upsert(booking, planned, NOW)
    assert "preferred_name" not in store.redis.get(store.doc_key("glow", "A-1042"))
    named = parse_booking(with_names(booking_doc, "Ana López", "Anita"), catalog)
    assert store.upsert(named, planned, NOW)["version"] == first["version"] + 1
    assert store.booking_doc("glow", "A-1042")["patient"]["preferred_name"] == "Anita"
