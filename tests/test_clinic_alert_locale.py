"""The clinic's own alert email (a held booking, a late pause, a call request) in a clinic
whose locale has no templates: it falls back as its patients' messages do (clinic -> English),
not a TemplateNotFound that leaves the event claimed, retried at every lease and never given
up (real Redis: the store's own write emits the event; the pump's claim; a real SMTP server)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

from tests.conftest import ROOT
from tests.sinks import SmtpSink
from worker.models import parse_booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings
from worker.store import Store
from worker.webhooks import Events, deliver_event, hooks_for, pump_events

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
HELD_MEDS = {"tretinoin": True, "isotretinoin_last_dose": "2026-10-01"}


def test_the_held_alert_of_a_clinic_whose_locale_has_no_templates_goes_in_english(
        redis_client, catalog, booking_doc, tmp_path):
    sink = SmtpSink().start()
    try:
        clinic = catalog.clinics["glow"].model_copy(update={"locale": "fr", "channels": {
            "email": f"mailto://127.0.0.1:{sink.port}?from=noreply@glow.example&to={{to}}"
                     "&mode=insecure",
            "sms": "json://127.0.0.1:9/sms?:to={to}"}})
        clinics = {"glow": clinic}
        store = Store(redis_client, "fr", retention_days=3650, hooks=hooks_for(clinics))
        booking = parse_booking(dict(booking_doc, medications=HELD_MEDS), catalog)
        timeline = store.upsert(booking, plan(booking, catalog.protocols["microneedling"],
                                              catalog.clinics["glow"], NOW), NOW)
        assert timeline["status"] == "held"
        events = Events(redis_client, "fr")
        settings = Settings(templates_dir=ROOT / "templates", data_dir=tmp_path,
                            _env_file=None)
        results: list[str] = []
        pump_events(events, lambda i, c: results.append(deliver_event(
            events, i, c, clinics=clinics, renderer=Renderer(ROOT / "templates"),
            settings=settings, env={})), batch=10, lease_seconds=30)
        assert results == ["delivered"]
        assert events.pending() == []
    finally:
        sink.stop()
    (mail,) = sink.snapshot()
    assert mail.to == "hola@glow.example"
    assert mail.subject == "Booking A-1042 is held for your review"
    assert timeline["hold_reason"] in mail.text


def test_an_alert_whose_template_is_missing_is_retried_then_given_up_not_left_claimed(
        redis_client, catalog, booking_doc, tmp_path):
    """A templates folder without clinic/replied.* (`reminders check` asks only for the held
    and late-pause alerts): a patient's R reply (call me) is emailed to the clinic. Before:
    TemplateNotFound escaped the delivery, the event stayed claimed with no attempt counted,
    was claimed again at each lease's end, for ever. Now: a failed attempt, retried with
    backoff, given up after `webhook_max_attempts` with the reason kept."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    for path in templates.glob("*/clinic/replied.*"):
        path.unlink()
    sink = SmtpSink().start()
    try:
        clinic = catalog.clinics["glow"].model_copy(update={"channels": {
            "email": f"mailto://127.0.0.1:{sink.port}?from=noreply@glow.example&to={{to}}"
                     "&mode=insecure",
            "sms": "json://127.0.0.1:9/sms?:to={to}"}})
        clinics = {"glow": clinic}
        store = Store(redis_client, "rp", retention_days=3650, hooks=hooks_for(clinics))
        booking = parse_booking(booking_doc, catalog)
        store.upsert(booking, plan(booking, catalog.protocols["microneedling"],
                                   catalog.clinics["glow"], NOW), NOW)
        assert store.note_reply("glow", "A-1042", "call_requested_at", NOW, "reschedule")
        events = Events(redis_client, "rp")
        (alert,) = [e for e in events.pending() if e.kind == "alert"]
        settings = Settings(templates_dir=templates, data_dir=tmp_path, _env_file=None,
                            webhook_max_attempts=2, backoff_base_seconds=0.01,
                            backoff_cap_seconds=0.01)
        renderer = Renderer(templates)
        results: list[str] = []
        for _ in range(2):
            redis_client.zadd(events.due_key, {alert.id: 0})  # due now (its backoff passed)
            for event_id, claim in events.claim(10, 30):
                if event_id == alert.id:
                    results.append(deliver_event(events, event_id, claim, clinics=clinics,
                                                 renderer=renderer, settings=settings, env={}))
    finally:
        sink.stop()
    reason = "cannot render the clinic's alert (TemplateNotFound)"
    assert results == [f"retrying: {reason}", f"given up: {reason}"]
    assert alert.id in events.dead() and alert.id not in [e.id for e in events.pending()]
    assert redis_client.hget(events.event_key(alert.id), "last_error") == reason
    assert sink.snapshot() == []


def _alerts_received(redis_client, catalog, booking, prefix, tmp_path) -> list:
    """Store `booking` at the Spanish-speaking glow clinic as of NOW, deliver the clinic's
    alert emails it emits through the pump to a real SMTP server, and return the mails."""
    sink = SmtpSink().start()
    try:
        clinic = catalog.clinics["glow"].model_copy(update={"channels": {
            "email": f"mailto://127.0.0.1:{sink.port}?from=noreply@glow.example&to={{to}}"
                     "&mode=insecure",
            "sms": "json://127.0.0.1:9/sms?:to={to}"}})
        clinics = {"glow": clinic}
        store = Store(redis_client, prefix, retention_days=3650, hooks=hooks_for(clinics))
        store.upsert(booking, plan(booking, catalog.protocols["microneedling"],
                                   catalog.clinics["glow"], NOW), NOW)
        events = Events(redis_client, prefix)
        settings = Settings(templates_dir=ROOT / "templates", data_dir=tmp_path,
                            _env_file=None)
        results: list[str] = []
        pump_events(events, lambda i, c: results.append(deliver_event(
            events, i, c, clinics=clinics, renderer=Renderer(ROOT / "templates"),
            settings=settings, env={})), batch=10, lease_seconds=30)
        assert results and set(results) == {"delivered"}
    finally:
        sink.stop()
    return sink.snapshot()


def test_a_spanish_clinics_held_alert_says_why_in_spanish(redis_client, catalog, booking_doc,
                                                         tmp_path):
    """glow's locale is es: its alert is the es template, and so is the reason it gives. Before:
    "Motivo: isotretinoin last taken 2026-10-01, 65 days before the appointment; the washout
    for microneedling is 182 days: the clinic must review" (the planner's English)."""
    booking = parse_booking(dict(booking_doc, medications=HELD_MEDS), catalog)
    (mail,) = _alerts_received(redis_client, catalog, booking, "esheld", tmp_path)
    assert mail.to == "hola@glow.example"
    assert mail.subject == "La cita A-1042 está retenida para su revisión"
    why = next(line for line in mail.text.splitlines() if line.startswith("Motivo: "))
    # The facts, as DOMAIN.md's gate states them: the last dose, the gap, the washout.
    assert "isotretinoína" in why and "1 de octubre de 2026" in why, why
    assert "65 días" in why and "182 días" in why, why
    assert [w for w in ("last taken", "washout", "days", "appointment", "the clinic")
            if w in why] == [], why


def test_a_spanish_clinics_late_pause_alert_says_why_in_spanish(redis_client, catalog,
                                                                booking_doc, tmp_path):
    """Booked 3 days before the visit: the pause message goes then, short of
    the 5-day minimum pause (seeds/001): the clinic is told why, in its own language."""
    doc = dict(booking_doc, starts_at="2026-11-24T14:30:00+01:00")
    booking = parse_booking(doc, catalog)
    (mail,) = _alerts_received(redis_client, catalog, booking, "eslate", tmp_path)
    assert mail.subject.startswith("Cita A-1042: sin tiempo para la pausa completa")
    why = next(line for line in mail.text.splitlines() if line.startswith("Motivo: "))
    assert "5 días" in why, why
    assert [w for w in ("message", "days", "appointment", "the patient") if w in why] == [], why


def test_a_spanish_clinics_alerts_address_it_the_same_way(catalog, tmp_path):
    """The held and late-pause alerts address the clinic as usted ("libérela desde su
    software de citas", "Espere su llamada"); the call-request alert switched to tú ("Llama
    al paciente", "Por favor, llámale", "hasta que la cambies ... desde tu programa de
    reservas") and called the booking a "reserva" where the others say "cita"."""
    from worker.webhooks import Event, render_alert

    renderer = Renderer(ROOT / "templates")
    clinic = catalog.clinics["glow"]  # locale es
    fields = {"booking_id": "A-1042", "treatment": "microneedling", "starts_at": 1764941400,
              "reason": "whatever"}
    texts = {name: render_alert(clinic, Event("1", "glow", "alert", f"booking.{name}",
                                              dict(fields), 0), renderer)
             for name in ("held", "late_pause")}
    texts["replied"] = render_alert(clinic, Event("1", "glow", "alert", "patient.replied",
                                                  dict(fields), 0), renderer)
    informal = ("Llama al", "llámale", "cambies", "canceles", " tu ", "reserva")
    found = {name: [w for w in informal if w in f"{m.subject}\n{m.text}"]
             for name, m in texts.items()}
    assert found == {"held": [], "late_pause": [], "replied": []}
    assert texts["replied"].subject == "Llame al paciente de la cita A-1042"
