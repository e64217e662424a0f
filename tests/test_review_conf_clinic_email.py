"""Review (revconf): a clinic's `email` (where held-booking and late-pause alerts go: the
isotretinoin review) was not checked at all: "hola at glow" passed `reminders check` and
the worker started; every alert then failed at send time and was given up after its
attempts, and the clinic never heard of the held booking. Refused now, naming the file
and the field; a test domain (`desk@e2e.test`) stays usable."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, EXIT_OK, check_copy, copy  # noqa: F401


@pytest.mark.parametrize(("email", "ok"), [("hola at glow", False), ("hola@", False),
                                           ("hola@glow.example", True),
                                           ("desk@e2e.test", True)])
def test_a_clinic_email_that_is_not_an_address_is_refused(copy: Path, email: str,  # noqa: F811
                                                          ok: bool) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    text = clinic.read_text(encoding="utf-8")
    assert '\nemail = "hola@glow.example"\n' in text
    clinic.write_text(text.replace('\nemail = "hola@glow.example"\n', f'\nemail = "{email}"\n'),
                      encoding="utf-8")
    result = check_copy(copy)
    if ok:
        assert result.returncode == EXIT_OK, result.stdout + result.stderr
    else:
        assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
        assert f"configuration error: {clinic}: email: " in result.stderr, result.stderr
