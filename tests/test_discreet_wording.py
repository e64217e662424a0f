"""Discreet clinics: no email subject and no SMS names a treatment, a medication or a
health condition, for every template of every treatment, in every locale.

The word list is tests/discreet_words.toml (per locale, with its sources). Each reminder
is rendered as planned and again as if sent late (2 h before the visit, or the day after
it), so that wording that depends on the moment of sending is covered too.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import icalendar
import pytest

from worker.catalog import Catalog
from worker.checking import sample_notices
from worker.models import CHANNELS, Booking
from worker.planner import plan
from worker.rendering import RenderedMessage, Renderer
from worker.sms import fold_to_gsm7

WORDS = tomllib.loads((Path(__file__).parent / "discreet_words.toml").read_text("utf-8"))
LOCALES = sorted(WORDS)


def pattern(locale: str, catalog: Catalog) -> re.Pattern[str]:
    """Return one regex matching any listed word (and any protocol name) at a word start."""
    words = [w for group in WORDS[locale].values() for w in group]
    words += [p.name for p in catalog.protocols.values() if p.id != "demo"]
    folded = sorted({fold_to_gsm7(w.lower()) for w in words}, key=len, reverse=True)
    return re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(w) for w in folded) + ")")


def named(text: str, words: re.Pattern[str]) -> list[str]:
    return words.findall(fold_to_gsm7(text.lower()))


def messages(catalog: Catalog, booking_doc: dict[str, Any], *, locale: str,
             discreet: bool) -> Iterator[tuple[str, str, RenderedMessage]]:
    """Yield (protocol, template, message) for every reminder of every treatment."""
    renderer = Renderer(catalog.templates_dir)
    clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
    for protocol in catalog.protocols.values():
        doc = {**booking_doc, "treatment": protocol.id,
               "medications": {"tretinoin": True, "retinol": True}}
        doc["patient"] = {**doc["patient"], "locale": locale, "name": "María José Núñez"}
        booking = Booking.model_validate(doc, context={"catalog": catalog})
        planned = plan(booking, protocol, clinic, booking.starts_at - timedelta(days=30))
        plan_dates: dict[str, datetime] = {}
        for reminder in planned.reminders:
            plan_dates.setdefault(reminder.step, reminder.due_at)
        for reminder in planned.reminders:
            late = (booking.starts_at - timedelta(hours=2) if reminder.due_at < booking.starts_at
                    else reminder.due_at + timedelta(hours=14))
            for now in (reminder.due_at, late):
                for channel in CHANNELS:
                    yield protocol.id, reminder.template, renderer.render(
                        template=reminder.template, channel=channel, booking=booking,
                        clinic=clinic, protocol=protocol, occurrence=reminder.occurrence,
                        due_at=reminder.due_at, plan_dates=plan_dates, now=now)
        # The change notices (a move, a cancel), and the calendar invite's title.
        for template, message in sample_notices(renderer, booking, clinic, protocol):
            yield protocol.id, template, message
            for attachment in message.attachments:
                event = icalendar.Calendar.from_ical(attachment.data).walk("VEVENT")[0]
                yield protocol.id, f"{template} invite", RenderedMessage(
                    "email", str(event["SUMMARY"]), "", None)


def visible(message: RenderedMessage) -> str:
    """What a stranger sees: the SMS text, or the email's subject in an inbox list."""
    return (message.subject if message.channel == "email" else message.text) or ""


@pytest.mark.parametrize("locale", LOCALES)
def test_discreet_subjects_and_sms_name_no_treatment_medication_or_condition(
    catalog: Catalog, booking_doc: dict[str, Any], locale: str,
) -> None:
    words = pattern(locale, catalog)
    seen, found = 0, []
    for protocol, template, message in messages(catalog, booking_doc, locale=locale,
                                                discreet=True):
        seen += 1
        if hits := named(visible(message), words):
            found.append((protocol, template, message.channel, hits, visible(message)))
    assert found == []
    templates = {s.template for p in catalog.protocols.values() for s in p.steps}
    assert seen >= len(templates) * 2 * 2  # every template, both channels, on time and late
    # The notices and the invites' titles were among them (the non-discreet run below shows
    # that the list catches their plain wording).
    assert {t for _, t, _ in messages(catalog, booking_doc, locale=locale, discreet=True)} >= {
        "rescheduled", "cancelled", "cancelled invite", "rescheduled invite"}


@pytest.mark.parametrize(("locale", "expected"), [
    ("en", {"tretinoin", "retinol", "cold sore"}),
    ("es", {"tretinoina", "retinol", "herpes"}),
])
def test_the_word_list_catches_the_plain_wording(catalog: Catalog, booking_doc: dict[str, Any],
                                                 locale: str, expected: set[str]) -> None:
    """The discreet test means something only if the same renders without the flag name
    medications and conditions, and the list catches them."""
    words = pattern(locale, catalog)
    hits = {hit for _, _, message in messages(catalog, booking_doc, locale=locale,
                                              discreet=False)
            for hit in named(visible(message), words)}
    assert expected <= hits
    notice_hits = {hit for _, t, message in messages(catalog, booking_doc, locale=locale,
                                                     discreet=False)
                   if t in ("rescheduled", "cancelled", "cancelled invite")
                   for hit in named(visible(message), words)}
    assert {"retinol", "microneedling"} <= notice_hits


@pytest.mark.parametrize(("locale", "product"), [
    ("en", "the night cream we discussed"),
    ("es", "la crema de noche que comentamos"),
])
def test_discreet_stop_sms_says_which_product_in_plain_words(
    catalog: Catalog, booking_doc: dict[str, Any], locale: str, product: str,
) -> None:
    """An SMS-only patient must still learn what to stop, on time and when it is late."""
    stops = [m.text for p, t, m in messages(catalog, booking_doc, locale=locale, discreet=True)
             if t == "stop-retinoids" and m.channel == "sms" and p == "microneedling"]
    assert len(set(stops)) == 2  # as planned, and late (2 h before the visit)
    assert all(fold_to_gsm7(product) in text for text in stops), stops
