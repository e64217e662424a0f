"""Review (protocols): what a clinic's own protocol and clinic files may say, run through
`reminders check` as a process on a scratch copy of config/ and templates/, and where a
file's effect is on what is sent, through the real planner.

Each case is a file `reminders check` used to accept although the worker cannot honour it:
the clinic must get an error naming the file, the step and the field instead."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, check_copy, copy  # noqa: F401
from worker.clinics import load_clinic
from worker.models import Booking
from worker.planner import plan
from worker.protocols import load_protocol


def edit(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there, once) by `new` in the file at `path`."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new), encoding="utf-8")


# --- an isotretinoin washout of 0 days ----------------------------------------------------


@pytest.mark.parametrize(("file", "old", "new"), [
    ("protocols/microneedling.toml", "isotretinoin_washout_days = 182",
     "isotretinoin_washout_days = 0"),
    ("clinics/glow.toml", 'timezone = "Europe/Madrid"',
     'timezone = "Europe/Madrid"\nisotretinoin_washout_days = 0'),
])
def test_an_isotretinoin_washout_of_0_days_is_refused(copy: Path, file: str, old: str,  # noqa: F811
                                                      new: str) -> None:
    """A washout of 0 days holds no booking ever (the planner holds a dose fewer than the
    washout's days before the visit; a dose after today is refused): a patient who took
    isotretinoin yesterday is microneedled with no review, while the confirmation and prep
    emails still ask about "the last 6 months" (a clinic's 0 leaves the protocol's months
    in the words). A gate that is not wanted is left out of the protocol; 0 is refused."""
    path = copy / "config" / file
    edit(path, old, new)
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {path}: isotretinoin_washout_days: " in result.stderr, (
        result.stderr)
    assert "Traceback" not in result.stderr


# --- a step that can never be sent ----------------------------------------------------------


def _booking(treatment: str, starts_at: str) -> Booking:
    return Booking.model_validate({
        "clinic": "glow", "booking_id": "R-1", "treatment": treatment, "starts_at": starts_at,
        "patient": {"name": "Ana López", "email": "ana@example.com", "phone": "+34600111222",
                    "timezone": "Europe/Madrid", "locale": "es", "channels": ["sms", "email"]},
        "medications": {"tretinoin": True, "retinol": False},
    })


def test_a_late_until_before_the_steps_own_time_is_refused(copy: Path) -> None:  # noqa: F811
    """`late_until = "1h"` on the aftercare step due 3 h after the start: the step may be
    sent only until an hour after the start, two hours before its own time, so the
    planner skips it for every booking ("outside the send window ... until after it
    expires") and the patient never gets the care-critical aftercare email. `reminders
    check` accepted it."""
    path = copy / "config" / "protocols" / "microneedling.toml"
    edit(path, 'offset = "3h"', 'offset = "3h"\nlate = "send"\nlate_until = "1h"')
    # What the worker does with it: the real planner, a booking a month ahead.
    protocol = load_protocol(path)
    clinic = load_clinic(copy / "config" / "clinics" / "glow.toml")
    planned = plan(_booking("microneedling", "2026-12-05T14:30:00+01:00"), protocol, clinic,
                   datetime(2026, 11, 5, 10, 0, tzinfo=UTC))
    aftercare = [r for r in planned.reminders if r.step == "aftercare"]
    assert aftercare and all(r.status == "skipped" for r in aftercare), aftercare

    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {path}: steps.4.late_until: step 'aftercare' is never "
            "sent:") in result.stderr, result.stderr


def test_a_step_outside_a_clinics_send_window_until_it_expires_is_refused(
        copy: Path) -> None:  # noqa: F811
    """A clinic narrowing its send window to 09:00-18:00 while tretinoin-start's
    application nights are due at 19:30 (a weekday series: each night's text is about that
    night and expires at its midnight): the window next opens the day after, so every night
    text is skipped and the patient starting tretinoin gets none of them. `reminders check`
    accepted it; it names the clinic's window and the step's time."""
    clinic_path = copy / "config" / "clinics" / "glow.toml"
    edit(clinic_path, 'end = "20:00"', 'end = "18:00"')
    protocol = load_protocol(copy / "config" / "protocols" / "tretinoin-start.toml")
    planned = plan(_booking("tretinoin-start", "2026-12-07T11:00:00+01:00"), protocol,
                   load_clinic(clinic_path), datetime(2026, 11, 5, 10, 0, tzinfo=UTC))
    nights = [r for r in planned.reminders if r.step == "application-night"]
    assert nights and all(r.status == "skipped" for r in nights), nights

    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    protocol_path = copy / "config" / "protocols" / "tretinoin-start.toml"
    assert (f"configuration error: {protocol_path}: steps.1.time: step 'application-night' is "
            "never sent at clinic glow (send_window 09:00-18:00):") in result.stderr, (
                result.stderr)


# --- a pause with nothing that ends it ------------------------------------------------------


def _without(text: str, step: str) -> str:
    """The protocol text without the `[[steps]]` block of `step`."""
    blocks = text.split("[[steps]]")
    kept = [b for b in blocks if f'\nid = "{step}"\n' not in b]
    assert len(kept) == len(blocks) - 1, step
    return "[[steps]]".join(kept)


def _step_block(text: str, step: str) -> tuple[int, str]:
    blocks = text.split("[[steps]]")
    found = [(n, b) for n, b in enumerate(blocks) if f'\nid = "{step}"\n' in b]
    assert len(found) == 1, step
    return found[0]


def test_a_pause_step_without_a_step_that_ends_it_is_refused(copy: Path) -> None:  # noqa: F811
    """stop-retinoids tells a tretinoin patient to stop it "until we say so" (pause = true);
    a clinic's protocol without the resume-retinoids step is accepted, and the patient is
    never told they may restart. `reminders check` names the pause step and the field."""
    path = copy / "config" / "protocols" / "microneedling.toml"
    path.write_text(_without(path.read_text(encoding="utf-8"), "resume-retinoids"),
                    encoding="utf-8")
    planned = plan(_booking("microneedling", "2026-12-05T14:30:00+01:00"),
                   load_protocol(path), load_clinic(copy / "config" / "clinics" / "glow.toml"),
                   datetime(2026, 11, 5, 10, 0, tzinfo=UTC))
    steps = {r.step for r in planned.reminders}
    assert "stop-retinoids" in steps and not any("resume" in s for s in steps), steps

    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {path}: steps.1.pause: step 'stop-retinoids' tells the "
            "patient to stop a product until told they may resume, and no step tells "
            "them:") in result.stderr, result.stderr


def test_a_resume_step_the_sms_cap_may_drop_is_refused(copy: Path) -> None:  # noqa: F811
    """The step that ends the pause without `care_critical = true`: the clinic's SMS cap
    may drop its SMS (moved past its expiry, skipped) for a patient who takes SMS only, and
    the paused patient never hears. `reminders check` names its care_critical."""
    path = copy / "config" / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    n, block = _step_block(text, "resume-retinoids")
    assert block.count("\ncare_critical = true\n") == 1
    path.write_text(text.replace(block, block.replace("\ncare_critical = true\n", "\n")),
                    encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {path}: steps.{n - 1}.care_critical: step "
            "'resume-retinoids' ends the pause of step 'stop-retinoids'") in result.stderr, (
                result.stderr)


# --- a step's clock time the planner cannot keep --------------------------------------------


@pytest.mark.parametrize(("written", "problem"), [
    ('"18:00+02:00"', "a UTC offset"),
    ('"18:00Z"', "a UTC offset"),
    ('"18:00:30"', "seconds"),
    ("18:00:30", "seconds"),  # a TOML local time
])
def test_a_step_time_with_an_offset_or_seconds_is_refused(copy: Path, written: str,  # noqa: F811
                                                          problem: str) -> None:
    """A step's `time` is patient-local and whole minutes (the planner reads its hour and
    minute only). `time = "18:00+02:00"` loaded, and the step went at 18:00 in each
    patient's own zone, not at 18:00 UTC+2 as written (16:00 UTC); `"18:00:30"` went at
    18:00. Each is now refused, naming the step and the field."""
    path = copy / "config" / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('time = "18:00"', f"time = {written}", 1), encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {path}: steps.1.time: " in result.stderr, result.stderr
    assert problem in result.stderr and "in step 'stop-retinoids'" in result.stderr, (
        result.stderr)


@pytest.mark.parametrize(("step", "old", "new", "field", "problem"), [
    # The pause message ("stop tretinoin from tonight until we say so") after the visit.
    ("stop-retinoids", "day = -7", "day = 2", "steps.1.pause",
     "step 'stop-retinoids' pauses a product but is due after the visit"),
    # "You may restart tretinoin tonight" before the visit it was paused for.
    ("resume-retinoids", "day = 3\n", "day = -2\n", "steps.7.resume",
     "step 'resume-retinoids' tells the patient they may resume the paused product but is "
     "due before the visit"),
])
def test_a_pause_after_the_visit_or_a_resume_before_it_is_refused(
        copy: Path, step: str, old: str, new: str, field: str,  # noqa: F811
        problem: str) -> None:
    path = copy / "config" / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    _, block = _step_block(text, step)
    assert block.count(old) == 1
    path.write_text(text.replace(block, block.replace(old, new)), encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {path}: {field}: {problem}" in result.stderr, result.stderr


def test_a_step_never_sent_for_morning_appointments_is_refused(copy: Path) -> None:  # noqa: F811
    """`late_until = "1d"` on the day-after 09:00 SPF text: for a visit at 12:30 it may go
    until 12:30 the next day and does; for a visit at 08:00 it may go only until 08:00 the
    next day, before its own 09:00, so every morning patient's SPF text is skipped.
    `reminders check` planned one sample visit at 12:30 only and accepted it; it now names
    the step, the field and the appointment time it fails for."""
    path = copy / "config" / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    _, block = _step_block(text, "spf")
    path.write_text(text.replace(block, block.replace(
        'template = "spf-morning"\n', 'template = "spf-morning"\nlate = "send"\n'
        'late_until = "1d"\n')), encoding="utf-8")
    clinic = load_clinic(copy / "config" / "clinics" / "glow.toml")
    booked = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
    for starts_at, status in (("2026-12-05T12:30:00+01:00", "scheduled"),
                              ("2026-12-05T08:00:00+01:00", "skipped")):
        planned = plan(_booking("microneedling", starts_at), load_protocol(path), clinic, booked)
        assert [r.status for r in planned.reminders if r.step == "spf"] == [status], starts_at

    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {path}: steps.5.late_until: step 'spf' is never sent "
            "for an appointment at 08:00:") in result.stderr, result.stderr
