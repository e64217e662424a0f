"""Templates and rendering: every shipped template, the discreet wording, escaping,
SMS segment maths, and dates in the patient's own timezone and language."""

from __future__ import annotations

import re
import time
import unicodedata
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from worker import sms as sms_module
from worker.catalog import Catalog
from worker.checking import check, sample_notices
from worker.errors import ConfigError
from worker.models import CHANNELS, Booking
from worker.planner import plan
from worker.protocols import NOTICE_STEPS, load_protocols
from worker.rendering import PARTS, RenderedMessage, Renderer, file_name
from worker.sms import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    fold_to_gsm7,
    is_gsm7,
    non_gsm7,
    normalise,
    sms_segments,
)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = load_protocols(ROOT / "config" / "protocols")
# Every protocol step's template, and the change notices' (worker/notices.py).
TEMPLATES = sorted({step.template for p in PROTOCOLS.values() for step in p.steps}
                   | set(NOTICE_STEPS)
                   | {p.hold_template for p in PROTOCOLS.values() if p.hold_template})
LOCALES = sorted(p.name for p in (ROOT / "templates").iterdir()
                 if p.is_dir() and not p.name.startswith("_"))
LONG_FIRST_NAME = "Christabelle"  # 12 letters
OPT_OUT = {"en": "Reply STOP to opt out", "es": "Responde BAJA para no recibir SMS"}


@pytest.fixture(scope="module")
def renderer(catalog: Catalog) -> Renderer:
    return Renderer(catalog.templates_dir)


def make_booking(doc: dict[str, Any], catalog: Catalog, **patient: Any) -> Booking:
    doc["patient"].update(patient)
    return Booking.model_validate(doc, context={"catalog": catalog})


def rendered(renderer: Renderer, catalog: Catalog, doc: dict[str, Any], *, locale: str,
             template: str, discreet: bool, name: str = f"{LONG_FIRST_NAME} López",
             ) -> list[RenderedMessage]:
    """Render `template` on both channels for every planned reminder that uses it."""
    clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
    messages = []
    for protocol in catalog.protocols.values():
        # Both medications, so that every conditional step is planned.
        booking = make_booking({**doc, "treatment": protocol.id,
                                "medications": {"tretinoin": True, "retinol": True}},
                               catalog, name=name, locale=locale)
        if template in NOTICE_STEPS:  # the change notices, in each of their forms
            messages += [m for t, m in sample_notices(renderer, booking, clinic, protocol)
                         if t == template]
            continue
        if template == protocol.hold_template:  # what a held booking sends: hold it
            booking = booking.model_copy(update={"medications": booking.medications.model_copy(
                update={"isotretinoin_last_dose": booking.starts_at.date() - timedelta(days=60)})})
        elif template not in {s.template for s in protocol.steps}:
            continue
        planned = plan(booking, protocol, clinic, booking.starts_at - timedelta(days=30))
        plan_dates: dict[str, datetime] = {}
        for reminder in planned.reminders:
            plan_dates.setdefault(reminder.step, reminder.due_at)
        for reminder in planned.reminders:
            if reminder.template != template:
                continue
            for channel in CHANNELS:
                messages.append(renderer.render(
                    template=template, channel=channel, booking=booking, clinic=clinic,
                    protocol=protocol, occurrence=reminder.occurrence, due_at=reminder.due_at,
                    plan_dates=plan_dates))
    return messages


# --- every shipped template -----------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_all_four_files_exist(renderer: Renderer, locale: str, template: str) -> None:
    assert renderer.missing_files(locale, template) == []


@pytest.mark.parametrize("discreet", [False, True], ids=["plain", "discreet"])
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_on_both_channels(renderer: Renderer, catalog: Catalog,
                                           booking_doc: dict[str, Any], locale: str,
                                           template: str, discreet: bool) -> None:
    messages = rendered(renderer, catalog, booking_doc, locale=locale, template=template,
                        discreet=discreet)
    assert {m.channel for m in messages} == set(CHANNELS)
    for message in messages:
        assert LONG_FIRST_NAME in message.text
        if message.channel == "email":
            assert message.subject and "\n" not in message.subject
            assert message.html and message.html.lstrip().startswith("<!doctype html>")
            assert f'lang="{locale}"' in message.html
            assert "{{" not in message.text + message.html
        else:
            assert message.subject is None and message.html is None
            # One GSM-7 segment with a 12-letter first name and the configured clinic.
            assert sms_segments(message.text)[0::2] == ("GSM-7", 1), message.text
            assert catalog.clinics["glow"].phone in message.text
            # Every SMS ends with how to opt out, in the message's language.
            assert message.text.endswith(OPT_OUT[locale]), message.text


@pytest.mark.parametrize(("locale", "word"), [("en", "tretinoin"), ("es", "tretinoina")])
def test_plain_wording_does_name_the_medication(renderer: Renderer, catalog: Catalog,
                                                booking_doc: dict[str, Any], locale: str,
                                                word: str) -> None:
    """The discreet test above means something only if plain wording differs."""
    sms = [m.text for m in rendered(renderer, catalog, booking_doc, locale=locale,
                                    template="stop-retinoids", discreet=False)
           if m.channel == "sms"]
    assert sms and all(word in text.lower() for text in sms)


def test_every_shipped_sms_is_one_gsm7_segment_for_every_clinic(catalog: Catalog,
                                                                repo_settings) -> None:
    report = check(catalog, repo_settings.clinics_dir, env={})
    assert report.errors == []
    assert {(s.template, s.locale) for s in report.sms} == {
        (t, loc) for t in TEMPLATES for loc in LOCALES}
    too_long = [(s.template, s.locale, s.encoding, s.length, s.segments) for s in report.sms
                if (s.encoding, s.segments) != ("GSM-7", 1)]
    assert too_long == []


def test_html_and_text_bodies_give_the_same_numbers(renderer: Renderer, catalog: Catalog,
                                                    booking_doc: dict[str, Any]) -> None:
    """The two email bodies are written twice: catch one being edited without the other."""
    for locale in LOCALES:
        for template in TEMPLATES:
            for message in rendered(renderer, catalog, booking_doc, locale=locale,
                                    template=template, discreet=False):
                if message.channel != "email":
                    continue
                assert message.html is not None
                body = unescape(re.sub(r"<[^>]+>", " ", re.split(r"<body[^>]*>", message.html)[1]))
                assert sorted(re.findall(r"\d+", body)) == sorted(
                    re.findall(r"\d+", message.text)), f"{locale}/{template}"


# --- escaping --------------------------------------------------------------------------


def test_html_escapes_the_patient_name_but_text_and_sms_do_not(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
) -> None:
    # (An SMS greets by at most SMS_NAME_MAX characters: a first word of 12.)
    name = "<i>Ann</i>&x Smith"
    messages = rendered(renderer, catalog, booking_doc, locale="en", template="day-before",
                        discreet=False, name=name)
    email = next(m for m in messages if m.channel == "email")
    sms = next(m for m in messages if m.channel == "sms")
    assert email.html is not None
    assert "<i>" not in email.html
    assert "&lt;i&gt;Ann&lt;/i&gt;&amp;x" in email.html
    assert "<i>Ann</i>&x" in email.text
    assert "<i>Ann</i>&x" in sms.text


# --- dates, times and counters in the patient's timezone and locale ---------------------


def context(renderer: Renderer, catalog: Catalog, doc: dict[str, Any], *, starts_at: str,
            due_at: datetime, timezone: str, locale: str) -> dict[str, Any]:
    booking = make_booking({**doc, "starts_at": starts_at}, catalog,
                           timezone=timezone, locale=locale)
    return renderer.context(booking=booking, clinic=catalog.clinics["glow"],
                            protocol=catalog.protocols["microneedling"], occurrence=1,
                            due_at=due_at)


@pytest.mark.parametrize(
    ("timezone", "locale", "date", "short", "time"),
    [
        # 23:30 UTC on 5 December is already 6 December in Madrid...
        ("Europe/Madrid", "es", "6 de diciembre de 2026", "6 dic", "0:30"),
        # ...and still the evening of 5 December in New York (in the glow clinic's variants:
        # its timezone is in Spain, so English is en-ES, British spelling and a 24 h clock).
        ("America/New_York", "en", "5 December 2026", "5 Dec", "18:30"),
        ("America/New_York", "es", "5 de diciembre de 2026", "5 dic", "18:30"),
    ],
)
def test_appointment_date_and_time_are_patient_local(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], timezone: str,
    locale: str, date: str, short: str, time: str,
) -> None:
    values = context(renderer, catalog, booking_doc, starts_at="2026-12-05T23:30:00Z",
                     due_at=datetime(2026, 12, 1, 12, tzinfo=UTC), timezone=timezone,
                     locale=locale)
    assert values["appointment_date"] == date
    assert values["appointment_date_short"] == short
    assert normalise(values["appointment_time"]) == time


@pytest.mark.parametrize(
    ("due_at", "days_until", "week"),
    [
        # 22:00 UTC on 5 Dec is 23:00 in Madrid: the visit (00:30 on 6 Dec) is tomorrow,
        # though both instants fall on 5 Dec in UTC.
        (datetime(2026, 12, 5, 22, 0, tzinfo=UTC), 1, 0),
        (datetime(2026, 12, 6, 0, 0, tzinfo=UTC), 0, 1),
        (datetime(2026, 12, 12, 9, 0, tzinfo=UTC), -6, 1),
        (datetime(2026, 12, 13, 9, 0, tzinfo=UTC), -7, 2),
        (datetime(2026, 12, 20, 9, 0, tzinfo=UTC), -14, 3),
        (datetime(2026, 11, 29, 9, 0, tzinfo=UTC), 7, 0),
    ],
)
def test_days_until_and_week_count_patient_local_calendar_days(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], due_at: datetime,
    days_until: int, week: int,
) -> None:
    values = context(renderer, catalog, booking_doc, starts_at="2026-12-05T23:30:00Z",
                     due_at=due_at, timezone="Europe/Madrid", locale="es")
    assert (values["days_until"], values["week"]) == (days_until, week)


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("es", "te esperamos mañana a las 14:30"), ("en", "see you tomorrow at 14:30")],
)
def test_day_before_sms_reads_naturally(renderer: Renderer, catalog: Catalog,
                                        booking_doc: dict[str, Any], locale: str,
                                        expected: str) -> None:
    booking = make_booking(booking_doc, catalog, locale=locale)  # 5 Dec 2026, 14:30 Madrid
    message = renderer.render(
        template="day-before", channel="sms", booking=booking, clinic=catalog.clinics["glow"],
        protocol=catalog.protocols["microneedling"], occurrence=1,
        due_at=datetime(2026, 12, 4, 9, tzinfo=UTC))
    assert expected in message.text
    assert "\u202f" not in message.text  # Babel's narrow no-break space, made plain


def test_confirmation_lists_the_prep_plan_in_date_order(renderer: Renderer, catalog: Catalog,
                                                        booking_doc: dict[str, Any]) -> None:
    booking = make_booking(booking_doc, catalog, locale="es")
    plan_dates = {  # deliberately out of order; one step the confirmation does not list
        "day-before": datetime(2026, 12, 4, 9, tzinfo=UTC),
        "aftercare": datetime(2026, 12, 5, 16, 30, tzinfo=UTC),
        "stop-retinoids": datetime(2026, 11, 28, 17, tzinfo=UTC),
        "spf": datetime(2026, 12, 6, 8, tzinfo=UTC),
        "resume-retinoids": datetime(2026, 12, 8, 17, tzinfo=UTC),
    }
    message = renderer.render(
        template="confirmation", channel="email", booking=booking,
        clinic=catalog.clinics["glow"], protocol=catalog.protocols["microneedling"],
        occurrence=1, due_at=datetime(2026, 11, 20, 10, tzinfo=UTC), plan_dates=plan_dates)
    # The date and time the locale's way (Babel's pattern), with the year.
    assert "reservada para el 5 de diciembre de 2026, 14:30." in message.text
    stop = message.text.index(
        "- Sábado, 28 de noviembre de 2026: desde esa noche, deja de usar tretinoína")
    reminder = message.text.index("- Viernes, 4 de diciembre de 2026: te enviamos un recordatorio")
    # ... and the steps after the visit, with their dates.
    aftercare = message.text.index("Después de la cita:\n- Sábado, 5 de diciembre de 2026: te "
                                   "enviamos por email cómo cuidar tu piel")
    resume = message.text.index("- Martes, 8 de diciembre de 2026: desde esa noche, si tu piel "
                                "está bien, puedes retomar la tretinoína")
    assert stop < reminder < aftercare < resume
    # two plan lines, three "before your visit", two after it (spf is not listed)
    assert message.text.count("\n- ") == 2 + 3 + 2


# --- template errors name the file -----------------------------------------------------


def write_template(folder: Path, template: str, body: str) -> None:
    for channel in CHANNELS:
        for part in PARTS[channel]:
            path = folder / file_name("en", template, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")


@pytest.mark.parametrize(
    ("body", "where", "problem"),
    [
        ("Hi {{ patient_firstname }}", "en/broken.sms.txt.j2:1", "patient_firstname"),
        ("Hi\n{% if discreet %}", "en/broken.sms.txt.j2:2", "syntax error"),
        # The sandbox refuses what a plain Jinja environment would allow.
        ("{{ clinic_name.__class__.__mro__ }}", "en/broken.sms.txt.j2", "__class__"),
    ],
)
def test_render_errors_name_the_template_file(catalog: Catalog, booking_doc: dict[str, Any],
                                              tmp_path: Path, body: str, where: str,
                                              problem: str) -> None:
    write_template(tmp_path, "broken", body)
    booking = make_booking(booking_doc, catalog, locale="en")
    with pytest.raises(ConfigError) as info:
        Renderer(tmp_path).render(
            template="broken", channel="sms", booking=booking, clinic=catalog.clinics["glow"],
            protocol=catalog.protocols["microneedling"], occurrence=1,
            due_at=datetime(2026, 12, 4, 9, tzinfo=UTC))
    assert where in str(info.value)
    assert problem in str(info.value)


def test_a_missing_file_is_named(catalog: Catalog, booking_doc: dict[str, Any],
                                 tmp_path: Path) -> None:
    booking = make_booking(booking_doc, catalog, locale="en")
    missing = r"en/absent\.email\.subject\.j2: template file not found"
    with pytest.raises(ConfigError, match=missing):
        Renderer(tmp_path).render(
            template="absent", channel="email", booking=booking, clinic=catalog.clinics["glow"],
            protocol=catalog.protocols["microneedling"], occurrence=1,
            due_at=datetime(2026, 12, 4, 9, tzinfo=UTC))


# --- SMS encoding and segments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("GSM-7", 0, 0)),
        ("a" * 160, ("GSM-7", 160, 1)),
        ("a" * 161, ("GSM-7", 161, 2)),
        ("a" * 306, ("GSM-7", 306, 2)),
        ("a" * 307, ("GSM-7", 307, 3)),
        ("€" + "a" * 158, ("GSM-7", 160, 1)),  # an extension character counts two
        ("€" + "a" * 159, ("GSM-7", 161, 2)),
        ("[~]" + "a" * 154, ("GSM-7", 160, 1)),
        # A part never ends in the middle of an escape pair: 152 + 2 does not fit in 153.
        ("a" * 152 + "€" + "a" * 152, ("GSM-7", 306, 3)),
        ("Mañana, ¿vienes? ¡Sí!", ("UCS-2", 21, 1)),  # one "í" turns it all to UCS-2
        ("Mañana, ¿vienes? ¡Si!", ("GSM-7", 21, 1)),  # ñ ¿ ¡ are GSM-7
        ("á" + "a" * 69, ("UCS-2", 70, 1)),
        ("á" + "a" * 70, ("UCS-2", 71, 2)),
        ("á" + "a" * 133, ("UCS-2", 134, 2)),
        ("á" + "a" * 134, ("UCS-2", 135, 3)),
        ("😀" * 35, ("UCS-2", 70, 1)),  # outside the BMP: two UTF-16 code units each
        ("😀" * 36, ("UCS-2", 72, 2)),
    ],
)
def test_sms_segments(text: str, expected: tuple[str, int, int]) -> None:
    assert sms_segments(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12:30\u202fPM", "12:30 PM"),
        ("\u201cHi\u201d \u2013 it\u2019s \u00abok\u00bb\u2026", "\"Hi\" - it's \"ok\"..."),
        ("line one\n  line two ", "line one line two"),
        ("María Núñez", "María Núñez"),  # letters are never changed
    ],
)
def test_normalise_replaces_typography_only(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_non_gsm7_names_the_offending_characters() -> None:
    assert non_gsm7("Día de la sesión, ¿vale? €") == ["í", "ó"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("María José Núñez", "Maria José Nuñez"),  # é and ñ are GSM-7 letters: kept
        ("Zoë Łukasz François", "Zoe Lukasz Francois"),
        ("Clínica Dermatológica", "Clinica Dermatologica"),
        ("tretinoína, sáltate, más", "tretinoina, saltate, mas"),
        ("Jose\u0301", "José"),  # decomposed input is composed first, then kept
        ("Åse Øvergård Ærø Ç ß", "Åse Øvergård Ærø Ç ß"),  # all GSM-7
        ("Œuvre", "OEuvre"),
        ("李 😀 38 °C", "李 😀 38 °C"),  # no GSM-7 base: left for UCS-2
    ],
)
def test_fold_to_gsm7_keeps_gsm7_letters_and_folds_the_rest(text: str, expected: str) -> None:
    assert fold_to_gsm7(text) == expected


def test_folded_names_are_gsm7() -> None:
    for name in ("María José", "Ramón", "Zoë", "Purificación", "Łucja", "Bjørn", "Sørina"):
        assert is_gsm7(fold_to_gsm7(name)), name



def _fold_char_by_char(text: str) -> str:
    """`fold_to_gsm7` as it was written first (a loop over the characters): the reference
    its table-driven form must match exactly."""
    gsm7 = GSM7_BASIC | GSM7_EXTENSION
    out = []
    for ch in unicodedata.normalize("NFC", text):
        if ch in gsm7:
            out.append(ch)
        elif ch in sms_module._FOLD_EXTRA:
            out.append(sms_module._FOLD_EXTRA[ch])
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", ch)
                           if not unicodedata.combining(c))
            out.append(base if base and all(c in gsm7 for c in base) else ch)
    return "".join(out)


def test_fold_to_gsm7_folds_every_character_as_the_loop_did(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every character of the Basic Multilingual Plane and a sample beyond (emoji, CJK
    extensions), alone and in a text mixing GSM-7, folded and unfoldable ones, folds
    exactly as the character-by-character loop folded it; once the folds kept number
    FOLDS_KEPT no more are kept, and characters still fold the same."""
    monkeypatch.setattr(sms_module, "_FOLDS", {})
    monkeypatch.setattr(sms_module, "FOLDS_KEPT", 2000)
    chars = [chr(c) for c in [*range(0xD800), *range(0xE000, 0x10000),
                              *range(0x1F600, 0x1F650), *range(0x20000, 0x20100)]]
    for ch in chars:
        assert fold_to_gsm7(ch) == _fold_char_by_char(ch), hex(ord(ch))
        assert is_gsm7(ch) == (ch in GSM7_BASIC or ch in GSM7_EXTENSION), hex(ord(ch))
    assert len(sms_module._FOLDS) == 2000
    mixed = "Hola María, Łukasz: 李 😀 38 °C {ok} ~ € Jose\u0301 Œuvre ﬁn ²"
    assert fold_to_gsm7(mixed) == _fold_char_by_char(mixed) != mixed
    plain = "Hi Ana, see you tomorrow at 14:30. Reply STOP to opt out"
    assert fold_to_gsm7(plain) == plain

# --- compiled templates and their files --------------------------------------------------


def test_templates_are_not_looked_at_on_every_render_but_edits_are_picked_up(
        catalog: Catalog, booking_doc: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A render uses the compiled templates without a look at their files (Jinja's
    auto_reload stats every file, the layouts too, at each use); a file edited while the
    process runs, a layout included, is still picked up once TEMPLATES_RECHECK_SECONDS
    have passed."""
    import jinja2.loaders

    from worker import rendering

    monkeypatch.setattr(rendering, "TEMPLATES_RECHECK_SECONDS", 0.3)
    write_template(tmp_path, "edited", "{% extends 'en/_layout.j2' %}")
    layout = tmp_path / "en" / "_layout.j2"
    layout.write_text("{% block body %}first{% endblock %}", encoding="utf-8")
    (tmp_path / "en" / "_opt_out.sms.txt.j2").write_text("STOP", encoding="utf-8")
    booking = make_booking(booking_doc, catalog, locale="en")
    renderer = Renderer(tmp_path)

    def text() -> str:
        return renderer.render(
            template="edited", channel="email", booking=booking,
            clinic=catalog.clinics["glow"], protocol=catalog.protocols["microneedling"],
            occurrence=1, due_at=datetime(2026, 12, 4, 9, tzinfo=UTC)).text

    assert text() == "first\n"
    looked: list[str] = []
    real = jinja2.loaders.os.path.getmtime
    monkeypatch.setattr(jinja2.loaders.os.path, "getmtime",
                        lambda path: looked.append(path) or real(path))
    assert text() == "first\n"
    assert looked == []  # compiled once, used as is
    layout.write_text("{% block body %}second{% endblock %}", encoding="utf-8")
    deadline = time.monotonic() + 5
    while text() != "second\n":
        assert time.monotonic() < deadline, "the edited layout was never picked up"
        time.sleep(0.05)
    assert looked  # it was looked at, once the recheck time had come


@pytest.mark.parametrize(("given", "canonical"), [("EN", "en"), ("En-gb", "en-GB"),
                                                  ("ES", "es"), ("es-es", "es-ES")])
def test_a_locale_written_in_another_case_is_written_in_its_language(
        renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], given: str,
        canonical: str) -> None:
    """Language tags are case-insensitive (BCP 47): `EN` is English. The booking (as the API
    and `reminders book` take it) accepted `EN`, but the templates' folder is `en`: its
    messages were written in the clinic's language instead (Spanish, at glow)."""
    def words(locale: str) -> list[tuple[str | None, str]]:
        doc = {**booking_doc, "patient": dict(booking_doc["patient"])}
        return [(m.subject, m.text) for m in rendered(
            renderer, catalog, doc, locale=locale, template="day-before",
            discreet=False)]

    assert words(given) == words(canonical) != []
    doc = {**booking_doc, "patient": {**booking_doc["patient"], "locale": given}}
    assert Booking.model_validate(doc, context={"catalog": catalog}).patient.locale == canonical
