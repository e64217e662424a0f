"""The wording findings of issue 8, each pinned: what the messages must and must not say,
their English variant (en-US / en-GB), Spanish phrasing, and accents in SMS."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import product
from pathlib import Path
from typing import Any

import icalendar
import pytest

from worker.catalog import Catalog
from worker.checking import (
    SAMPLE_FIRST_NAMES,
    check,
    sample_booking,
    sample_messages,
    sample_names,
    sample_notices,
)
from worker.clinics import Clinic
from worker.models import CHANNELS, Booking
from worker.planner import plan
from worker.rendering import RenderedMessage, Renderer
from worker.settings import Settings
from worker.sms import is_gsm7, sms_segments


@pytest.fixture(scope="module")
def renderer(catalog: Catalog) -> Renderer:
    return Renderer(catalog.templates_dir)


def booking(catalog: Catalog, doc: dict[str, Any], *, treatment: str = "microneedling",
            starts_at: str | None = None, validate: bool = True, **patient: Any) -> Booking:
    doc = {**doc, "treatment": treatment, "medications": {"tretinoin": True, "retinol": True}}
    if starts_at:
        doc["starts_at"] = starts_at
    doc["patient"] = {**doc["patient"], **patient}
    return Booking.model_validate(doc, context={"catalog": catalog} if validate else None)


def rendered(renderer: Renderer, catalog: Catalog, booking: Booking, clinic: Clinic, *,
             booked_at: datetime | None = None,
             ) -> Iterator[tuple[str, RenderedMessage]]:
    """Yield (reminder key, message) for each planned reminder, rendered when it is due."""
    protocol = catalog.protocols[booking.treatment]
    booked_at = booked_at or booking.starts_at - timedelta(days=30)
    reminders = plan(booking, protocol, clinic, booked_at).reminders
    plan_dates: dict[str, datetime] = {}
    for reminder in reminders:
        plan_dates.setdefault(reminder.step, reminder.due_at)
    for reminder in reminders:
        if reminder.status != "scheduled":
            continue
        for channel in CHANNELS:
            yield reminder.key, renderer.render(
                template=reminder.template, channel=channel, booking=booking, clinic=clinic,
                protocol=protocol, occurrence=reminder.occurrence, due_at=reminder.due_at,
                plan_dates=plan_dates)


def texts(messages: Iterator[tuple[str, RenderedMessage]], prefix: str,
          channel: str | None = None) -> list[str]:
    return [f"{m.subject or ''}\n{m.text}" for key, m in messages
            if key.startswith(prefix) and (channel is None or m.channel == channel)]


# --- chemical peel: the antiviral ---------------------------------------------------------


@pytest.mark.parametrize(("locale", "question", "as_prescribed"), [
    ("en", "if you have ever had a cold sore, please tell us now", "exactly as prescribed"),
    ("es", "si alguna vez has tenido un herpes labial, avísanos ahora",
     "exactamente como te lo recetamos"),
])
def test_the_peel_confirmation_asks_about_cold_sores_and_the_antiviral_is_as_prescribed(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str,
    question: str, as_prescribed: str,
) -> None:
    glow = catalog.clinics["glow"]
    peel = list(rendered(renderer, catalog, booking(catalog, booking_doc,
                                                    treatment="chemical-peel",
                                                    locale=locale), glow))
    (confirmation,) = texts(iter(peel), "booking-confirmation", "email")
    assert question in confirmation
    (sms,) = texts(iter(peel), "booking-confirmation", "sms")  # an SMS-only patient's copy
    assert ("Ever had cold sores?" if locale == "en" else "¿Has tenido herpes labial?") in sms
    for prefix in ("prep", "aftercare"):
        (email,) = texts(iter(peel), prefix, "email")
        assert as_prescribed in email
    everything = "\n".join(texts(iter(peel), ""))
    assert not re.search(r"5 days after|5 días después|hasta 5 días", everything)
    # Microneedling does not ask about cold-sore history in its confirmation.
    needling = rendered(renderer, catalog, booking(catalog, booking_doc, locale=locale), glow)
    assert question not in "\n".join(texts(needling, "booking-confirmation"))


# --- makeup, "this evening", "today" --------------------------------------------------------


@pytest.mark.parametrize(("locale", "says", "never"), [
    ("en", "No makeup for 3 days", "24 hours"),
    ("es", "No te maquilles durante 3 días", "24 horas"),
])
def test_makeup_waits_the_few_days_seeds_002_says(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str, says: str,
    never: str,
) -> None:
    messages = rendered(renderer, catalog, booking(catalog, booking_doc, locale=locale),
                        catalog.clinics["glow"])
    (email,) = texts(messages, "aftercare", "email")
    assert says in email
    assert not re.search(rf"(maquill|makeup)[^.]*{never}|{never}[^.]*(maquill|makeup)", email)


@pytest.mark.parametrize(("locale", "line"), [
    ("en", ": from that evening, stop using tretinoin and retinol"),
    ("es", ": desde esa noche, deja de usar tretinoína y retinol"),
])
def test_the_confirmation_says_that_evening_for_a_date_a_week_away(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str, line: str,
) -> None:
    messages = rendered(renderer, catalog, booking(catalog, booking_doc, locale=locale),
                        catalog.clinics["glow"])
    (email,) = texts(messages, "booking-confirmation", "email")
    assert line in email
    assert "this evening" not in email and "esta noche" not in email


@pytest.mark.parametrize(("locale", "starts_at", "when", "subject"), [
    # 18:30 + 3 h = 21:30, outside the 09:00-20:00 window: it goes the next morning.
    ("en", "2026-12-05T18:30:00+01:00", "Thank you for coming to Glow Skin Clinic yesterday.",
     "Caring for your skin after yesterday's appointment"),
    ("es", "2026-12-05T18:30:00+01:00", "Gracias por venir ayer a Glow Skin Clinic.",
     "Cuidados de tu piel después de la cita de ayer"),
    # 14:30 + 3 h = 17:30, the same evening.
    ("en", "2026-12-05T14:30:00+01:00", "Thank you for coming to Glow Skin Clinic today.",
     "Caring for your skin after today's appointment"),
    ("es", "2026-12-05T14:30:00+01:00", "Gracias por venir hoy a Glow Skin Clinic.",
     "Cuidados de tu piel después de la cita de hoy"),
])
@pytest.mark.parametrize("treatment", ["microneedling", "chemical-peel"])
def test_aftercare_moved_to_the_next_morning_says_yesterday(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], treatment: str,
    locale: str, starts_at: str, when: str, subject: str,
) -> None:
    glow = catalog.clinics["glow"].model_copy(update={"discreet": True})
    messages = list(rendered(renderer, catalog, booking(
        catalog, booking_doc, treatment=treatment, starts_at=starts_at, locale=locale), glow))
    (email,) = [m for key, m in messages if key == "aftercare:email" and m.channel == "email"]
    assert when in email.text
    assert email.subject == subject
    late = "yesterday" in when or "ayer" in when
    assert ("today" in email.text.lower() or " hoy " in email.text) is not late


@pytest.mark.parametrize(("locale", "email_says", "sms_says"), [
    ("en", "Your appointment is less than 5 days away",
     "is too soon for a full pause: stop tretinoin and retinol now and call us"),
    ("es", "Tu cita es dentro de menos de 5 días",
     "queda poco para tu cita del 5 dic: deja ya la tretinoina y el retinol y llamanos"),
])
def test_a_stop_message_too_late_for_the_full_pause_says_to_call(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str,
    email_says: str, sms_says: str,
) -> None:
    appointment = booking(catalog, booking_doc, locale=locale)  # Sat 5 Dec 2026, 14:30
    booked_at = appointment.starts_at - timedelta(days=3)  # the stop step is late: sent now
    messages = list(rendered(renderer, catalog, appointment, catalog.clinics["glow"],
                             booked_at=booked_at))
    (email,) = texts(iter(messages), "stop-retinoids:email", "email")
    (sms,) = texts(iter(messages), "stop-retinoids:sms", "sms")
    assert email_says in email and sms_says in sms
    on_time = rendered(renderer, catalog, appointment, catalog.clinics["glow"])
    assert email_says not in "\n".join(texts(on_time, "stop-retinoids"))


@pytest.mark.parametrize(("locale", "tonight", "now"), [
    ("en", "tonight", "stop using tretinoin and retinol now"),
    ("es", "esta noche", "deja ya de usar tretinoína y retinol"),
])
@pytest.mark.parametrize("discreet", [False, True])
def test_a_stop_email_sent_on_the_day_of_the_visit_says_now_not_tonight(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str,
    tonight: str, now: str, discreet: bool,
) -> None:
    """Booked at 08:00 for 17:00 the same day: the pause message still goes (until 6 h
    before, at 09:00). Its SMS says "stop now and call us"; its email said "Stop tretinoin
    and retinol from tonight" and "Your appointment is today at 17:00. From tonight, please
    stop...": tonight comes after the treatment, and no retinoid is used on its day
    (seeds/000). Too late for the full pause, the email says "now", as the SMS does."""
    appointment = booking(catalog, booking_doc, locale=locale,
                          starts_at="2026-12-05T17:00:00+01:00")
    clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
    messages = list(rendered(renderer, catalog, appointment, clinic,
                             booked_at=appointment.starts_at - timedelta(hours=9)))
    (email,) = [m for key, m in messages
                if key == "stop-retinoids:email" and m.channel == "email"]
    assert tonight not in f"{email.subject}\n{email.text}\n{email.html}".lower(), email
    html = (email.html or "").replace("<strong>", "").replace("</strong>", "")
    assert now in email.text.lower() and now in html.lower(), email.text


# --- English variants ----------------------------------------------------------------------


def en_clinic(catalog: Catalog, locale: str, timezone: str) -> Clinic:
    return catalog.clinics["demo"].model_copy(update={"locale": locale, "timezone": timezone})


@pytest.mark.parametrize(("locale", "timezone", "region"), [
    ("en-US", "America/New_York", "US"),
    ("en-GB", "Europe/London", "GB"),
    ("en", "America/Chicago", "US"),  # no region: the clinic's timezone decides
    ("en", "Europe/Madrid", "ES"),  # English in Spain: British spelling, Celsius, 24 h
    ("es", "Europe/Madrid", "ES"),  # another language: the same
])
def test_the_variant_follows_the_clinic(renderer: Renderer, catalog: Catalog, locale: str,
                                        timezone: str, region: str) -> None:
    variant = renderer.variant("en", en_clinic(catalog, locale, timezone))
    assert (variant.folder, variant.region) == ("en", region)
    # The patient's own region wins (a locale such as "en-GB" in a booking).
    assert renderer.variant("en-GB", en_clinic(catalog, "en-US", timezone)).region == "GB"


@pytest.mark.parametrize(("locale", "timezone", "wants", "never"), [
    ("en-US", "America/New_York",
     ["moisturizer", "call us at", "100.4 °F", "December 5, 2026", "2:30 PM", "tanning beds",
      "is canceled"],
     ["moisturis", "°C", "call us on", "sunbeds", "cancelled", "Demo Skin Clinic on +"]),
    ("en-GB", "Europe/London",
     ["moisturiser", "call us on", "38 °C", "5 December 2026", "14:30", "sunbeds",
      "is cancelled"],
     ["moisturiz", "°F", "call us at", "PM", "canceled"]),
])
def test_one_spelling_and_unit_per_english_variant(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str,
    timezone: str, wants: list[str], never: list[str],
) -> None:
    clinic = en_clinic(catalog, locale, timezone)
    everything = ""
    for treatment in ("microneedling", "chemical-peel", "tretinoin-start"):
        patient = booking(catalog, booking_doc, treatment=treatment, locale="en",
                          timezone=timezone, starts_at="2026-12-05T14:30:00"
                          + ("-05:00" if timezone == "America/New_York" else "+00:00"))
        # The change notices, and the calendar invite's title and description.
        for _, message in [*rendered(renderer, catalog, patient, clinic),
                           *sample_notices(renderer, patient, clinic,
                                           catalog.protocols[treatment])]:
            everything += f"{message.subject}\n{message.text}\n{message.html}\n"
            for attachment in message.attachments:
                event = icalendar.Calendar.from_ical(attachment.data).walk("VEVENT")[0]
                everything += f"{event['SUMMARY']}\n{event['DESCRIPTION']}\n"
    assert ([w for w in wants if w not in everything],
            [w for w in never if w in everything]) == ([], [])


def test_every_us_sms_fits_one_gsm7_segment(renderer: Renderer, catalog: Catalog) -> None:
    """Check covers the configured clinics; an en-US clinic has longer times and °F."""
    clinic = en_clinic(catalog, "en-US", "America/New_York")
    worst = []
    for protocol in catalog.protocols.values():
        for discreet in (False, True):
            wording = clinic.model_copy(update={"discreet": discreet})
            for name in SAMPLE_FIRST_NAMES["en"]:
                patient = sample_booking(wording, protocol, "en", first_name=name)
                for _, message in sample_messages(renderer, patient, wording, protocol,
                                                  ("sms",)):
                    if sms_segments(message.text)[0::2] != ("GSM-7", 1):
                        worst.append(message.text)
    assert worst == []


def test_a_clinic_locale_with_a_region_uses_its_language_folder(renderer: Renderer) -> None:
    template = renderer.env.get_template("en-GB/clinic/held.email.subject.j2")
    assert template.filename is not None and template.filename.endswith(
        "en/clinic/held.email.subject.j2")


# --- Spanish and accents -----------------------------------------------------------------


def test_spanish_greets_hola_comma_name_colon_everywhere(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
) -> None:
    glow = catalog.clinics["glow"]
    for treatment in ("microneedling", "chemical-peel", "tretinoin-start"):
        patient = booking(catalog, booking_doc, treatment=treatment, locale="es",
                          name="María José Núñez")
        for key, message in rendered(renderer, catalog, patient, glow):
            first = message.text.splitlines()[0]
            if message.channel == "email":
                assert re.fullmatch(r"(Hola|Buenos días), María:", first), (key, first)
            else:
                assert first.startswith("Hola, Maria: "), (key, first)


@pytest.mark.parametrize(("template", "channel", "phrase"), [
    ("tretinoin-night", "email", "una cantidad del tamaño de un guisante"),
    # The SMS says it shorter, to fit "Mañana, SPF 30+." in one segment (seeds/000).
    ("tretinoin-night", "sms", "(cantidad de un guisante) y luego hidratante"),
    ("tretinoin-night", "sms", "saltate una noche"),  # folded: GSM-7 has no "á"
    ("tretinoin-welcome", "email", "sáltate una noche"),
    ("tretinoin-welcome", "email", "0,025 %"),
    ("microneedling-aftercare", "email", "fiebre de 38 °C o más"),
    ("microneedling-redness", "sms", "fiebre de 38C o mas"),
    # As in English ("restart ... tonight, every other night at first"): a lower frequency
    # at first (seeds/000), not alternate nights for good, and from when.
    ("resume-retinoids", "sms", "retoma hoy tretinoina o retinol, al principio en noches alternas"),
    # As in English ("Moisturise, SPF 30+."), for a patient without email (seeds/000).
    ("tretinoin-step-up", "sms", "Hidrata, SPF 30+."),
])
def test_spanish_phrasing(renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
                          template: str, channel: str, phrase: str) -> None:
    treatment = "tretinoin-start" if template.startswith("tretinoin") else "microneedling"
    patient = booking(catalog, booking_doc, treatment=treatment, locale="es")
    steps = {s.id for s in catalog.protocols[treatment].steps if s.template == template}
    found = [m.text for key, m in rendered(renderer, catalog, patient, catalog.clinics["glow"])
             if m.channel == channel and key.split(":")[0].split("#")[0] in steps]
    assert found and any(phrase in text for text in found), found


@pytest.mark.parametrize(("accents", "name", "greeting", "word", "encoding"), [
    ("fold", "María José", "Hola, Maria:", "tretinoina", "GSM-7"),
    # Keep: "María" needs UCS-2 anyway, so the whole text keeps its accents.
    ("keep", "María José", "Hola, María:", "tretinoína", "UCS-2"),
    # Keep, but a GSM-7 name: the template's words are still folded to stay GSM-7.
    ("keep", "Ana López", "Hola, Ana:", "tretinoina", "GSM-7"),
])
def test_sms_accents_setting(renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
                             accents: str, name: str, greeting: str, word: str,
                             encoding: str) -> None:
    clinic = catalog.clinics["glow"].model_copy(update={"sms_accents": accents})
    patient = booking(catalog, booking_doc, locale="es", name=name)
    stop = {m.channel: m for key, m in rendered(renderer, catalog, patient, clinic)
            if key == "stop-retinoids:sms"}
    sms, email = stop["sms"], stop["email"]  # the email: the same step on the other channel
    assert sms.text.startswith(greeting) and word in sms.text
    assert sms_segments(sms.text)[0] == encoding
    # Email always keeps the accents.
    assert email.text.startswith(f"Hola, {name.split()[0]}:") and "tretinoína" in email.text


def test_a_clinic_name_with_accents_is_folded_in_sms_and_kept_in_email(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any],
) -> None:
    clinic = catalog.clinics["glow"].model_copy(update={"name": "Clínica Dermatológica"})
    patient = booking(catalog, booking_doc, locale="es")
    for _, message in rendered(renderer, catalog, patient, clinic):
        if message.channel == "sms":
            assert is_gsm7(message.text), message.text
        else:
            assert "Clínica Dermatológica" in message.text


def test_now_counts_from_the_moment_of_sending(renderer: Renderer, catalog: Catalog,
                                               booking_doc: dict[str, Any]) -> None:
    """days_until and days_since come from `now`, not from the planned time."""
    patient = booking(catalog, booking_doc, locale="en")  # 5 Dec 2026 14:30 Madrid
    glow = catalog.clinics["glow"]
    args = dict(booking=patient, clinic=glow, protocol=catalog.protocols["microneedling"],
                occurrence=1, due_at=datetime(2026, 12, 5, 16, 30, tzinfo=UTC))
    assert renderer.context(**args)["days_since"] == 0
    later = renderer.context(**args, now=datetime(2026, 12, 6, 8, 0, tzinfo=UTC))
    assert (later["days_since"], later["days_until"]) == (1, -1)


def test_check_accepts_a_clinic_locale_with_a_region(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "config", tmp_path / "config")
    clinic = tmp_path / "config" / "clinics" / "demo.toml"
    clinic.write_text(clinic.read_text().replace('locale = "en"', 'locale = "en-US"'))
    settings = Settings(config_dir=tmp_path / "config", templates_dir=root / "templates",
                        _env_file=None)
    catalog = Catalog.load(settings)
    report = check(catalog, settings.clinics_dir, env={}, clinic_ids=["demo"])
    assert report.errors == [] and report.warnings == []
    day_before = next(s for s in report.sms if (s.template, s.locale) == ("day-before", "en"))
    # A 12-hour time: the clinic's en-US variant ("12:30 PM"), or a patient's wider one that
    # check renders too (en-CA "12:30 p.m."), never the 24-hour clock of bare English.
    assert re.search(r"12:30 (PM|p\.m\.)", day_before.text), day_before.text


# --- plain-text layout ---------------------------------------------------------------------


def run_together(text: str) -> list[tuple[str, str]]:
    """Consecutive lines of a plain-text body that belong to two paragraphs (no blank line
    between them): a sentence then another sentence, a sentence then a list, or a list
    then a sentence (which reads as the last item's own)."""
    body = text.split("\n--\n", 1)[0].split("\n")
    return [(a, b) for a, b in zip(body, body[1:], strict=False)
            if a.strip() and b.strip() and not a.endswith(":")
            and (not a.startswith("- ") or not b.startswith("- "))]


@pytest.mark.parametrize("locale", ["en", "es"])
def test_plain_text_paragraphs_stay_apart(renderer: Renderer, catalog: Catalog,
                                         locale: str) -> None:
    """A line of a .txt template ending in "{% endif %}" lost its line break (trim_blocks):
    "...so the treatment would irritate it more.\\nUntil then:", "...that is the peel
    working.\\nWhat helps:", "That is expected.\\n- Let the skin...": paragraphs run
    together in the plain-text email (what text-only mail clients and screen readers of
    the text part show). And a list then a sentence: the tretinoin welcome's "- Every
    morning: ... sensitive to the sun.\nSome dryness, redness and peeling ... is common."
    read as part of the last item."""
    found: dict[str, list[tuple[str, str]]] = {}
    for protocol in catalog.protocols.values():
        for discreet in (False, True):
            clinic = catalog.clinics["glow"].model_copy(update={"discreet": discreet})
            patient = sample_booking(clinic, protocol, locale)
            for reminder, message in sample_messages(renderer, patient, clinic, protocol,
                                                     ("email",)):
                if run_together(message.text):
                    found[reminder.template] = run_together(message.text)
            for template, message in sample_notices(renderer, patient, clinic, protocol,
                                                    ("email",)):
                if run_together(message.text):
                    found[template] = run_together(message.text)
    assert found == {}


@pytest.mark.parametrize(("locale", "texted", "reminded"), [
    ("en", "we will text you", "we will remind you on those nights"),
    ("es", "te enviaremos un SMS", "te lo recordaremos esas noches"),
])
def test_the_tretinoin_welcome_promises_no_texts_to_a_patient_without_sms(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], locale: str,
    texted: str, reminded: str,
) -> None:
    """A patient who takes email only gets the night reminders by email (the planner's
    fallback), yet the welcome email said "we will text you on those nights"."""
    patient = booking(catalog, booking_doc, treatment="tretinoin-start", locale=locale,
                      channels=["email"])
    (welcome,) = [m for key, m in rendered(renderer, catalog, patient, catalog.clinics["glow"])
                  if key.startswith("welcome:") and m.channel == "email"]
    for part in (welcome.text, welcome.html or ""):
        assert texted not in part and reminded in part, part
    # The night reminders do go by email.
    nights = [key for key, m in rendered(renderer, catalog, patient, catalog.clinics["glow"])
              if key.startswith("application-night") and m.channel == "email"]
    assert nights and all(key.endswith(":email") for key in nights)


# --- isotretinoin: the months the patient is asked about are the clinic's washout -------


@pytest.mark.parametrize(("washout_days", "en", "es"), [
    (None, "in the last 6 months", "en los últimos 6 meses"),  # the protocols' 182 days
    (365, "in the last 12 months", "en los últimos 12 meses"),
    (270, "in the last 9 months", "en los últimos 9 meses"),
])
@pytest.mark.parametrize("treatment", ["microneedling", "chemical-peel"])
def test_the_isotretinoin_question_asks_about_the_clinics_own_washout(
    renderer: Renderer, catalog: Catalog, booking_doc: dict[str, Any], treatment: str,
    washout_days: int | None, en: str, es: str,
) -> None:
    """A clinic may set its own isotretinoin washout (`isotretinoin_washout_days`; DOMAIN.md
    "Oral isotretinoin": "the clinic's washout (default 182 days ...)"), and the planner
    holds by it. The confirmation and prep emails ask the patient to tell the clinic if
    they took isotretinoin "in the last N months": N must be that washout. Before: always
    the protocol's 6, so at a clinic holding for 12 months a patient who took it 8 months
    ago read that they had nothing to tell."""
    clinic = catalog.clinics["glow"].model_copy(
        update={"isotretinoin_washout_days": washout_days})
    for locale, phrase in (("en", en), ("es", es)):
        patient = booking(catalog, booking_doc, treatment=treatment, locale=locale)
        asked = [m.text for key, m in rendered(renderer, catalog, patient, clinic)
                 if m.channel == "email" and "isotretino" in m.text]
        assert len(asked) >= 2, asked  # the confirmation and the prep email
        assert all(phrase in text for text in asked), (phrase, asked)


# --- a sentence ending in an abbreviation takes one full stop -----------------------------

# A full stop right after one that ends an abbreviation ("p.m.", "p. m.", "oct."), with at
# most tags between them: "12:30 p.m..", "12:30 p.m.</strong>.". Not an ellipsis ("...").
DOUBLE_STOP = re.compile(r"[^.\s]\.(?:</?[a-z][^>]*>)*\.(?!\.)")


@pytest.mark.parametrize(("locale", "clinic_locale", "timezone"), [
    ("es-US", "en-US", "America/New_York"),   # a US clinic's Spanish-speaking patients
    ("es-MX", "es-MX", "America/Mexico_City"),
    ("es-CO", "es", "Europe/Madrid"),          # a Colombian patient of glow
    ("en-CA", "en", "Europe/Madrid"),
])
def test_a_time_ending_in_p_m_is_not_followed_by_a_second_full_stop(
    renderer: Renderer, catalog: Catalog, locale: str, clinic_locale: str, timezone: str,
) -> None:
    """The templates end sentences with "{{ appointment_time }}." and "{{ ..._short }}.": in
    variants whose 12-hour times end in "p.m." / "p. m." (es-US, es-MX, es-CO, en-CA) or
    whose short months end in a dot ("30 set." in es-PE), every confirmation, stop and
    prep email read "a las 12:30 p.m.. Así puedes prepararte"."""
    clinic = catalog.clinics["glow"].model_copy(update={
        "locale": clinic_locale, "timezone": timezone, "phone": "+12125550100"})
    seen, found = 0, []
    for protocol in catalog.protocols.values():
        patient = sample_booking(clinic, protocol, locale)
        messages = [m for _, m in sample_messages(renderer, patient, clinic, protocol)]
        messages += [m for _, m in sample_notices(renderer, patient, clinic, protocol)]
        for message in messages:
            for part in (message.subject or "", message.text, message.html or ""):
                seen += bool(re.search(r"p\.\s?m\.", part))
                found += [(message.channel, hit.group(0), part[max(0, hit.start() - 40):
                                                             hit.end() + 20])
                          for hit in DOUBLE_STOP.finditer(part)]
    assert seen > 10  # the times are 12-hour ones
    assert found == []


def regional_variants(renderer: Renderer, catalog: Catalog) -> list[str]:
    """One patient locale (language-TERRITORY) per distinct way Babel writes the variable
    parts of an SMS in a language with a templates folder: the time, the short and long
    dates, the fever, a decimal ("12:30 p. m.", "30 de sept", "100.4F", "0,025")."""
    from babel.localedata import locale_identifiers

    clinic, protocol = catalog.clinics["glow"], catalog.protocols["microneedling"]
    seen: dict[tuple[str, ...], str] = {}
    for ident in sorted(locale_identifiers()):
        language, _, territory = ident.partition("_")
        if language not in catalog.locales or not territory.isalpha():
            continue
        patient = sample_booking(clinic, protocol, f"{language}-{territory}")
        values = renderer.context(booking=patient, clinic=clinic, protocol=protocol,
                                  occurrence=1, due_at=patient.starts_at, channel="sms")
        key = (language, values["appointment_time"], values["appointment_date_short"],
               values["appointment_when"], values["temperature"](38), values["number"](0.025))
        seen.setdefault(key, f"{language}-{territory}")
    return sorted(seen.values())


def test_every_sms_fits_one_gsm7_segment_in_every_regional_variant_of_its_language(
        renderer: Renderer, catalog: Catalog) -> None:
    """DOMAIN.md: an SMS is one GSM-7 segment (160). A message is written in the patient's
    own regional variant (templates/README.md "Variants"), and `check` renders only the
    clinics' own: a Colombian patient of glow read "tu cita pasa al 14 de oct, 12:30 p. m.
    Puedes usar tretinoina/retinol solo hasta el 7 de oct." in two segments (166), as did
    es-PE, es-PY, es-UY and es-VE patients (161)."""
    variants = regional_variants(renderer, catalog)
    assert {"es-CO", "es-PE", "es-US", "en-CA", "en-AS"} <= set(variants), variants
    over = []
    for clinic, protocol, discreet in product(catalog.clinics.values(),
                                              catalog.protocols.values(), (False, True)):
        wording = clinic.model_copy(update={"discreet": discreet})
        for locale in variants:
            for name in sample_names(locale.split("-")[0]):
                patient = sample_booking(wording, protocol, locale, first_name=name)
                messages = [m for _, m in sample_messages(renderer, patient, wording, protocol,
                                                          ("sms",))]
                messages += [m for _, m in sample_notices(renderer, patient, wording, protocol,
                                                          ("sms",))]
                over += [(locale, sms_segments(m.text)[1], m.text) for m in messages
                         if sms_segments(m.text)[0::2] != ("GSM-7", 1)]
    assert sorted(set(over)) == [], "\n".join(map(str, sorted(set(over))))
