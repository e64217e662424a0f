"""A morning message greets by the moment it goes, not by the hour it was planned for (found
by review; the rig of tests/test_send_caps.py: real Redis, a real HTTP SMS gateway, the real
send path with its clock fixed; and the real renderer and templates).

The SPF texts are planned for 09:00 ("Good morning Ana. Before going out today, apply SPF
30+"), but go later whenever their time moves at send time: a backlog after an outage, a
retry, a dead letter replayed. Words such as "tomorrow" already count from the moment of
sending (templates/README.md); the greeting did not: after a worker outage the patient got
"Good morning" at 19:30. Now it says "Good morning" / "Buenos días" only before noon,
patient-local, at the moment of sending, and "Hi" / "Hola" after.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.test_send_caps import Rig, rig, sinks  # noqa: F401  (fixtures)
from worker.catalog import Catalog
from worker.models import Booking
from worker.rendering import Renderer

MORNING = {"en": "Good morning", "es": "Buenos días"}
LATER = {"en": "Hi Ana", "es": "Hola, Ana"}


def test_a_morning_sms_sent_in_the_evening_after_an_outage_does_not_say_good_morning(
        rig: Rig) -> None:  # noqa: F811
    d = rig.day
    rig.book("A-1", "morn", d)  # its SPF SMS on D+1 10:00
    rig.book("A-2", "morn", d + timedelta(days=1))  # on D+2 10:00
    # The worker was down from 09:30 to 19:30 on D+1: the backlog goes at 19:30.
    assert rig.send("A-1", "morning:sms", rig.local(d + timedelta(days=1), 19, 30)) == "sent"
    assert rig.send("A-2", "morning:sms", rig.local(d + timedelta(days=2), 10)) == "sent"
    late, on_time = (m.text for m in rig.sms.snapshot())
    assert late.startswith("Hi Ana. Before going out today"), late
    assert on_time.startswith("Good morning Ana. Before going out today"), on_time


@pytest.mark.parametrize("locale", ["en", "es"])
@pytest.mark.parametrize("template", ["spf-morning", "spf-weekly"])
@pytest.mark.parametrize("part", ["sms", "email"])
def test_the_morning_greeting_follows_the_hour_of_sending(
        catalog: Catalog, booking_doc: dict[str, Any], locale: str, template: str,
        part: str) -> None:
    booking = Booking.model_validate(
        {**booking_doc, "patient": {**booking_doc["patient"], "name": "Ana López",
                                    "locale": locale}}, context={"catalog": catalog})
    tz = ZoneInfo(booking.patient.timezone)
    day = booking.starts_at.astimezone(tz).date() + timedelta(days=1)
    due = datetime(day.year, day.month, day.day, 9, tzinfo=tz).astimezone(UTC)
    renderer = Renderer(catalog.templates_dir)

    def text(now: datetime) -> str:
        message = renderer.render(
            template=template, channel=part, booking=booking,  # type: ignore[arg-type]
            clinic=catalog.clinics["glow"], protocol=catalog.protocols["microneedling"],
            occurrence=1, due_at=due, now=now)
        return message.text + (message.html or "")

    at_nine, at_noon = text(due), text(due + timedelta(hours=3))
    greeted = MORNING[locale] in at_nine
    assert greeted or part == "sms" and locale == "es", at_nine  # "Hola, Ana:" all day
    assert MORNING[locale] not in at_noon, at_noon
    assert LATER[locale] in at_noon, at_noon
