"""`reminders check` asks for every alert the clinic itself is emailed (worker/webhooks.py
`render_alert`: templates/<locale>/clinic/<name>.email.*.j2): the held booking, the late
pause, and a patient's reply asking for a call (`patient.replied`, reply "reschedule")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, EXIT_OK, check_copy, copy  # noqa: F401  (fixture)


@pytest.mark.parametrize(("name", "what"), [
    ("held", "held-booking alert"),
    ("late_pause", "late-pause alert"),
    ("replied", "patient-reply alert"),
])
@pytest.mark.parametrize("part", ["subject", "txt"])
def test_a_missing_clinic_alert_template_is_an_error(copy: Path, name: str, what: str,  # noqa: F811
                                                     part: str) -> None:
    missing = copy / "templates" / "es" / "clinic" / f"{name}.email.{part}.j2"
    missing.unlink()
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, (result.stdout, result.stderr)
    assert f"{missing}: missing (needed by clinic glow's {what})" in result.stderr


def test_a_clinic_without_an_address_needs_no_alert_template(copy: Path) -> None:  # noqa: F811
    (copy / "templates" / "es" / "clinic" / "replied.email.txt.j2").unlink()
    for clinic in (copy / "config" / "clinics").glob("*.toml"):
        text = clinic.read_text(encoding="utf-8")
        clinic.write_text("\n".join(line for line in text.splitlines()
                                    if not line.startswith("email =")) + "\n",
                          encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, (result.stdout, result.stderr)
